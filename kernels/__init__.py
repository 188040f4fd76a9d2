"""Depthwise large-kernel convolution with one dispatcher over CUDA, numba.cuda and PyTorch backends.

``import kernels`` builds nothing: the CUDA extension compiles on the first CUDA call (or
``python -m kernels.info``) and is cached under ``SLAK_KERNEL_CACHE``.
"""

from .dispatch import (
    BackendUnavailableError,
    active_backend,
    backend_report,
    dwconv2d,
    requested_backend,
    set_backend,
    shared_input,
    use_backend,
)

__all__ = [
    "dwconv2d",
    "active_backend",
    "backend_report",
    "requested_backend",
    "set_backend",
    "shared_input",
    "use_backend",
    "BackendUnavailableError",
]
