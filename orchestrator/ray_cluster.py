"""The one place this project starts or joins Ray, and what is reachable while it runs.

* **Local** (no ``--address``): a single-node Ray whose every server (GCS, raylet, workers, dashboard and
  its agents) listens on the loopback interface only, with Ray's token authentication left on (Ray
  generates a token in ``~/.ray/auth_token``). Ray binds to the node's IP, which it looks up from the
  network; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes that IP the loopback address, which is the
  single-node mode Ray documents for laptops, so nothing answers on another interface.
* **Cluster** (``--address``): joins it. Token authentication follows Ray's own variables
  (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) as the cluster's nodes were started
  with; ``RAY_AUTH_MODE=disabled`` is an explicit opt-out that is logged as a warning.
* Workers get the project on their ``PYTHONPATH`` *in addition to* the caller's (an HPC module system
  provides its stack there), never instead of it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

__all__ = ["LOCAL_HOST", "PROJECT_ROOT", "init_ray", "worker_env"]

log = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for Ray workers: the project root prepended to the caller's ``PYTHONPATH``."""
    paths = [str(PROJECT_ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), **(extra or {})}


def _warn_if_auth_disabled(where: str) -> None:
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        log.warning("Ray token authentication is OFF for %s (RAY_AUTH_MODE=disabled): any process that can reach "
                    "its ports can run code in it. Unset RAY_AUTH_MODE to turn it back on.", where)


def _bind_loopback_only() -> None:
    """Make a local Ray take the loopback address as its node IP (read when Ray starts its processes)."""
    os.environ[_SINGLE_NODE_ENV] = "0"  # the raylet, agents and workers inherit it
    from ray._private import ray_constants  # read once at import, so the driver's copy is set too

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(
    *,
    address: str | None,
    num_cpus: int | None = None,
    include_dashboard: bool | None = None,
    object_store_memory: int | None = None,
    extra_env: dict[str, str] | None = None,
    log_to_driver: bool = True,
    temp_dir: str | None = None,
) -> None:
    """Join ``address``, or start a local Ray bound to loopback; no-op when Ray is already up in this process.

    Args:
        address: A Ray cluster address (``auto``, ``ray://host:10001``, ``host:6379``) or None for local.
        num_cpus: Logical CPUs of a local Ray (ignored when joining, where the cluster has its own).
        include_dashboard: Start the dashboard locally (Train V2 inside Tune needs its state API).
        object_store_memory: Bytes of object store for a local Ray (Ray's default takes 30 % of RAM).
        extra_env: More environment variables for the workers.
        log_to_driver: Forward worker output to this process.
        temp_dir: Session folder of a local Ray (Ray's default is /tmp/ray; keep it short, Ray's unix
            sockets live there and their paths must stay under 108 characters).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": worker_env(extra_env)}
    if address:
        _warn_if_auth_disabled(f"the cluster at {address}")
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
        return
    _warn_if_auth_disabled("this local Ray")
    _bind_loopback_only()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        dashboard_host=LOCAL_HOST,
        object_store_memory=object_store_memory,
        runtime_env=runtime_env,
        log_to_driver=log_to_driver,
        _temp_dir=temp_dir,
    )
