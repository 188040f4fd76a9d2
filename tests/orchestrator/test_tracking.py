"""MLflow tracking adapter against a real sqlite store: logging, rank-0 gating, offline journal, sync."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import zipfile
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from orchestrator import tracking
from orchestrator.config.schema import TrackingConfig
from orchestrator.tracking import MlflowTracker, NullTracker, Tracker, create_tracker, sync_offline
from orchestrator.tracking import journal as journal_module
from orchestrator.tracking import tracker as tracker_module
from slak_model.sparsity.masks import load_masks
from tests.orchestrator.sessions import CpuSession


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store per module: creating the schema costs seconds, experiments keep tests apart."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def cfg(uri: str, tmp_path: Path, request: pytest.FixtureRequest) -> TrackingConfig:
    return TrackingConfig(enabled=True, uri=uri, experiment=request.node.name.replace("[", "-").rstrip("]"),
                          offline_dir=str(tmp_path / "offline"))


def _dead_uri() -> str:
    """An http URI on a local port nobody listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _masks() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"stages.0.blocks.0.large.weight": torch.rand(4, 1, 7, 3, generator=gen) > 0.4,
            "stages.1.blocks.0.large.weight": torch.rand(6, 1, 5, 5, generator=gen) > 0.7}


def test_logs_params_metrics_masks_table_and_environment_tags(cfg: dict, uri: str, tmp_path: Path) -> None:
    masks = _masks()
    with create_tracker(cfg, run_name="smoke", tags={"purpose": "test"}, environment=True) as tr:
        assert isinstance(tr, MlflowTracker)
        tr.log_params({"model.kernel_size": [51, 49, 47, 13, 5], "sparse.sparsity": 0.4, "train.lr": 4e-3})
        for step in range(3):
            tr.log_metrics({"train/loss": 2.0 - step, "sparsity/density/stage0": 0.6}, step=step)
        for step in (2, 4):  # two topology updates: one archive, one history table
            tr.log_masks(masks, step=step)
            tr.log_density_table({"stage0": 0.6, "stage1": 0.3}, step=step)
        tr.log_final_sparsity(masks, {"stage0": 0.6, "stage1": 0.3}, step=4)
        tr.log_dict({"model": {"variant": "slak_test"}}, "config/resolved.yaml")
        tr.log_text("hello", "notes/readme.txt")
    client = MlflowClient(uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "smoke"
    assert run.data.params["model.kernel_size"] == "[51, 49, 47, 13, 5]"
    assert run.data.params["sparse.sparsity"] == "0.4"
    assert _history(client, tr.run_id, "train/loss") == [(0, 2.0), (1, 1.0), (2, 0.0)]
    tags = run.data.tags
    assert tags["purpose"] == "test"
    assert tags["slak.kernel.backend"] == "torch"
    assert tags["slak.version.torch"] == torch.__version__
    assert "slak.devices" in tags and "slak.git.commit" in tags

    out = tmp_path / "dl"
    top = sorted(a.path for a in client.list_artifacts(tr.run_id))
    assert {"masks.npz", "density.json", "masks"} <= set(top)  # the final state at fixed top-level paths
    assert sorted(a.path for a in client.list_artifacts(tr.run_id, "masks")) == [
        "masks/density_history_from_step00000002.json", "masks/history_from_step00000002.zip"]
    loaded = load_masks(Path(client.download_artifacts(tr.run_id, "masks.npz", str(out))))
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(loaded[name], mask), name
    archive = Path(client.download_artifacts(tr.run_id, "masks/history_from_step00000002.zip", str(out)))
    with zipfile.ZipFile(archive) as z:
        assert z.namelist() == ["masks_step00000002.npz", "masks_step00000004.npz"]
        z.extract("masks_step00000004.npz", out / "x")
    assert all(torch.equal(load_masks(out / "x" / "masks_step00000004.npz")[k], v) for k, v in masks.items())
    table = json.loads(Path(client.download_artifacts(tr.run_id, "density.json", str(out))).read_text())
    assert table["columns"] == ["layer", "density", "step"]
    assert [row[:2] for row in table["data"]] == [["stage0", 0.6], ["stage1", 0.3]]
    history = json.loads(Path(client.download_artifacts(
        tr.run_id, "masks/density_history_from_step00000002.json", str(out))).read_text())
    assert [row[2] for row in history["data"]] == [2, 2, 4, 4]
    yaml_text = Path(client.download_artifacts(tr.run_id, "config/resolved.yaml", str(out))).read_text()
    assert "variant: slak_test" in yaml_text
    assert Path(client.download_artifacts(tr.run_id, "notes/readme.txt", str(out))).read_text() == "hello"


@pytest.mark.parametrize("rank, enabled", [(1, True), (3, True), (0, False)], ids=["rank1", "rank3", "disabled"])
def test_other_ranks_and_disabled_tracking_get_a_null_tracker(cfg: dict, rank: int, enabled: bool) -> None:
    tr = create_tracker(dataclasses.replace(cfg, enabled=enabled), rank=rank)
    assert isinstance(tr, NullTracker) and isinstance(tr, Tracker)
    assert tr.run_id is None
    tr.log_metrics({"train/loss": 1.0}, step=0)
    tr.log_masks(_masks(), step=0)
    tr.end()
    assert not Path(cfg.offline_dir).exists()


def test_unreachable_server_keeps_everything_offline_then_sync_replays_once(
        cfg: dict, uri: str, caplog: pytest.LogCaptureFixture) -> None:
    dead = dataclasses.replace(cfg, uri=_dead_uri())
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        tr = create_tracker(dead, run_name="offline-run")
        tr.log_params({"train.lr": 0.1})
        for step in range(4):
            tr.log_metrics({"train/loss": float(step)}, step=step)
        tr.log_masks(_masks(), step=3)
        tr.end()
    unreachable = [r for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(unreachable) == 1, "warn once, not per call"
    assert "python -m orchestrator.tracking sync" in caplog.text
    assert tr.run_id.startswith("offline-")

    results = sync_offline(cfg.offline_dir, uri)
    assert len(results) == 1 and results[0]["pending"] == 0 and results[0]["rejected"] == 0
    client = MlflowClient(uri)
    run = client.get_run(results[0]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["slak.offline_synced"] == "true"
    assert run.data.params["train.lr"] == "0.1"
    assert _history(client, run.info.run_id, "train/loss") == [(s, float(s)) for s in range(4)]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "masks")] == ["masks/history_from_step00000003.zip"]

    again = sync_offline(cfg.offline_dir, uri)
    assert again[0]["applied"] == 0
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4, "a second sync must not duplicate"


def test_server_back_mid_run_resumes_live_logging_and_syncs_the_gap(
        cfg: dict, uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"up": True}
    real_apply = tracker_module._apply

    def flaky_apply(client, run_id, event, root=None):  # noqa: ANN001, ANN202 - mirrors _apply
        if not state["up"]:
            raise ConnectionError("server down")
        return real_apply(client, run_id, event, root)

    for module in (tracker_module, journal_module):  # live logging and replay both apply events
        monkeypatch.setattr(module, "_apply", flaky_apply)
        monkeypatch.setattr(module, "_server_reachable", lambda *a, **k: state["up"])
    tr = create_tracker(cfg, run_name="flaky")
    tr.reconnect_interval_s = 0.0
    tr.log_metrics({"train/loss": 0.0}, step=0)
    state["up"] = False
    tr.log_metrics({"train/loss": 1.0}, step=1)
    tr.log_metrics({"train/loss": 2.0}, step=2)
    state["up"] = True
    tr.log_metrics({"train/loss": 3.0}, step=3)
    client = MlflowClient(uri)
    assert _history(client, tr.run_id, "train/loss") == [(0, 0.0), (3, 3.0)], "live again after the outage"
    tr.end()
    assert _history(client, tr.run_id, "train/loss") == [(s, float(s)) for s in range(4)]
    assert client.get_run(tr.run_id).info.status == "FINISHED"
    assert journal_module._Journal(Path(cfg.offline_dir) / tr.run_id).pending() == 0


def test_rejected_event_is_kept_aside_and_does_not_stop_logging(cfg: dict, uri: str) -> None:
    tr = create_tracker(cfg)
    tr.log_params({"train.lr": 0.1})
    tr.log_params({"train.lr": 0.2})  # MLflow forbids changing a logged param
    tr.log_metrics({"train/loss": 1.0}, step=0)
    tr.end()
    rejected = (Path(cfg.offline_dir) / tr.run_id / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 1 and json.loads(rejected[0])["event"]["params"] == {"train.lr": "0.2"}
    assert _history(MlflowClient(uri), tr.run_id, "train/loss") == [(0, 1.0)]


def test_exception_inside_context_marks_run_failed_and_end_checks_status(cfg: dict, uri: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with create_tracker(cfg) as tr:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(tr.run_id).info.status == "FAILED"
    other = create_tracker(cfg)
    with pytest.raises(ValueError, match="status='DONE'"):
        other.end("DONE")
    other.end()


def test_tune_helpers_find_run_by_trial_tag_set_status_and_dataframe(cfg: dict, uri: str, tmp_path: Path) -> None:
    parent = tracking.find_or_create_run(cfg, run_name="sweep")
    first = tracking.find_or_create_run(cfg, run_name="trial", parent_run_id=parent,
                                        match_tag=("ray_trial_id", "abc_00001"))
    assert tracking.find_or_create_run(cfg, run_name="trial", match_tag=("ray_trial_id", "abc_00001")) == first
    tr = create_tracker(cfg, run_id=first)
    tr.log_metrics({"val/top1": 12.5}, step=1)
    tr.end()
    note = tmp_path / "summary.txt"
    note.write_text("ok")
    tracking.log_artifact_to_run(uri, parent, note, "reports")
    tracking.set_run_status(uri, parent, "KILLED")
    with pytest.raises(ValueError, match="status='PAUSED'"):
        tracking.set_run_status(uri, parent, "PAUSED")
    df = tracking.runs_dataframe(uri, cfg.experiment).set_index("run_id")
    assert df.loc[first, "tags.mlflow.parentRunId"] == parent
    assert df.loc[first, "metrics.val/top1"] == 12.5
    assert df.loc[first, "status"] == "FINISHED" and df.loc[parent, "status"] == "KILLED"
    assert tracking.runs_dataframe(uri, "no-such-experiment").empty


def test_sync_cli_reports_and_rejects_a_missing_dir(cfg: dict, uri: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    tr = create_tracker(dataclasses.replace(cfg, uri=_dead_uri()))
    tr.log_metrics({"train/loss": 0.5}, step=7)
    tr.end()
    assert journal_module.main(["sync", cfg.offline_dir, "--tracking-uri", uri]) == 0
    assert tr.run_id in capsys.readouterr().out
    assert journal_module.main(["sync", str(tmp_path / "missing"), "--tracking-uri", uri]) == 1
    assert "offline_dir=" in capsys.readouterr().err


def test_a_driver_closing_a_run_keeps_the_workers_environment_tags(cfg: dict, uri: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The training worker tags the run with its host and kernel backend; the Tune driver later reopens the run
    to set its final status from another machine, and must not overwrite those tags with its own."""
    import socket

    import kernels

    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-worker-7")
    monkeypatch.setattr(kernels, "active_backend", lambda *a, **k: "cuda")
    worker = create_tracker(cfg, run_name="trial", tags={"slak.role": "train"}, environment=True)
    worker.log_metrics({"train/loss": 1.0}, step=1)

    monkeypatch.setattr(socket, "gethostname", lambda: "driver-laptop")
    monkeypatch.setattr(kernels, "active_backend", lambda *a, **k: "torch")
    create_tracker(cfg, run_id=worker.run_id, tags={"slak.epochs_done": "2"}).end("FINISHED")

    tags = MlflowClient(uri).get_run(worker.run_id).data.tags
    assert tags["slak.hostname"] == "gpu-worker-7" and tags["slak.kernel.backend"] == "cuda"
    assert tags["slak.epochs_done"] == "2"


def test_environment_tags_fall_back_to_the_commit_baked_into_an_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_git(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - stands in for subprocess.run
        raise FileNotFoundError("git")

    from kernels import environment

    monkeypatch.setattr(environment.subprocess, "run", no_git)
    monkeypatch.setenv("SLAK_GIT_COMMIT", "0123abcd")
    tags = tracking.run_tags_for_environment()
    assert tags["slak.git.commit"] == tags["mlflow.source.git.commit"] == "0123abcd"
    monkeypatch.delenv("SLAK_GIT_COMMIT")
    assert tracking.run_tags_for_environment()["slak.git.commit"].startswith("unknown")


def test_tracker_accepts_the_typed_tracking_section_and_logs_the_flat_config(uri: str, tmp_path: Path) -> None:
    from orchestrator.config.loading import load_config

    smoke = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "smoke.yaml"
    cfg = load_config(smoke if smoke.exists() else None,
                      {"tracking.uri": uri, "tracking.experiment": "typed-config",
                       "tracking.offline_dir": str(tmp_path / "offline")})
    with create_tracker(cfg.tracking, run_name="typed") as tr:
        tr.log_params(cfg.to_flat())
    params = MlflowClient(uri).get_run(tr.run_id).data.params
    assert params["tracking.experiment"] == "typed-config"
    assert set(params) == set(cfg.to_flat()), "every dotted config name becomes one MLflow param"


def test_a_training_process_never_sets_its_runs_final_status(cfg: TrackingConfig, uri: str, tmp_path: Path) -> None:
    """The run's owner (the driver that created it) gives the final status once; a training process that
    fails only flushes what it logged, so a Ray Train retry does not flip the run FAILED -> RUNNING."""
    from orchestrator import worker
    from orchestrator.config.loading import load_config

    exp = load_config(None, {"run.num_workers": 1, "run.use_gpu": False, "train.epochs": 2, "data.train_size": 64,
                             "data.val_size": 16, "train.global_batch_size": 16, "run.storage_path": str(tmp_path),
                             "tracking.uri": uri, "tracking.experiment": cfg.experiment,
                             "tracking.offline_dir": cfg.offline_dir})
    run_id = tracking.find_or_create_run(exp.tracking, run_name="owned", tags={}, match_tag=("slak.run_name", "owned"))
    with pytest.raises(RuntimeError, match="the worker dies here"):
        worker.run_worker({"experiment": exp, "run_name": "owned", "mlflow_run_id": run_id},
                          CpuSession(fail_on_report=True))
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "RUNNING" and "val/top1" in run.data.metrics  # flushed, status left to the owner
    import socket

    assert run.data.tags["slak.rank_hostnames"] == f"0:{socket.gethostname()}"  # where each rank ran
    tracking.create_tracker(exp.tracking, run_id=run_id).end("FAILED")  # what the owner does
    assert MlflowClient(uri).get_run(run_id).info.status == "FAILED"


def test_experiments_are_ml_kind_and_the_ui_link_lands_on_the_runs_table(cfg: TrackingConfig, uri: str) -> None:
    parent = tracking.find_or_create_run(cfg, run_name="parent")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    # MLflow's experiment-type setting: a training experiment, not a GenAI one
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    command = tracking.mlflow_ui_command(uri, cfg.experiment)
    assert command.startswith(f"mlflow ui --backend-store-uri {uri}")
    assert command.endswith(f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
                            "?workflowType=machine_learning")
    assert tracking.mlflow_ui_command("http://host:5000", None) == "open http://host:5000 in a browser"
    assert client.get_run(parent).info.artifact_uri.startswith(Path(uri[len("sqlite:///"):]).parent.as_uri())


def test_new_runs_name_their_source_and_user_and_children_inherit_them(cfg: TrackingConfig, uri: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(sys, "argv", ["experiments/tune_sparsity_width.py"])
    parent = tracking.find_or_create_run(cfg, run_name="parent")
    monkeypatch.setattr(sys, "argv", ["/ray/default_worker.py"])  # what a Ray actor runs
    child = tracking.find_or_create_run(cfg, run_name="child", parent_run_id=parent)
    client = MlflowClient(uri)
    for run_id in (parent, child):
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.source.name"] == "experiments/tune_sparsity_width.py", run_id
        assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"


def test_parent_metrics_and_tables_land_in_an_existing_run(cfg: TrackingConfig, uri: str) -> None:
    import pandas as pd

    run_id = tracking.find_or_create_run(cfg, run_name="parent")
    tracking.log_metrics_to_run(uri, run_id, {"table8/slak/0.40/1.3x/top1_mean": 61.0})
    tracking.log_table_to_run(uri, run_id, pd.DataFrame({"row": ["0.40/1.3x"], "top1": [61.0]}),
                              "tables/table8_summary.json")
    client = MlflowClient(uri)
    assert client.get_run(run_id).data.metrics == {"table8/slak/0.40/1.3x/top1_mean": 61.0}
    assert [f.path for f in client.list_artifacts(run_id, "tables")] == ["tables/table8_summary.json"]


def test_a_moved_sqlite_store_warns_that_its_artifacts_stayed_behind(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from orchestrator.tracking import _mlflow

    old = tmp_path / "old"
    old.mkdir()
    cfg = TrackingConfig(enabled=True, uri=f"sqlite:///{old / 'mlflow.db'}", experiment="moved",
                         offline_dir=str(tmp_path / "offline"))
    tracking.find_or_create_run(cfg, run_name="before")
    with caplog.at_level(logging.WARNING):
        tracking.find_or_create_run(cfg, run_name="same place")
    assert "moved or copied" not in caplog.text
    shutil.copytree(old, tmp_path / "new")
    with caplog.at_level(logging.WARNING):
        tracking.find_or_create_run(dataclasses.replace(cfg, uri=f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"),
                                    run_name="after")
    assert "moved or copied" in caplog.text and str(old / "mlartifacts") in caplog.text
    _mlflow._warned_moved.clear()
