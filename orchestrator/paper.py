"""The paper's published cells, keyed the way our grids key their points.

The numbers themselves live in :mod:`slak_model.published` (Tables 1, 2, 3, 8, 9 as data), already
keyed like our grid points; this module hands them to collation as a DataFrame with the same
``(row, setting)`` keys that :mod:`orchestrator.search_space` gives grid points:

- Table 1: row = kernel (``"31-29-27-13"``), setting ``naive`` or ``replknet``;
- Table 2: row = kernel, setting ``decomposed``, ``sparse_groups`` or ``sparse_groups_wide``;
- Table 8: row = ``"<sparsity:.2f>/<width:g>x"``, setting ``slak``;
- Table 9: row = ``"N=<n>"``, setting ``slak``;
- the adaptation sweeps have no printed numbers (a figure only): no cells.
"""

from __future__ import annotations

import pandas as pd

from slak_model import published

__all__ = ["COLUMNS", "paper_recipe", "published_cells"]

COLUMNS = ["row", "setting", "top1", "params_m", "flops_g", "axis"]


def published_cells(table: str) -> pd.DataFrame:
    """Published cells of ``table`` as ``row, setting, top1, params_m, flops_g, axis`` in the paper's order.

    Tables without printed numbers (the adaptation sweeps, or any name the paper lacks) give an empty
    frame, so their collated cells show no published number rather than failing.
    """
    if table not in published.TABLES:
        return pd.DataFrame(columns=COLUMNS)
    rows = [{column: getattr(cell, column) for column in COLUMNS} for cell in published.published(table)]
    return pd.DataFrame(rows, columns=COLUMNS)


def paper_recipe(table: str) -> tuple[int, int] | None:
    """``(epochs, image_size)`` of the paper's runs behind ``table`` (ImageNet-1K), or None without cells.

    Collation compares a run's recipe with this before it prints a difference to the paper: a Δ between
    runs of different length or resolution measures the recipe, not the model.
    """
    if table not in published.TABLES:
        return None
    cells = published.published(table)
    return (cells[0].epochs, cells[0].image_size) if cells else None
