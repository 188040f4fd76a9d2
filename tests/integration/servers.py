"""Real PostgreSQL and MLflow tracking servers for integration tests, started and stopped by process id.

Both run on 127.0.0.1 on a free port, in a throw-away directory, in their own process group, and are
stopped (SIGINT/SIGTERM, then SIGKILL) when the ``with`` block ends, also when the test fails.
PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` (else ``nobody``) user.

Usage::

    with mlflow_server(backend="postgresql") as uri:   # or backend="sqlite"
        ...  # log to uri, e.g. "http://127.0.0.1:41234"

    server = MlflowServer(backend_store_uri, artifacts_dir)   # stop()/start() on the same port
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["MlflowServer", "ServerUnavailable", "free_port", "managed_mlflow_server", "mlflow_server", "postgres_reason",
           "postgres_server", "process_alive"]


class ServerUnavailable(RuntimeError):
    """A server cannot be started on this machine (tests turn this into a skip with the reason)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_reason() -> str | None:
    """Why PostgreSQL cannot be used here, or None when it can."""
    if _pg_bindir() is None:
        return "PostgreSQL binaries (initdb, postgres) not found; install the 'postgresql' package (CI does)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is missing; pip install -r requirements-dev.txt"
    return None


def _stop(proc: subprocess.Popen, first: int, timeout_s: float = 20.0) -> None:
    """Signal the process group, wait, escalate to SIGKILL; never leaves the group running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, first)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group (worker processes)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


def _log_tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@contextmanager
def postgres_server(dbname: str = "mlflow") -> Iterator[str]:
    """A fresh PostgreSQL cluster; yields ``postgresql+psycopg2://slak@127.0.0.1:PORT/<dbname>`` (trust auth)."""
    reason = postgres_reason()
    if reason:
        raise ServerUnavailable(reason)
    import psycopg2

    bindir = _pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="slakpg", dir="/tmp"))  # short: unix socket paths < 108 chars
    user = None
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        if user is None:
            raise ServerUnavailable("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")
        os.chown(root, user.pw_uid, user.pw_gid)
    as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    env = {**os.environ, "LC_ALL": "C"}
    data, log = root / "data", root / "postgres.log"
    init = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "slak", "--auth=trust", "-E", "UTF8",
                           "--no-sync"], capture_output=True, text=True, env=env, cwd=root, **as_user)
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise ServerUnavailable(f"initdb failed: {init.stderr[-2000:]}")
    port = free_port()
    with open(log, "w") as fh:
        if user:
            os.chown(log, user.pw_uid, user.pw_gid)
        proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True, **as_user)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise ServerUnavailable(f"postgres exited with {proc.returncode}: {_log_tail(log)}")
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user="slak", dbname="postgres")
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(f"postgres not ready after 30 s: {_log_tail(log)}") from None
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{dbname}"')
        conn.close()
        # SQLAlchemy 2.1 defaults to psycopg 3; name the driver we ship (psycopg2-binary).
        yield f"postgresql+psycopg2://slak@127.0.0.1:{port}/{dbname}"
    finally:
        _stop(proc, signal.SIGINT)  # SIGINT = PostgreSQL's "fast" shutdown
        shutil.rmtree(root, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with artifacts served by the server; restartable on one port.

    Args:
        backend_store_uri: ``postgresql://...`` or ``sqlite:///...``.
        artifacts_dir: Where ``--serve-artifacts`` keeps artifacts.
        port: Fixed port (default: a free one), kept across :meth:`stop`/:meth:`start`.
    """

    def __init__(self, backend_store_uri: str, artifacts_dir: str | Path, port: int | None = None) -> None:
        self.backend_store_uri = backend_store_uri
        self.artifacts_dir = Path(artifacts_dir)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = self.artifacts_dir.parent / f"mlflow-server-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []

    def start(self, timeout_s: float = 90.0) -> str:
        """Start the server and wait for ``/health``; returns the tracking URI."""
        exe = Path(sys.executable).parent / "mlflow"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]
        cmd += ["server", "--backend-store-uri", self.backend_store_uri, "--serve-artifacts",
                "--artifacts-destination", str(self.artifacts_dir), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]
        # No job runner: the default starts huey consumers that outlive the server (orphans).
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "a") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.pids.append(self.proc.pid)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise ServerUnavailable(f"mlflow server exited with {self.proc.returncode}: {_log_tail(self.log)}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self.uri
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerUnavailable(f"mlflow server not healthy after {timeout_s} s: {_log_tail(self.log)}")
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL what is left; idempotent."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM)
            self.proc = None


@contextmanager
def managed_mlflow_server(backend: str = "postgresql") -> Iterator[MlflowServer]:
    """A started :class:`MlflowServer` (stop/start it to simulate an outage); stopped at exit."""
    if backend not in ("postgresql", "sqlite"):
        raise ValueError(f"backend={backend!r} is not supported; use 'postgresql' or 'sqlite'")
    root = Path(tempfile.mkdtemp(prefix="slakml", dir="/tmp"))
    try:
        with contextlib.ExitStack() as stack:
            if backend == "postgresql":
                store = stack.enter_context(postgres_server())
            else:
                store = f"sqlite:///{root / 'mlflow.db'}"
            server = MlflowServer(store, root / "artifacts")
            stack.callback(server.stop)
            server.start()
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def mlflow_server(backend: str = "postgresql") -> Iterator[str]:
    """A tracking server on 127.0.0.1 backed by PostgreSQL or sqlite; yields its ``http://`` URI."""
    with managed_mlflow_server(backend) as server:
        yield server.uri
