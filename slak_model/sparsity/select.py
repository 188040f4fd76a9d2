"""Exact top-k index selection, the one primitive of init, prune and grow.

Two implementations give the same SET of indices for distinct scores: ``torch.topk`` (radix
select, no full sort) and a full ``torch.sort``. Which is faster depends on the device and on k/n
(on GPUs, large-k ``topk`` has been slower than sorting in some PyTorch versions), so the choice
is a process-wide setting, measured by ``python -m slak_model.sparsity.bench select=...``.
"""

from __future__ import annotations

import torch

__all__ = ["SELECT_METHODS", "get_select_method", "set_select_method", "top_k_indices"]

SELECT_METHODS: tuple[str, ...] = ("topk", "sort")
_method = "topk"


def set_select_method(method: str) -> None:
    """Choose ``topk`` (default) or ``sort`` for every later selection in this process."""
    global _method
    if method not in SELECT_METHODS:
        raise ValueError(f"select method {method!r} is not one of {list(SELECT_METHODS)}")
    _method = method


def get_select_method() -> str:
    """The current selection method."""
    return _method


def top_k_indices(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``k`` largest (or smallest) entries of a 1-D tensor, in no particular order."""
    if _method == "sort":
        return torch.sort(scores, descending=largest).indices[:k]
    return torch.topk(scores, k, largest=largest, sorted=False).indices
