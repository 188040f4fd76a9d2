"""The torch backend (the CPU path and every GPU test's reference) against an independent float64 oracle."""

from __future__ import annotations

import pytest
import torch

import kernels
from tests.kernels.oracle import dwconv2d_oracle

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
SHAPES = [  # (N, C, H, W, kh, kw)
    (2, 1, 1, 1, 1, 1),
    (2, 3, 7, 7, 3, 3),
    (1, 3, 14, 15, 5, 51),
    (1, 3, 14, 15, 51, 5),
    (2, 5, 7, 7, 13, 5),
    (1, 2, 9, 12, 31, 31),
    (1, 2, 3, 4, 151, 1),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


@pytest.fixture(autouse=True)
def _torch_backend():
    with kernels.use_backend("auto"):
        yield


@pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}C{s[1]}-{s[2]}x{s[3]}-k{s[4]}x{s[5]}")
def test_forward_and_grads_match_oracle(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    n, c, h, w, kh, kw = shape
    gen = torch.Generator().manual_seed(sum(shape))
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
    errors = {
        "fwd": _rel(out, ref),
        "dgrad": _rel(x.grad, x64.grad),
        "wgrad": _rel(wt.grad, w64.grad),
        "bias": _rel(b.grad, b64.grad),
    }
    assert all(e <= TOL[dtype] for e in errors.values()), errors


def test_channels_last_and_strided_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 9, 20, generator=gen)
    wt = torch.randn(4, 1, 5, 7, generator=gen)
    ref = dwconv2d_oracle(x, wt)
    assert _rel(kernels.dwconv2d(x.to(memory_format=torch.channels_last), wt), ref) <= 1e-6
    strided = torch.cat([x, x], dim=3)[..., ::2]
    assert not strided.is_contiguous()
    assert _rel(kernels.dwconv2d(strided, wt), dwconv2d_oracle(strided, wt)) <= 1e-6


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


def test_autocast_casts_like_conv2d() -> None:
    x = torch.randn(1, 2, 6, 6)
    wt = torch.randn(2, 1, 3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.dwconv2d(x, wt)
    assert out.dtype == torch.bfloat16
    assert _rel(out, dwconv2d_oracle(x.bfloat16(), wt.bfloat16())) <= 1e-2
