"""Collation logic on fake MLflow runs: tidy rows, seed aggregation, missing cells, output formats."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.collate.display import to_display, to_latex, to_markdown
from orchestrator.collate.plot import plot_table
from orchestrator.collate.recipe import Recipe, recipe_of
from orchestrator.collate.runs import find_experiment, tidy_runs
from orchestrator.collate.statistics import BEST, NO_INTERVAL, direction_lines, t_interval
from orchestrator.collate.summary import summarize, summary_metrics

EXP = "table8-20260101-000000"
PUBLISHED8 = pd.DataFrame(
    {
        "row": ["0.20/1.1x", "0.40/1.3x", "0.55/1.5x"],
        "setting": ["slak"] * 3,
        "top1": [81.3, 81.6, 81.7],
        "params_m": [29.0, 30.0, 30.0],
        "flops_g": [5.0, 5.0, 4.9],
        "axis": [1.1, 1.3, 1.5],
    }
)


def _run(
    run_id: str,
    row: str,
    seed: int,
    status: str = "FINISHED",
    top1: float | None = 70.0,
    *,
    table: str = "table8",
    setting: str = "slak",
    experiment: str = EXP,
    stopped: bool = False,
    width: str = "1.1",
    axis: float | None = None,
) -> dict:
    """One trial run as MLflow lists it; ``axis`` is what the trial driver tags (Table 8: the width)."""
    axis = float(width) if axis is None and table == "table8" else axis
    record = {
        "run_id": run_id,
        "status": status,
        "start_time": pd.Timestamp("2026-01-01", tz="UTC"),
        "tags.slak.grid_role": "trial",
        "tags.slak.experiment": experiment,
        "tags.slak.table": table,
        "tags.slak.row": row,
        "tags.slak.setting": setting,
        "tags.slak.point": f"{row}__{setting}",
        "tags.slak.axis": None if axis is None else repr(float(axis)),
        "tags.slak.seed_index": str(seed),
        "tags.ray_trial_id": f"t_{run_id}",
        "tags.mlflow.runName": run_id,
        "tags.slak.stopped_early": "asha" if stopped else None,
        "params.model.width_factor": width,
        "params.sparse.sparsity": "0.2",
        "params.model.kernel_mode": "decomposed",
        "metrics.epochs_done": 3.0,
        "metrics.complexity/params": 2.5e6,
        "metrics.complexity/flops": 1.2e8,
    }
    if top1 is not None:
        record["metrics.val/top1"] = top1
    return record


@pytest.fixture()
def runs() -> pd.DataFrame:
    parent = {
        "run_id": "p",
        "status": "RUNNING",
        "start_time": pd.Timestamp("2026-01-01", tz="UTC"),
        "tags.slak.grid_role": "experiment",
        "tags.slak.experiment": EXP,
        "tags.slak.table": "table8",
    }
    return pd.DataFrame(
        [
            parent,
            _run("a", "0.20/1.1x", 0, top1=70.0),
            _run("b", "0.20/1.1x", 1, top1=72.0),
            _run("c", "0.40/1.3x", 0, status="FAILED", top1=None, width="1.3"),
            _run("d", "0.40/1.3x", 1, status="RUNNING", top1=50.0, width="1.3"),
            _run("e", "0.90/3x", 0, top1=60.0, setting="extra", width="3.0", stopped=True),
            _run("z", "0.20/1.1x", 0, top1=10.0, experiment="another-experiment"),
        ]
    )


def test_tidy_keeps_only_trials_of_the_experiment_with_dotted_params(runs: pd.DataFrame) -> None:
    tidy = tidy_runs(runs, EXP)
    assert sorted(tidy["run_id"]) == ["a", "b", "c", "d", "e"]
    assert tidy["model.width_factor"].dtype.kind == "f"  # numeric params are typed
    assert tidy.loc[tidy["run_id"] == "a", "params_m"].item() == pytest.approx(2.5)
    assert tidy.loc[tidy["run_id"] == "a", "flops_g"].item() == pytest.approx(0.12)
    assert tidy.loc[tidy["run_id"] == "e", "stopped_early"].item()
    assert not tidy.loc[tidy["run_id"] == "a", "stopped_early"].item()


def test_best_comes_from_the_metric_history(runs: pd.DataFrame) -> None:
    history = pd.DataFrame(
        {"run_id": ["a", "a", "a"], "key": ["val/top1"] * 3, "step": [0, 1, 2], "value": [50.0, 75.0, 70.0]}
    )
    tidy = tidy_runs(runs, EXP, history).set_index("run_id")
    assert tidy.loc["a", "top1_final"] == 70.0 and tidy.loc["a", "top1_best"] == 75.0
    assert tidy.loc["b", "top1_best"] == 72.0  # no history -> best is the final value


def test_summary_aggregates_seeds_marks_missing_and_failed_and_computes_delta(runs: pd.DataFrame) -> None:
    summary = summarize(tidy_runs(runs, EXP), "table8", PUBLISHED8).set_index("row")
    first = summary.loc["0.20/1.1x"]
    assert first["seeds"] == 2 and first["top1"] == pytest.approx(71.0)
    assert first["top1_std"] == pytest.approx(math.sqrt(2.0))
    assert first["delta"] == pytest.approx(71.0 - 81.3)
    assert first["status"] == "2 done"
    second = summary.loc["0.40/1.3x"]
    assert second["seeds"] == 0 and math.isnan(second["top1"]) and second["status"] == "1 running, 1 failed"
    assert summary.loc["0.55/1.5x", "status"] == "missing"
    assert summary.loc["0.90/3x", "status"] == "1 done, 1 stopped early"
    assert math.isnan(summary.loc["0.90/3x", "published_top1"])
    # the paper's row order first, then extra points
    assert list(summary.index) == ["0.20/1.1x", "0.40/1.3x", "0.55/1.5x", "0.90/3x"]


def test_display_markdown_and_latex_mark_missing_cells(runs: pd.DataFrame) -> None:
    summary = summarize(tidy_runs(runs, EXP), "table8", PUBLISHED8)
    summary = summary[summary["setting"] == "slak"]
    display = to_display(summary)
    assert list(display.columns[:4]) == ["row", "top-1", "95% CI", "vs best"]
    assert display.loc[0, "top-1"] == "71.0 ± 1.4"
    assert display.loc[0, "95% CI"] == "[58.3, 83.7]"  # t(0.975, 1) = 12.706 times the standard error 1.0
    assert display.loc[2, "top-1"] == "—"
    markdown = to_markdown(display, "T8")
    assert markdown.startswith("### T8") and "| 0.55/1.5x | — |" in markdown
    latex = to_latex(display, "T8")
    assert r"\begin{tabular}" in latex and r"71.0 $\pm$ 1.4" in latex and "--" in latex


def test_multi_setting_tables_get_one_column_group_per_setting() -> None:
    runs = pd.DataFrame(
        [
            _run("n", "31-29-27-13", 0, table="table1", setting="naive", top1=60.0),
            _run("r", "31-29-27-13", 0, table="table1", setting="replknet", top1=65.0),
        ]
    )
    published = pd.DataFrame(
        {
            "row": ["7-7-7-7", "31-29-27-13", "31-29-27-13"],
            "setting": ["naive", "naive", "replknet"],
            "top1": [81.0, 80.5, 81.5],
        }
    )
    imagenet = Recipe(source="imagenet", image_size=224, epochs=120, seeds=1, paper_epochs=120,
                              paper_image_size=224)
    display = to_display(summarize(tidy_runs(runs, EXP), "table1", published), imagenet)
    assert list(display["row"]) == ["7-7-7-7", "31-29-27-13"]
    assert display.loc[1, "naive top-1"] == "60.0" and display.loc[1, "replknet top-1"] == "65.0"
    assert display.loc[0, "replknet status"] == "missing"
    assert display.loc[1, "replknet Δ"] == "-16.5"


def test_empty_experiment_collates_to_empty_frames() -> None:
    tidy = tidy_runs(pd.DataFrame(columns=["run_id", "status"]), EXP)
    assert tidy.empty
    summary = summarize(tidy, "table8", PUBLISHED8)
    assert list(summary["status"]) == ["missing"] * 3


def test_plot_and_parquet_are_written(runs: pd.DataFrame, tmp_path: Path) -> None:
    tidy = tidy_runs(runs, EXP)
    tidy.to_parquet(tmp_path / "trials.parquet", engine="pyarrow", index=False)
    assert len(pd.read_parquet(tmp_path / "trials.parquet")) == len(tidy)
    png = plot_table(summarize(tidy, "table8", PUBLISHED8), "table8", tmp_path / "t8.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    empty = summarize(tidy.iloc[0:0], "table8", PUBLISHED8)
    assert plot_table(empty, "table8", tmp_path / "none.png") is None


def test_find_experiment_picks_the_newest_parent_of_a_table(runs: pd.DataFrame) -> None:
    older = {
        "run_id": "p0",
        "status": "FINISHED",
        "start_time": pd.Timestamp("2025-01-01", tz="UTC"),
        "tags.slak.grid_role": "experiment",
        "tags.slak.experiment": "table8-old",
        "tags.slak.table": "table8",
    }
    both = pd.concat([runs, pd.DataFrame([older])], ignore_index=True)
    assert find_experiment(both, "table8") == EXP
    assert find_experiment(both, "table1") is None


def test_rows_without_published_cells_follow_the_numeric_axis() -> None:
    runs = pd.DataFrame(
        [_run(r, f"f={f}", 0, table="adapt_f", axis=f) for r, f in (("a", 1000), ("b", 100), ("c", 20))]
    )
    summary = summarize(tidy_runs(runs, EXP), "adapt_f", None)
    assert list(summary["row"]) == ["f=20", "f=100", "f=1000"]
    assert summary["published_top1"].isna().all()


def _seeded(row: str, values: list[float], *, table: str = "table8", setting: str = "slak",
            collapsed: list[float] | None = None, **params: str) -> list[dict]:
    records = []
    for i, value in enumerate(values):
        record = _run(f"{row}-{setting}-{i}", row, i, top1=value, table=table, setting=setting)
        record.update({f"params.{k.replace('__', '.')}": v for k, v in params.items()})
        if collapsed is not None:
            record["metrics.sparsity/collapsed_layers"] = collapsed[i]
        records.append(record)
    return records


def test_t_interval_uses_students_t_and_needs_two_values() -> None:
    low, high = t_interval(pd.Series([70.0, 72.0, 74.0]))
    assert (low + high) / 2 == pytest.approx(72.0)
    assert high - low == pytest.approx(2 * 4.303 * 2.0 / math.sqrt(3), rel=1e-3)  # t(0.975, 2) * s / sqrt(n)
    assert all(math.isnan(v) for v in t_interval(pd.Series([70.0])))


def test_rows_are_compared_with_the_best_by_their_intervals() -> None:
    runs = pd.DataFrame(
        _seeded("0.20/1.1x", [70.0, 71.0, 72.0])
        + _seeded("0.40/1.3x", [69.0, 71.5, 73.0])  # overlaps the best
        + _seeded("0.55/1.5x", [40.0, 41.0, 42.0])  # far below
    )
    summary = summarize(tidy_runs(runs, EXP), "table8", PUBLISHED8).set_index("row")
    assert summary.loc["0.40/1.3x", "vs_best"] == BEST  # highest mean, 71.17
    assert summary.loc["0.20/1.1x", "vs_best"] == "no difference detectable"
    assert summary.loc["0.55/1.5x", "vs_best"] == "lower"
    one_seed = summarize(tidy_runs(pd.DataFrame(_seeded("0.20/1.1x", [70.0])
                                                                + _seeded("0.40/1.3x", [60.0])), EXP),
                                 "table8", PUBLISHED8).set_index("row")
    assert one_seed.loc["0.40/1.3x", "vs_best"] == NO_INTERVAL


def test_a_proxy_shows_the_paper_as_context_and_no_delta() -> None:
    runs = pd.DataFrame(
        _seeded("0.20/1.1x", [30.0, 31.0, 32.0], data__source="shapes", data__image_size="32",
                train__epochs="10", data__train_size="1024")
    )
    tidy = tidy_runs(runs, EXP)
    recipe = recipe_of(tidy, "table8")
    assert recipe.proxy and recipe.seeds == 3 and recipe.epochs == 10 and recipe.image_size == 32
    assert (recipe.paper_epochs, recipe.paper_image_size) == (120, 224)
    text = recipe.describe()
    assert "LAPTOP PROXY" in text and "shapes" in text and "1,024" in text and "3 seeds" in text
    display = to_display(summarize(tidy, "table8", PUBLISHED8), recipe)
    assert "Δ" not in display.columns and "paper (context)" in display.columns


def test_imagenet_prints_delta_and_says_when_the_recipe_differs() -> None:
    short = Recipe(source="imagenet", image_size=160, epochs=30, seeds=1, data_path="/data/in",
                           paper_epochs=120, paper_image_size=224)
    assert not short.proxy and not short.matches_paper and "DIFFERS" in short.describe()
    same = Recipe(source="imagenet", image_size=224, epochs=120, seeds=1, paper_epochs=120,
                          paper_image_size=224)
    assert same.matches_paper and "matches the paper's" in same.describe()
    summary = summarize(tidy_runs(pd.DataFrame(_seeded("0.20/1.1x", [80.0])), EXP), "table8",
                                PUBLISHED8)
    assert to_display(summary, short).loc[0, "Δ"] == "-1.3"


def test_directions_compare_the_papers_order_with_ours() -> None:
    agree = pd.DataFrame(
        _seeded("0.20/1.1x", [50.0, 51.0, 52.0]) + _seeded("0.40/1.3x", [60.0, 61.0, 62.0])
        + _seeded("0.55/1.5x", [70.0, 71.0, 72.0])
    )
    lines = direction_lines(summarize(tidy_runs(agree, EXP), "table8", PUBLISHED8))
    assert len(lines) == 1 and "paper ranks 0.55/1.5x best" in lines[0] and "ours ranks 0.55/1.5x" in lines[0]
    assert "best row: agrees" in lines[0] and "same order as the paper" in lines[0]
    assert "0.20/1.1x worst (81.3)" in lines[0]
    noisy = pd.DataFrame(
        _seeded("0.20/1.1x", [40.0, 60.0, 50.0]) + _seeded("0.40/1.3x", [45.0, 62.0, 52.0])
        + _seeded("0.55/1.5x", [41.0, 58.0, 49.0])
    )
    lines = direction_lines(summarize(tidy_runs(noisy, EXP), "table8", PUBLISHED8))
    assert "no difference detectable" in lines[0] and "agrees" not in lines[0]
    reversed_ = pd.DataFrame(_seeded("0.20/1.1x", [70.0, 71.0, 72.0]) + _seeded("0.55/1.5x", [40.0, 41.0, 42.0]))
    lines = direction_lines(summarize(tidy_runs(reversed_, EXP), "table8", PUBLISHED8))
    assert "DIFFERS" in lines[0] and "REVERSED" in lines[0]


def test_collapsed_layers_mark_the_row_when_the_metric_is_there(tmp_path: Path) -> None:
    runs = pd.DataFrame(
        _seeded("0.20/1.1x", [50.0, 51.0, 52.0], collapsed=[0.0, 2.0, 0.0])
        + _seeded("0.40/1.3x", [60.0, 61.0, 62.0], collapsed=[0.0, 0.0, 0.0])
        + _seeded("0.55/1.5x", [70.0, 71.0, 72.0])  # metric absent: unknown, no mark
    )
    summary = summarize(tidy_runs(runs, EXP), "table8", PUBLISHED8).set_index("row")
    assert summary.loc["0.20/1.1x", "collapsed"] == 1 and summary.loc["0.20/1.1x", "status"] == "3 done, 1 collapsed"
    assert summary.loc["0.40/1.3x", "collapsed"] == 0 and summary.loc["0.40/1.3x", "status"] == "3 done"
    assert math.isnan(summary.loc["0.55/1.5x", "collapsed"]) and summary.loc["0.55/1.5x", "status"] == "3 done"
    png = plot_table(summary.reset_index(), "table8", tmp_path / "t8.png")
    assert png is not None and png.stat().st_size > 0


def test_summary_metrics_name_every_cell_with_allowed_characters() -> None:
    runs = pd.DataFrame(_seeded("N=5", [50.0, 52.0], table="table9"))
    metrics = summary_metrics(summarize(tidy_runs(runs, EXP), "table9", None), "table9")
    assert metrics["table9/slak/N_5/top1_mean"] == pytest.approx(51.0)
    assert metrics["table9/slak/N_5/seeds"] == 2 and "table9/slak/N_5/top1_ci_low" in metrics


def test_the_axis_comes_typed_from_the_grid_point_not_from_the_row_label() -> None:
    """Rows sort and plot by the number the trial driver tagged (``slak.axis``), whatever the label says."""
    from orchestrator.config.loading import load_config
    from orchestrator.search_space import GridPoint, sparsity_width_grid
    from orchestrator.tune_trial import trial_identity

    point = sparsity_width_grid(load_config(None, {}))[1]
    assert point.axis == 1.3 and GridPoint.from_dict(point.to_dict()) == point
    _, tags = trial_identity({"point": point.to_dict(), "seed_index": 0, "experiment": EXP}, "t1")
    assert float(tags["slak.axis"]) == 1.3
    runs = pd.DataFrame([_run(r, label, 0, table="adapt_f", axis=x)
                         for r, label, x in (("a", "late", 500), ("b", "early", 20), ("c", "middle", 100))])
    summary = summarize(tidy_runs(runs, EXP), "adapt_f", None)
    assert list(summary["row"]) == ["early", "middle", "late"] and list(summary["axis"]) == [20, 100, 500]
