"""``python -m slak_model.info``: our parameter counts and GMACs beside the paper's published ones.

For every registered variant and for the configurations of the paper's Tables 1, 2, 3, 8 and 9 it
builds the model on the ``meta`` device (no memory, no weights), counts it with
:func:`~slak_model.counting.count_complexity` at the table's input size, and prints one row per cell.

Sparse rows are counted with a *uniform* sparsity over every 2-D/4-D weight: that is the paper's
theoretical count only up to the layer-wise densities, which the paper took from SNIP on real data
(e.g. SLaK-T at 40 %: 5.22 G uniform vs the printed 5.0 G). Dense rows should agree with the paper to
its printed precision.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import kernels

from .counting import count_complexity
from .published import PUBLISHED, TABLE8_PAIRS, PublishedResult, table8_row
from .variants import VARIANTS, create_model

__all__ = ["InfoRow", "format_rows", "info_rows", "main", "paper_configs"]

_KERNELS = {
    "7-7-7-7": [7, 7, 7, 7],
    "31-29-27-13": [31, 29, 27, 13],
    "51-49-47-13": [51, 49, 47, 13],
    "61-59-57-13": [61, 59, 57, 13],
}
_CONVNEXT = {"kernel_mode": "naive", "kernel_size": [7, 7, 7, 7, 100], "width_factor": 1.0}


@dataclass(frozen=True)
class InfoRow:
    """One printed line: a configuration, our counts and the published ones (``None`` = not printed)."""

    table: str
    row: str
    setting: str
    model: str
    overrides: dict[str, Any]
    sparsity: float
    image_size: int
    params_m: float
    gmacs: float
    published_params_m: float | None
    published_gmacs: float | None


def paper_configs() -> list[tuple[PublishedResult | None, str, dict[str, Any], float]]:
    """``(published cell or None, variant, overrides, sparsity)`` for every configuration we print."""
    cells = {(c.table, c.row, c.setting): c for c in PUBLISHED}
    out: list[tuple[PublishedResult | None, str, dict[str, Any], float]] = []
    for name in VARIANTS:
        out.append((None, name, {}, 0.0))
    for kernel, ks in _KERNELS.items():
        for mode in ("naive", "replknet"):
            cell = cells.get(("table1", kernel, mode))
            if cell is None:
                continue
            small = 5 if mode == "replknet" else 100
            out.append(
                (
                    cell,
                    "slak_tiny",
                    {"kernel_mode": mode, "kernel_size": [*ks, small], "width_factor": 1.0},
                    0.0,
                )
            )
    for kernel, ks in _KERNELS.items():
        settings = {"decomposed": (1.0, 0.0), "sparse_groups": (1.0, 0.4), "sparse_groups_wide": (1.3, 0.4)}
        for setting, (width, sparsity) in settings.items():
            out.append(
                (
                    cells[("table2", kernel, setting)],
                    "slak_tiny",
                    {"kernel_mode": "decomposed", "kernel_size": [*ks, 5], "width_factor": width},
                    sparsity,
                )
            )
    for model, variant in (
        ("ConvNeXt-T", "slak_tiny"),
        ("ConvNeXt-S", "slak_small"),
        ("ConvNeXt-B", "slak_base"),
    ):
        out.append((cells[("table3", model, "224")], variant, dict(_CONVNEXT), 0.0))
    for model, variant in (("SLaK-T", "slak_tiny"), ("SLaK-S", "slak_small"), ("SLaK-B", "slak_base")):
        out.append((cells[("table3", model, "224")], variant, {}, 0.4))
    out.append((cells[("table3", "SLaK-B", "384")], "slak_base", {}, 0.4))
    for sparsity, width in TABLE8_PAIRS:
        out.append((cells[("table8", table8_row(sparsity, width), "slak")], "slak_tiny", {"width_factor": width},
                    sparsity))
    for cell in (c for c in PUBLISHED if c.table == "table9"):
        out.append((cell, "slak_tiny", {"short_edge": int(cell.axis), "small_kernel": int(cell.axis)}, 0.4))
    return out


def _variant_image_size(variant: str) -> int:
    return 64 if variant == "slak_test" else 224  # slak_test is sized for 64 px inputs


def info_rows() -> list[InfoRow]:
    """Count every configuration of :func:`paper_configs` (models are built on the meta device)."""
    rows = []
    for cell, variant, overrides, sparsity in paper_configs():
        size = cell.image_size if cell is not None else _variant_image_size(variant)
        with torch.device("meta"):
            model = create_model(variant, **overrides)
        counts = count_complexity(model, image_size=size, sparsity=sparsity if sparsity > 0 else None)
        rows.append(
            InfoRow(
                table=cell.table if cell else "variant",
                row=cell.row if cell else variant,
                setting=cell.setting if cell else "dense",
                model=variant,
                overrides=overrides,
                sparsity=sparsity,
                image_size=size,
                params_m=counts.nonzero_params / 1e6,
                gmacs=counts.sparse_gmacs,
                published_params_m=cell.params_m if cell else None,
                published_gmacs=cell.flops_g if cell else None,
            )
        )
    return rows


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_rows(rows: Sequence[InfoRow]) -> str:
    """A fixed-width text table of ``rows``."""
    header = ("table", "row", "setting", "model", "sparsity", "px", "params M", "paper M", "GMACs", "paper G")
    lines = [
        (
            r.table,
            r.row,
            r.setting,
            r.model,
            f"{r.sparsity:.2f}",
            str(r.image_size),
            _num(r.params_m, 2),
            _num(r.published_params_m, 0),
            _num(r.gmacs, 3),
            _num(r.published_gmacs, 1),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(
        [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table (no arguments are taken)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv:
        print(f"usage: python -m slak_model.info  (takes no arguments, got {argv})", file=sys.stderr)
        return 2
    print(
        f"SLaK model family: params (nonzero, M) and GMACs (sparsity-aware) vs the paper; "
        f"torch {torch.__version__}, depthwise-conv backend: {kernels.active_backend()}"
    )
    print(
        "sparse rows use a uniform sparsity over all 2-D/4-D weights (the paper used SNIP layer densities)\n"
    )
    print(format_rows(info_rows()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
