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

``min_density`` (0 = the reference) puts a floor under every layer. SNIP, the reference's default,
ranks |w * dL/dw| over the whole network; with the blocks' layer scale at 1e-6 their scores are orders
of magnitude below those of the stem, downsample and head layers, so at a high sparsity or on a small
model whole block layers get no weight at all and stay empty for the run (updates keep each layer's
count). With a floor, each layer's ``ceil(min_density * numel)`` highest-scoring weights are kept first
and the rest of the budget goes by the global ranking; ERK solves its scale with every density clipped
to [min_density, 1]; :func:`allocate_counts` turns either into whole counts with the exact total.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "allocate_counts",
    "erk_densities",
    "snip_densities",
    "uniform_densities",
]


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Every layer at the same density."""
    return {name: float(density) for name in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float, min_density: float = 0.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (RigL), the closed form of the reference's ``ERK`` mode.

    raw_l = sum(shape_l) / prod(shape_l); eps solves sum_l n_l * min(1, eps * raw_l) = density *
    sum_l n_l by declaring the layer with the largest raw_l dense while eps * raw_l > 1. With
    ``min_density`` > 0 eps solves sum_l n_l * clip(eps * raw_l, min_density, 1) = density * sum_l n_l.

    Args:
        shapes: Layer name -> weight shape.
        density: Overall target density (1 - sparsity).
        min_density: Floor of every layer's density (0 = none, the reference); at most ``density``.

    Returns:
        Layer name -> density in (0, 1].
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / numel[name] for name, shape in shapes.items()}
    if min_density > 0.0:
        return _clipped_erk(numel, raw, density, min_density)
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


def _clipped_erk(numel: Mapping[str, int], raw: Mapping[str, float], density: float,
                 min_density: float) -> dict[str, float]:
    """ERK with every density clipped to [min_density, 1]: the budget is piecewise linear in eps, so
    eps is found exactly on the segment between two consecutive breakpoints (min_density/raw, 1/raw)."""
    if min_density > density + 1e-9:
        raise ValueError(f"min_density={min_density} exceeds the overall density {density}: lower min_density")
    target = density * sum(numel.values())

    def budget(eps: float) -> float:
        return sum(n * min(1.0, max(min_density, eps * raw[name])) for name, n in numel.items())

    points = sorted({min_density / r for r in raw.values()} | {1.0 / r for r in raw.values()})
    lo, g_lo = 0.0, budget(0.0)
    eps = points[-1]
    for hi in points:
        g_hi = budget(hi)
        if g_hi >= target:
            eps = hi if g_hi == g_lo else lo + (target - g_lo) * (hi - lo) / (g_hi - g_lo)
            break
        lo, g_lo = hi, g_hi
    return {name: min(1.0, max(min_density, eps * raw[name])) for name in numel}


def allocate_counts(
    densities: Mapping[str, float], numels: Mapping[str, int], budget: int, min_density: float
) -> dict[str, int]:
    """Whole active counts: each layer at least ``ceil(min_density * numel)``, all together exactly ``budget``.

    Each layer starts from ``floor(density * numel)`` (raised to its floor); the weights still missing go
    one each to the layers with the largest fractional parts, weights over the budget come off those with
    the smallest ones (never below a floor). Counts that are already whole (SNIP's) are returned as they are
    when they sum to ``budget``.

    Raises:
        ValueError: The floors alone exceed the budget.
    """
    floors = {n: min(numels[n], math.ceil(min_density * numels[n])) for n in densities}
    if sum(floors.values()) > budget:
        raise ValueError(
            f"min_density={min_density} needs {sum(floors.values())} active weights, more than the budget of "
            f"{budget}: lower min_density or sparsity"
        )
    exact = {}
    for n, d in densities.items():
        x = d * numels[n]
        exact[n] = float(round(x)) if abs(x - round(x)) < 1e-6 else x
    counts = {n: min(numels[n], max(floors[n], math.floor(exact[n]))) for n in densities}
    frac = {n: exact[n] - math.floor(exact[n]) for n in densities}
    missing = budget - sum(counts.values())
    while missing:
        if missing > 0:
            order = sorted((n for n in counts if counts[n] < numels[n]), key=lambda n: -frac[n])
            step = 1
        else:
            order = sorted((n for n in counts if counts[n] > floors[n]), key=lambda n: frac[n])
            step = -1
        if not order:
            raise ValueError(f"cannot place a budget of {budget} weights in layers of {sum(numels.values())}")
        for n in order[: abs(missing)]:
            counts[n] += step
        missing = budget - sum(counts.values())
    return counts


def snip_densities(
    model: nn.Module,
    names: Sequence[str],
    batch: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    density: float,
    min_density: float = 0.0,
) -> dict[str, float]:
    """Per-layer densities from a global SNIP ranking (reference semantics, spec section 3.3).

    A deep copy of ``model`` (so BN running statistics and gradients of the real model are left
    alone) runs one forward/backward in the model's current mode; each targeted weight scores
    |w * dL/dw|; k = int(total * density); tau = the k-th largest score; a layer's density is the
    fraction of its entries whose score is strictly greater than tau.

    With ``min_density`` > 0 each layer's ``ceil(min_density * numel)`` highest scores are ranked
    first, and scores tied at tau are taken in layer order until exactly k weights are active (the
    reference's strict ``> tau`` may leave the total short when scores tie, e.g. at 0).

    Args:
        model: The (unwrapped) model.
        names: Parameter names to score.
        batch: ``(inputs, targets)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        density: Overall target density.
        min_density: Floor of every layer's density (0 = none, the reference).

    Returns:
        Layer name -> density (count / numel, so the count is recovered exactly by rounding).

    Raises:
        ValueError: A name is not a parameter, a targeted weight got no gradient, or the floors of
            ``min_density`` alone exceed the budget.
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
    del work
    total = sum(s.numel() for s in scores)
    k = int(total * density)
    if k >= total:
        return {n: 1.0 for n in names}
    k = max(k, 1)
    if min_density > 0.0:
        return _snip_with_floor(names, scores, k, min_density)
    all_scores = torch.cat(scores)
    # k-th largest == (total - k + 1)-th smallest; kthvalue avoids sorting 50M scores.
    tau = torch.kthvalue(all_scores.cpu(), total - k + 1).values
    out = {}
    for n, s in zip(names, scores):
        out[n] = int((s.cpu() > tau).sum()) / s.numel()
    return out


def _snip_with_floor(names: Sequence[str], scores: list[torch.Tensor], k: int, min_density: float) -> dict[str, float]:
    """The SNIP selection of exactly k weights of which every layer holds at least its floor."""
    floors = [min(s.numel(), math.ceil(min_density * s.numel())) for s in scores]
    if sum(floors) > k:
        raise ValueError(
            f"min_density={min_density} needs {sum(floors)} active weights, more than the SNIP budget of {k}: "
            "lower min_density or sparsity"
        )
    ranked = []
    for s, floor in zip(scores, floors):
        s = s.cpu().clone()
        if floor:
            s[torch.topk(s, floor).indices] = torch.inf  # a layer's floor is ranked before every other weight
        ranked.append(s)
    tau = torch.kthvalue(torch.cat(ranked), sum(s.numel() for s in ranked) - k + 1).values
    above = [int((s > tau).sum()) for s in ranked]
    tied = [int((s == tau).sum()) for s in ranked]
    left = k - sum(above)
    out = {}
    for n, s, a, t in zip(names, ranked, above, tied):
        take = min(t, left)
        left -= take
        out[n] = (a + take) / s.numel()
    return out
