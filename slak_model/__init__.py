"""SLaK model family and dynamic sparsity engine (pure PyTorch + timm; no Ray, no MLflow).

Importing the package registers ``slak_tiny``, ``slak_small``, ``slak_base`` and ``slak_test`` with
timm, so ``timm.create_model("slak_tiny")`` works after ``import slak_model``.
"""

from . import _compat

_compat.install()

from .checkpoint import CheckpointMismatchError, checkpoint_filter_fn, load_official_checkpoint  # noqa: E402
from .config import KERNEL_MODES, SLaKConfig  # noqa: E402
from .counting import Complexity, StageComplexity, count_complexity  # noqa: E402
from .layers import LargeKernelConv  # noqa: E402
from .model import SLaK  # noqa: E402
from .variants import VARIANTS, create_model, variant_config  # noqa: E402

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
    "variant_config",
]
