"""The tracker against a real MLflow tracking server (PostgreSQL or sqlite backend), including an outage."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from orchestrator.tracking import create_tracker
from servers import MlflowServer, ServerUnavailable, managed_mlflow_server, postgres_reason, process_alive
from slak_model.sparsity.masks import load_masks

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BACKENDS = [pytest.param("postgresql", id="postgresql"), pytest.param("sqlite", id="sqlite")]


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


def _cfg(uri: str, tmp_path: Path) -> dict:
    return {"enabled": True, "uri": uri, "experiment": "server-it", "offline_dir": str(tmp_path / "offline")}


def _losses(client: MlflowClient, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))


@pytest.mark.parametrize("server", BACKENDS, indirect=True)
def test_params_metrics_and_masks_reach_the_server(server: MlflowServer, tmp_path: Path) -> None:
    masks = _masks(0)
    with create_tracker(_cfg(server.uri, tmp_path), run_name="it") as tr:
        tr.log_params({"sparse.sparsity": 0.4, "model.width_factor": 1.3})
        for step in range(5):
            tr.log_metrics({"train/loss": 1.0 / (step + 1), "val/top1": 10.0 * step}, step=step)
        tr.log_masks(masks, step=4)
        tr.log_density_table({"stage0": 0.5, "stage2": 0.7}, step=4)
    client = MlflowClient(server.uri)
    run = client.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts must be served by the server"
    assert run.data.params == {"sparse.sparsity": "0.4", "model.width_factor": "1.3"}
    assert _losses(client, tr.run_id) == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert sorted(a.path for a in client.list_artifacts(tr.run_id, "masks")) == [
        "masks/density_step00000004.json", "masks/masks_step00000004.npz"]
    loaded = load_masks(client.download_artifacts(tr.run_id, "masks/masks_step00000004.npz", str(tmp_path)))
    assert all(torch.equal(loaded[k], v) for k, v in masks.items())
    assert not Path(_cfg(server.uri, tmp_path)["offline_dir"]).exists(), "nothing should have gone offline"
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
    assert [a.path for a in client.list_artifacts(tr.run_id, "masks")] == ["masks/masks_step00000005.npz"]
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
    assert f"python -m orchestrator.tracking sync {cfg['offline_dir']} --tracking-uri {server.uri}" in caplog.text
    server.start()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    sync = subprocess.run([sys.executable, "-m", "orchestrator.tracking", "sync", cfg["offline_dir"],
                           "--tracking-uri", server.uri], capture_output=True, text=True, env=env, timeout=120)
    assert sync.returncode == 0, sync.stderr[-2000:]
    client = MlflowClient(server.uri)
    assert _losses(client, tr.run_id) == [(s, float(s)) for s in range(4)]
    assert client.get_run(tr.run_id).info.status == "FINISHED"
