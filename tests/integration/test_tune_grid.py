"""A real 2-trial Table-8 grid: Ray Tune trials that are 2-worker Ray Train jobs, MLflow, collation, resume.

The first run is interrupted (SIGUSR1, Tune's graceful stop) as soon as its first trial finished; the
second call resumes it. Checked: one parent run with two nested trial runs, params under the dotted
names, every run ending FINISHED, the finished trial not trained again, and the collated Table 8.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

from ray import tune  # noqa: E402

from orchestrator import search_space, tracking, tune_runner  # noqa: E402
from orchestrator.config import load_config, replace  # noqa: E402


class _InterruptAfterFirstTrial(tune.Callback):
    """Sends Tune's stop signal once, after the first trial completed (a marker file makes it one-shot,
    also after ``Tuner.restore`` unpickles this callback again)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


def _children(uri: str, experiment: str, name: str):
    runs = tracking.runs_dataframe(uri, experiment)
    parents = runs[runs["tags.slak.grid_role"] == "experiment"]
    children = runs[(runs["tags.slak.grid_role"] == "trial") & (runs["tags.slak.experiment"] == name)]
    return parents, children


def test_two_trial_grid_interrupt_and_resume(ray_cluster, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, {
        "run.name": "t8-itest", "run.num_workers": 2, "run.storage_path": str(tmp_path / "ray"),
        "tracking.uri": uri, "tracking.experiment": "itest", "tracking.offline_dir": str(tmp_path / "offline"),
        "tune.max_concurrent_trials": 1, "tune.seeds": 1, "train.epochs": 2,
    })
    points = search_space.sparsity_width_grid(cfg)[:2]

    first = tune_runner.run_experiment(cfg, points, table="table8",
                                       callbacks=[_InterruptAfterFirstTrial(tmp_path / "interrupted")])
    assert first.interrupted and first.trials == 2
    parents, children = _children(uri, "itest", "t8-itest")
    assert len(parents) == 1 and parents["status"].item() == "KILLED"
    done_first = children[children["status"] == "FINISHED"]
    assert len(done_first) == 1, children[["tags.slak.row", "status"]]
    finished_run = done_first["run_id"].item()
    history_before = tracking.metric_history(uri, [finished_run], ["val/top1"])

    second = tune_runner.run_experiment(replace(cfg, {}), points, table="table8", resume=True)
    assert not second.interrupted and second.errors == 0
    parents, children = _children(uri, "itest", "t8-itest")
    assert len(parents) == 1 and parents["status"].item() == "FINISHED"
    assert len(children) == 2, "one MLflow run per trial, found again on resume"
    assert set(children["status"]) == {"FINISHED"}
    assert set(children["tags.mlflow.parentRunId"]) == {parents["run_id"].item()}
    # params keyed by the dotted config names
    assert sorted(children["params.sparse.sparsity"].astype(float)) == [0.2, 0.4]
    assert sorted(children["params.model.width_factor"].astype(float)) == [1.1, 1.3]
    assert "params.train.epochs" in children
    # the trial finished before the interruption was not trained again
    history_after = tracking.metric_history(uri, [finished_run], ["val/top1"])
    assert len(history_after) == len(history_before) == 2

    table = second.collated.tables["table8"].set_index("row")
    assert list(table.loc[["0.20/1.1x", "0.40/1.3x"], "seeds"]) == [1, 1]
    assert table.loc["0.20/1.1x", "top1"] >= 0.0
    assert table.loc["0.82/2.5x", "status"] == "missing"
    assert (second.path / "tables" / "trials.parquet").exists()
    assert (second.path / "tables" / "table8.md").read_text().count("|") > 10
