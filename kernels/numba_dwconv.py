"""The ``numba`` backend: the same three kernels written with ``numba.cuda``.

Used on a GPU where the extension cannot be built, and on CPU under ``NUMBA_ENABLE_CUDASIM=1`` (the
simulator) so CI exercises the kernel code without a GPU. It favours clarity over speed: one thread per
output (forward, input gradient) or per weight tap (weight gradient), taps clipped to the image. Half
precision is computed in fp32 (numba has no bfloat16 arrays) and cast back.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import torch

__all__ = ["dwconv2d", "available", "simulator_enabled"]

_THREADS = 128
_kernels: SimpleNamespace | None = None


def simulator_enabled() -> bool:
    """Whether numba's CUDA simulator is on (it must be set before numba is imported)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def available(device: torch.device) -> tuple[bool, str]:
    """``(ok, reason)`` for running the numba kernels on tensors of ``device``."""
    try:
        from numba import cuda
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available", with its reason
        return False, f"numba.cuda cannot be imported ({exc}); pip install numba (and numba-cuda on CUDA 12+)"
    if device.type == "cuda":
        if simulator_enabled():
            return False, "NUMBA_ENABLE_CUDASIM=1 runs numba on the CPU; unset it to use numba on a GPU"
        if not cuda.is_available():
            return False, "numba.cuda sees no GPU (check the driver and the numba-cuda package)"
        return _smoke(device)
    if simulator_enabled():
        return True, "numba CUDA simulator on CPU tensors (NUMBA_ENABLE_CUDASIM=1; slow, for tests)"
    return False, (
        f"tensors are on {device.type}; numba kernels need a CUDA tensor, or NUMBA_ENABLE_CUDASIM=1 set before "
        "numba is imported to simulate them on the CPU"
    )


# The kernel bodies reference the module globals ``cuda`` and ``float32``, bound on first use by
# ``_compile`` (importing numba costs a second, so ``import kernels`` never does it). Globals, not a
# closure: the CUDA simulator swaps the ``cuda`` module in a kernel's globals for its fake one.
cuda = None
float32 = None


def _forward_body(x, w, b, y, has_bias):  # pragma: no cover - compiled by numba
    n_, c_, h_, w_ = x.shape
    kh = w.shape[1]
    kw = w.shape[2]
    idx = cuda.grid(1)
    if idx >= n_ * c_ * h_ * w_:
        return
    ox = idx % w_
    t = idx // w_
    oy = t % h_
    t = t // h_
    c = t % c_
    n = t // c_
    ph = kh // 2
    pw = kw // 2
    acc = float32(0.0)
    for i in range(max(0, ph - oy), min(kh, h_ + ph - oy)):
        for j in range(max(0, pw - ox), min(kw, w_ + pw - ox)):
            acc += x[n, c, oy + i - ph, ox + j - pw] * w[c, i, j]
    if has_bias:
        acc += b[c]
    y[n, c, oy, ox] = acc


def _wgrad_body(x, dy, dw):  # pragma: no cover - compiled by numba
    n_, c_, h_, w_ = x.shape
    kh = dw.shape[1]
    kw = dw.shape[2]
    idx = cuda.grid(1)
    if idx >= c_ * kh * kw:
        return
    j = idx % kw
    t = idx // kw
    i = t % kh
    c = t // kh
    ph = kh // 2
    pw = kw // 2
    acc = float32(0.0)
    for n in range(n_):
        for oy in range(max(0, ph - i), min(h_, h_ + ph - i)):
            for ox in range(max(0, pw - j), min(w_, w_ + pw - j)):
                acc += dy[n, c, oy, ox] * x[n, c, oy + i - ph, ox + j - pw]
    dw[c, i, j] = acc


_smoke_results: dict[str, tuple[bool, str]] = {}


def _smoke(device: torch.device) -> tuple[bool, str]:
    """Compile and run the kernels once on ``device`` so a broken numba install is reported, not picked."""
    key = str(device)
    if key not in _smoke_results:
        try:
            x = torch.arange(12, dtype=torch.float32, device=device).reshape(1, 1, 3, 4)
            w = torch.ones(1, 3, 3, device=device)
            y = _fwd(x, w, None)
            expected = torch.nn.functional.conv2d(x, w[:, None], padding=1)
            if not torch.allclose(y, expected):
                raise RuntimeError("smoke test gave a wrong result")
            _smoke_results[key] = (True, "numba.cuda kernels (one thread per output / per tap)")
        except Exception as exc:  # noqa: BLE001 - report why the numba kernels cannot run here
            _smoke_results[key] = (False, f"numba.cuda kernels fail to compile/run here: {type(exc).__name__}: {exc}")
    return _smoke_results[key]


def _compile() -> SimpleNamespace:
    global _kernels, cuda, float32
    if _kernels is not None:
        return _kernels
    import numba
    import numpy as np

    if not hasattr(np, "row_stack"):
        # numba-cuda 0.2x still registers an overload for np.row_stack, which NumPy 2.4 removed; without
        # this alias its first kernel compile fails with AttributeError (seen with NumPy 2.5 + numba-cuda).
        np.row_stack = np.vstack
    from numba import cuda as numba_cuda

    cuda, float32 = numba_cuda, numba.float32
    _kernels = SimpleNamespace(forward=numba_cuda.jit(_forward_body), wgrad=numba_cuda.jit(_wgrad_body))
    return _kernels


def _launch(kernel, total: int, tensors: list[torch.Tensor], *scalars) -> None:  # noqa: ANN001
    """Run ``kernel`` over ``total`` threads on fp32 tensors, on torch's stream (or the simulator)."""
    blocks = max(1, math.ceil(total / _THREADS))
    if simulator_enabled():
        arrays = [t.numpy() for t in tensors]  # CPU tensors share memory with these arrays
        kernel[blocks, _THREADS](*arrays, *scalars)
        return
    from numba import cuda

    stream = cuda.external_stream(torch.cuda.current_stream(tensors[0].device).cuda_stream)
    arrays = [cuda.as_cuda_array(t) for t in tensors]
    kernel[blocks, _THREADS, stream](*arrays, *scalars)


def _fwd(x: torch.Tensor, w3: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x32 = x.detach().to(torch.float32).contiguous()
    w32 = w3.detach().to(torch.float32).contiguous()
    b32 = (bias.detach() if bias is not None else torch.zeros(1, device=x.device)).to(torch.float32).contiguous()
    y = torch.empty_like(x32)
    if y.numel():
        _launch(_compile().forward, y.numel(), [x32, w32, b32, y], bias is not None)
    return y.to(x.dtype)


def _wgrad(x: torch.Tensor, dy: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    x32 = x.detach().to(torch.float32).contiguous()
    dy32 = dy.detach().to(torch.float32).contiguous()
    dw = torch.zeros((x.shape[1], kh, kw), dtype=torch.float32, device=x.device)
    if x.numel():
        _launch(_compile().wgrad, dw.numel(), [x32, dy32, dw])
    return dw


class _NumbaDwConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: ANN001, ANN205 - autograd.Function signature
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _fwd(x, weight[:, 0], bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205 - autograd.Function signature
        x, weight = ctx.saved_tensors
        kh, kw = weight.shape[-2], weight.shape[-1]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _fwd(grad, weight[:, 0].flip((-2, -1)), None)
        if ctx.needs_input_grad[1]:
            gw = _wgrad(x, grad, kh, kw).unsqueeze(1).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = grad.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        return gx, gw, gb


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise 'same' conv with the numba kernels (autograd included)."""
    return _NumbaDwConv.apply(x, weight, bias)
