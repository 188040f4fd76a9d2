"""Regrowth rules: switch on exactly ``count`` inactive positions.

Deliberate difference from the reference: its ``random`` growth switches each inactive position
on with probability removed/n0, so a layer's active count performs a random walk; here exactly
``count`` positions are sampled without replacement (top-k of uniform scores), so every layer's
count is invariant across updates. ``gradient`` and ``momentum`` choose the top-``count`` scores
among inactive positions, as in the reference. Positions pruned in the same update are eligible
(also as in the reference); if re-selected they are simply kept.
"""

from __future__ import annotations

import torch

from .select import top_k_indices

__all__ = ["growth_scores", "grow_", "momentum_of"]


def momentum_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """The momentum signal of ``param``: Adam's exp_avg / (sqrt(exp_avg_sq) + 1e-8), or SGD's buffer.

    Raises:
        ValueError: The optimizer keeps no momentum for ``param`` (yet).
    """
    state = optimizer.state.get(param, {})
    if "exp_avg" in state and "exp_avg_sq" in state:
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
    if state.get("momentum_buffer") is not None:
        return state["momentum_buffer"]
    raise ValueError(
        "growth='momentum' needs an optimizer with Adam moments (exp_avg/exp_avg_sq) or an SGD "
        "momentum_buffer for every masked weight; use growth='gradient' or 'random' otherwise"
    )


def growth_scores(
    mode: str,
    numel: int,
    *,
    device: torch.device,
    generator: torch.Generator | None = None,
    grad: torch.Tensor | None = None,
    momentum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float scores (higher = grown first) for every position of a layer.

    Non-finite gradient entries (a step a GradScaler skipped) score 0 instead of winning.
    """
    if mode == "random":
        return torch.rand(numel, generator=generator, device=device)
    if mode == "gradient":
        if grad is None:
            raise ValueError("growth='gradient' needs the gradients of the step: call on_optimizer_step before zero_grad")
        return torch.nan_to_num(grad.detach().reshape(-1).float().abs(), nan=0.0, posinf=0.0, neginf=0.0)
    if mode == "momentum":
        if momentum is None:
            raise ValueError("growth='momentum' needs the optimizer's momentum")
        return torch.nan_to_num(momentum.detach().reshape(-1).float().abs(), nan=0.0, posinf=0.0, neginf=0.0)
    raise ValueError(f"growth={mode!r} is not one of ['random', 'gradient', 'momentum']")


def grow_(mask: torch.Tensor, scores: torch.Tensor, count: int) -> torch.Tensor:
    """Activate the ``count`` highest-scoring inactive entries of a 1-D mask, in place.

    Returns:
        The flat indices that were activated.
    """
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=mask.device)
    masked = torch.where(mask, -torch.inf, scores)
    idx = top_k_indices(masked, count)
    mask[idx] = True
    return idx
