"""Distillation runs beside the published large-to-small numbers: one line per student run, and one per
published cell that no run has reached yet.

The distillation jobs are single training runs (``experiments/train.py`` with a ``distill_*`` preset), not
Tune grids, so their lines come straight from MLflow's runs frame: every run that has a teacher
(``distill.teacher``) or trains a student architecture of the published table on labels alone (the
baseline it is compared with). A run is placed in the published table by its student's architecture
(``convnext_tiny`` = ConvNeXt-T) and its teacher (``slak_tiny`` = SLaK-T). The difference to the paper is
printed only for runs of the paper's recipe (an ImageNet-style folder, 300 epochs, 224 px); beside anything
else the published number is context.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from orchestrator import paper
from slak_model.published import L2S_STUDENTS, L2S_TEACHERS, TABLES

__all__ = ["COLUMNS", "distillation_table", "to_markdown"]

TABLE = "l2s"
COLUMNS = ["student", "teacher", "run", "status", "loss", "temperature", "epochs", "data", "top1", "ema_top1",
           "teacher_top1", "published_top1", "delta"]
_STUDENT_ROWS = {model: row for row, model in L2S_STUDENTS.items()}
_TEACHER_SETTINGS = {variant: setting for setting, variant in L2S_TEACHERS.items()}


def _value(run: pd.Series, column: str) -> Any:
    value = run.get(column)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _number(run: pd.Series, column: str) -> float:
    value = pd.to_numeric(_value(run, column), errors="coerce")
    return math.nan if value is None or pd.isna(value) else float(value)


def _paper_recipe(run: pd.Series) -> bool:
    return (_value(run, "params.data.source") == "imagenet" and _number(run, "params.train.epochs") == 300
            and _number(run, "params.data.image_size") == 224)


def distillation_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The lines of the table from an ``mlflow.search_runs``-shaped frame (``params.*``, ``metrics.*``, ``tags.*``).

    Returns:
        Columns :data:`COLUMNS`: the student (the published row's name where it has one, else the model
        name), the teacher (``none`` without one), the run's name and status, the loss and temperature, the
        epochs and data source, the final ``val/top1`` and ``ema/top1``, the teacher's own ``teacher/top1``,
        the published top-1 and, for runs of the paper's recipe, ours minus it. Published cells without a
        run follow as ``missing``.
    """
    published = paper.published_cells(TABLE)
    cells = {(r, s): float(t) for r, s, t in zip(published["row"], published["setting"], published["top1"],
                                                 strict=True)}
    lines, seen = [], set()
    for _, run in runs.iterrows():
        student_model = _value(run, "params.model.variant")
        teacher_model = _value(run, "params.distill.teacher")
        if student_model is None or (teacher_model is None and student_model not in _STUDENT_ROWS):
            continue
        student = _STUDENT_ROWS.get(student_model, student_model)
        teacher = "none" if teacher_model is None else _TEACHER_SETTINGS.get(teacher_model, teacher_model)
        reference = cells.get((student, teacher), math.nan)
        top1 = _number(run, "metrics.val/top1")
        seen.add((student, teacher))
        lines.append({
            "student": student, "teacher": teacher, "run": _value(run, "tags.slak.run_name") or run.get("run_id"),
            "status": run.get("status"),
            "loss": _value(run, "params.distill.loss") if teacher_model is not None else "labels",
            "temperature": _number(run, "params.distill.temperature") if teacher_model is not None else math.nan,
            "epochs": _number(run, "params.train.epochs"), "data": _value(run, "params.data.source"),
            "top1": top1, "ema_top1": _number(run, "metrics.ema/top1"),
            "teacher_top1": _number(run, "metrics.teacher/top1"), "published_top1": reference,
            "delta": top1 - reference if _paper_recipe(run) else math.nan,
        })
    for (student, teacher), top1 in cells.items():
        if (student, teacher) not in seen:
            lines.append({"student": student, "teacher": teacher, "run": "", "status": "missing",
                          "published_top1": top1})
    order = {key: i for i, key in enumerate(cells)}
    table = pd.DataFrame(lines, columns=COLUMNS)
    rank = [order.get((s, t), len(order)) for s, t in zip(table["student"], table["teacher"], strict=True)]
    return table.assign(_rank=rank).sort_values(["_rank", "student", "teacher", "run"], kind="stable").drop(
        columns="_rank").reset_index(drop=True)


def _fmt(value: Any, digits: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def to_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, with the published table's caption and what ``Δ`` means."""
    header = ["student", "teacher", "run", "status", "loss", "T", "epochs", "data", "top-1", "EMA top-1",
              "teacher top-1", "published", "Δ"]
    lines = [f"**{TABLES[TABLE]}**", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for line in table.itertuples(index=False):
        cells = [line.student, line.teacher, line.run or "-", line.status, _fmt(line.loss), _fmt(line.temperature, 1),
                 _fmt(line.epochs, 0), _fmt(line.data), _fmt(line.top1, 2), _fmt(line.ema_top1, 2),
                 _fmt(line.teacher_top1, 2), _fmt(line.published_top1), _fmt(line.delta, 2, signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("Δ = our top-1 minus the published one, shown only for runs of the paper's recipe (ImageNet folder, "
            "300 epochs, 224 px); beside other runs the published number is context.")
    lines += ["", note]
    return "\n".join(lines)
