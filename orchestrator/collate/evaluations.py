"""Evaluation runs -> one table: each evaluated checkpoint beside the paper's number for its recipe.

An evaluation run (``experiments/evaluate.py``, tag ``slak.role=eval``) carries the checkpoint's path and
SHA-256, ``val/*`` (and ``ema/*`` when the file held EMA weights) and, where the paper has a cell for
its variant and resolution, that cell (tags ``slak.published``, ``slak.published_top1``). A pure function
of the runs frame, like the rest of the package.

``Δ`` (ours − paper) is printed only for runs on an image folder (``data.source=imagenet``): the paper's
numbers are ImageNet-1K validation top-1, and beside a generated dataset they are context, not a target.
The best of the model's and the EMA's top-1 is compared, as the reference reports the better one.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

__all__ = ["EVAL_ROLE", "evaluation_markdown", "evaluation_table"]

EVAL_ROLE = "eval"
_MISSING = "—"
COLUMNS = ["checkpoint", "sha256", "model", "image_size", "data", "top1", "top5", "ema_top1", "ema_top5",
           "paper", "paper_top1", "delta", "run_id", "status"]


def _col(df: pd.DataFrame, name: str, default: object = None) -> pd.Series:
    return df[name] if name in df else pd.Series(default, index=df.index, dtype=object)


def _num(df: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(_col(df, name), errors="coerce")


def evaluation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation run (newest first), from an ``mlflow.search_runs``-shaped frame.

    Returns:
        Columns ``checkpoint`` (file name), ``sha256`` (first 12 hex digits), ``model``, ``image_size``,
        ``data`` (``data.source``), ``top1``, ``top5``, ``ema_top1``, ``ema_top5``, ``paper`` (the cell's
        label, e.g. "SLaK-T 224 px, 300 ep: 82.5"), ``paper_top1``, ``delta`` (NaN beside generated data or
        without a cell), ``run_id``, ``status``.
    """
    if runs.empty or "tags.slak.role" not in runs:
        return pd.DataFrame(columns=COLUMNS)
    mine = runs[runs["tags.slak.role"] == EVAL_ROLE]
    if "start_time" in mine:
        mine = mine.sort_values("start_time", ascending=False)
    out = pd.DataFrame({
        "checkpoint": _col(mine, "tags.slak.checkpoint", "").fillna("").map(lambda p: Path(str(p)).name),
        "sha256": _col(mine, "tags.slak.checkpoint_sha256", "").fillna("").map(lambda s: str(s)[:12]),
        "model": _col(mine, "params.model.variant"),
        "image_size": _num(mine, "params.data.image_size"),
        "data": _col(mine, "params.data.source"),
        "top1": _num(mine, "metrics.val/top1"),
        "top5": _num(mine, "metrics.val/top5"),
        "ema_top1": _num(mine, "metrics.ema/top1"),
        "ema_top5": _num(mine, "metrics.ema/top5"),
        "paper": _col(mine, "tags.slak.published", "").fillna(""),
        "paper_top1": _num(mine, "tags.slak.published_top1"),
        "run_id": mine["run_id"],
        "status": _col(mine, "status"),
    })
    best = out[["top1", "ema_top1"]].max(axis=1, skipna=True)
    on_images = out["data"] == "imagenet"
    out["delta"] = (best - out["paper_top1"]).where(on_images)
    return out[COLUMNS].reset_index(drop=True)


def _fmt(value: object, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    return f"{float(value):+.{digits}f}" if signed else f"{float(value):.{digits}f}"


def evaluation_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, with a note on what the paper column means."""
    head = ("| checkpoint | sha256 | model | px | data | top-1 | top-5 | EMA top-1 | EMA top-5 | paper | Δ top-1 |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in table.itertuples(index=False):
        size = _MISSING if r.image_size is None or math.isnan(r.image_size) else str(int(r.image_size))
        lines.append(f"| {r.checkpoint} | {r.sha256} | {r.model} | {size} | {r.data} | {_fmt(r.top1)} | "
                     f"{_fmt(r.top5)} | {_fmt(r.ema_top1)} | {_fmt(r.ema_top5)} | {r.paper or _MISSING} | "
                     f"{_fmt(r.delta, signed=True)} |")
    note = ("Δ = the better of top-1 and EMA top-1 minus the paper's ImageNet-1K top-1, shown for image-folder "
            "evaluations only; beside generated data the paper's number is context.")
    return "\n".join([*lines, "", note])
