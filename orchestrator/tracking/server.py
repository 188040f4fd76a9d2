"""Whether the tracking server answers, checked once by a job's driver before Ray starts, in bounded time.

An unreachable server does not stop a job (the offline journal keeps what it logs, see
:mod:`orchestrator.tracking.tracker`); :func:`check_server` says so in one warning, with where the events
are kept, how to send them later and how to fix the address, before anything else is started.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.error
import urllib.request

from orchestrator.config.schema import TrackingConfig
from orchestrator.tracking._mlflow import _is_http
from orchestrator.tracking.journal import sync_command

__all__ = ["SERVER_TIMEOUT_S", "check_server", "server_problem"]

logger = logging.getLogger(__name__)

#: Seconds :func:`server_problem` waits for the server's ``/health`` (name lookup included).
SERVER_TIMEOUT_S = 5.0


def server_problem(uri: str, timeout_s: float = SERVER_TIMEOUT_S) -> str | None:
    """None when the MLflow server at ``uri`` answers ``/health`` within ``timeout_s`` seconds, else why not
    (a database URI is not checked here: it is local to the job).

    The request runs in a daemon thread, so that a name lookup (which ignores the request timeout) cannot
    stall the caller either.
    """
    if not _is_http(uri):
        return None
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
                outcome.append(None if resp.status == 200 else f"/health answered HTTP {resp.status}")
        except urllib.error.HTTPError as exc:
            outcome.append(f"/health answered HTTP {exc.code}: is this an MLflow server?")
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ConnectionRefusedError):
                outcome.append("connection refused: nothing listens on that port")
            elif isinstance(reason, OSError) and reason.strerror:
                outcome.append(reason.strerror)
            else:
                outcome.append(str(reason))
        except TimeoutError:
            outcome.append(f"no answer within {timeout_s:g} s")
        except (OSError, ValueError, http.client.HTTPException) as exc:
            outcome.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=attempt, name="slak-mlflow-check", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s (the host name did not resolve in time)"


def check_server(tracking_cfg: TrackingConfig, timeout_s: float = SERVER_TIMEOUT_S) -> bool:
    """True when tracking is off or its server answers; otherwise log one warning (the job goes on offline)."""
    if not tracking_cfg.enabled:
        return True
    started = time.monotonic()
    problem = server_problem(tracking_cfg.uri, timeout_s)
    if problem is None:
        return True
    logger.warning(
        "MLflow tracking server %s does not answer (%s, after %.1f s). The job runs anyway: its params, metrics "
        "and artifacts are kept in %s and sent when the server answers again, or later with: %s. If the "
        "address is wrong, fix --tracking-uri (tracking.uri); to run without MLflow, set tracking.enabled=false",
        tracking_cfg.uri, problem, time.monotonic() - started, tracking_cfg.offline_dir,
        sync_command(tracking_cfg.offline_dir, tracking_cfg.uri))
    return False
