"""One experiment collated end to end: runs read from MLflow, tables and plots written, the parent run given them.

This is the only module of the package with I/O (through :mod:`orchestrator.tracking` and the file
system); the steps it chains are pure functions of DataFrames in the modules beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from orchestrator import tracking
from orchestrator.collate.display import INTERVALS_NOTE, TABLE_TITLES, to_display, to_latex, to_markdown
from orchestrator.collate.plot import plot_table
from orchestrator.collate.recipe import recipe_of
from orchestrator.collate.runs import EMA_TOP1, TOP1, experiment_run_ids, parent_run_id, tidy_runs
from orchestrator.collate.statistics import direction_lines
from orchestrator.collate.summary import summary_metrics, tables_from_tidy

__all__ = ["CollatedExperiment", "collate_experiment"]

logger = logging.getLogger(__name__)


@dataclass
class CollatedExperiment:
    """What :func:`collate_experiment` produced: the frames and every file written."""

    experiment: str
    tidy: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    files: list[Path] = field(default_factory=list)
    markdown: str = ""


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
    trial_ids = experiment_run_ids(runs, experiment)
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
            INTERVALS_NOTE,
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
        parent = parent_run_id(runs, experiment)
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
