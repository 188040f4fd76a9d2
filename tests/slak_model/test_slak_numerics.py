"""Our forward equals a straightforward re-implementation of the reference's math on its own key names.

The oracle below reads the reference-named state dict directly (``downsample_layers``, ``LoRA1``...)
and spells out every step the reference performs: channels-first LayerNorm by mean / biased variance,
depthwise convs with per-dimension padding (kh//2, kw//2), eval-mode BatchNorm, channels-last
LayerNorm, Linear-GELU-Linear, layer scale, residual, mean pool, LayerNorm, head. Nothing from
``slak_model`` is used on the oracle side, so a transposed kernel, a wrong padding or a mis-mapped
key fails here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slak_model import create_model, load_official_checkpoint
from tests.numerics import assert_rel_close, rel_tol

pytestmark = pytest.mark.numeric


def _model_tol(arch: dict) -> float:
    """fp32 bound for the whole network: one stage per block, downsample and the head; the longest sum is
    the MLP's second linear (4 x the last width) or a square kernel's taps, whichever is longer."""
    layers = sum(arch["depths"]) + len(arch["depths"]) + 1
    reduction = max(4 * arch["widths"][-1], max(arch["kernel_size"][:4]) ** 2)
    return rel_tol(torch.float32, reduction, layers=layers)


def _ln_channels_first(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return w[:, None, None] * x + b[:, None, None]


def _branch(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    w = sd[prefix + ".conv.weight"]
    kh, kw = w.shape[2], w.shape[3]
    y = F.conv2d(x, w, None, stride=1, padding=(kh // 2, kw // 2), groups=x.shape[1])
    if prefix + ".bn.weight" in sd:
        mean, var = sd[prefix + ".bn.running_mean"], sd[prefix + ".bn.running_var"]
        gamma, beta = sd[prefix + ".bn.weight"], sd[prefix + ".bn.bias"]
        y = (y - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * gamma[:, None, None] + beta[
            :, None, None
        ]
    return y


def reference_forward(sd: dict, x: torch.Tensor, depths: tuple[int, ...]) -> torch.Tensor:
    """The reference network's eval-mode forward, written out from its state dict."""
    for i, depth in enumerate(depths):
        p = f"downsample_layers.{i}"
        if i == 0:
            x = F.conv2d(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"], stride=4)
            x = _ln_channels_first(x, sd[f"{p}.1.weight"], sd[f"{p}.1.bias"])
        else:
            x = _ln_channels_first(x, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"])
            x = F.conv2d(x, sd[f"{p}.1.weight"], sd[f"{p}.1.bias"], stride=2)
        for b in range(depth):
            q = f"stages.{i}.{b}."
            branches = [
                n
                for n in ("LoRA1", "LoRA2", "lkb_origin", "small_conv")
                if f"{q}large_kernel.{n}.conv.weight" in sd
            ]
            y = sum(_branch(x, sd, f"{q}large_kernel.{n}") for n in branches)
            y = y.permute(0, 2, 3, 1)
            y = F.layer_norm(y, (y.shape[-1],), sd[q + "norm.weight"], sd[q + "norm.bias"], eps=1e-6)
            y = F.linear(y, sd[q + "pwconv1.weight"], sd[q + "pwconv1.bias"])
            y = 0.5 * y * (1.0 + torch.erf(y / 2.0**0.5))
            y = F.linear(y, sd[q + "pwconv2.weight"], sd[q + "pwconv2.bias"])
            if q + "gamma" in sd:
                y = sd[q + "gamma"] * y
            x = x + y.permute(0, 3, 1, 2)
    x = x.mean(dim=(-2, -1))
    x = F.layer_norm(x, (x.shape[-1],), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def _sparsify(sd: dict, seed: int) -> dict:
    """Zero about 40 % of every 2-D/4-D weight, as a released sparse checkpoint stores them."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v * (torch.rand(v.shape, generator=g) >= 0.4) if v.dim() in (2, 4) else v for k, v in sd.items()
    }


@pytest.mark.parametrize(
    "overrides,ref_change",
    [
        ({}, {}),
        ({"kernel_mode": "replknet"}, {"decom": False}),
        ({"use_bn": False}, {"bn": False}),
        ({"kernel_size": [5, 5, 5, 3, 3]}, {"kernel_size": (5, 5, 5, 3, 3)}),
    ],
    ids=["slak", "replknet", "no-bn", "strips-equal-N"],
)
@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 96, 64)], ids=["2x64x64", "1x96x64"])
def test_forward_equals_the_reference_math(
    overrides, ref_change, shape, reference_state_dict, test_arch, numeric_seed
) -> None:
    sd = _sparsify(reference_state_dict(seed=numeric_seed + 11, **{**test_arch, **ref_change}), seed=numeric_seed)
    model = load_official_checkpoint(create_model("slak_test", **overrides), {"model": sd}).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(numeric_seed + 13))
    with torch.no_grad():
        ours = model(x)
        oracle = reference_forward(sd, x, test_arch["depths"])
    assert oracle.abs().max() > 0.1, "degenerate oracle output"
    assert_rel_close(ours, oracle, _model_tol({**test_arch, **ref_change}))


def test_merged_model_also_equals_the_reference_math(reference_state_dict, test_arch, numeric_seed) -> None:
    sd = _sparsify(reference_state_dict(seed=numeric_seed + 21, **test_arch), seed=numeric_seed + 22)
    model = load_official_checkpoint(create_model("slak_test"), sd).eval().merge_for_inference()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(numeric_seed + 23))
    with torch.no_grad():
        assert_rel_close(model(x), reference_forward(sd, x, test_arch["depths"]), _model_tol(test_arch))
