"""Shared fixtures of the integration tests.

``ray_cluster``: ONE local Ray cluster per test session, shared by every Ray test (Train jobs, Tune
grids), because starting Ray costs ~5 s and parallel clusters slow each other down. Settings and why:

* ``num_cpus=3``: a Tune trial driver (1 CPU) plus two Train workers fit on a 2-core CI box
  (logical oversubscription; tests run one trial at a time).
* ``include_dashboard=True``: Train V2 inside Tune needs the State API to clean up the placement
  groups of stopped trials, or the next trial waits forever.
* ``object_store_memory=300 MiB``: the default takes 30% of RAM in /dev/shm.
* ``_temp_dir``: a short private folder (Ray's unix sockets must stay under 108 characters), deleted
  after shutdown so session logs do not pile up in /tmp/ray.
* Started through ``orchestrator.ray_cluster.init_ray``, as the scripts start it: bound to 127.0.0.1,
  Ray's token authentication on, the repo root added to the workers' PYTHONPATH (workers do not
  inherit the driver's ``sys.path``).

Tests that need Ray take the fixture as an argument; it yields the ``ray`` module.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    from orchestrator import ray_cluster as local_ray

    if ray.is_initialized():  # someone else's cluster in this process: share it
        yield ray
        return
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    local_ray.init_ray(address=None, num_cpus=3, include_dashboard=True, object_store_memory=300 * 2**20,
                       temp_dir=tmp, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
