"""The registered variants (timm ``@register_model``) and :func:`create_model`.

Each variant is a few lines over :class:`~slak_model.config.SLaKConfig`, as timm's ConvNeXt does, with
a tiny ``slak_test`` beside the real ones so every API test runs on CPU in milliseconds. Variant
defaults are the paper's SLaK settings (decomposed, 51-49-47-13 with N = 5, width 1.3): one set of
keyword overrides turns them into any row of the paper's tables, e.g. ``kernel_mode="naive",
kernel_size=[7, 7, 7, 7, 100], width_factor=1.0`` is the ConvNeXt-T baseline.

The released checkpoints have no public URL timm could fetch; load them with
:func:`slak_model.load_official_checkpoint`, or through timm with
``pretrained=True, pretrained_cfg_overlay={"file": path}`` (the filter maps the reference names).
"""

from __future__ import annotations

from difflib import get_close_matches
from typing import TYPE_CHECKING, Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .config import SLaKConfig

if TYPE_CHECKING:
    from .model import SLaK

# The model stack (``.model``, ``.checkpoint``) is imported inside the functions below: this module is
# what registers the variants when timm is first imported (``slak_model._timm_hook``), and that import may
# happen from inside ``slak_model.layers`` or ``slak_model.model`` while they are still half loaded.

__all__ = ["VARIANTS", "create_model", "variant_config"]

_SLAK_KERNELS: dict[str, Any] = {
    "kernel_mode": "decomposed",
    "stage_kernels": (51, 49, 47, 13),
    "short_edge": 5,
    "small_kernel": 5,
}

#: Variant name -> the :class:`SLaKConfig` fields it fixes (everything else is a default or override).
VARIANTS: dict[str, dict[str, Any]] = {
    "slak_tiny": {"depths": (3, 3, 9, 3), "dims": (96, 192, 384, 768), "width_factor": 1.3, **_SLAK_KERNELS},
    "slak_small": {
        "depths": (3, 3, 27, 3),
        "dims": (96, 192, 384, 768),
        "width_factor": 1.3,
        **_SLAK_KERNELS,
    },
    "slak_base": {
        "depths": (3, 3, 27, 3),
        "dims": (128, 256, 512, 1024),
        "width_factor": 1.3,
        **_SLAK_KERNELS,
    },
    # Tiny CPU variant: same code paths (strips, small kernel, BN, layer scale), milliseconds per forward.
    "slak_test": {
        "depths": (1, 1, 2, 1),
        "dims": (8, 16, 24, 32),
        "width_factor": 1.0,
        "kernel_mode": "decomposed",
        "stage_kernels": (13, 11, 9, 7),
        "short_edge": 3,
        "small_kernel": 3,
        "num_classes": 10,
    },
}


#: Fields where ``None`` is a real value; for every other field an override of ``None`` means "the
#: variant's own value", so configs and Tune points can leave a setting unset without special-casing.
_NONE_IS_A_VALUE = frozenset({"small_kernel"})


def variant_config(name: str, **overrides: Any) -> SLaKConfig:
    """The :class:`SLaKConfig` of variant ``name`` with ``overrides`` applied (validated, no tensors).

    An override of ``None`` keeps the variant's value (``width_factor=None`` -> 1.3 for ``slak_tiny``),
    except ``small_kernel=None``, which removes the small branch.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None or k in _NONE_IS_A_VALUE}
    if name not in VARIANTS:
        close = get_close_matches(name, VARIANTS, 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"model name {name!r} is not a SLaK variant{hint}; valid names: {sorted(VARIANTS)}")
    return SLaKConfig().replace(**{**VARIANTS[name], **overrides})


def create_model(name: str, **overrides: Any) -> SLaK:
    """Build variant ``name`` with config-field ``overrides`` (``width_factor=1.5``, ``kernel_size=[...]``).

    The config is validated before any tensor is allocated. Construct under ``torch.device("meta")``
    to count parameters of large variants without allocating them.
    """
    from .model import SLaK

    return SLaK(variant_config(name, **overrides))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "slak_tiny": _cfg(),
        "slak_small": _cfg(),
        "slak_base": _cfg(),
        "slak_test": _cfg(num_classes=10, input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> SLaK:
    from .checkpoint import checkpoint_filter_fn
    from .model import SLaK

    # Validate the architecture first (ValueError before any tensor); timm then adds its own defaults
    # (num_classes, in_chans from the pretrained cfg, only when absent) and handles features_only.
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in _NONE_IS_A_VALUE | _TIMM_KWARGS}
    overrides = {k: v for k, v in kwargs.items() if k not in _TIMM_KWARGS}
    variant_config(variant, **overrides)
    return build_model_with_cfg(
        SLaK,
        variant,
        pretrained,
        model_cfg=SLaKConfig().replace(**VARIANTS[variant]),
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": (0, 1, 2, 3), "flatten_sequential": True},
        **kwargs,
    )


_TIMM_KWARGS = frozenset(
    {
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "features_only",
        "out_indices",
        "feature_cfg",
        "feature_cls",
        "cache_dir",
        "output_stride",
    }
)


@register_model
def slak_tiny(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """SLaK-T: depths 3-3-9-3, widths 124-249-499-998, kernels 51x5/49x5/47x5/13x5 + 5x5 (50.7M dense)."""
    return _create("slak_tiny", pretrained, **kwargs)


@register_model
def slak_small(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """SLaK-S: depths 3-3-27-3, widths 124-249-499-998 (91.1M dense)."""
    return _create("slak_small", pretrained, **kwargs)


@register_model
def slak_base(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """SLaK-B: depths 3-3-27-3, widths 166-332-665-1331 (158.0M dense)."""
    return _create("slak_base", pretrained, **kwargs)


@register_model
def slak_test(pretrained: bool = False, **kwargs: Any) -> SLaK:
    """Tiny CPU test variant: depths 1-1-2-1, widths 8-16-24-32, kernels 13/11/9/7 with N = 3, 10 classes."""
    return _create("slak_test", pretrained, **kwargs)
