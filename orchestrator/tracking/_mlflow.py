"""The MLflow client calls every tracking module shares: quick failure over http, liveness probe,
experiments created on first use, and :func:`_apply`, which turns one event into client calls (live
logging and journal replay both go through it)."""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)


# MLflow's own defaults (7 retries, exponential backoff, 120 s timeout) would stall a training step
# for minutes when the server is down; the offline journal makes quick failure safe. Users may still
# override these through the environment.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_MAX_METRICS, _MAX_PARAMS_TAGS = 1000, 100
_MAX_PARAM_LEN, _MAX_TAG_LEN = 6000, 8000
_FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _client(uri: str) -> MlflowClient:
    if _is_http(uri):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


def _server_reachable(uri: str, client: MlflowClient | None = None, timeout_s: float = 2.0) -> bool:
    """Quick liveness probe: ``/health`` for a server, one cheap query for a database URI."""
    if _is_http(uri):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False
    try:
        (client or _client(uri)).search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable now"
        return False


#: MLflow's experiment-type tag (what the UI's "experiment type" selector writes): these experiments hold
#: training runs, not GenAI traces.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def _sqlite_artifact_root(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):]).parent / "mlartifacts"


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """Id of experiment ``name``, created on first use (artifacts beside a sqlite file, not the cwd) and
    marked as a machine-learning experiment (:data:`EXPERIMENT_KIND`) unless it already has a type."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        _warn_if_moved(uri, exp.artifact_location)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Without a location MLflow puts artifacts under the *current* directory, which differs
        # between the driver and every Ray worker; anchor them next to the database instead. MLflow's
        # sqlite store keeps local locations as absolute paths (it resolves relative ones on creation).
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        location = (_sqlite_artifact_root(uri) / safe).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(name)  # created concurrently by another process
        if exp is None:
            raise
        return exp.experiment_id


_warned_moved: set[str] = set()


def _warn_if_moved(uri: str, artifact_location: str) -> None:
    """Warn once when a sqlite store's artifacts are recorded under a folder other than the database's.

    That happens when the project folder (database and ``mlartifacts/`` together) was moved or copied:
    MLflow recorded absolute paths, so new runs still write to, and the UI still reads from, the old place.
    """
    if not uri.startswith("sqlite:///") or not artifact_location.startswith("file:") or uri in _warned_moved:
        return
    expected = _sqlite_artifact_root(uri).absolute()
    recorded = Path(urllib.parse.unquote(urllib.parse.urlparse(artifact_location).path))
    if recorded.parent != expected:
        _warned_moved.add(uri)
        logger.warning(
            "MLflow keeps this experiment's artifacts at %s, not beside the database (%s): the folder was "
            "moved or copied, and MLflow stores absolute paths for a sqlite store. Runs keep writing to the old "
            "place; use a new tracking.experiment (or an MLflow server with --serve-artifacts, whose "
            "mlflow-artifacts:/ locations do not depend on a folder) to keep new artifacts with the database.",
            recorded, expected)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:_MAX_PARAM_LEN]


def _apply(client: MlflowClient, run_id: str, event: dict, root: Path | None = None) -> None:
    """Perform one event against MLflow; ``root`` resolves artifact paths stored in a journal."""
    kind = event["kind"]
    if kind == "params":
        params = [Param(k, v) for k, v in event["params"].items()]
        for chunk in _chunks(params, _MAX_PARAMS_TAGS):
            client.log_batch(run_id, params=chunk, synchronous=True)
    elif kind == "metrics":
        metrics = [Metric(k, v, event["timestamp"], event["step"]) for k, v in event["metrics"].items()]
        for chunk in _chunks(metrics, _MAX_METRICS):
            client.log_batch(run_id, metrics=chunk, synchronous=True)
    elif kind == "tags":
        tags = [RunTag(k, v) for k, v in event["tags"].items()]
        for chunk in _chunks(tags, _MAX_PARAMS_TAGS):
            client.log_batch(run_id, tags=chunk, synchronous=True)
    elif kind == "artifact":
        path = Path(event["path"]) if root is None else root / event["path"]
        if path.is_dir():
            client.log_artifacts(run_id, str(path), event.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), event.get("artifact_path"))
    elif kind == "table":
        client.log_table(run_id, data=pd.DataFrame(event["data"]), artifact_file=event["artifact_file"])
    elif kind == "status":
        client.set_terminated(run_id, event["status"])
    else:
        raise ValueError(f"unknown tracking event kind {kind!r}")
