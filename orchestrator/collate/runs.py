"""MLflow runs of one experiment -> a tidy frame, one row per trial run: the input of every table.

Why a frame of its own: MLflow lists runs with ``params.*``, ``metrics.*`` and ``tags.*`` columns, every
value a string; here each trial becomes one row with its grid cell (table, row, setting, typed axis, seed),
its status, its final and best top-1 and the params as typed columns. Everything after (aggregation,
display, plots) is a pure function of this frame, so it runs on fake runs in tests and at any time on a
live experiment. This module also finds an experiment's parent run and its newest experiment.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

__all__ = [
    "COLLAPSED",
    "DENSITY",
    "EMA_TOP1",
    "EPOCHS_DONE",
    "FLOPS",
    "PARAMS",
    "TOP1",
    "experiment_run_ids",
    "find_experiment",
    "parent_run_id",
    "tidy_runs",
]

#: Metric keys reported by the training loop, and the complexity metrics logged by the trial driver.
TOP1, EMA_TOP1, EPOCHS_DONE, DENSITY = "val/top1", "ema/top1", "epochs_done", "sparsity/density"
PARAMS, FLOPS = "complexity/params", "complexity/flops"
#: Layers whose kept weights fell to zero (a count; 0 = none), logged by the worker when sparsity is on.
COLLAPSED = "sparsity/collapsed_layers"
#: Params kept as typed columns in the tidy frame (the rest stay as strings).
_NUMERIC_PARAMS = (
    "model.width_factor",
    "sparse.sparsity",
    "sparse.prune_rate",
    "sparse.update_frequency",
    "train.seed",
    "train.epochs",
    "data.image_size",
    "data.train_size",
)


def _metric(df: pd.DataFrame, key: str) -> pd.Series:
    column = f"metrics.{key}"
    return pd.to_numeric(df[column], errors="coerce") if column in df else pd.Series(math.nan, index=df.index)


def _tag(df: pd.DataFrame, key: str, default: Any = None) -> pd.Series:
    column = f"tags.{key}"
    return df[column] if column in df else pd.Series(default, index=df.index, dtype=object)


def tidy_runs(runs: pd.DataFrame, experiment: str, histories: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per trial run of ``experiment`` from an ``mlflow.search_runs``-shaped frame.

    Args:
        runs: columns ``run_id``, ``status``, ``params.*``, ``metrics.*``, ``tags.*``.
        experiment: the Tune experiment name (tag ``slak.experiment``).
        histories: optional long frame ``run_id, key, step, value`` of per-epoch metrics; gives the best
            epoch. Without it the best equals the final value.

    Returns:
        Columns ``experiment, table, row, setting, point, seed_index, trial_id, run_id, run_name, status,
        stopped_early, epochs_done, top1_final, top1_best, ema_top1_final, ema_top1_best, density,
        collapsed_layers, params_m, flops_g`` followed by every logged param under its dotted name.
    """
    if runs.empty or "tags.slak.grid_role" not in runs:
        return pd.DataFrame(columns=["experiment", "table", "row", "setting", "point", "run_id", "status"])
    mine = runs[
        (runs["tags.slak.grid_role"] == "trial") & (_tag(runs, "slak.experiment") == experiment)
    ].copy()
    tidy = pd.DataFrame(
        {
            "experiment": experiment,
            "table": _tag(mine, "slak.table"),
            "row": _tag(mine, "slak.row"),
            "setting": _tag(mine, "slak.setting"),
            "point": _tag(mine, "slak.point"),
            "axis": pd.to_numeric(_tag(mine, "slak.axis"), errors="coerce"),
            "seed_index": pd.to_numeric(_tag(mine, "slak.seed_index"), errors="coerce"),
            "trial_id": _tag(mine, "ray_trial_id"),
            "run_id": mine["run_id"],
            "run_name": _tag(mine, "mlflow.runName"),
            "status": mine["status"],
            "stopped_early": _tag(mine, "slak.stopped_early", "").fillna("").astype(str) != "",
            "epochs_done": _metric(mine, EPOCHS_DONE),
            "top1_final": _metric(mine, TOP1),
            "ema_top1_final": _metric(mine, EMA_TOP1),
            "density": _metric(mine, DENSITY),
            "collapsed_layers": _metric(mine, COLLAPSED),
            "params_m": _metric(mine, PARAMS) / 1e6,
            "flops_g": _metric(mine, FLOPS) / 1e9,
        }
    )
    tidy["top1_best"] = tidy["top1_final"]
    tidy["ema_top1_best"] = tidy["ema_top1_final"]
    if histories is not None and not histories.empty:
        best = histories.groupby(["run_id", "key"])["value"].max().unstack()
        for key, column in ((TOP1, "top1_best"), (EMA_TOP1, "ema_top1_best")):
            if key in best:
                mapped = tidy["run_id"].map(best[key])
                tidy[column] = mapped.where(mapped.notna(), tidy[column])
    for column in sorted(c for c in mine.columns if c.startswith("params.")):
        name = column[len("params.") :]
        values = mine[column]
        tidy[name] = pd.to_numeric(values, errors="coerce") if name in _NUMERIC_PARAMS else values
    return tidy.sort_values(["table", "row", "setting", "seed_index"], na_position="last").reset_index(
        drop=True
    )


def find_experiment(runs: pd.DataFrame, table: str | None = None) -> str | None:
    """The most recent Tune experiment (parent run) in ``runs``, optionally of one table."""
    if runs.empty or "tags.slak.grid_role" not in runs:
        return None
    parents = runs[runs["tags.slak.grid_role"] == "experiment"]
    if table is not None:
        parents = parents[_tag(parents, "slak.table") == table]
    if parents.empty:
        return None
    return str(parents.sort_values("start_time").iloc[-1]["tags.slak.experiment"])


def parent_run_id(runs: pd.DataFrame, experiment: str) -> str | None:
    """The run id of ``experiment``'s parent run (the newest, should there be several), or None."""
    if runs.empty or "tags.slak.grid_role" not in runs:
        return None
    parents = runs[
        (runs["tags.slak.grid_role"] == "experiment") & (_tag(runs, "slak.experiment") == experiment)
    ]
    return None if parents.empty else str(parents.sort_values("start_time").iloc[-1]["run_id"])


def experiment_run_ids(runs: pd.DataFrame, experiment: str) -> list[str]:
    """The ids of every run tagged with ``experiment`` (its parent and its trials)."""
    return runs["run_id"][_tag(runs, "slak.experiment") == experiment].tolist() if len(runs) else []
