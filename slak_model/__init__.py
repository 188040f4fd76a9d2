"""SLaK model family and dynamic sparsity engine (pure PyTorch + timm; no Ray, no MLflow)."""

from . import _compat

_compat.install()
