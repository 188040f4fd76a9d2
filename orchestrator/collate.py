"""MLflow runs of one experiment -> a tidy per-trial table -> the paper's tables and plots.

Every step is a pure function of a DataFrame so that it can be tested on fake runs and re-run at any
time, also while the experiment is still going: cells without a finished run are marked, never
dropped. The only I/O lives in :func:`collate_experiment` (read runs through ``tracking``, write
parquet / Markdown / LaTeX / CSV / PNG, attach them to the experiment's parent run).

Layout of a table: one line per paper row (kernel sizes, (sparsity, width) pair, N, p or f) and, per
setting of that table (naive / RepLKNet, decomposed / sparse groups / + width, ...), our top-1 of the
final epoch (mean ± std over seeds), the best epoch, EMA top-1 where the paper reports EMA models,
params and FLOPs as counted for our model (sparsity-aware), the published top-1 and our delta to it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator import paper, tracking

__all__ = [
    "TABLE_TITLES",
    "CollatedExperiment",
    "collate_experiment",
    "find_experiment",
    "plot_table",
    "summarize",
    "tables_from_tidy",
    "tidy_runs",
    "to_display",
    "to_latex",
    "to_markdown",
]

logger = logging.getLogger(__name__)

TABLE_TITLES: dict[str, str] = {
    "table1": "Table 1: naive enlarging vs RepLKNet-style re-parameterisation",
    "table2": "Table 2: decomposed kernels, sparse groups, sparse groups + 1.3x width",
    "table8": "Table 8: sparsity vs width (paired points)",
    "table9": "Table 9: short edge N of the decomposed kernels",
    "adapt_p": "Adaptation rate p (update frequency fixed)",
    "adapt_f": "Adaptation frequency f (p = 0.3)",
}
#: Metric keys reported by the training loop, and the complexity metrics logged by the trial driver.
TOP1, EMA_TOP1, EPOCHS_DONE, DENSITY = "val/top1", "ema/top1", "epochs_done", "sparsity/density"
PARAMS, FLOPS = "complexity/params", "complexity/flops"
#: Params kept as typed columns in the tidy frame (the rest stay as strings).
_NUMERIC_PARAMS = (
    "model.width_factor",
    "sparse.sparsity",
    "sparse.prune_rate",
    "sparse.update_frequency",
    "train.seed",
    "train.epochs",
)
_MISSING = "—"


@dataclass
class CollatedExperiment:
    """What :func:`collate_experiment` produced: the frames and every file written."""

    experiment: str
    tidy: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    files: list[Path] = field(default_factory=list)
    markdown: str = ""


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
        params_m, flops_g`` followed by every logged param under its dotted name.
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


def _cell_status(group: pd.DataFrame) -> str:
    counts = group["status"].value_counts()
    done = int(counts.get("FINISHED", 0))
    parts = [f"{done} done"] if done else []
    stopped = int(group.loc[group["status"] == "FINISHED", "stopped_early"].sum())
    if stopped:
        parts.append(f"{stopped} stopped early")
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
    ``status``); failed, killed or running ones only towards ``status``. Cells of the paper with no
    run at all appear with status ``missing``, in the paper's order, before any extra points (which
    follow sorted by the table's axis: width, p, f, kernel or N).

    Returns:
        Columns ``row, setting, top1, top1_std, top1_best, ema_top1, params_m, flops_g, density,
        seeds, published_top1, published_params_m, published_flops_g, delta, status``.
    """
    ours = tidy[tidy["table"] == table] if not tidy.empty else tidy
    published = published if published is not None else pd.DataFrame(columns=["row", "setting", "top1"])
    paper_keys = list(zip(published["row"], published["setting"], strict=True))
    order: list[tuple[str, str]] = list(paper_keys)
    extras = {
        key for key in zip(ours.get("row", []), ours.get("setting", []), strict=True) if key not in order
    }
    order += sorted(extras, key=lambda key: _axis_key(table, *key))
    paper_index = {key: i for i, key in enumerate(paper_keys)}
    lines = []
    for row, setting in order:
        group = ours[(ours["row"] == row) & (ours["setting"] == setting)] if len(ours) else ours
        done = group[group["status"] == "FINISHED"] if len(group) else group
        line: dict[str, Any] = {"row": row, "setting": setting, "seeds": len(done)}
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
        ref = published.iloc[paper_index[(row, setting)]] if (row, setting) in paper_index else None
        for column in ("top1", "params_m", "flops_g"):
            value = ref.get(column) if ref is not None else None
            line[f"published_{column}"] = float(value) if value is not None and pd.notna(value) else math.nan
        line["delta"] = line["top1"] - line["published_top1"]
        line["status"] = _cell_status(group) if len(group) else "missing"
        lines.append(line)
    columns = [
        "row",
        "setting",
        "top1",
        "top1_std",
        "top1_best",
        "ema_top1",
        "params_m",
        "flops_g",
        "density",
        "seeds",
        "published_top1",
        "published_params_m",
        "published_flops_g",
        "delta",
        "status",
    ]
    return pd.DataFrame(lines, columns=columns)


def tables_from_tidy(tidy: pd.DataFrame, tables: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Summaries of every table present in ``tidy`` (or of ``tables``), each with its published cells."""
    names = list(tables) if tables is not None else sorted(set(tidy["table"].dropna())) if len(tidy) else []
    return {name: summarize(tidy, name, paper.published_cells(name)) for name in names}


def _fmt(value: float, digits: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _human(value: float) -> str:
    """29.0M / 5.02G / 33.8K: the tiny CPU models and SLaK-T share one readable column."""
    if value is None or math.isnan(value):
        return _MISSING
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def to_display(summary: pd.DataFrame) -> pd.DataFrame:
    """Strings laid out like the paper: one line per row, a column group per setting."""
    settings = list(dict.fromkeys(summary["setting"]))
    single = len(settings) == 1
    rows = list(dict.fromkeys(summary["row"]))
    out = pd.DataFrame({"row": rows})
    for setting in settings:
        prefix = "" if single else f"{setting} "
        part = summary[summary["setting"] == setting].set_index("row").reindex(rows)
        top1 = [
            _MISSING if math.isnan(t) else (f"{t:.1f} ± {s:.1f}" if not math.isnan(s) else f"{t:.1f}")
            for t, s in zip(part["top1"], part["top1_std"], strict=True)
        ]
        out[f"{prefix}top-1"] = top1
        out[f"{prefix}best"] = [_fmt(v) for v in part["top1_best"]]
        if part["ema_top1"].notna().any():
            out[f"{prefix}EMA"] = [_fmt(v) for v in part["ema_top1"]]
        if part["density"].notna().any():
            out[f"{prefix}density"] = [_fmt(v, 2) for v in part["density"]]
        out[f"{prefix}params"] = [_human(v * 1e6) for v in part["params_m"]]
        out[f"{prefix}FLOPs"] = [_human(v * 1e9) for v in part["flops_g"]]
        out[f"{prefix}paper"] = [_fmt(v) for v in part["published_top1"]]
        out[f"{prefix}Δ"] = [_fmt(v, signed=True) for v in part["delta"]]
        out[f"{prefix}seeds"] = [str(int(v)) if pd.notna(v) else "0" for v in part["seeds"]]
        out[f"{prefix}status"] = [s if isinstance(s, str) else "missing" for s in part["status"]]
    return out


def to_markdown(display: pd.DataFrame, title: str = "") -> str:
    """A GitHub Markdown table (pandas' own needs ``tabulate``, which the stack does not pin)."""
    header = [str(c) for c in display.columns]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for values in display.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |")
    return "\n".join(lines) + "\n"


def to_latex(display: pd.DataFrame, title: str = "") -> str:
    """A booktabs LaTeX table of the display frame."""
    body = display.rename(columns=lambda c: str(c).replace("Δ", r"$\Delta$"))
    body = body.map(lambda v: str(v).replace("±", r"$\pm$").replace("—", "--").replace("_", r"\_"))
    latex = body.to_latex(index=False, escape=False, column_format="l" * len(body.columns))
    return (f"% {title}\n" if title else "") + latex


def _axis_key(table: str, row: str, setting: str) -> tuple[bool, float, str, str]:
    """Sort key of a row: numeric axis value first (rows without one last), then the labels."""
    x = _x_value(table, row)
    return (math.isnan(x), 0.0 if math.isnan(x) else x, row, setting)


def _x_value(table: str, row: str) -> float:
    """The plotted x of a paper row: width, p, f, the stage-1 kernel, or N."""
    try:
        if table == "table8":
            return float(row.split("/")[1].rstrip("x"))
        if table in ("adapt_p", "adapt_f", "table9"):
            return float(row.split("=")[1])
        return float(row.split("-")[0])
    except (IndexError, ValueError):
        return math.nan


_X_LABELS = {
    "table8": "width factor (sparsity rises with it)",
    "adapt_p": "adaptation rate p",
    "adapt_f": "adaptation frequency f (steps)",
    "table9": "short edge N",
    "table1": "stage-1 kernel size (paper)",
    "table2": "stage-1 kernel size (paper)",
}


def plot_table(summary: pd.DataFrame, table: str, path: Path) -> Path | None:
    """Our top-1 (error bars = std over seeds) against the table's axis, one line per setting.

    Returns ``None`` when no cell has a number yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = summary.assign(x=[_x_value(table, r) for r in summary["row"]]).dropna(subset=["x", "top1"])
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for setting, part in data.groupby("setting", sort=False):
        part = part.sort_values("x")
        ax.errorbar(
            part["x"],
            part["top1"],
            yerr=part["top1_std"].fillna(0),
            marker="o",
            capsize=3,
            label=str(setting),
        )
        if table == "table8":
            for x, y, row in zip(part["x"], part["top1"], part["row"], strict=True):
                ax.annotate(
                    f"s={row.split('/')[0]}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
    if table == "adapt_f":
        ax.set_xscale("log")
    ax.set_xlabel(_X_LABELS.get(table, "point"))
    ax.set_ylabel("our top-1 (%)")
    ax.set_title(TABLE_TITLES.get(table, table), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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


def collate_experiment(
    uri: str, mlflow_experiment: str, experiment: str, out_dir: str | Path, *, log_to_parent: bool = True
) -> CollatedExperiment:
    """Rebuild every table of Tune experiment ``experiment`` from MLflow and write them under ``out_dir``.

    Args:
        uri: MLflow tracking URI (``tracking.uri``).
        mlflow_experiment: MLflow experiment holding the runs (``tracking.experiment``).
        experiment: the Tune experiment's name (tag ``slak.experiment`` of its parent and trial runs).
        out_dir: where the files go.
        log_to_parent: also attach every file to the parent run (artifact folder ``tables/``).

    Writes ``trials.parquet`` (tidy, one row per trial run), and per table ``<table>.md``, ``.tex``,
    ``.csv`` (the numeric summary) and ``.png``; attaches them to the experiment's parent run under
    ``tables/`` when ``log_to_parent``.
    """
    runs = tracking.runs_dataframe(uri, mlflow_experiment)
    trial_ids = runs["run_id"][_tag(runs, "slak.experiment") == experiment].tolist() if len(runs) else []
    histories = tracking.metric_history(uri, trial_ids, [TOP1, EMA_TOP1]) if trial_ids else None
    tidy = tidy_runs(runs, experiment, histories)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = CollatedExperiment(experiment, tidy, tables_from_tidy(tidy))
    tidy_path = out / "trials.parquet"
    tidy.to_parquet(tidy_path, engine="pyarrow", index=False)
    result.files.append(tidy_path)
    sections = []
    note = (
        "Published numbers are ImageNet-1K top-1 after 120 epochs (paper). Our params/FLOPs are for the "
        "model we trained, sparse weights not counted."
    )
    for table, summary in result.tables.items():
        display = to_display(summary)
        title = f"{TABLE_TITLES.get(table, table)} — {experiment}"
        markdown = to_markdown(display, title)
        sections.append(markdown)
        for suffix, text in ((".md", markdown + "\n" + note + "\n"), (".tex", to_latex(display, title))):
            path = out / f"{table}{suffix}"
            path.write_text(text, encoding="utf-8")
            result.files.append(path)
        csv_path = out / f"{table}.csv"
        summary.to_csv(csv_path, index=False)
        result.files.append(csv_path)
        png = plot_table(summary, table, out / f"{table}.png")
        if png is not None:
            result.files.append(png)
    result.markdown = "\n".join(sections) + ("\n" + note + "\n" if sections else "")
    if log_to_parent:
        parent = _parent_run_id(runs, experiment)
        if parent is not None:
            for path in result.files:
                tracking.log_artifact_to_run(uri, parent, path, "tables")
        else:
            logger.warning(
                "no parent run found for experiment %s; tables were only written to %s", experiment, out
            )
    return result


def _parent_run_id(runs: pd.DataFrame, experiment: str) -> str | None:
    if runs.empty or "tags.slak.grid_role" not in runs:
        return None
    parents = runs[
        (runs["tags.slak.grid_role"] == "experiment") & (_tag(runs, "slak.experiment") == experiment)
    ]
    return None if parents.empty else str(parents.sort_values("start_time").iloc[-1]["run_id"])
