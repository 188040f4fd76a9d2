"""Depthwise large-kernel convolution with one dispatcher over CUDA, numba.cuda and PyTorch backends."""

from .dispatch import active_backend, backend_report, dwconv2d

__all__ = ["dwconv2d", "active_backend", "backend_report"]
