"""The one place this project starts or joins Ray, and what is reachable while it runs.

* **Local** (no ``--address``): a single-node Ray whose every server (GCS, raylet, workers, dashboard and
  its agents) listens on the loopback interface only, with Ray's token authentication on (Ray
  generates a token in ``~/.ray/auth_token``): ``RAY_AUTH_MODE=token`` is set when unset, the mode a new
  local Ray takes by default, so that Ray does not warn at every start that it chose it. Ray binds to the node's IP, which it looks up from the
  network; ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes that IP the loopback address, which is the
  single-node mode Ray documents for laptops, so nothing answers on another interface.
* **Cluster** (``--address``): joins it. Token authentication follows Ray's own variables
  (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) as the cluster's nodes were started
  with; setting ``RAY_AUTH_MODE`` to ``disabled`` is an explicit opt-out that is logged as a warning.
* Workers get the project on their ``PYTHONPATH`` *in addition to* the caller's (an HPC module system
  provides its stack there), never instead of it.

Before joining, :func:`check_address` opens one TCP connection to the address and asks the GCS behind it
for the cluster's id, each bounded in time: Ray's own ``ray.init`` retries an address where no GCS answers
for many minutes, printing a warning every few seconds. A wrong address therefore ends in a
:class:`ClusterError` naming it and the fix. Once joined, :func:`check_nodes` runs one small task on every
node: it imports the project as a training worker does, and, on more than one node, reads a marker file
the driver wrote under ``run.storage_path``; a node that fails either is named, with the fix, before any
trial starts.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import ray

from orchestrator.config.ignored import warn_newly_ignored
from orchestrator.config.loading import replace
from orchestrator.config.schema import CPU_DEFAULT_WORKERS, ExperimentConfig
from orchestrator.config.validation import ConfigError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "GCS_TIMEOUT_S",
    "LOCAL_HOST",
    "NODE_CHECK_TIMEOUT_S",
    "PROJECT_ROOT",
    "WORKER_MODULES",
    "ClusterError",
    "ResourceError",
    "check_address",
    "check_local_machine",
    "check_nodes",
    "fit_resources",
    "fit_resources_waiting",
    "how_many",
    "init_ray",
    "local_num_cpus",
    "warn_if_wait_has_no_effect",
    "worker_env",
]

log = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_AUTH_MODE_ENV = "RAY_AUTH_MODE"
#: Seconds :func:`check_address` waits for the cluster's address to accept a connection (name lookup included).
CONNECT_TIMEOUT_S = 10.0
#: Seconds it then waits for the GCS there to answer (one attempt of Ray's client gives up after about 40 s).
GCS_TIMEOUT_S = 45.0
_RAY_CLIENT_PORT, _GCS_PORT = 10001, 6379
#: What a training worker imports first (the project's packages and, through them, torch and timm).
WORKER_MODULES = ("orchestrator.worker", "slak_model", "kernels")
#: Seconds :func:`check_nodes` waits for every node's answer (a new worker process imports torch).
NODE_CHECK_TIMEOUT_S = 90.0
_MARKER_PREFIX = ".slak-node-check-"


class ClusterError(ValueError):
    """The cluster cannot run the job as given (its address, the storage its nodes see, the project on its
    workers); the message names the cause and the fix. Nothing was scheduled."""


def _connect_problem(host: str, port: int, timeout_s: float) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout_s`` seconds, else why not.

    The attempt runs in a daemon thread, so that a name lookup (which ignores socket timeouts) cannot stall
    the caller either.
    """
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(None)
        except socket.gaierror as exc:
            outcome.append(f"the host name does not resolve ({exc.strerror or exc})")
        except ConnectionRefusedError:
            outcome.append("connection refused: nothing listens on that port")
        except TimeoutError:
            outcome.append(f"no answer within {timeout_s:g} s")
        except OSError as exc:
            outcome.append(exc.strerror or str(exc))

    thread = threading.Thread(target=attempt, name="slak-address-check", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s (the host name did not resolve in time)"


def _gcs_problem(hostport: str, timeout_s: float) -> str | None:
    """None when the GCS at ``hostport`` tells its cluster id within ``timeout_s`` seconds, else why not.

    One attempt of Ray's own GCS client (the one ``ray.init`` makes, without its retries), in a daemon thread.
    """
    from ray._raylet import GcsClient

    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            GcsClient(address=hostport).cluster_id  # noqa: B018 - the call is the check
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure means "no usable GCS there"
            outcome.append(str(exc).strip() or type(exc).__name__)

    thread = threading.Thread(target=attempt, name="slak-gcs-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def _endpoint(address: str) -> tuple[str, int]:
    """The host and port that ``ray.init(address=...)`` connects to first (``auto`` resolved as Ray does)."""
    if address.startswith("ray://"):
        hostport, default_port = address[len("ray://"):].split("/")[0], _RAY_CLIENT_PORT
    else:
        from ray._private import services

        try:
            hostport = services.canonicalize_bootstrap_address_or_die(address)
        except ConnectionError as exc:
            raise ClusterError(
                f"--address {address}: {exc.args[0] if exc.args else exc} Start Ray on this node first "
                "(`ray start --head`, or `ray start --address=HEAD:6379` to join one), give the head's address "
                "(--address HEAD:6379), or leave --address out to start a local Ray") from None
        default_port = _GCS_PORT
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        host, port = hostport, str(default_port)
    return host.strip("[]"), int(port)


def check_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S, gcs_timeout_s: float = GCS_TIMEOUT_S) -> None:
    """Refuse a Ray address where no cluster answers, within ``timeout_s + gcs_timeout_s`` seconds at most
    (Ray's own join retries for many minutes).

    Raises:
        ClusterError: ``auto`` found no Ray on this node, the address does not accept a connection, or what
            answers there is not a Ray GCS.
    """
    host, port = _endpoint(address)
    started = time.monotonic()
    shown = address if f"{host}:{port}" in address else f"{address} ({host}:{port})"
    if address == "auto":
        shown = f"auto ({host}:{port}, the cluster `ray start` last started or joined on this node)"
    fix = ("Check the address of the Ray head (`ray start --head` prints it; the GCS port is 6379 by default, "
           "and a ray:// address names the client port, 10001 by default), that the head is running (`ray "
           "status` on it) and that this machine can reach it; or leave --address out to start a local Ray")
    problem = _connect_problem(host, port, timeout_s)
    if problem is not None:
        raise ClusterError(f"--address {shown}: no Ray cluster answers there ({problem}, after "
                           f"{time.monotonic() - started:.1f} s). {fix}")
    if address.startswith("ray://"):
        return  # a Ray client server, not a GCS: ray.init's client connection has its own timeout
    problem = _gcs_problem(f"{host}:{port}", gcs_timeout_s)
    if problem is not None:
        raise ClusterError(f"--address {shown}: something accepts connections there, but no Ray GCS answers "
                           f"({problem}, after {time.monotonic() - started:.0f} s): is it another service's "
                           f"port (the dashboard's 8265, MLflow's 5000)? {fix}")


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for Ray workers: the project root prepended to the caller's ``PYTHONPATH``."""
    paths = [str(PROJECT_ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), **(extra or {})}


def _warn_if_auth_disabled(where: str) -> None:
    if os.environ.get(_AUTH_MODE_ENV, "").strip().lower() == "disabled":
        log.warning("Ray token authentication is OFF for %s (opted out through RAY_AUTH_MODE): any process that "
                    "can reach its ports can run code in it. Unset RAY_AUTH_MODE to turn it back on.", where)


def _bind_loopback_only() -> None:
    """Make a local Ray take the loopback address as its node IP (read when Ray starts its processes)."""
    os.environ[_SINGLE_NODE_ENV] = "0"  # the raylet, agents and workers inherit it
    from ray._private import ray_constants  # read once at import, so the driver's copy is set too

    ray_constants.ENABLE_RAY_CLUSTER = False


def _choose_token_auth() -> None:
    """Set ``RAY_AUTH_MODE=token`` for a local Ray when the caller left it unset.

    Token authentication is the mode a new local Ray takes by default anyway; Ray then warns at every start
    that it chose it, and stays quiet only when the mode was given. Ray reads the variable when it is
    imported, so its cached config is refreshed as Ray's own default path does
    (``authentication_token_setup._enable_token_auth``, which sets the variable for this process and its
    children). Should that not turn token mode on (another Ray version), the variable is removed again
    and Ray's own default applies, with its warning: the driver and the servers must agree on the mode.
    """
    if os.environ.get(_AUTH_MODE_ENV) is not None:
        return
    try:
        from ray._private.authentication import authentication_token_setup
        from ray._raylet import AuthenticationMode, get_authentication_mode

        authentication_token_setup._enable_token_auth()
        if get_authentication_mode() == AuthenticationMode.TOKEN:
            return
    except (ImportError, AttributeError) as exc:
        log.debug("could not choose Ray's token authentication explicitly (%s); Ray's default applies", exc)
    os.environ.pop(_AUTH_MODE_ENV, None)


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
        address: A Ray cluster address (``auto``, ``ray://host:10001``, ``host:6379``) or None for local;
            checked first by :func:`check_address`.
        num_cpus: Logical CPUs of a local Ray (ignored when joining, where the cluster has its own).
        include_dashboard: Start the dashboard locally (Train V2 inside Tune needs its state API).
        object_store_memory: Bytes of object store for a local Ray (Ray's default takes 30 % of RAM).
        extra_env: More environment variables for the workers.
        log_to_driver: Forward worker output to this process.
        temp_dir: Session folder of a local Ray (Ray's default is /tmp/ray; keep it short, Ray's unix
            sockets live there and their paths must stay under 108 characters).

    Raises:
        ClusterError: nothing answers at ``address``.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": worker_env(extra_env)}
    if address:
        _warn_if_auth_disabled(f"the cluster at {address}")
        check_address(address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
        return
    _warn_if_auth_disabled("this local Ray")
    _choose_token_auth()
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


def _node_probe() -> Callable[[str | None, str, tuple[str, ...]], dict[str, str | None]]:
    """The task :func:`check_nodes` runs on each node. It is defined inside this function so that Ray ships
    it by value: a node that cannot import this project can still run it and say why."""

    def probe(marker: str | None, token: str, modules: tuple[str, ...]) -> dict[str, str | None]:
        import importlib
        import socket as sockets

        report: dict[str, str | None] = {"host": sockets.gethostname(), "import": None, "storage": None}
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - reported to the driver
                report["import"] = f"import {name}: {type(exc).__name__}: {exc}"
                break
        if marker is not None:
            try:
                with open(marker, encoding="utf-8") as handle:
                    report["storage"] = None if handle.read() == token else "sees another file there"
            except OSError as exc:
                report["storage"] = exc.strerror or str(exc)
        return report

    return probe


def _node_problems(reports: Mapping[str, Mapping[str, str | None]], storage: str) -> list[str]:
    """The :class:`ClusterError` lines for the nodes' answers (``reports``: node label -> probe report)."""
    lines = []
    broken = {node: r["import"] for node, r in reports.items() if r.get("import")}
    if broken:
        lines.append(
            f"the project cannot be imported on {len(broken)} of {len(reports)} Ray node(s): "
            + "; ".join(f"{node}: {why}" for node, why in broken.items())
            + ". Install the project and its pinned requirements on every node with the same Python (`pip "
            "install -r requirements.txt && pip install -e .`), or start every node from the project's image "
            "(docker/)")
    blind = {node: r["storage"] for node, r in reports.items() if r.get("storage")}
    if blind:
        lines.append(
            f"run.storage_path={storage} is not shared: {len(blind)} of {len(reports)} Ray node(s) cannot see "
            "what this driver wrote there ("
            + "; ".join(f"{node}: {why}" for node, why in blind.items())
            + "). Ray Train restarts workers on any node and they resume from checkpoints there: use a file "
            "system mounted at the same path on every node (NFS, Lustre, CephFS) or an object store "
            "(run.storage_path=s3://BUCKET/slak or gs://BUCKET/slak)")
    return lines


def check_nodes(cfg: ExperimentConfig, *, modules: tuple[str, ...] = WORKER_MODULES,
                timeout_s: float = NODE_CHECK_TIMEOUT_S, shared_storage: bool | None = None) -> None:
    """Run one task on every alive node of the joined cluster: import ``modules`` as a training worker does,
    and read a marker file this driver writes under ``run.storage_path``.

    Args:
        shared_storage: Check that every node sees ``run.storage_path``; default: when the cluster has more
            than one node and the path is a local one (an ``s3://``-style URI is not checked).

    Raises:
        ClusterError: some node cannot import the project, or cannot see ``run.storage_path``.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    storage = cfg.run.storage_path
    if shared_storage is None:
        shared_storage = len(nodes) > 1 and "://" not in storage
    token = uuid.uuid4().hex
    marker = None
    if shared_storage:
        root = Path(storage).expanduser().absolute()
        root.mkdir(parents=True, exist_ok=True)
        marker = root / f"{_MARKER_PREFIX}{token}"
        marker.write_text(token, encoding="utf-8")
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_node_probe())
        refs = {f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})": probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                None if marker is None else str(marker), token, modules) for n in nodes}
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        reports: dict[str, Mapping[str, str | None]] = {}
        silent = []
        for node, ref in refs.items():
            if ref in pending:
                silent.append(node)
                ray.cancel(ref, force=True)
                continue
            try:
                report = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the task itself died there
                report = {"host": "?", "import": f"the check task failed: {_first_line(exc)}", "storage": None}
            reports[f"{node.split(' ')[0]} ({report['host']})"] = report
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    if silent:
        log.warning("%d Ray node(s) did not answer the worker check within %g s (busy, or still starting): %s; "
                    "going on without it", len(silent), timeout_s, ", ".join(silent))
    problems = _node_problems(reports, storage)
    if problems:
        raise ClusterError("; and ".join(problems) if len(problems) > 1 else problems[0])
    log.info("cluster check: %d node(s) import the project%s", len(reports),
             f" and see run.storage_path={storage}" if shared_storage else "")


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


class ResourceError(ValueError):
    """What one trial asks for can never fit the cluster; the message says what was asked, what exists and
    the setting to change."""


def local_num_cpus(cfg: ExperimentConfig, trials_at_once: int = 1, trial_driver_cpus: int = 0) -> int:
    """Logical CPUs for a local Ray: the machine's, or more, so that the configured workers always fit.

    On a 2-core laptop the processes then share the cores instead of waiting forever for CPUs that do not
    exist. Workers still to be fitted count as one per local GPU (at least the CPU default).
    """
    import torch

    workers = cfg.run.num_workers or max(CPU_DEFAULT_WORKERS, torch.cuda.device_count())
    per_trial = trial_driver_cpus + workers * max(1, int(cfg.run.cpus_per_worker))
    return max(os.cpu_count() or 1, per_trial * max(1, trials_at_once))


#: GPU memory one trial process that shares a GPU (``run.gpus_per_worker`` < 1) is counted at: its CUDA context,
#: cuDNN/cuBLAS handles and workspaces and a small model. Caps how many such trials run on one GPU at once.
SHARED_TRIAL_GPU_GIB = 1.0


def local_gpu_memory_gib() -> float | None:
    """Total memory of this machine's smallest NVIDIA GPU in GiB, or None where ``nvidia-smi`` cannot say.

    Read through ``nvidia-smi`` so that the driver process never creates a CUDA context of its own (which
    would hold GPU memory for the whole experiment).
    """
    try:
        shown = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
        mib = [float(v) for v in shown.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return min(mib) / 1024 if mib else None


def how_many(available: float, each: float) -> int:
    """How many ``each``-sized shares fit in ``available`` (0.2 GPU five times in 1: float ``//`` says 4)."""
    return math.floor(available / each + 1e-9)


def check_local_machine(cfg: ExperimentConfig, *, num_cpus: int, trial_driver_cpus: int = 0) -> None:
    """Before a local Ray starts, refuse what this machine can never hold.

    Ray's start takes 10-20 s on a large machine; a request that cannot fit is answered without it, from the
    CPUs the local Ray will get and the GPUs CUDA sees (``CUDA_VISIBLE_DEVICES`` applies, as for Ray).

    Raises:
        ResourceError: as :func:`fit_resources`.
    """
    import torch

    fit_resources(cfg, {"CPU": float(num_cpus), "GPU": float(torch.cuda.device_count())},
                  trial_driver_cpus=trial_driver_cpus, announce=False)


def fit_resources(cfg: ExperimentConfig, cluster: Mapping[str, float], *, trial_driver_cpus: int = 0,
                  announce: bool = True) -> ExperimentConfig:
    """Resolve ``run.use_gpu="auto"`` and an unset ``run.num_workers`` against ``cluster`` (Ray's
    ``cluster_resources()``), and refuse what can never fit.

    Args:
        cfg: The validated config.
        cluster: Total resources of the cluster, e.g. ``{"CPU": 16.0, "GPU": 1.0}``.
        trial_driver_cpus: CPUs each trial reserves besides its workers (1 for a Tune trial driver).
        announce: Log the fitted resources (one line), and warn about the user's GPU settings that a
            ``run.use_gpu="auto"`` resolved to CPUs leaves without effect.

    Returns:
        ``cfg`` with ``run.use_gpu`` True/False and ``run.num_workers`` a number (validated again).

    Raises:
        ResourceError: GPUs asked for on a cluster without any, or more GPUs or CPUs per trial than exist.
    """
    r = cfg.run
    gpus, cpus = float(cluster.get("GPU", 0.0)), float(cluster.get("CPU", 0.0))
    use_gpu = gpus > 0 if r.use_gpu == "auto" else bool(r.use_gpu)
    if use_gpu and gpus <= 0:
        raise ResourceError(
            f"run.use_gpu=true but the cluster has no GPUs ({cpus:g} CPUs): set run.use_gpu=auto (uses the "
            "CPUs here) or false, or join a cluster with GPUs (--address)")
    if r.num_workers is not None:
        workers = r.num_workers
    elif use_gpu:
        workers = max(1, how_many(gpus, r.gpus_per_worker)) if r.gpus_per_worker >= 1 else 1
    else:
        workers = CPU_DEFAULT_WORKERS
    if use_gpu and workers * r.gpus_per_worker > gpus + 1e-9:
        fits = how_many(gpus, r.gpus_per_worker)
        fix = (f"set run.num_workers={fits} (or leave it unset to fit the GPUs)" if fits
               else f"lower run.gpus_per_worker to at most {gpus:g}")
        asked = workers * r.gpus_per_worker
        raise ResourceError(
            f"one trial asks for {workers} worker(s) x {r.gpus_per_worker:g} GPU = {asked:g} GPUs, the "
            f"cluster has {gpus:g}: {fix}, or run.use_gpu=false")
    need_cpus = trial_driver_cpus + workers * r.cpus_per_worker
    if need_cpus > cpus + 1e-9:
        driver = f" + {trial_driver_cpus} for the trial driver" if trial_driver_cpus else ""
        raise ResourceError(
            f"one trial asks for {need_cpus} CPUs ({workers} worker(s) x run.cpus_per_worker="
            f"{r.cpus_per_worker}{driver}), the cluster has {cpus:g}: lower run.num_workers or "
            "run.cpus_per_worker, or add nodes")
    try:
        resolved = replace(cfg, {"run.use_gpu": use_gpu, "run.num_workers": workers})
    except ConfigError as exc:  # e.g. a batch that does not divide over the fitted worker count
        raise ResourceError(
            f"with {workers} {'GPU' if use_gpu else 'CPU'} worker(s) (fitted to this cluster) the config is "
            f"invalid: {'; '.join(exc.problems)}; set run.num_workers (and run.use_gpu) explicitly, or fix "
            "the settings named") from None
    each = f"{r.gpus_per_worker:g} GPU each" if use_gpu else f"{r.cpus_per_worker} CPU each"
    if announce:
        if r.use_gpu == "auto" and not use_gpu:
            warn_newly_ignored(cfg, resolved, "run.use_gpu=auto found no GPU in this cluster")
        log.info("resources: %d %s worker(s) per trial (%s); the cluster has %g CPUs, %g GPUs", workers,
                 "GPU" if use_gpu else "CPU", each, cpus, gpus)
    return resolved


def _request_bundles(cfg: ExperimentConfig, trial_driver_cpus: int) -> list[dict[str, float]]:
    """One trial's resource bundles as the autoscaler takes them: a driver CPU and one bundle per worker."""
    r = cfg.run
    workers = r.num_workers or 1
    use_gpu = r.use_gpu is True
    each = {"CPU": float(r.cpus_per_worker), **({"GPU": float(r.gpus_per_worker)} if use_gpu else {})}
    return ([{"CPU": float(trial_driver_cpus)}] if trial_driver_cpus else []) + [dict(each)] * workers


def _ask_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Tell a cluster's autoscaler what one trial needs (a no-op on a cluster without one)."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as exc:  # noqa: BLE001 - asking is a courtesy; waiting works without it
        log.debug("could not ask the autoscaler for %s: %s", bundles, exc)


def fit_resources_waiting(
    cfg: ExperimentConfig,
    *,
    trial_driver_cpus: int = 0,
    wait_s: float | None = None,
    poll_s: float = 15.0,
    cluster_resources: Callable[[], Mapping[str, float]] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    ask_autoscaler: Callable[[list[dict[str, float]]], None] = _ask_autoscaler,
) -> ExperimentConfig:
    """:func:`fit_resources` against a cluster that may grow (an autoscaling Ray cluster).

    ``wait_s`` defaults to ``run.wait_for_resources_s``. With 0 this is :func:`fit_resources` on the cluster as it is, and a refusal adds how to wait.
    Otherwise a request that does not fit yet is shown to the autoscaler (``request_resources``), and the
    cluster's resources are read again every ``poll_s`` seconds, each time with one line saying what is
    missing and how long is left, until one trial fits or ``wait_s`` has passed.

    Raises:
        ResourceError: still does not fit after ``wait_s`` seconds.
    """
    read = cluster_resources or ray.cluster_resources
    wait_s = float(cfg.run.wait_for_resources_s if wait_s is None else wait_s)
    deadline = clock() + wait_s
    asked = False
    while True:
        try:
            return fit_resources(cfg, read(), trial_driver_cpus=trial_driver_cpus)
        except ResourceError as exc:
            left = deadline - clock()
            if wait_s <= 0:
                raise ResourceError(
                    f"{exc}. If this cluster autoscales, set run.wait_for_resources_s (e.g. 900) to wait for "
                    "it to grow") from None
            if left <= 0:
                raise ResourceError(f"{exc} (still, after waiting {wait_s:g} s for the cluster to grow: "
                                    "run.wait_for_resources_s)") from None
            if not asked:
                ask_autoscaler(_request_bundles(cfg, trial_driver_cpus))
                asked = True
            log.warning("waiting for the cluster to grow (%.0f s left of run.wait_for_resources_s=%g): %s",
                        left, wait_s, exc)
            sleep(min(poll_s, left))


def warn_if_wait_has_no_effect(cfg: ExperimentConfig, address: str | None) -> None:
    """``run.wait_for_resources_s`` waits for a cluster to grow; a local Ray never does."""
    if address is None and cfg.run.wait_for_resources_s > 0:
        log.warning("run.wait_for_resources_s=%g has no effect on a local Ray (this machine cannot grow): "
                    "drop it, or join an autoscaling cluster with --address", cfg.run.wait_for_resources_s)
