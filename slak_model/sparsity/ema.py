"""Mask-aware model EMA (reference semantics, spec section 3.12) on top of timm's ``ModelEmaV3``.

For every masked weight: entries at inactive positions are 0 in the EMA, entries that just
became active (active in the mask, exactly 0 in the EMA) copy the live weight, and the others
follow the ordinary EMA. Everything else in the state dict (dense layers, norms, BN buffers)
gets timm's plain EMA. Reusing ``ModelEmaV3`` keeps its fused updates, warm-up and bf16
stochastic rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

__all__ = ["MaskedModelEma"]


class MaskedModelEma(ModelEmaV3):
    """``ModelEmaV3`` whose ``update`` also takes the sparsity masks.

    Build it from the unwrapped model (no DDP ``module.`` prefix) and pass ``engine.masks``
    at every update.
    """

    @torch.no_grad()
    def update(  # type: ignore[override]
        self,
        model: nn.Module,
        masks: Mapping[str, torch.Tensor] | None = None,
        step: int | None = None,
    ) -> None:
        """One EMA step.

        Args:
            model: The live (unwrapped) model.
            masks: Name -> bool mask of the masked weights (``DynamicSparsity.masks``); None
                behaves like ``ModelEmaV3.update``.
            step: Optimizer step, for timm's decay warm-up.
        """
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        if not masks:
            super().update(model, step)
            return
        ema_params = dict(self.module.named_parameters())
        unknown = [n for n in masks if n not in ema_params]
        if unknown:
            raise ValueError(f"masks name {unknown[:3]} that are not parameters of the EMA model; "
                             "build the EMA from the unwrapped model")
        on_ema = {n: m.to(ema_params[n].device, torch.bool) for n, m in masks.items()}
        newborn = {n: m & (ema_params[n] == 0) for n, m in on_ema.items()}
        super().update(model, step)
        live = dict(model.named_parameters())
        for name, mask in on_ema.items():
            ema = ema_params[name]
            ema.mul_(mask)
            ema.copy_(torch.where(newborn[name], live[name].detach().to(ema.device, ema.dtype), ema))
