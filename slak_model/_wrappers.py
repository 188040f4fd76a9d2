"""The module inside the wrappers a training loop adds, so parameter names carry no wrapper prefix."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) wrappers, in either order.

    Only those two wrapper types are looked through: a user's own module that happens to have an attribute
    called ``module`` is returned as it is (timm's ``unwrap_model`` would descend into it).
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model
