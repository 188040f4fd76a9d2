"""A table cell summary -> a PNG: our mean top-1 against the table's axis, with the paper as context.

matplotlib is imported (with its non-interactive backend) only when a plot is drawn, so that collating
without plots and importing the package stay light.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from orchestrator.collate.display import TABLE_TITLES
from orchestrator.collate.recipe import Recipe

__all__ = ["plot_table"]

_X_LABELS = {
    "table8": "width factor (sparsity rises with it)",
    "adapt_p": "adaptation rate p",
    "adapt_f": "adaptation frequency f (steps)",
    "table9": "short edge N",
    "table1": "stage-1 kernel size (paper)",
    "table2": "stage-1 kernel size (paper)",
}


def plot_table(summary: pd.DataFrame, table: str, path: Path, recipe: Recipe | None = None) -> Path | None:
    """Our mean top-1 against the table's axis, one line per setting, bars = 95 % t-interval over seeds.

    A setting with a single seed is drawn without bars and says so in the legend; cells whose runs had
    collapsed layers get a red cross; the paper's numbers, on their own (right) axis, are context.
    Returns ``None`` when no cell has a number yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = summary.assign(x=summary["axis"]).dropna(subset=["x", "top1"])
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for setting, part in data.groupby("setting", sort=False):
        part = part.sort_values("x")
        seeds = int(part["seeds"].max())
        if part["top1_ci_low"].notna().any():
            yerr = [(part["top1"] - part["top1_ci_low"]).fillna(0), (part["top1_ci_high"] - part["top1"]).fillna(0)]
            ax.errorbar(part["x"], part["top1"], yerr=yerr, marker="o", capsize=3,
                        label=f"{setting}: mean of {seeds} seeds, 95 % CI")
        else:
            ax.plot(part["x"], part["top1"], marker="o", label=f"{setting}: {seeds} seed(s), no interval")
        if table == "table8":
            for x, y, row in zip(part["x"], part["top1"], part["row"], strict=True):
                ax.annotate(row, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    collapsed = data[data["collapsed"].fillna(0) > 0]
    if len(collapsed):
        ax.scatter(collapsed["x"], collapsed["top1"], marker="x", s=90, color="red", zorder=5,
                   label="runs with collapsed layers")
    handles, labels = ax.get_legend_handles_labels()
    paper_points = summary.assign(x=summary["axis"]).dropna(
        subset=["x", "published_top1"])
    if len(paper_points) and (recipe is None or recipe.proxy):
        right = ax.twinx()
        for setting, part in paper_points.groupby("setting", sort=False):
            part = part.sort_values("x")
            right.plot(part["x"], part["published_top1"], linestyle="--", marker="s", alpha=0.5, color="grey")
        right.set_ylabel("paper top-1 (%), ImageNet-1K (context)", fontsize=8)
        handles.append(plt.Line2D([], [], linestyle="--", marker="s", alpha=0.5, color="grey"))
        labels.append("paper (right axis)")
    elif len(paper_points):
        for setting, part in paper_points.groupby("setting", sort=False):
            part = part.sort_values("x")
            ax.plot(part["x"], part["published_top1"], linestyle="--", marker="s", alpha=0.5,
                    label=f"{setting}: paper")
        handles, labels = ax.get_legend_handles_labels()
    if table == "adapt_f":
        ax.set_xscale("log")
    ax.set_xlabel(_X_LABELS.get(table, "point"))
    ax.set_ylabel("our top-1 (%)")
    title = TABLE_TITLES.get(table, table)
    if recipe is not None and recipe.proxy:
        title += (f"\nlaptop proxy: {recipe.source}, {recipe.image_size} px, {recipe.epochs} epochs, "
                  f"{recipe.train_size} images")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
