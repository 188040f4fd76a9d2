"""The node checks on a real Ray: a task on every node imports the project and reads the driver's marker
under run.storage_path (one node here; several nodes are covered with their answers in
tests/orchestrator/test_cluster_checks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("ray")

from orchestrator import ray_cluster as cluster
from orchestrator.config.loading import load_config
from orchestrator.ray_cluster import ClusterError

SMOKE = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "smoke.yaml"


def test_a_node_that_cannot_import_a_worker_module_is_named(ray_cluster, tmp_path: Path) -> None:
    cfg = load_config(SMOKE, {"run.storage_path": str(tmp_path / "ray")})
    with pytest.raises(ClusterError) as err:
        cluster.check_nodes(cfg, modules=("orchestrator", "slak_no_such_package"))
    text = str(err.value)
    assert "cannot be imported on 1 of 1 Ray node(s)" in text
    assert "import slak_no_such_package: ModuleNotFoundError" in text and "pip install" in text


def test_every_node_reads_the_drivers_marker_and_the_marker_is_removed(ray_cluster,
                                                                       tmp_path: Path) -> None:
    cfg = load_config(SMOKE, {"run.storage_path": str(tmp_path / "ray")})
    cluster.check_nodes(cfg, modules=("orchestrator",), shared_storage=True)
    assert not list((tmp_path / "ray").iterdir()), "the marker file must not stay"
