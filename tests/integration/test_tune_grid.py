"""A real 2-trial Table-8 grid: Ray Tune trials that are 2-worker Ray Train jobs or single-worker trials
trained in their own (reused) Tune actors, MLflow, collation, resume.

The first run is interrupted (SIGUSR1, Tune's graceful stop) as soon as its first trial finished; the
second call resumes it. Checked: one parent run with two nested trial runs, params under the dotted
names, every run ending FINISHED, the finished trial not trained again, and the collated Table 8.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from ray import tune  # noqa: E402

from orchestrator import cli, run_identity, search_space, tracking, tune_runner, tune_trial  # noqa: E402
from orchestrator.config.loading import load_config, replace  # noqa: E402
from orchestrator.search_space import GridPoint  # noqa: E402


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


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 1], ids=["ray-train-ddp", "in-trial-actor"])
def test_two_trial_grid_interrupt_and_resume(ray_cluster, tmp_path: Path, workers: int) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        None,
        {
            "run.name": "t8-itest",
            "run.num_workers": workers,
            "run.storage_path": str(tmp_path / "ray"),
            "tracking.uri": uri,
            "tracking.experiment": "itest",
            "tracking.offline_dir": str(tmp_path / "offline"),
            "tune.max_concurrent_trials": 1,
            "tune.seeds": 1,
            "train.epochs": 2,
        },
    )
    points = search_space.sparsity_width_grid(cfg)[:2]

    first = tune_runner.run_experiment(
        cfg, points, table="table8", callbacks=[_InterruptAfterFirstTrial(tmp_path / "interrupted")]
    )
    assert first.interrupted and first.trials == 2
    parents, children = _children(uri, "itest", "t8-itest")
    assert len(parents) == 1 and parents["status"].item() == "KILLED"
    done_first = children[children["status"] == "FINISHED"]
    assert len(done_first) == 1, children[["tags.slak.row", "status"]]
    finished_run = done_first["run_id"].item()
    history_before = tracking.metric_history(uri, [finished_run], ["val/top1"])

    # a changed setting on --resume is refused, naming it, before anything starts
    with pytest.raises(run_identity.RunConfigMismatchError, match=r"train\.epochs: 2 when it started, 3 now"):
        tune_runner.run_experiment(replace(cfg, {"train.epochs": 3}), points, table="table8", resume=True)

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

    # the parent run: the grid's axes (not the base config's values of them), the collated cells as metrics
    parent = tracking.runs_dataframe(uri, "itest").set_index("run_id").loc[parents["run_id"].item()]
    assert pd.isna(parent.get("params.sparse.sparsity")) and pd.isna(parent.get("params.model.width_factor"))
    assert parent["params.grid.sparse.sparsity"] == "[0.2, 0.4]"
    assert parent["params.grid.model.width_factor"] == "[1.1, 1.3]"
    assert parent["params.grid.train.seed"] == "[0]" and parent["params.train.epochs"] == "2"
    assert parent["metrics.table8/slak/0.20/1.1x/seeds"] == 1
    assert parent["tags.mlflow.source.name"] and parent["tags.mlflow.user"]
    for run_id in children["run_id"]:  # the trials' runs name the driver's script, not Ray's worker
        assert tracking.runs_dataframe(uri, "itest").set_index("run_id").loc[
            run_id, "tags.mlflow.source.name"] == parent["tags.mlflow.source.name"]

    table = second.collated.tables["table8"].set_index("row")
    assert list(table.loc[["0.20/1.1x", "0.40/1.3x"], "seeds"]) == [1, 1]
    assert table.loc["0.20/1.1x", "top1"] >= 0.0
    assert table.loc["0.82/2.5x", "status"] == "missing"
    assert (second.path / "tables" / "trials.parquet").exists()
    assert (second.path / "tables" / "table8.md").read_text().count("|") > 10


class _FakeTrial:
    """The few attributes of ``ray.tune.experiment.Trial`` the status callback reads."""

    def __init__(self, trial_id: str, config: dict, last_result: dict | None = None) -> None:
        self.trial_id, self.config, self.last_result = trial_id, config, last_result or {}
        self.error_file = "/tmp/error.txt"


def test_status_callback_sets_final_states_without_duplicates(tmp_path: Path) -> None:
    """No Ray needed: FINISHED, FINISHED + ASHA tag when stopped early, FAILED (run created if missing)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        None,
        {
            "tracking.uri": uri,
            "tracking.experiment": "cb",
            "train.epochs": 4,
            "tracking.offline_dir": str(tmp_path / "offline"),
        },
    )
    def config(row: str) -> dict:
        point = GridPoint("table8", row, "slak", {"sparse.sparsity": 0.2})
        return {
            "point": point.to_dict(),
            "seed_index": 0,
            "experiment": "cb-exp",
            "parent_run_id": None,
        }

    full, short, broken = (
        _FakeTrial("t1", config("a"), {"epochs_done": 4}),
        _FakeTrial("t2", config("b"), {"epochs_done": 1}),
        _FakeTrial("t3", config("c")),
    )
    existing = tune_trial._find_trial_run(cfg.tracking, full.config, "t1")  # the trial driver made its run
    callback = tune_trial.TrialStatusCallback(cfg, total_trials=3)
    callback.on_trial_complete(0, [], full)
    callback.on_trial_complete(0, [], short)
    callback.on_trial_error(0, [], broken)
    callback.on_trial_complete(0, [], full)  # a repeated event must not create a second run

    runs = tracking.runs_dataframe(uri, "cb").set_index("tags.ray_trial_id")
    assert sorted(runs.index) == ["t1", "t2", "t3"]
    assert runs.loc["t1", "run_id"] == existing
    assert dict(runs["status"]) == {"t1": "FINISHED", "t2": "FINISHED", "t3": "FAILED"}
    assert runs.loc["t2", "tags.slak.stopped_early"] == "asha"
    assert pd.isna(runs.loc["t1"].get("tags.slak.stopped_early"))
    assert runs.loc["t3", "tags.slak.grid_role"] == "trial"



@pytest.mark.slow
def test_grid_logs_to_a_tracking_server_over_http(ray_cluster, tmp_path: Path) -> None:
    """The same grid against a real ``mlflow server`` (sqlite behind it) at http://127.0.0.1:PORT: the
    trial drivers own their runs over http, so there is one parent, one child per trial, all FINISHED,
    every epoch's metrics on the server and nothing journaled offline. Single-worker trials train in their
    Tune actor, which the second trial reuses: only the first pays the process start."""
    from servers import ServerUnavailable, managed_mlflow_server

    try:
        server_cm = managed_mlflow_server("sqlite")
        server = server_cm.__enter__()
    except ServerUnavailable as exc:
        pytest.skip(f"sqlite tracking server unavailable here: {exc}")
    try:
        cfg = load_config(None, {
            **cli.LAPTOP_DEFAULTS, "train.epochs": 2, "data.train_size": 256, "data.val_size": 64,
            "run.name": "http-itest", "run.num_workers": 1, "run.storage_path": str(tmp_path / "ray"),
            "tracking.uri": server.uri, "tracking.experiment": "http", "tracking.offline_dir": str(tmp_path / "off"),
            "tune.max_concurrent_trials": 1, "tune.seeds": 1,
        })
        out = tune_runner.run_experiment(cfg, search_space.sparsity_width_grid(cfg)[:2], table="table8")
        assert not out.interrupted and out.errors == 0
        parents, children = _children(server.uri, "http", "http-itest")
        assert len(parents) == 1 and parents["status"].item() == "FINISHED"
        assert len(children) == 2 and set(children["status"]) == {"FINISHED"}
        assert set(children["tags.mlflow.parentRunId"]) == {parents["run_id"].item()}
        hist = tracking.metric_history(server.uri, list(children["run_id"]), ["val/top1"])
        assert len(hist) == 4, hist
        startup = children.filter(like="metrics.perf/startup/").notna()
        assert startup["metrics.perf/startup/worker_s"].all() and startup["metrics.perf/startup/trial_driver_s"].all()
        assert startup["metrics.perf/startup/process_s"].sum() == 1, "the second trial reuses the first one's actor"
        assert not (tmp_path / "off").exists(), "the server was up: nothing should have gone offline"
    finally:
        server_cm.__exit__(None, None, None)
