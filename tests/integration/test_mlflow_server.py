"""The tracker against a real MLflow tracking server (PostgreSQL or sqlite backend), including an outage."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from job_helpers import all_artifacts, load_train_cli
from mlflow import MlflowClient
from servers import MlflowServer, ServerUnavailable, managed_mlflow_server, postgres_reason, process_alive

from orchestrator.config.schema import TrackingConfig
from orchestrator.tracking import create_tracker
from slak_model.sparsity.masks import load_masks

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BACKENDS = [pytest.param("postgresql", id="postgresql"), pytest.param("sqlite", id="sqlite")]
#: The backend a whole training job runs against: PostgreSQL (a shared deployment's store) where it can run
#: here, else sqlite. The job talks HTTP to the server whatever its store, and each store is checked by
#: test_params_metrics_and_masks_reach_the_server, so one job (a Ray Train job of its own) is enough.
JOB_BACKEND = "sqlite" if postgres_reason() else "postgresql"


def _start(backend: str) -> Iterator[MlflowServer]:
    """A started server, shared by the module (each start costs seconds); afterwards asserts that none
    of its processes (nor PostgreSQL's, stopped inside the context manager) survive."""
    if backend == "postgresql" and (reason := postgres_reason()):
        pytest.skip(reason)
    try:
        with managed_mlflow_server(backend) as srv:
            yield srv
            pids = list(srv.pids)
    except ServerUnavailable as exc:
        pytest.skip(f"{backend} tracking server unavailable here: {exc}")
    assert not [p for p in pids if process_alive(p)], "mlflow server processes left running"


@pytest.fixture(scope="module")
def postgresql_server() -> Iterator[MlflowServer]:
    yield from _start("postgresql")


@pytest.fixture(scope="module")
def sqlite_server() -> Iterator[MlflowServer]:
    yield from _start("sqlite")


@pytest.fixture
def server(request: pytest.FixtureRequest) -> MlflowServer:
    """The module's server of backend ``request.param``, running (a failed outage test may leave it stopped)."""
    srv = request.getfixturevalue(f"{request.param}_server")
    if srv.proc is None:
        srv.start()
    return srv


def _masks(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"stages.0.blocks.0.large.weight": torch.rand(8, 1, 13, 5, generator=gen) > 0.5,
            "stages.2.blocks.1.large.weight": torch.rand(16, 1, 5, 5, generator=gen) > 0.3}


def _cfg(uri: str, tmp_path: Path) -> TrackingConfig:
    return TrackingConfig(enabled=True, uri=uri, experiment="server-it", offline_dir=str(tmp_path / "offline"))


def _losses(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))


@pytest.mark.parametrize("server", BACKENDS, indirect=True)
def test_params_metrics_and_masks_reach_the_server(server: MlflowServer, tmp_path: Path) -> None:
    masks = _masks(0)
    with create_tracker(_cfg(server.uri, tmp_path), run_name="it") as tr:
        tr.log_params({"sparse.sparsity": 0.4, "model.width_factor": 1.3})
        for step in range(5):
            tr.log_metrics({"train/loss": 1.0 / (step + 1), "val/top1": 10.0 * step}, step=step)
        tr.log_final_sparsity(masks, {"stage0": 0.5, "stage2": 0.7}, step=4)
    client = MlflowClient(server.uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts must be served by the server"
    assert run.data.params == {"sparse.sparsity": "0.4", "model.width_factor": "1.3"}
    assert _losses(client, tr.run_id) == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert {"density.json", "masks.npz"} <= {a.path for a in client.list_artifacts(tr.run_id)}
    loaded = load_masks(client.download_artifacts(tr.run_id, "masks.npz", str(tmp_path)))
    assert all(torch.equal(loaded[k], v) for k, v in masks.items())
    assert not Path(_cfg(server.uri, tmp_path).offline_dir).exists(), "nothing should have gone offline"
    if server.backend_store_uri.startswith("postgresql"):
        import psycopg2

        dsn = server.backend_store_uri.replace("postgresql+psycopg2://", "postgresql://")
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (tr.run_id,))
            assert cur.fetchone() == ("FINISHED",), "the run must live in PostgreSQL"


@pytest.mark.parametrize("server", BACKENDS[:1], indirect=True)
def test_server_outage_mid_run_loses_nothing(server: MlflowServer, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    tr = create_tracker(_cfg(server.uri, tmp_path), run_name="outage")
    assert tr.run_id is not None and not tr.run_id.startswith("offline-")
    tr.reconnect_interval_s = 0.5
    tr.log_params({"train.lr": 0.004})
    for step in range(0, 3):
        tr.log_metrics({"train/loss": float(step)}, step=step)
    server.stop()
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        for step in range(3, 6):
            tr.log_metrics({"train/loss": float(step)}, step=step)
        tr.log_masks(_masks(1), step=5)
    assert sum("is unreachable" in r.getMessage() for r in caplog.records) == 1
    server.start()
    tr.log_metrics({"train/loss": 6.0}, step=6)  # live again (after the probe interval)
    tr.end()
    client = MlflowClient(server.uri)
    assert _losses(client, tr.run_id) == [(s, float(s)) for s in range(7)]
    assert [a.path for a in client.list_artifacts(tr.run_id, "masks")] == ["masks/history_from_step00000005.zip"]
    assert client.get_run(tr.run_id).info.status == "FINISHED"


@pytest.mark.parametrize("server", BACKENDS[:1], indirect=True)
def test_server_down_until_the_end_keeps_metrics_and_cli_syncs_them(
        server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(server.uri, tmp_path)
    tr = create_tracker(cfg, run_name="late-sync")
    tr.log_metrics({"train/loss": 0.0}, step=0)
    server.stop()
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        for step in range(1, 4):
            tr.log_metrics({"train/loss": float(step)}, step=step)
        tr.end()
    assert f"python -m orchestrator.tracking sync {cfg.offline_dir} --tracking-uri {server.uri}" in caplog.text
    server.start()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    sync = subprocess.run([sys.executable, "-m", "orchestrator.tracking", "sync", cfg.offline_dir,
                           "--tracking-uri", server.uri], capture_output=True, text=True, env=env, timeout=120)
    assert sync.returncode == 0, sync.stderr[-2000:]
    client = MlflowClient(server.uri)
    assert _losses(client, tr.run_id) == [(s, float(s)) for s in range(4)]
    assert client.get_run(tr.run_id).info.status == "FINISHED"


# ---------------------------------------------------------------- a real training job against the server
SMOKE = PROJECT_ROOT / "experiments" / "configs" / "smoke.yaml"


def _train_args(server: MlflowServer, root: Path, name: str) -> list[str]:
    """The smoke preset, one epoch (8 optimizer steps, 2 topology updates), logging to ``server``."""
    return ["--config", str(SMOKE), "--tracking-uri", server.uri, f"run.name={name}",
            f"run.storage_path={root / 'ray'}", "tracking.experiment=server-train",
            f"tracking.offline_dir={root / 'offline'}", "train.epochs=1", "tracking.masks_every_updates=1"]


def _train_run(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("server-train")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`slak.run_name` = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _histories(client: MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    keys = [k for k in run.data.metrics if not k.startswith("perf/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}


@pytest.mark.slow
@pytest.mark.parametrize("server", [JOB_BACKEND], indirect=True)
def test_smoke_training_job_logs_to_the_server(server: MlflowServer, ray_cluster, tmp_path: Path) -> None:
    """experiments/train.py (2 Ray workers, sparsity on) with --tracking-uri http://127.0.0.1:PORT: the run,
    its dotted params, per-step metrics and the bit-packed masks are on the server, masks equal the checkpoint's."""
    from orchestrator import checkpoints

    assert load_train_cli().main(_train_args(server, tmp_path, f"smoke-{server.port}")) == 0
    client = MlflowClient(server.uri)
    run = _train_run(client, f"smoke-{server.port}")
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert run.data.params["sparse.sparsity"] == "0.4" and run.data.params["tracking.uri"] == server.uri
    hist = _histories(client, run)
    # the per-step loss every 2 steps, and the epoch's mean under its own key at the epoch's last step
    assert [s for s, _ in hist["train/loss_step"]] == [2, 4, 6, 8] and len(hist["val/top1"]) == 1
    assert [s for s, _ in hist["train/loss"]] == [8]
    # a sanity bound on the logged metric; exact per-layer counts are the sparsity engine tests' job
    assert hist["sparsity/density"][-1][1] == pytest.approx(0.6, abs=0.01)
    files = all_artifacts(client, run.info.run_id)
    assert "config/resolved.yaml" in files and "checkpoint/state.pt" in files, files
    assert any(f.startswith("masks/history_from_step") for f in files), files  # the per-update masks, one archive
    masks = load_masks(client.download_artifacts(run.info.run_id, "masks.npz", str(tmp_path)))
    ckpt_dir = sorted((tmp_path / "ray" / f"smoke-{server.port}").glob("epoch_*"))[-1]
    state, _ = checkpoints.load_checkpoint_dir(ckpt_dir)
    assert masks.keys() == state["sparsity"]["masks"].keys()
    assert all(torch.equal(masks[k], v) for k, v in state["sparsity"]["masks"].items())
    assert not (tmp_path / "offline").exists(), "nothing should have gone offline"
    if server.backend_store_uri.startswith("postgresql"):
        import psycopg2

        dsn = server.backend_store_uri.replace("postgresql+psycopg2://", "postgresql://")
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss'",
                        (run.info.run_id,))
            assert cur.fetchone() == (len(hist["train/loss"]),), "the metrics must live in PostgreSQL"


@pytest.mark.slow
@pytest.mark.parametrize("server", BACKENDS[:1], indirect=True)
def test_training_job_survives_a_server_outage(server: MlflowServer, ray_cluster, tmp_path: Path) -> None:
    """The server goes down once the job's first metrics arrive and stays down until the job is over: the job
    finishes, rank 0 journals what it could not send, and ``tracking sync`` makes the run whole again —
    with the same metric history as the uninterrupted job of the same config."""
    import threading

    client = MlflowClient(server.uri)
    name = f"outage-{server.port}"
    outcome: dict[str, object] = {}
    job = threading.Thread(target=lambda: outcome.setdefault("rc", load_train_cli().main(
        _train_args(server, tmp_path, name))), daemon=True)
    job.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.is_alive():
        exp = client.get_experiment_by_name("server-train")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`slak.run_name` = '{name}'") if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train/loss_step"):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the job logged no train/loss_step before it ended (or in 240 s)")
    server.stop()
    job.join(timeout=300)
    assert not job.is_alive() and outcome.get("rc") == 0, outcome
    journals = list((tmp_path / "offline").iterdir())
    assert journals, "the metrics sent during the outage must be journaled"

    server.start()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    sync = subprocess.run([sys.executable, "-m", "orchestrator.tracking", "sync", str(tmp_path / "offline"),
                           "--tracking-uri", server.uri], capture_output=True, text=True, env=env, timeout=120)
    assert sync.returncode == 0, sync.stderr[-2000:]
    run = _train_run(client, name)
    assert run.info.status == "FINISHED"
    got = _histories(client, run)
    ref_name = f"smoke-{server.port}"  # same config, no outage: the test above, or run here when alone
    exp = client.get_experiment_by_name("server-train")
    if not client.search_runs([exp.experiment_id], filter_string=f"tags.`slak.run_name` = '{ref_name}'"):
        assert load_train_cli().main(_train_args(server, tmp_path / "reference", ref_name)) == 0
    reference = _train_run(client, ref_name)
    want = _histories(client, reference)
    assert got.keys() == want.keys()
    for key in want:
        assert [s for s, _ in got[key]] == [s for s, _ in want[key]], key
    assert got["train/loss_step"] == want["train/loss_step"], "CPU training with fixed seeds is deterministic"
    files = all_artifacts(client, run.info.run_id)
    assert "masks.npz" in files and any(f.startswith("masks/history_from_step") for f in files), files
