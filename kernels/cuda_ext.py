"""The ``cuda`` backend: our CUDA extension behind ``torch.library`` custom ops.

Three ops (forward, input gradient, weight gradient) with fake kernels and autograd, so the op composes
with ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck``. The input gradient of a 'same'
correlation with an odd kernel is the forward of the flipped kernel, so it reuses the forward kernel.
Outputs are always NCHW-contiguous: the kernels read NCHW, and channels_last or strided inputs are
made contiguous first (one copy, never a wrong answer).
"""

from __future__ import annotations

import torch

from . import _build

__all__ = ["dwconv2d", "available", "plan"]


def _module():
    module = _build.load(build=True)
    if module is None:
        _, reason = _build.status()
        raise RuntimeError(f"slak CUDA dwconv extension unavailable: {reason}")
    return module


def available() -> tuple[bool, str]:
    """Build (if needed) and report ``(ok, reason)``."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    _build.load(build=True)
    ok, reason = _build.status()
    return bool(ok), reason


def plan(n: int, c: int, h: int, w: int, kh: int, kw: int, wgrad: bool = False) -> dict[str, int]:
    """Launch geometry the extension would use (for notes and tests)."""
    keys = ("status", "transposed", "R", "TH", "TW", "P", "threads", "smem", "tiles_y", "tiles_x", "n_chunks")
    return dict(zip(keys, _module().plan(n, c, h, w, kh, kw, wgrad)))


@torch.library.custom_op("slak::dwconv2d", mutates_args=())
def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _module().forward(x.contiguous(), weight, bias)


@_forward.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("slak::dwconv2d_grad_input", mutates_args=())
def _grad_input(grad_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _module().forward(grad_output.contiguous(), weight, None, True)


@_grad_input.register_fake
def _(grad_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(grad_output, memory_format=torch.contiguous_format)


@torch.library.custom_op("slak::dwconv2d_grad_weight", mutates_args=())
def _grad_weight(x: torch.Tensor, grad_output: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    return _module().wgrad(x.contiguous(), grad_output.contiguous(), kh, kw)


@_grad_weight.register_fake
def _(x: torch.Tensor, grad_output: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    return x.new_empty((x.shape[1], 1, kh, kw))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202 - torch.library's signature
    x, weight = ctx.saved_tensors
    kh, kw = weight.shape[-2], weight.shape[-1]
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _grad_input(grad, weight)
    if ctx.needs_input_grad[1]:
        grad_w = _grad_weight(x, grad, kh, kw).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = grad.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b


_forward.register_autograd(_backward, setup_context=_setup_context)


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise 'same' conv on the CUDA extension (x, weight, bias on one CUDA device, same dtype)."""
    return _forward(x, weight, bias)
