"""Layer-wise magnitude pruning: drop exactly the ``ceil(p * nnz)`` smallest active weights.

The reference sorts |w| over the whole tensor and relies on inactive weights being exactly zero;
we rank only the active entries (inactive ones score +inf), so the removed set is exactly the
requested number of smallest-|w| ACTIVE weights even when some active weights are zero (freshly
grown ones start at zero). ``torch.topk`` selects without a full sort.
"""

from __future__ import annotations

import math

import torch

from .select import top_k_indices

__all__ = ["magnitude_prune_", "prune_count"]


def prune_count(rate: float, nnz: int) -> int:
    """Weights to remove from a layer with ``nnz`` active weights at adaptation rate ``rate``."""
    return min(nnz, math.ceil(rate * nnz))


def magnitude_prune_(mask: torch.Tensor, weight: torch.Tensor, count: int) -> torch.Tensor:
    """Deactivate the ``count`` smallest-|w| active entries of a 1-D mask, in place.

    Args:
        mask: 1-D bool mask (a view into the engine's flat buffer).
        weight: The layer's weight, any shape with ``mask.numel()`` elements.
        count: How many active entries to remove (at most the active count).

    Returns:
        The flat indices that were deactivated.
    """
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=mask.device)
    scores = torch.where(mask, weight.detach().reshape(-1).abs(), torch.inf)
    idx = top_k_indices(scores, count, largest=False)
    mask[idx] = False
    return idx
