"""Any network a job trains or distils from, by name: one of our SLaK variants, or a timm model.

Why timm models here: the large-to-small distillation trains ConvNeXt students (timm's ``convnext_tiny``,
``convnext_small``; ``test_convnext`` on CPU) from SLaK teachers, and a teacher may itself be a timm model.
The ``model`` section of the config describes both kinds: a SLaK variant takes every field (they are
:class:`slak_model.SLaKConfig` fields), a timm model the ones timm's constructors share (``drop_path_rate``,
``num_classes``, and ``layer_scale_init`` as ConvNeXt's ``ls_init_value``); the config rejects the rest
before a job starts (``orchestrator.config.ignored``).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from torch import nn

# isort: off
import slak_model  # installs the torchvision guard before the first timm import
import timm
# isort: on

from orchestrator.config.schema import ModelConfig
from orchestrator.config.validation import MODEL_VARIANTS, is_slak_variant

__all__ = ["build_network", "timm_model_problem"]


def timm_model_problem(name: str) -> str | None:
    """None when timm knows ``name``; else a line naming the nearest timm models and our variants."""
    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, [*MODEL_VARIANTS, *timm.list_models()], n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{name!r} is neither a SLaK variant {list(MODEL_VARIANTS)} nor a timm model{hint}"


def build_network(model: ModelConfig, num_classes: int) -> nn.Module:
    """The network ``model`` describes, with ``num_classes`` outputs and freshly initialised weights.

    A SLaK variant gets every ``model.*`` field that is not None (None leaves the variant's own; the
    library would read ``small_kernel=None`` as "no small branch"). A timm model gets ``drop_path_rate``
    and, for ConvNeXt, ``layer_scale_init`` as ``ls_init_value``.

    Raises:
        ValueError: an unknown model name (with the nearest names), or a geometry the variant refuses.
    """
    if is_slak_variant(model.variant):
        overrides: dict[str, Any] = {
            f.name: getattr(model, f.name)
            for f in dataclasses.fields(model)
            if f.name != "variant" and getattr(model, f.name) is not None
        }
        overrides["num_classes"] = num_classes
        return slak_model.create_model(model.variant, **overrides)
    problem = timm_model_problem(model.variant)
    if problem is not None:
        raise ValueError(f"model.variant={problem}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": model.drop_path_rate}
    if model.variant.startswith("convnext_"):  # ConvNeXt V1; V2 has GRN in place of layer scale
        kwargs["ls_init_value"] = model.layer_scale_init
    return timm.create_model(model.variant, pretrained=False, **kwargs)
