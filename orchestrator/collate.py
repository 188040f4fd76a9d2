"""MLflow runs of one experiment -> a tidy per-trial table -> the paper's tables and plots.

Every step is a pure function of a DataFrame so that it can be tested on fake runs and re-run at any
time, also while the experiment is still going: cells without a finished run are marked, never
dropped. The only I/O lives in :func:`collate_experiment` (read runs through ``tracking``, write
parquet / Markdown / LaTeX / CSV / PNG, attach them to the experiment's parent run).

Layout of a table: one line per paper row (kernel sizes, (sparsity, width) pair, N, p or f) and, per
setting of that table (naive / RepLKNet, decomposed / sparse groups / + width, ...), our top-1 of the
final epoch (mean ± std over seeds and a 95 % t-interval), whether the row differs detectably from the
table's best, the best epoch, EMA top-1, params and FLOPs as counted for our model (sparsity-aware) and
the published top-1.

What the paper column means depends on the recipe the trials ran (:class:`Recipe`, read from their
params): beside a laptop proxy (procedural data, tiny images, a few epochs) the ImageNet numbers are
context only, so no difference to them is printed and the comparison is one of directions (which row
ranks best, and whether the paper's best-vs-worst order shows on ours); on an ImageNet-style folder the
difference ``Δ`` is printed, and said to be like-for-like only when epochs and resolution match the paper.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from orchestrator import paper, tracking

__all__ = [
    "TABLE_TITLES",
    "CollatedExperiment",
    "Recipe",
    "collate_experiment",
    "direction_lines",
    "find_experiment",
    "plot_table",
    "recipe_of",
    "summarize",
    "summary_metrics",
    "t_interval",
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


def _vs_best(lines: list[dict[str, Any]]) -> None:
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
    _vs_best(lines)
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


@dataclass(frozen=True)
class Recipe:
    """What the trials of one table ran on, read from their logged params.

    It decides what the paper column means: beside a *proxy* (any ``data.source`` but ``imagenet``) the
    paper's ImageNet numbers are context and no Δ is printed; on ``imagenet`` the Δ is printed, and is
    like-for-like only when ``matches_paper`` (same epochs and resolution as the paper's runs; whether the
    folder really is ImageNet-1K cannot be read from the params, and is assumed).
    """

    source: str = ""
    image_size: int | None = None
    epochs: int | None = None
    train_size: int | None = None
    seeds: int = 0
    data_path: str = ""
    paper_epochs: int | None = None
    paper_image_size: int | None = None

    @property
    def proxy(self) -> bool:
        """True unless the trials trained on an ImageNet-style folder."""
        return self.source != "imagenet"

    @property
    def matches_paper(self) -> bool:
        """ImageNet with the paper's epochs and resolution."""
        return (not self.proxy and self.paper_epochs is not None and self.epochs == self.paper_epochs
                and self.image_size == self.paper_image_size)

    def describe(self) -> str:
        """One paragraph that says what the table's numbers can and cannot be compared with."""
        seeds = f"{self.seeds} seed{'s' if self.seeds != 1 else ''} per row"
        paper = (f"ImageNet-1K top-1 after {self.paper_epochs} epochs at {self.paper_image_size} px"
                 if self.paper_epochs is not None else None)
        if self.proxy:
            what = (f"LAPTOP PROXY, not ImageNet: data.source={self.source or 'unknown'}, "
                    f"{_count(self.train_size)} training images of {_count(self.image_size)} px, "
                    f"{_count(self.epochs)} epochs, {seeds}.")
            if paper is None:
                return what
            return (f"{what} The paper column ({paper}) is context only: no difference to it is computed. "
                    "Compare directions: which row each ranks best, and whether the paper's best-vs-worst "
                    "order shows on ours.")
        where = f"an ImageNet-style folder ({self.data_path})" if self.data_path else "an ImageNet-style folder"
        what = f"{where}, {_count(self.image_size)} px, {_count(self.epochs)} epochs, {seeds}."
        if paper is None:
            return what
        if self.matches_paper:
            return (f"{what} The recipe matches the paper's ({paper}): Δ = ours − paper (assuming the folder "
                    "is ImageNet-1K).")
        return (f"{what} The recipe DIFFERS from the paper's ({paper}): Δ is printed but measures the recipe "
                "as much as the model; it is not a like-for-like comparison.")


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _param(part: pd.DataFrame, name: str) -> Any:
    """The value most trials logged for param ``name`` (None when absent)."""
    if name not in part or part[name].dropna().empty:
        return None
    return part[name].dropna().mode().iloc[0]


def recipe_of(tidy: pd.DataFrame, table: str) -> Recipe:
    """The :class:`Recipe` of ``table``'s trials in ``tidy`` (their ``data.*`` / ``train.*`` params)."""
    part = tidy[tidy["table"] == table] if len(tidy) else tidy
    paper_recipe = paper.paper_recipe(table)

    def number(name: str) -> int | None:
        value = pd.to_numeric(_param(part, name), errors="coerce")
        return None if value is None or pd.isna(value) else int(value)

    seeds = int(part.groupby(["row", "setting"])["seed_index"].nunique().max()) if len(part) else 0
    return Recipe(
        source=str(_param(part, "data.source") or ""),
        image_size=number("data.image_size"),
        epochs=number("train.epochs"),
        train_size=number("data.train_size"),
        seeds=seeds,
        data_path="" if str(_param(part, "data.path")) in ("None", "") else str(_param(part, "data.path")),
        paper_epochs=paper_recipe[0] if paper_recipe else None,
        paper_image_size=paper_recipe[1] if paper_recipe else None,
    )


def _ci_text(low: float, high: float) -> str:
    return _MISSING if math.isnan(low) else f"[{low:.1f}, {high:.1f}]"


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


def to_display(summary: pd.DataFrame, recipe: Recipe | None = None) -> pd.DataFrame:
    """Strings laid out like the paper: one line per row, a column group per setting.

    ``Δ`` (ours − paper) is shown only for trials on ImageNet (``recipe`` not a proxy); without a recipe,
    or beside a proxy, the paper column is context and no difference is printed.
    """
    show_delta = recipe is not None and not recipe.proxy
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
        out[f"{prefix}95% CI"] = [_ci_text(lo, hi) for lo, hi in zip(part["top1_ci_low"], part["top1_ci_high"],
                                                                      strict=True)]
        out[f"{prefix}vs best"] = [v if isinstance(v, str) and v else _MISSING for v in part["vs_best"]]
        out[f"{prefix}best epoch"] = [_fmt(v) for v in part["top1_best"]]
        if part["ema_top1"].notna().any():
            out[f"{prefix}EMA"] = [_fmt(v) for v in part["ema_top1"]]
        if part["density"].notna().any():
            out[f"{prefix}density"] = [_fmt(v, 2) for v in part["density"]]
        out[f"{prefix}params"] = [_human(v * 1e6) for v in part["params_m"]]
        out[f"{prefix}FLOPs"] = [_human(v * 1e9) for v in part["flops_g"]]
        out[f"{prefix}paper{'' if show_delta else ' (context)'}"] = [_fmt(v) for v in part["published_top1"]]
        if show_delta:
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
    ``.csv`` (the numeric summary) and ``.png``; when ``log_to_parent``, attaches them to the experiment's
    parent run under ``tables/``, with each summary as an MLflow table (``tables/<table>_summary.json``,
    which the UI previews) and its cells as metrics (:func:`summary_metrics`).
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
    metrics: dict[str, float] = {}
    for table, summary in result.tables.items():
        recipe = recipe_of(tidy, table)
        display = to_display(summary, recipe)
        title = f"{TABLE_TITLES.get(table, table)} — {experiment}"
        directions = direction_lines(summary)
        text = "\n".join([
            to_markdown(display, title),
            recipe.describe(),
            _INTERVALS_NOTE,
            *([""] + [f"- {line}" for line in directions] if directions else []),
        ]) + "\n"
        sections.append(text)
        for suffix, body in ((".md", text), (".tex", to_latex(display, title))):
            path = out / f"{table}{suffix}"
            path.write_text(body, encoding="utf-8")
            result.files.append(path)
        csv_path = out / f"{table}.csv"
        summary.to_csv(csv_path, index=False)
        result.files.append(csv_path)
        png = plot_table(summary, table, out / f"{table}.png", recipe)
        if png is not None:
            result.files.append(png)
        metrics.update(summary_metrics(summary, table))
    result.markdown = "\n".join(sections)
    if log_to_parent:
        parent = _parent_run_id(runs, experiment)
        if parent is not None:
            for path in result.files:
                tracking.log_artifact_to_run(uri, parent, path, "tables")
            for table, summary in result.tables.items():
                tracking.log_table_to_run(uri, parent, summary, f"tables/{table}_summary.json")
            tracking.log_metrics_to_run(uri, parent, metrics)
        else:
            logger.warning(
                "no parent run found for experiment %s; tables were only written to %s", experiment, out
            )
    return result


_INTERVALS_NOTE = (
    "Intervals: 95 % Student-t over seeds; 'no difference detectable' = the row's interval overlaps the table's "
    "best row's. Our params/FLOPs are for the model we trained, sparse weights not counted."
)


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


def _parent_run_id(runs: pd.DataFrame, experiment: str) -> str | None:
    if runs.empty or "tags.slak.grid_role" not in runs:
        return None
    parents = runs[
        (runs["tags.slak.grid_role"] == "experiment") & (_tag(runs, "slak.experiment") == experiment)
    ]
    return None if parents.empty else str(parents.sort_values("start_time").iloc[-1]["run_id"])
