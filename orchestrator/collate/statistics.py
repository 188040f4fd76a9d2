"""How far seeds let us tell cells apart: the 95 % t-interval, the verdict against a table's best row, and
whether the paper's directions (its best row, its best-vs-worst order) show on ours.

Why intervals and not point estimates: a proxy run of a few epochs on a laptop has seed noise of several
points top-1, as large as the paper's differences. "no difference detectable" means two 95 % intervals
overlap; it is not evidence that the cells are equal, only that these seeds cannot tell them apart.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from scipy import stats

__all__ = ["BEST", "LOWER", "NO_INTERVAL", "SAME", "direction_lines", "set_vs_best", "t_interval"]


def t_interval(values: pd.Series, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` confidence interval of the mean of ``values`` (Student's t; NaN with fewer than 2).

    Seeds are few (3 by default), so the normal 1.96 would make the interval far too narrow.
    """
    values = pd.to_numeric(values, errors="coerce").dropna()
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(values.std(ddof=1)) / math.sqrt(n)
    mean = float(values.mean())
    return mean - half, mean + half


#: ``vs_best`` verdicts: the table's best cell, a cell whose 95 % interval overlaps the best's (no
#: difference detectable), one whose interval lies wholly below the best's, and cells without intervals.
BEST, SAME, LOWER, NO_INTERVAL = "best", "no difference detectable", "lower", "no interval (1 seed)"


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def set_vs_best(lines: list[dict[str, Any]]) -> None:
    """Set each line's ``vs_best``: compared with the cell of highest mean top-1 in the whole table.

    "no difference detectable" means the two 95 % intervals overlap; it is not evidence that the cells are
    equal, only that these seeds cannot tell them apart.
    """
    scored = [line for line in lines if not math.isnan(line["top1"])]
    for line in lines:
        line["vs_best"] = ""
    if not scored:
        return
    best = max(scored, key=lambda line: line["top1"])
    best_ci = (best["top1_ci_low"], best["top1_ci_high"])
    for line in scored:
        ci = (line["top1_ci_low"], line["top1_ci_high"])
        if line is best:
            line["vs_best"] = BEST
        elif math.isnan(ci[0]) or math.isnan(best_ci[0]):
            line["vs_best"] = NO_INTERVAL
        else:
            line["vs_best"] = SAME if _overlap(ci, best_ci) else LOWER


def _order_verdict(hi: pd.Series, lo: pd.Series) -> str:
    """How our cells ``hi`` and ``lo`` (the paper's better and worse) compare: by their 95 % intervals."""
    if math.isnan(hi["top1"]) or math.isnan(lo["top1"]):
        return "not measured"
    if math.isnan(hi["top1_ci_low"]) or math.isnan(lo["top1_ci_low"]):
        return "no interval (1 seed)"
    if _overlap((hi["top1_ci_low"], hi["top1_ci_high"]), (lo["top1_ci_low"], lo["top1_ci_high"])):
        return "no difference detectable (95 % intervals overlap)"
    return "same order as the paper" if hi["top1"] > lo["top1"] else "REVERSED (intervals separate)"


def _ci(line: pd.Series) -> tuple[float, float]:
    return float(line["top1_ci_low"]), float(line["top1_ci_high"])


def _best_row_verdict(both: pd.DataFrame, paper_best: pd.Series, ours_best: pd.Series) -> str:
    """Whether our best row of one setting is the paper's, told apart from the others by 95 % intervals."""
    if both["top1_ci_low"].isna().any():
        return "no intervals (1 seed)"
    if ours_best["row"] == paper_best["row"]:
        others = both[both["row"] != ours_best["row"]]
        if any(not _overlap(_ci(line), _ci(ours_best)) for _, line in others.iterrows()):
            return "agrees"
        return "same row, but no difference detectable between any of our rows"
    if _overlap(_ci(paper_best), _ci(ours_best)):
        return "no difference detectable between the paper's best and ours"
    return "DIFFERS (the paper's best row is detectably below ours)"


def direction_lines(summary: pd.DataFrame) -> list[str]:
    """Per setting: the row the paper ranks best (and worst) beside ours, and whether the paper's
    best-vs-worst order appears in ours (95 % intervals separate) or is not detectable. Of rows the paper
    ties as worst, all are named and the first in the paper's order is compared.

    Rows count when both the paper and we have a number; a setting with fewer than two such rows says so.
    """
    lines = []
    for setting, part in summary.groupby("setting", sort=False):
        both = part.dropna(subset=["top1", "published_top1"])
        if len(both) < 2:
            if part["top1"].notna().any() and part["published_top1"].notna().any():
                lines.append(f"{setting}: fewer than two rows with both numbers; no direction to compare.")
            continue
        paper_best = both.loc[both["published_top1"].idxmax()]
        paper_worst = both.loc[both["published_top1"].idxmin()]
        ours_best = both.loc[both["top1"].idxmax()]
        if paper_best["published_top1"] == paper_worst["published_top1"]:
            lines.append(f"{setting}: the paper ranks these rows equal ({paper_best['published_top1']:.1f}).")
            continue
        agree = _best_row_verdict(both, paper_best, ours_best)
        worst = ", ".join(both.loc[both["published_top1"] == paper_worst["published_top1"], "row"])
        lines.append(
            f"{setting}: paper ranks {paper_best['row']} best ({paper_best['published_top1']:.1f}) and "
            f"{worst} worst ({paper_worst['published_top1']:.1f}); ours ranks {ours_best['row']} "
            f"best ({ours_best['top1']:.1f}) — best row: {agree}; paper's best vs worst on ours: "
            f"{_order_verdict(paper_best, paper_worst)}."
        )
    return lines
