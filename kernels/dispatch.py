"""Backend selection for the depthwise conv (skeleton: torch only; the CUDA/numba backends extend it)."""

from __future__ import annotations

import os

import torch

from .reference import check_dwconv_args, dwconv2d_reference

__all__ = ["dwconv2d", "active_backend", "backend_report", "ENV_VAR"]

ENV_VAR = "SLAK_KERNEL_BACKEND"
_VALID = ("auto", "cuda", "numba", "torch")


def _requested() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend; choose one of {', '.join(_VALID)}")
    return value


def active_backend(device: torch.device | str | None = None) -> str:
    """Name of the backend that :func:`dwconv2d` uses on ``device``."""
    requested = _requested()
    if requested in ("cuda", "numba"):
        raise RuntimeError(f"{ENV_VAR}={requested} requested but that backend is not built in this version")
    return "torch"


def backend_report() -> list[dict]:
    """Every backend with whether it is available and why not."""
    return [
        {"backend": "cuda", "available": False, "reason": "not built in this version"},
        {"backend": "numba", "available": False, "reason": "not built in this version"},
        {"backend": "torch", "available": True, "reason": "pure PyTorch F.conv2d(groups=C)"},
    ]


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise 2-D conv, stride 1, zero 'same' padding (kh//2, kw//2), odd kh and kw."""
    check_dwconv_args(x, weight, bias)
    active_backend(x.device)
    return dwconv2d_reference(x, weight, bias)
