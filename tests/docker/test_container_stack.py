"""The built CPU image and the compose stack, for real: a Ray head and two Ray worker containers, MLflow on
PostgreSQL, and the Table 8 grid run against them with ``--address auto``.

Opt-in (it starts five containers for a few minutes): ``SLAK_CONTAINER_TESTS=1`` with podman + podman-compose
(or docker + ``docker compose``) and the images already built (docs/containers.md has the commands). Skipped
otherwise, with the reason. Names, ports and volumes are this test's own; everything it starts is removed.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
IMAGE = os.environ.get("SLAK_TEST_IMAGE", "slak-orchestrator:0.1.0-cpu")
POSTGRES_IMAGE = os.environ.get("SLAK_TEST_POSTGRES_IMAGE", "localhost/slak-postgres:15")

pytestmark = pytest.mark.slow


def _engine() -> tuple[str, list[str]] | None:
    """(engine, compose command) found on this machine, or None."""
    podman_compose = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
    if shutil.which("podman") and Path(podman_compose).exists():
        return "podman", [podman_compose]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                  check=False).returncode == 0:
        return "docker", ["docker", "compose"]
    return None


def _requirements() -> tuple[str, list[str]]:
    if os.environ.get("SLAK_CONTAINER_TESTS") != "1":
        pytest.skip("container tests are opt-in: SLAK_CONTAINER_TESTS=1 (they start a 5-container stack)")
    found = _engine()
    if found is None:
        pytest.skip("neither podman + podman-compose nor docker + docker compose is available")
    engine, _ = found
    for image in (IMAGE, POSTGRES_IMAGE):
        if subprocess.run([engine, "image", "exists" if engine == "podman" else "inspect", image],
                          capture_output=True, check=False).returncode != 0:
            pytest.skip(f"image {image} is not built (docs/containers.md)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    engine, compose = _requirements()
    project = f"slaktest{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("stack")
    (folder / "data").mkdir()
    env_file = folder / "env"
    mlflow_port = _free_port()
    env_file.write_text("\n".join([
        f"POSTGRES_PASSWORD={secrets.token_hex(16)}", f"RAY_AUTH_TOKEN={secrets.token_hex(32)}",
        f"SLAK_DATA_DIR={folder / 'data'}", f"SLAK_IMAGE={IMAGE}", f"POSTGRES_IMAGE={POSTGRES_IMAGE}",
        "RAY_WORKERS=2", "RAY_HEAD_CPUS=0", "RAY_WORKER_CPUS=3", "RAY_SHM_SIZE=2gb",
        f"MLFLOW_PORT={mlflow_port}", f"RAY_DASHBOARD_PORT={_free_port()}", f"RAY_CLIENT_PORT={_free_port()}",
    ]) + "\n")
    env_file.chmod(0o600)
    base = [*compose, "-p", project, "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]

    def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=timeout, check=check)

    try:
        run("up", "-d", timeout=300)
        deadline = time.monotonic() + 240
        while True:  # three Ray nodes: the head and two workers
            status = run("exec", "-T", "ray-head", "ray", "status", check=False).stdout
            if status.count(" node_") >= 3:
                break
            assert time.monotonic() < deadline, f"the cluster did not reach 3 nodes:\n{status}"
            time.sleep(5)
        yield run, f"http://127.0.0.1:{mlflow_port}", engine, project
    finally:
        subprocess.run([*base, "down", "-v"], capture_output=True, timeout=300, check=False)


def test_image_reports_its_kernel_backend() -> None:
    engine, _ = _requirements()
    out = subprocess.run([engine, "run", "--rm", IMAGE, "python", "-m", "kernels.info"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "torch 2.13.0+cpu" in out.stdout and "torch    yes        *" in out.stdout


def test_grid_on_the_cluster_puts_one_rank_in_each_worker_and_lands_in_mlflow(stack) -> None:
    run, uri, engine, project = stack
    grid = run("exec", "-T", "ray-head", "python", "experiments/tune_sparsity_width.py", "--address", "auto",
               "--tracking-uri", "http://mlflow:5000", "train.epochs=2", "data.train_size=256",
               "data.val_size=64", "tune.seeds=1", "run.num_workers=2", "run.cpus_per_worker=2",
               "run.use_gpu=false", "run.storage_path=/mnt/slak/storage",
               "tracking.experiment=container-test", timeout=900, check=False)
    assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]
    assert "5 trial(s), 0 failed, complete" in grid.stdout

    hosts = {}
    for service in ("ray-head", "ray-worker"):
        names = subprocess.run([engine, "ps", "--filter", f"label=com.docker.compose.project={project}",
                                "--filter", f"label=com.docker.compose.service={service}",
                                "--format", "{{.Names}}"],
                               capture_output=True, text=True, check=True).stdout.split()
        hosts[service] = {subprocess.run([engine, "exec", n, "hostname"], capture_output=True, text=True,
                                         check=True).stdout.strip() for n in names}
    assert len(hosts["ray-head"]) == 1 and len(hosts["ray-worker"]) == 2, hosts

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("container-test")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == 6 and len(children) == 5, [r.info.run_name for r in runs]
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
    for child in children:
        placed = dict(pair.split(":") for pair in child.data.tags["slak.rank_hostnames"].split(","))
        assert set(placed.values()) == hosts["ray-worker"], (child.info.run_name, placed, hosts)
        assert child.info.artifact_uri.startswith("mlflow-artifacts:/")  # served by the MLflow container
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"masks.npz", "density.json", "checkpoint"} <= artifacts, artifacts
        assert "val/top1" in child.data.metrics
    density = json.loads(Path(client.download_artifacts(children[0].info.run_id, "density.json")).read_text())
    assert density, "the density table came back through the server"
    print("ranks:", shlex.join(c.data.tags["slak.rank_hostnames"] for c in children))
