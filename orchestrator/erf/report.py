"""What an ERF job writes: the heat-map, and the table of every model measured into a folder beside the
published Table 10 (markdown and csv), rebuilt from the rows (``<label>.erf.json``) the folder holds."""

from __future__ import annotations

import csv
import json
import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slak_model.published import TABLE10

__all__ = ["ROW_SUFFIX", "TABLE_CSV", "TABLE_MD", "cell", "pct", "read_rows", "save_heatmap", "table_rows", "to_markdown",
           "write_tables"]

log = logging.getLogger(__name__)

TABLE_MD, TABLE_CSV, ROW_SUFFIX = "erf_table.md", "erf_table.csv", ".erf.json"


def pct(t: float) -> str:
    """A threshold as the percentage that names its columns and metrics (0.2 -> "20")."""
    return f"{100 * t:g}"


def cell(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def save_heatmap(scaled: Any, path: Path, title: str, ratios: Sequence[Any] = ()) -> Path:
    """The log-scaled map as an image: the upper half of a red-yellow-green scale over [0, 1], RepLKNet's look
    (its heat-map centres the diverging scale at 0), with a colour bar and the ratios under the title (its
    lines wrapped, since labels with ``model.*`` settings run long)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(matplotlib.colormaps["RdYlGn"](np.linspace(0.5, 1.0, 256)))
    fig, ax = plt.subplots(figsize=(6.0, 6.4), dpi=120)
    image = ax.imshow(scaled, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    subtitle = ", ".join(f"r({pct(r.threshold)} %) = {100 * r.ratio:.1f} %" for r in ratios if r.ratio is not None)
    lines = [*title.splitlines(), subtitle] if subtitle else title.splitlines()
    ax.set_title("\n".join(textwrap.fill(line, 72) for line in lines), fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="log10(1 + contribution), scaled to [0, 1]")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def read_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(out.glob(f"*{ROW_SUFFIX}")):
        try:
            rows.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as err:
            log.warning("left %s out of the table: %s", path, err)
    return rows


def table_rows(measured: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Measured rows beside the published ones: the paper's rows in its order (each followed by what was measured
    for it), then measured rows without a published counterpart. Every row has ``r<t>_pct`` (ours) and
    ``paper_r<t>_pct``."""
    from slak_model.published import ERF_THRESHOLDS

    def with_paper(row: Mapping[str, Any], paper: Any) -> dict[str, Any]:
        out = dict(row)
        for t in ERF_THRESHOLDS:
            out[f"paper_r{pct(t)}_pct"] = paper.ratio_pct(t) if paper is not None else None
        return out

    rows: list[dict[str, Any]] = []
    for paper in TABLE10:
        mine = [r for r in measured if r.get("paper_row") == paper.model]
        if not mine:
            rows.append(with_paper({"label": "-", "model": "-", "paper_row": paper.model, "kernel": paper.kernel,
                                    "weights": "-", "images": None}, paper))
        rows += [with_paper(r, paper) for r in mine]
    known = {p.model for p in TABLE10}
    rows += [with_paper(r, None) for r in measured if r.get("paper_row") not in known]
    return rows


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table as markdown: r in % of the input area, ours beside the paper's for each threshold."""
    from slak_model.published import ERF_THRESHOLDS, TABLE10_CAPTION

    head = ["ours", "paper row", "kernel", "weights", "images", "px"]
    for t in ERF_THRESHOLDS:
        head += [f"r t={pct(t)} %", "paper"]
    lines = [f"{TABLE10_CAPTION}; ours: the rows measured into this folder", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.get("label", "-"), r.get("paper_row") or "-", r.get("kernel", "-"), r.get("weights", "-"),
                 cell(r.get("images")), cell(r.get("size"))]
        for t in ERF_THRESHOLDS:
            cells += [cell(r.get(f"r{pct(t)}_pct")), cell(r.get(f"paper_r{pct(t)}_pct"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path) -> tuple[str, Path, Path]:
    """``erf_table.md`` and ``erf_table.csv`` of every ``*.erf.json`` row in ``out``; returns the markdown."""
    from slak_model.published import ERF_THRESHOLDS

    rows = table_rows(read_rows(out))
    markdown = to_markdown(rows)
    md_path, csv_path = out / TABLE_MD, out / TABLE_CSV
    md_path.write_text(markdown, encoding="utf-8")
    columns = ["label", "model", "paper_row", "kernel", "weights", "checkpoint_sha256", "images", "skipped", "size",
               "precision", "device", "batch_size", "seconds_per_image", "data"]
    for t in ERF_THRESHOLDS:
        columns += [f"r{pct(t)}_pct", f"side{pct(t)}", f"paper_r{pct(t)}_pct"]
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return markdown, md_path, csv_path

