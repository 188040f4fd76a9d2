"""The torch backend (the CPU path and every GPU test's reference) against an independent float64 oracle."""

from __future__ import annotations

import pytest
import torch

import kernels
from tests.kernels.oracle import dwconv2d_errors, dwconv2d_oracle, dwconv2d_term_norms
from tests.numerics import rel_error, rel_tol

pytestmark = pytest.mark.numeric

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
SHAPES = [  # (N, C, H, W, kh, kw)
    (2, 1, 1, 1, 1, 1),
    (2, 3, 7, 7, 3, 3),
    (1, 3, 14, 15, 5, 51),
    (1, 3, 14, 15, 51, 5),
    (2, 5, 7, 7, 13, 5),
    (1, 2, 9, 12, 31, 31),
    (1, 2, 3, 4, 151, 1),
]


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.use_backend("auto"):
        yield


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPES.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}C{s[1]}-{s[2]}x{s[3]}-k{s[4]}x{s[5]}")
def test_forward_and_grads_match_oracle(shape: tuple[int, ...], dtype: torch.dtype, numeric_seed: int) -> None:
    n, c, h, w, kh, kw = shape
    gen = torch.Generator().manual_seed(numeric_seed + sum(shape))
    x = torch.randn(n, c, h, w, generator=gen).to(dtype).requires_grad_()
    wt = torch.randn(c, 1, kh, kw, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(c, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(n, c, h, w, generator=gen).to(dtype)
    out = kernels.dwconv2d(x, wt, b)
    out.backward(dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, wt, b))
    ref = dwconv2d_oracle(x64, w64, b64)
    ref.backward(dy.double())
    assert kernels.active_backend(x.device) == "torch"
    assert out.shape == x.shape and out.dtype == dtype
    checks = dwconv2d_errors(
        dtype, x.shape, wt.shape,
        {"fwd": out, "dgrad": x.grad, "wgrad": wt.grad, "bias": b.grad},
        {"fwd": ref, "dgrad": x64.grad, "wgrad": w64.grad, "bias": b64.grad},
        dwconv2d_term_norms(dwconv2d_oracle, x, wt, b, dy))
    bad = {name: f"{err:.3g} > {tol:.3g}" for name, (err, tol) in checks.items() if not err <= tol}
    assert not bad, bad


def test_channels_last_and_strided_inputs(numeric_seed: int) -> None:
    gen = torch.Generator().manual_seed(numeric_seed)
    x = torch.randn(2, 4, 9, 20, generator=gen)
    wt = torch.randn(4, 1, 5, 7, generator=gen)
    ref = dwconv2d_oracle(x, wt)
    tol = rel_tol(torch.float32, 5 * 7)
    assert rel_error(kernels.dwconv2d(x.to(memory_format=torch.channels_last), wt), ref) <= tol
    strided = torch.cat([x, x], dim=3)[..., ::2]
    assert not strided.is_contiguous()
    assert rel_error(kernels.dwconv2d(strided, wt), dwconv2d_oracle(strided, wt)) <= tol


@pytest.mark.parametrize(
    "x_shape,w_shape,match",
    [
        ((2, 3, 8), (3, 1, 3, 3), "4-D"),
        ((2, 3, 8, 8), (3, 2, 3, 3), r"\(C, 1, kh, kw\)"),
        ((2, 3, 8, 8), (4, 1, 3, 3), "4 channels but x has 3"),
        ((2, 3, 8, 8), (3, 1, 4, 3), "odd"),
    ],
    ids=["x-3d", "weight-not-depthwise", "channel-mismatch", "even-kernel"],
)
def test_bad_arguments_raise_value_error(x_shape, w_shape, match) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        kernels.dwconv2d(torch.randn(x_shape), torch.randn(w_shape))


def test_dtype_mismatch_names_the_fix() -> None:
    with pytest.raises(ValueError, match="cast/move the weight"):
        kernels.dwconv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3, dtype=torch.float64))


def test_autocast_casts_like_conv2d(numeric_seed: int) -> None:
    gen = torch.Generator().manual_seed(numeric_seed)
    x = torch.randn(1, 2, 6, 6, generator=gen)
    wt = torch.randn(2, 1, 3, 5, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.dwconv2d(x, wt)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, dwconv2d_oracle(x.bfloat16(), wt.bfloat16())) <= rel_tol(torch.bfloat16, 3 * 5)
