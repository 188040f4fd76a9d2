"""What a bad cluster gets, without starting Ray: a wrong ``--address`` is refused in seconds with the fix."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")

from orchestrator import ray_cluster
from orchestrator.ray_cluster import ClusterError
from tests.orchestrator import ports
from tests.orchestrator.ports import closed_port

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers, on the address Ray turns 127.0.0.1 into (the node's IP)."""
    with ports.silent_port(ray_cluster._endpoint("127.0.0.1:1")[0]) as port:
        yield port


def test_an_address_where_nothing_listens_is_refused_at_once_with_the_fix() -> None:
    port = closed_port()
    t0 = time.monotonic()
    with pytest.raises(ClusterError) as err:
        ray_cluster.check_address(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5
    text = str(err.value)
    assert f":{port}" in text and "connection refused" in text
    assert "ray start --head" in text and "leave --address out" in text


def test_a_host_that_does_not_resolve_is_named() -> None:
    with pytest.raises(ClusterError, match="does not resolve"):
        ray_cluster.check_address("no-such-host.invalid:6379", timeout_s=5)


def test_a_port_that_is_not_a_ray_gcs_is_refused_in_bounded_time(silent_port: int) -> None:
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="no Ray GCS answers"):
        ray_cluster.check_address(f"127.0.0.1:{silent_port}", gcs_timeout_s=2)
    assert time.monotonic() - t0 < 10


def test_auto_without_a_cluster_on_this_node_says_how_to_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private import services

    def nothing_here(address: str, temp_dir: str | None = None) -> str:
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address_or_die", nothing_here)
    with pytest.raises(ClusterError, match=r"--address auto: Could not find any running Ray instance\. Start Ray"):
        ray_cluster.check_address("auto")


def test_train_py_with_a_wrong_address_exits_2_with_one_line(tmp_path: Path) -> None:
    """The script as users run it: before this check, Ray retried the address for many minutes."""
    port = closed_port()
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "experiments" / "train.py"), "--config",
         str(REPO_ROOT / "experiments" / "configs" / "smoke.yaml"), "--address", f"127.0.0.1:{port}",
         f"run.storage_path={tmp_path / 'ray'}", "tracking.enabled=false"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "no Ray cluster answers" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_nodes_that_cannot_see_the_storage_are_named_with_the_fix() -> None:
    """Two nodes, one of which has its own local disk at run.storage_path (the answers of the node tasks)."""
    reports = {
        "10.0.0.1 (head)": {"host": "head", "import": None, "storage": None},
        "10.0.0.2 (gpu-7)": {"host": "gpu-7", "import": None, "storage": "No such file or directory"},
    }
    [line] = ray_cluster._node_problems(reports, "/scratch/slak")
    assert "run.storage_path=/scratch/slak is not shared: 1 of 2" in line
    assert "10.0.0.2 (gpu-7): No such file or directory" in line and "10.0.0.1" not in line
    assert "same path on every node" in line and "s3://" in line


def test_nodes_that_cannot_import_the_project_are_named_with_the_error() -> None:
    reports = {"10.0.0.2 (gpu-7)": {"host": "gpu-7", "storage": None,
                                    "import": "import orchestrator.worker: ModuleNotFoundError: No module named 'timm'"}}
    [line] = ray_cluster._node_problems(reports, "/mnt/shared")
    assert "10.0.0.2 (gpu-7): import orchestrator.worker: ModuleNotFoundError: No module named 'timm'" in line
    assert "pip install" in line and "docker/" in line
