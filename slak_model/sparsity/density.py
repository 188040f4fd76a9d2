"""Per-layer densities at initialisation: uniform, ERK and SNIP.

These functions only decide HOW MANY weights of each layer are active; where they sit is drawn
afterwards (:func:`slak_model.sparsity.masks.draw_exact_masks`). That split is the reference's
too: its SNIP ranks |w * dL/dw| globally only to obtain per-layer sparsities and then draws
random masks at those sparsities.

Deliberate differences from the reference:
    * SNIP runs on a deep copy of the unwrapped model with the given batch and loss (the
      reference deep-copies the DDP wrapper, so its gradients are averaged over ranks). Under
      DDP the engine computes it on every rank and keeps rank 0's densities (broadcast), so all
      ranks agree whatever their batches.
    * The reference draws Bernoulli masks, so realised densities only approximate the chosen
      ones; we return exact counts and draw exactly that many active weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "erk_densities",
    "snip_densities",
    "uniform_densities",
]


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Every layer at the same density."""
    return {name: float(density) for name in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (RigL), the closed form of the reference's ``ERK`` mode.

    raw_l = sum(shape_l) / prod(shape_l); eps solves sum_l n_l * min(1, eps * raw_l) = density *
    sum_l n_l by declaring the layer with the largest raw_l dense while eps * raw_l > 1.

    Args:
        shapes: Layer name -> weight shape.
        density: Overall target density (1 - sparsity).

    Returns:
        Layer name -> density in (0, 1].
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / numel[name] for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        rhs = 0.0
        divisor = 0.0
        for name, n in numel.items():
            if name in dense:
                rhs -= n * (1.0 - density)
            else:
                rhs += n * density
                divisor += raw[name] * n
        if divisor == 0.0:  # every layer dense
            break
        eps = rhs / divisor
        candidates = {name: raw[name] for name in numel if name not in dense}
        top = max(candidates, key=candidates.__getitem__)
        if eps * candidates[top] > 1.0:
            dense.add(top)
            continue
        break
    return {name: 1.0 if name in dense else eps * raw[name] for name in numel}


def snip_densities(
    model: nn.Module,
    names: Sequence[str],
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    density: float,
) -> dict[str, float]:
    """Per-layer densities from a global SNIP ranking (reference semantics, spec section 3.3).

    A deep copy of ``model`` (so BN running statistics and gradients of the real model are left
    alone) runs one forward/backward in the model's current mode; each targeted weight scores
    |w * dL/dw|; k = int(total * density); tau = the k-th largest score; a layer's density is the
    fraction of its entries whose score is strictly greater than tau.

    Args:
        model: The (unwrapped) model.
        names: Parameter names to score.
        batch: ``(inputs, targets)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        density: Overall target density.

    Returns:
        Layer name -> density (count / numel, so the count is recovered exactly by rounding).
    """
    inputs, targets = batch
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"SNIP: parameters {missing[:3]} are not in the model; pass the unwrapped model")
    for p in work.parameters():
        p.grad = None
    with torch.enable_grad():
        loss = loss_fn(work(inputs), targets)
        loss.backward()
    scores = []
    for n in names:
        grad = params[n].grad
        if grad is None:
            raise ValueError(
                f"SNIP: parameter {n!r} got no gradient from loss_fn; every targeted weight must take part in the loss"
            )
        scores.append((params[n].detach().float() * grad.float()).abs().flatten())
    all_scores = torch.cat(scores)
    total = all_scores.numel()
    k = int(total * density)
    if k >= total:
        return {n: 1.0 for n in names}
    k = max(k, 1)
    # k-th largest == (total - k + 1)-th smallest; kthvalue avoids sorting 50M scores.
    tau = torch.kthvalue(all_scores.cpu(), total - k + 1).values
    out = {}
    for n, s in zip(names, scores):
        out[n] = int((s.cpu() > tau).sum()) / s.numel()
    del work
    return out
