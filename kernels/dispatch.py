"""Choose the depthwise-conv backend: a priority list (cuda -> numba -> torch) that explains itself.

Each backend reports whether it can run on a device and why not. ``auto`` takes the first that can,
once per process per device; ``SLAK_KERNEL_BACKEND=cuda|numba|torch`` (or :func:`set_backend`) forces one,
and a forced backend that cannot run raises :class:`BackendUnavailableError` with the reason and the fix,
never a silent fallback. CPU tensors under ``auto`` always use ``torch``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import _build, cuda_ext, numba_dwconv
from .reference import check_dwconv_args, dwconv2d_reference

__all__ = [
    "ENV_VAR",
    "BACKENDS",
    "BackendUnavailableError",
    "dwconv2d",
    "active_backend",
    "backend_report",
    "requested_backend",
    "set_backend",
    "shared_input",
    "use_backend",
]

ENV_VAR = "SLAK_KERNEL_BACKEND"
BACKENDS = ("cuda", "numba", "torch")
_VALID = ("auto", *BACKENDS)

_override: str | None = None
_chosen: dict[tuple[str, str], str] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why and how to fix it."""


def _validate(value: str, source: str) -> str:
    value = value.strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError(f"{source}={value!r} is not a backend; choose one of {', '.join(_VALID)}")
    return value


def requested_backend() -> str:
    """The backend asked for: :func:`set_backend`'s value, else ``SLAK_KERNEL_BACKEND``, else ``auto``."""
    if _override is not None:
        return _override
    return _validate(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def set_backend(name: str | None) -> None:
    """Force a backend for this process (``None`` returns to the environment variable)."""
    global _override
    _override = None if name is None else _validate(name, "set_backend(name)")
    _chosen.clear()


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager around :func:`set_backend` (restores the previous choice)."""
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _as_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return _default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _availability(name: str, device: torch.device, build: bool = True) -> tuple[bool | None, str]:
    if name == "torch":
        return True, "pure PyTorch F.conv2d(groups=C), per-dimension padding"
    if name == "numba":
        return numba_dwconv.available(device)
    if device.type != "cuda":
        return False, f"tensors are on {device.type}; the CUDA extension runs on CUDA tensors only"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if build:
        _build.load(build=True)
    return _build.status()


_FIXES = {
    "cuda": "install a CUDA toolkit (nvcc) and ninja matching torch.version.cuda, run on a CUDA tensor, "
    "or set SLAK_KERNEL_BACKEND=auto",
    "numba": "install numba (+ numba-cuda) and run on a CUDA tensor, or set SLAK_KERNEL_BACKEND=auto",
    "torch": "",
}


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL = 151  # the largest kernel side the cuda/numba backends are tested on


def _unsupported(name: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    """Why backend ``name`` cannot take these tensors ('' when it can); torch takes everything."""
    if name == "torch":
        return ""
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} (the {name} kernels take float32, float16, bfloat16)"
    if max(weight.shape[-2:]) > MAX_KERNEL:
        return f"kernel {tuple(weight.shape[-2:])} (the {name} kernels take sides up to {MAX_KERNEL})"
    return ""


def active_backend(device: torch.device | str | None = None) -> str:
    """Name of the backend :func:`dwconv2d` uses on ``device`` (decided once per process per device)."""
    requested = requested_backend()
    dev = _as_device(device)
    key = (requested, str(dev))
    if key in _chosen:
        return _chosen[key]
    if requested == "auto":
        choice = "torch"
        if dev.type == "cuda":
            for name in ("cuda", "numba"):
                if _availability(name, dev)[0]:
                    choice = name
                    break
    else:
        ok, reason = _availability(requested, dev)
        if not ok:
            raise BackendUnavailableError(
                f"{ENV_VAR}={requested} was requested but the {requested} backend cannot run on {dev}: {reason}. "
                f"Fix: {_FIXES[requested]}"
            )
        choice = requested
    _chosen[key] = choice
    return choice


def backend_report(device: torch.device | str | None = None, build: bool = False) -> list[dict[str, object]]:
    """Every backend, whether it can run on ``device`` and why (``available`` is None when not tried yet).

    Args:
        device: Device to ask about; defaults to the current CUDA device, else CPU.
        build: Build the CUDA extension if it has not been tried (``python -m kernels.info`` does).
    """
    dev = _as_device(device)
    requested = requested_backend()
    try:
        active: str | None = active_backend(dev) if (build or requested != "auto" or dev.type != "cuda") else None
        active_error = ""
    except BackendUnavailableError as exc:
        active, active_error = None, str(exc)
    rows: list[dict[str, object]] = []
    for name in BACKENDS:
        ok, reason = _availability(name, dev, build=build)
        rows.append({"backend": name, "available": ok, "active": name == active, "reason": reason})
    if active_error:
        rows.append({"backend": "error", "available": False, "active": False, "reason": active_error})
    return rows


def shared_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` converted once as :func:`dwconv2d` would convert it, for several convs that read the same input.

    Under autocast every call casts its input to the autocast dtype, and the ``cuda``/``numba`` backends
    read NCHW-contiguous tensors, so k parallel branches on one (fp32, channels-last strided) activation
    would cast and copy it k times in the forward pass and copy it again for each weight gradient. After
    this one conversion the calls' own are no-ops. The branches' input gradients then add up in the
    autocast dtype before the single cast back. Without autocast and with a layout the backend reads,
    ``x`` itself is returned.
    """
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    reads_nchw = dtype in _KERNEL_DTYPES and active_backend(x.device) != "torch"
    fmt = torch.contiguous_format if reads_nchw else torch.preserve_format
    return x.to(dtype=dtype, memory_format=fmt)


def _autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):  # noqa: ANN202
    """Mirror F.conv2d under autocast: inputs cast to the autocast dtype (weights stay fp32 master copies)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return x, weight, bias


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise 2-D conv: stride 1, zero padding (kh//2, kw//2), odd kh and kw, output of x's H x W.

    Args:
        x: (N, C, H, W), fp32/bf16/fp16, any memory format.
        weight: (C, 1, kh, kw), the same dtype as ``x`` (autocast casts both).
        bias: Optional (C,).

    Returns:
        (N, C, H, W) in x's dtype (NCHW-contiguous from the cuda/numba backends).
    """
    x, weight, bias = _autocast(x, weight, bias)
    check_dwconv_args(x, weight, bias)
    backend = active_backend(x.device)
    why_not = _unsupported(backend, x, weight)
    if why_not:
        if requested_backend() != "auto":
            raise BackendUnavailableError(
                f"{ENV_VAR}={backend} cannot run this call: {why_not}. Fix: set {ENV_VAR}=auto or torch"
            )
        backend = "torch"  # auto: the first backend in priority order that supports the call
    if backend == "cuda":
        return cuda_ext.dwconv2d(x, weight, bias)
    if backend == "numba":
        return numba_dwconv.dwconv2d(x, weight, bias)
    return dwconv2d_reference(x, weight, bias)
