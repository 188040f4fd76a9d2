"""The tidy trial rows -> one line per table cell: the seeds aggregated, the paper's cell beside them.

A cell is a (row, setting) of a paper table. Its numbers come from its finished runs only (mean, std, 95 %
t-interval and the verdict against the table's best cell, :mod:`orchestrator.collate.statistics`); its
status counts every run, so a running, failed or missing cell is marked, never dropped. The lines also
become metrics of the experiment's parent run (:func:`summary_metrics`), for the MLflow UI to chart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import pandas as pd

from orchestrator import paper
from orchestrator.collate.statistics import set_vs_best, t_interval

__all__ = ["summarize", "summary_metrics", "tables_from_tidy"]


def _cell_status(group: pd.DataFrame) -> str:
    counts = group["status"].value_counts()
    done = int(counts.get("FINISHED", 0))
    parts = [f"{done} done"] if done else []
    finished = group[group["status"] == "FINISHED"]
    stopped = int(finished["stopped_early"].sum())
    if stopped:
        parts.append(f"{stopped} stopped early")
    if "collapsed_layers" in finished:
        collapsed = int((finished["collapsed_layers"] > 0).sum())
        if collapsed:
            parts.append(f"{collapsed} collapsed")
    for status, word in (
        ("RUNNING", "running"),
        ("SCHEDULED", "queued"),
        ("FAILED", "failed"),
        ("KILLED", "killed"),
    ):
        if counts.get(status, 0):
            parts.append(f"{int(counts[status])} {word}")
    return ", ".join(parts) or "missing"


def summarize(tidy: pd.DataFrame, table: str, published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Aggregate the seeds of each (row, setting) cell of ``table`` and put the paper beside it.

    Finished runs count towards the numbers (runs stopped early by ASHA included, and said so in
    ``status``, as are runs whose final ``sparsity/collapsed_layers`` is above 0); failed, killed or
    running ones only towards ``status``. Cells of the paper with no run at all appear with status
    ``missing``, in the paper's order, before any extra points (which follow sorted by the table's axis:
    width, p, f, kernel or N).

    Returns:
        Columns ``row, setting, top1, top1_std, top1_ci_low, top1_ci_high, vs_best, top1_best, ema_top1,
        params_m, flops_g, density, seeds, collapsed, published_top1, published_params_m,
        published_flops_g, delta, status``. ``collapsed`` counts finished runs with collapsed layers (NaN
        when no run logged the metric); ``delta`` is ours minus the paper's, whatever the recipe (the
        display decides whether to show it, see :class:`Recipe`).
    """
    ours = tidy[tidy["table"] == table] if not tidy.empty else tidy
    published = published if published is not None else pd.DataFrame(columns=["row", "setting", "top1"])
    paper_keys = list(zip(published["row"], published["setting"], strict=True))
    order: list[tuple[str, str]] = list(paper_keys)
    extras = {
        key for key in zip(ours.get("row", []), ours.get("setting", []), strict=True) if key not in order
    }
    axis = _axes(ours, published)
    order += sorted(extras, key=lambda key: (math.isnan(axis.get(key, math.nan)), axis.get(key, 0.0), *key))
    paper_index = {key: i for i, key in enumerate(paper_keys)}
    lines = []
    for row, setting in order:
        group = ours[(ours["row"] == row) & (ours["setting"] == setting)] if len(ours) else ours
        done = group[group["status"] == "FINISHED"] if len(group) else group
        line: dict[str, Any] = {"row": row, "setting": setting, "axis": axis.get((row, setting), math.nan),
                                "seeds": len(done)}
        for column, source in (
            ("top1", "top1_final"),
            ("top1_best", "top1_best"),
            ("ema_top1", "ema_top1_final"),
            ("params_m", "params_m"),
            ("flops_g", "flops_g"),
            ("density", "density"),
        ):
            line[column] = (
                float(done[source].mean()) if len(done) and done[source].notna().any() else math.nan
            )
        line["top1_std"] = float(done["top1_final"].std(ddof=1)) if len(done) > 1 else math.nan
        line["top1_ci_low"], line["top1_ci_high"] = (
            t_interval(done["top1_final"]) if len(done) else (math.nan, math.nan)
        )
        collapsed = done["collapsed_layers"] if "collapsed_layers" in done else pd.Series(dtype=float)
        line["collapsed"] = float((collapsed > 0).sum()) if collapsed.notna().any() else math.nan
        ref = published.iloc[paper_index[(row, setting)]] if (row, setting) in paper_index else None
        for column in ("top1", "params_m", "flops_g"):
            value = ref.get(column) if ref is not None else None
            line[f"published_{column}"] = float(value) if value is not None and pd.notna(value) else math.nan
        line["delta"] = line["top1"] - line["published_top1"]
        line["status"] = _cell_status(group) if len(group) else "missing"
        lines.append(line)
    set_vs_best(lines)
    columns = [
        "row",
        "setting",
        "axis",
        "top1",
        "top1_std",
        "top1_ci_low",
        "top1_ci_high",
        "vs_best",
        "top1_best",
        "ema_top1",
        "params_m",
        "flops_g",
        "density",
        "seeds",
        "collapsed",
        "published_top1",
        "published_params_m",
        "published_flops_g",
        "delta",
        "status",
    ]
    return pd.DataFrame(lines, columns=columns)


def _axes(ours: pd.DataFrame, published: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(row, setting) -> the cell's number on the table's axis (width, p, f, the stage-1 kernel, N): the typed
    value the grid point carried into its runs' ``slak.axis`` tag, else the paper's own for unrun cells."""
    out: dict[tuple[str, str], float] = {}
    if "axis" in published:
        for row, setting, value in zip(published["row"], published["setting"], published["axis"], strict=True):
            if value is not None and pd.notna(value):
                out[(row, setting)] = float(value)
    if len(ours) and "axis" in ours:
        for (row, setting), values in ours.groupby(["row", "setting"], sort=False)["axis"]:
            if values.notna().any():
                out[(row, setting)] = float(values.dropna().iloc[0])
    return out


def tables_from_tidy(tidy: pd.DataFrame, tables: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Summaries of every table present in ``tidy`` (or of ``tables``), each with its published cells."""
    names = list(tables) if tables is not None else sorted(set(tidy["table"].dropna())) if len(tidy) else []
    return {name: summarize(tidy, name, paper.published_cells(name)) for name in names}


def _metric_key(text: str) -> str:
    """MLflow metric names allow letters, digits and ``_-. /:``; other characters become ``_``."""
    return re.sub(r"[^\w\-. /:]", "_", text)


def summary_metrics(summary: pd.DataFrame, table: str) -> dict[str, float]:
    """The collated cells as parent-run metrics ``<table>/<setting>/<row>/top1_mean`` (also ``top1_std``,
    ``top1_ci_low``, ``top1_ci_high``, ``seeds``), so that the MLflow UI can chart and compare experiments."""
    metrics = {}
    for line in summary.itertuples(index=False):
        base = _metric_key(f"{table}/{line.setting}/{line.row}")
        for name in ("top1", "top1_std", "top1_ci_low", "top1_ci_high", "seeds"):
            value = float(getattr(line, name))
            if not math.isnan(value):
                metrics[f"{base}/{'top1_mean' if name == 'top1' else name}"] = value
    return metrics
