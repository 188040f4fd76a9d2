"""Dynamic sparsity for SLaK: SNIP/ERK/uniform init, magnitude prune, random/gradient/momentum regrowth.

Pure PyTorch (plus timm for the EMA helper); no Ray, no MLflow. Typical use::

    from slak_model.sparsity import DynamicSparsity, SparsityConfig

    engine = DynamicSparsity(model, SparsityConfig(sparsity=0.4, init="snip"), total_steps=T)
    engine.initialize(batch=(x, y), loss_fn=torch.nn.functional.cross_entropy)
    ...  # after every optimizer.step():
    engine.on_optimizer_step(optimizer)

Only the settings (:class:`SparsityConfig` and its allowed values) are imported with the package: they
need no torch, so a config can be validated without it. The engine's names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _lazy
from .config import GROWTH_MODES, INIT_MODES, PRUNE_MODES, TARGETS, SparsityConfig

if TYPE_CHECKING:
    from .collective import Collective, LocalCollective, TorchDistributedCollective
    from .density import allocate_counts, erk_densities, snip_densities, uniform_densities
    from .ema import MaskedModelEma
    from .engine import DynamicSparsity, layer_group
    from .grow import grow_, growth_scores, momentum_of
    from .masks import FlatMasks, draw_exact_masks, load_masks, mask_summary, save_masks, select_targets
    from .prune import magnitude_prune_, prune_count
    from .schedule import AdaptationSchedule, cosine_prune_rate
    from .select import SELECT_METHODS, get_select_method, set_select_method, top_k_indices

#: Public name -> the submodule that defines it (imported on first access; these need torch).
_LAZY: dict[str, str] = {
    "Collective": "collective",
    "LocalCollective": "collective",
    "TorchDistributedCollective": "collective",
    "allocate_counts": "density",
    "erk_densities": "density",
    "snip_densities": "density",
    "uniform_densities": "density",
    "MaskedModelEma": "ema",
    "DynamicSparsity": "engine",
    "layer_group": "engine",
    "grow_": "grow",
    "growth_scores": "grow",
    "momentum_of": "grow",
    "FlatMasks": "masks",
    "draw_exact_masks": "masks",
    "load_masks": "masks",
    "mask_summary": "masks",
    "save_masks": "masks",
    "select_targets": "masks",
    "magnitude_prune_": "prune",
    "prune_count": "prune",
    "AdaptationSchedule": "schedule",
    "cosine_prune_rate": "schedule",
    "SELECT_METHODS": "select",
    "get_select_method": "select",
    "set_select_method": "select",
    "top_k_indices": "select",
}

__all__ = [
    "GROWTH_MODES",
    "INIT_MODES",
    "PRUNE_MODES",
    "SELECT_METHODS",
    "TARGETS",
    "AdaptationSchedule",
    "Collective",
    "DynamicSparsity",
    "FlatMasks",
    "LocalCollective",
    "MaskedModelEma",
    "SparsityConfig",
    "TorchDistributedCollective",
    "allocate_counts",
    "cosine_prune_rate",
    "draw_exact_masks",
    "erk_densities",
    "get_select_method",
    "grow_",
    "growth_scores",
    "layer_group",
    "load_masks",
    "magnitude_prune_",
    "mask_summary",
    "momentum_of",
    "prune_count",
    "save_masks",
    "select_targets",
    "set_select_method",
    "snip_densities",
    "top_k_indices",
    "uniform_densities",
]


__getattr__, __dir__ = _lazy.attach(__name__, _LAZY)
