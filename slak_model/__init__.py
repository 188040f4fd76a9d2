"""SLaK model family and dynamic sparsity engine (pure PyTorch + timm; no Ray, no MLflow).

Importing the package registers ``slak_tiny``, ``slak_small``, ``slak_base`` and ``slak_test`` with
timm, so ``timm.create_model("slak_tiny")`` works after ``import slak_model``.

The import itself is cheap: it loads only the typed settings (:class:`SLaKConfig` here,
:class:`slak_model.sparsity.SparsityConfig`), which need neither torch nor timm, so that a launcher can
validate a config in a fraction of a second. The model names below are imported on first use, and the
variants are registered with timm when timm is imported (see :mod:`slak_model._timm_hook`, which also
runs the torchvision guard of :mod:`slak_model._compat` before that import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _lazy, _timm_hook
from .config import KERNEL_MODES, SLaKConfig

_timm_hook.install()

if TYPE_CHECKING:
    from .checkpoint import (
        CheckpointMismatchError,
        checkpoint_filter_fn,
        load_official_checkpoint,
        load_pretrained,
    )
    from .counting import Complexity, StageComplexity, count_complexity
    from .layers import LargeKernelConv
    from .model import SLaK
    from .variants import VARIANTS, create_model, variant_config

#: Public name -> the submodule that defines it (imported on first access; these need torch and timm).
_LAZY: dict[str, str] = {
    "CheckpointMismatchError": "checkpoint",
    "checkpoint_filter_fn": "checkpoint",
    "load_official_checkpoint": "checkpoint",
    "load_pretrained": "checkpoint",
    "Complexity": "counting",
    "StageComplexity": "counting",
    "count_complexity": "counting",
    "LargeKernelConv": "layers",
    "SLaK": "model",
    "VARIANTS": "variants",
    "create_model": "variants",
    "variant_config": "variants",
}

__all__ = [
    "KERNEL_MODES",
    "VARIANTS",
    "CheckpointMismatchError",
    "Complexity",
    "LargeKernelConv",
    "SLaK",
    "SLaKConfig",
    "StageComplexity",
    "checkpoint_filter_fn",
    "count_complexity",
    "create_model",
    "load_official_checkpoint",
    "load_pretrained",
    "variant_config",
]


__getattr__, __dir__ = _lazy.attach(__name__, _LAZY)
