"""The built CPU image and the compose stack, for real: a Ray head and two Ray worker containers, MLflow on
PostgreSQL, and the Table 8 grid run against them with ``--address auto``: one DDP rank in each worker container,
a worker container killed in the middle of a trial, the driver killed and ``--resume``'d, what a bad cluster
setting gets, and the runs read back through the server's API and its web UI (headless Chromium).

Opt-in (it starts five containers for about ten minutes): ``SLAK_CONTAINER_TESTS=1`` with podman +
podman-compose (or docker + ``docker compose``) and the images already built; ``.ci/containers`` builds them
and runs this file. Skipped otherwise, with the reason. Names, ports and volumes are this test's own; everything
it starts is removed.
"""

from __future__ import annotations

import json
import math
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
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
IMAGE = os.environ.get("SLAK_TEST_IMAGE", "slak-orchestrator:0.1.0-cpu")
POSTGRES_IMAGE = os.environ.get("SLAK_TEST_POSTGRES_IMAGE", "localhost/slak-postgres:15")

pytestmark = pytest.mark.slow

#: The grid both the fault-free and the faulted experiment run: 5 trials of 2 DDP ranks (2 CPUs each; a worker
#: node offers 3 and the head none, so the two ranks of a trial always sit in different worker containers), one
#: trial at a time, long enough per epoch that a container can be killed between two epochs.
GRID = ("train.epochs=3", "data.train_size=768", "data.val_size=64", "tune.seeds=1", "run.num_workers=2",
        "run.cpus_per_worker=2", "run.use_gpu=false", "run.storage_path=/mnt/slak/storage")
EPOCHS = 3


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


class Stack:
    """The running stack: ``compose`` is the compose command for it; ``uri`` the MLflow server as the host sees it."""

    def __init__(self, uri: str, engine: str, project: str, compose: list[str]) -> None:
        self.uri, self.engine, self.project, self.compose = uri, engine, project, compose

    def containers(self, service: str) -> list[str]:
        return subprocess.run([self.engine, "ps", "--filter", f"label=com.docker.compose.project={self.project}",
                               "--filter", f"label=com.docker.compose.service={service}", "--format", "{{.Names}}"],
                              capture_output=True, text=True, check=True).stdout.split()

    def hostname(self, container: str) -> str:
        return subprocess.run([self.engine, "exec", container, "hostname"], capture_output=True, text=True,
                              check=True).stdout.strip()

    def grid_command(self, *args: str) -> list[str]:
        """The main job, run by the head's Python against the cluster and the MLflow container."""
        return [*self.compose, "exec", "-T", "ray-head", "python", "experiments/tune_sparsity_width.py",
                "--address", "auto", "--tracking-uri", "http://mlflow:5000", *args]


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
        yield Stack(f"http://127.0.0.1:{mlflow_port}", engine, project, base)
    finally:
        subprocess.run([*base, "down", "-v"], capture_output=True, timeout=300, check=False)


def test_image_reports_its_kernel_backend() -> None:
    engine, _ = _requirements()
    out = subprocess.run([engine, "run", "--rm", IMAGE, "python", "-m", "kernels.info"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "torch 2.13.0+cpu" in out.stdout and "torch    yes        *" in out.stdout


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(client: Any, experiment: str) -> list[Any]:
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def _trials(runs: list[Any]) -> dict[str, Any]:
    """The grid's trial runs by run name (a name twice would be a duplicate run: asserted where it matters)."""
    return {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}


#: What each trial measured, epoch by epoch, and what the collated tables are made of.
COMPARED_METRICS = ("train/loss", "val/loss", "val/top1", "sparsity/density")


def _histories(client: Any, run_id: str, keys: tuple[str, ...] = COMPARED_METRICS) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def _table_rows(output: str) -> list[str]:
    """The collated table as the grid prints it (markdown rows), without the run-specific lines around it."""
    return [line for line in output.splitlines() if line.startswith("|")]


def _wait_for(what: str, probe: Any, timeout: float, driver: subprocess.Popen | None = None,
              log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        if driver is not None and driver.poll() is not None:
            pytest.fail(f"the driver exited ({driver.returncode}) while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{tail}")
        time.sleep(1)


@pytest.fixture(scope="module")
def fault_free(stack: Stack) -> subprocess.CompletedProcess:
    """The Table 8 grid with no fault: the placement test reads it, the fault test compares against it."""
    grid = subprocess.run(stack.grid_command(*GRID, "tracking.experiment=container-test"), capture_output=True,
                          text=True, timeout=1200, check=False)
    assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]
    assert "5 trial(s), 0 failed, complete" in grid.stdout
    return grid


def test_grid_on_the_cluster_puts_one_rank_in_each_worker_and_lands_in_mlflow(stack: Stack, fault_free) -> None:
    hosts = {service: {stack.hostname(n) for n in stack.containers(service)}
             for service in ("ray-head", "ray-worker")}
    assert len(hosts["ray-head"]) == 1 and len(hosts["ray-worker"]) == 2, hosts

    client = _client(stack.uri)
    runs = _runs(client, "container-test")
    children = list(_trials(runs).values())
    assert len(runs) == 6 and len(children) == 5, [r.info.run_name for r in runs]
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
    for child in children:
        placed = dict(pair.split(":") for pair in child.data.tags["slak.rank_hostnames"].split(","))
        assert set(placed.values()) == hosts["ray-worker"], (child.info.run_name, placed, hosts)
        assert child.info.artifact_uri.startswith("mlflow-artifacts:/")  # served by the MLflow container
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"masks.npz", "density.json", "checkpoint"} <= artifacts, artifacts
        assert len(client.get_metric_history(child.info.run_id, "val/top1")) == EPOCHS
    density = json.loads(Path(client.download_artifacts(children[0].info.run_id, "density.json")).read_text())
    assert density, "the density table came back through the server"
    print("ranks:", shlex.join(c.data.tags["slak.rank_hostnames"] for c in children))


def test_worker_killed_mid_trial_then_driver_killed_and_resumed(stack: Stack, fault_free, tmp_path: Path) -> None:
    """A worker container dies between two epochs of a trial: the trial resumes from its last checkpoint in the
    same MLflow run. Then the driver dies during a later trial: ``--resume`` runs only what had not finished.
    Every trial's epoch-by-epoch metrics and the collated table equal the fault-free grid's."""
    client = _client(stack.uri)
    experiment = "container-fault"
    args = (*GRID, "run.max_failures=2", "tune.trial_max_failures=2", f"tracking.experiment={experiment}")
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(stack.grid_command(*args), stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        def trial_after_first_epoch() -> Any:
            for r in _trials(_runs(client, experiment)).values():
                if r.info.status == "RUNNING" and client.get_metric_history(r.info.run_id, "val/top1"):
                    return r
            return None

        hit = _wait_for("a trial's first epoch", trial_after_first_epoch, 600, driver, log)
        # MLflow has the epoch's metrics before Ray Train has stored and registered its checkpoint: a kill in
        # between would restart the trial from scratch, so wait until the checkpoint manager lists it.
        head = stack.containers("ray-head")[0]
        snapshot = f"/mnt/slak/storage/*_train_{hit.data.tags['ray_trial_id']}/checkpoint_manager_snapshot.json"

        def first_checkpoint_registered() -> bool:
            shown = subprocess.run([stack.engine, "exec", head, "sh", "-c", f"cat {snapshot} 2>/dev/null"],
                                   capture_output=True, text=True, check=False, timeout=60)
            return "epoch_0001" in shown.stdout

        _wait_for("the trial's first checkpoint to be registered", first_checkpoint_registered, 300, driver, log)
        placed = dict(pair.split(":") for pair in hit.data.tags["slak.rank_hostnames"].split(","))
        by_host = {stack.hostname(n): n for n in stack.containers("ray-worker")}
        victim = by_host[placed["1"]]
        subprocess.run([stack.engine, "kill", victim], capture_output=True, check=True, timeout=60)
        epochs_at_kill = len(client.get_metric_history(hit.info.run_id, "val/top1"))
        time.sleep(15)
        subprocess.run([stack.engine, "start", victim], capture_output=True, check=True, timeout=120)
        assert epochs_at_kill < EPOCHS, "the trial finished before its worker was killed: lengthen its epochs"

        def killed_trial_done() -> Any:
            run = client.get_run(hit.info.run_id)
            return run if run.info.status != "RUNNING" else None

        done = _wait_for("the trial whose worker was killed to finish", killed_trial_done, 900, driver, log)
        assert done.info.status == "FINISHED", done.info.status
        assert client.get_metric_history(hit.info.run_id, "perf/startup/resume_s"), \
            "the trial did not resume from a checkpoint"

        def later_trial_running() -> dict[str, Any] | None:
            trials = _trials(_runs(client, experiment))
            finished = {n: r for n, r in trials.items() if r.info.status == "FINISHED"}
            running = [r for r in trials.values() if r.info.status == "RUNNING"]
            return finished if len(finished) >= 2 and running else None

        finished = _wait_for("a later trial to start", later_trial_running, 900, driver, log)
        before = {name: (r.info.end_time, _histories(client, r.info.run_id)) for name, r in finished.items()}
        subprocess.run([*stack.compose, "exec", "-T", "ray-head", "pkill", "-9", "-f",
                        "experiments/tune_sparsity_width.py"], capture_output=True, check=False, timeout=60)
        driver.wait(timeout=120)
        assert driver.returncode != 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()

    resumed = subprocess.run(stack.grid_command("--resume", *args), capture_output=True, text=True, timeout=1500,
                             check=False)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    assert "resuming experiment" in output and "5 trial(s), 0 failed, complete" in resumed.stdout, output[-4000:]

    runs = _runs(client, experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(trials) == 5, sorted(r.info.run_name for r in runs)
    assert len({r.info.run_name for r in trials}) == 5, "a trial has two MLflow runs"
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    for name, (end_time, histories) in before.items():
        now = _trials(runs)[name]
        assert (now.info.end_time, _histories(client, now.info.run_id)) == (end_time, histories), \
            f"{name} had finished before the driver was killed, but --resume ran it again"

    reference = _trials(_runs(client, "container-test"))
    for name, run in _trials(runs).items():
        got, want = _histories(client, run.info.run_id), _histories(client, reference[name].info.run_id)
        assert len(got["val/top1"]) == EPOCHS, (name, got["val/top1"])
        for key in COMPARED_METRICS:
            assert [s for s, _ in got[key]] == [s for s, _ in want[key]], (name, key, got[key], want[key])
            assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for (_, a), (_, b) in zip(got[key], want[key], strict=True)), \
                (name, key, got[key], want[key])
    assert _table_rows(resumed.stdout) == _table_rows(fault_free.stdout), (resumed.stdout, fault_free.stdout)


def test_storage_path_only_the_head_sees_is_refused_before_any_trial(stack: Stack) -> None:
    """A real three-node cluster and a ``run.storage_path`` local to each container: one message naming the path
    and the fix, exit 2, no trial started."""
    started = time.monotonic()
    out = subprocess.run(stack.grid_command(*GRID[:-1], "run.storage_path=/tmp/slak-not-shared",
                                            "tracking.experiment=container-bad-storage"),
                         capture_output=True, text=True, timeout=300, check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "run.storage_path=/tmp/slak-not-shared" in text, text[-3000:]
    assert time.monotonic() - started < 120
    assert not _trials(_runs(_client(stack.uri), "container-bad-storage")), "a trial started"


def test_a_worker_that_cannot_import_the_project_is_named_before_any_trial(stack: Stack) -> None:
    """One worker container loses the project's ``orchestrator`` package: the message names that node, the
    cause and the fix; exit 2; no trial started. The package is put back whatever happens."""
    worker = stack.containers("ray-worker")[0]
    hidden = ["/opt/slak/orchestrator", "/opt/slak/orchestrator.hidden-by-test"]
    subprocess.run([stack.engine, "exec", worker, "mv", *hidden], capture_output=True, check=True, timeout=60)
    try:
        out = subprocess.run(stack.grid_command(*GRID, "tracking.experiment=container-bad-import"),
                             capture_output=True, text=True, timeout=300, check=False)
    finally:
        subprocess.run([stack.engine, "exec", worker, "mv", *reversed(hidden)], capture_output=True, check=True,
                       timeout=60)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "the project cannot be imported on 1 of 3 Ray node(s)" in text, text[-3000:]
    assert f"({stack.hostname(worker)})" in text and "pip install" in text, text[-3000:]
    assert not _trials(_runs(_client(stack.uri), "container-bad-import")), "a trial started"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _render(browser: str, url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran (headless Chromium), and a screenshot of it for a person to look at."""
    common = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--virtual-time-budget=25000", "--window-size=1600,1100"]
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=False)
    return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                          check=True).stdout


def test_mlflow_ui_of_the_stack_shows_the_grid_runs_metrics_and_masks(stack: Stack, fault_free,
                                                                     tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    client = _client(stack.uri)
    experiment = client.get_experiment_by_name("container-test")
    runs = _runs(client, "container-test")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trial = next(iter(_trials(runs).values()))
    from orchestrator.tracking.runs import runs_table_url

    listing = _render(browser, runs_table_url(stack.uri, experiment.experiment_id), tmp_path / "experiment.png")
    assert parent.info.run_name in listing, "the runs table (the address the job prints) lacks the grid's run"
    page = f"{stack.uri}/#/experiments/{experiment.experiment_id}/runs/{trial.info.run_id}"
    run_page = _render(browser, page, tmp_path / "trial.png")
    for expected in (trial.info.run_name, parent.info.run_name, "val/top1"):  # nested: the trial names its parent
        assert expected in run_page, f"the trial's page lacks {expected!r}"
    artifacts = _render(browser, f"{page}/artifacts", tmp_path / "artifacts.png")
    assert "masks.npz" in artifacts and "density.json" in artifacts, "the trial's mask artifacts are not listed"
    for shot in ("experiment.png", "trial.png", "artifacts.png"):
        assert (tmp_path / shot).stat().st_size > 20_000, f"{shot}: the screenshot is (nearly) empty"
    print("screenshots:", tmp_path)
