"""Queries and status changes of MLflow runs for the Tune driver and result collation (so that only the
tracking package touches mlflow)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.config import TrackingConfig
from orchestrator.tracking._mlflow import _FINAL_STATUSES, _client, _experiment_id, _is_http

__all__ = [
    "find_or_create_run",
    "log_artifact_to_run",
    "metric_history",
    "mlflow_ui_command",
    "runs_dataframe",
    "set_run_status",
]


def mlflow_ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on ``uri`` (a server URI is simply opened in a browser)."""
    if _is_http(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


# -- helpers for Tune and collation (so that only this module touches mlflow) ---------------------------
def find_or_create_run(tracking_cfg: TrackingConfig, *, run_name: str, tags: Mapping[str, Any] | None = None,
                       parent_run_id: str | None = None,
                       match_tag: tuple[str, str] | None = None) -> str:
    """Run id of the run carrying tag ``match_tag`` (a Tune retry finds its run again), else a new run."""
    uri = tracking_cfg.uri
    client = _client(uri)
    exp_id = _experiment_id(client, uri, tracking_cfg.experiment)
    if match_tag is not None:
        key, value = match_tag
        found = client.search_runs([exp_id], filter_string=f"tags.`{key}` = '{value}'", max_results=1)
        if found:
            return found[0].info.run_id
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if match_tag is not None:
        all_tags[match_tag[0]] = str(match_tag[1])
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id


def set_run_status(uri: str, run_id: str, status: str) -> None:
    """Mark a run FINISHED/FAILED/KILLED (or RUNNING again on resume)."""
    client = _client(uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    elif status in _FINAL_STATUSES:
        client.set_terminated(run_id, status)
    else:
        raise ValueError(f"status={status!r} is not allowed; use RUNNING or one of {_FINAL_STATUSES}")


def log_artifact_to_run(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload one local file or directory into an existing run."""
    client = _client(uri)
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def runs_dataframe(uri: str, experiment: str) -> pd.DataFrame:
    """All runs of ``experiment`` as ``mlflow.search_runs`` lays them out (``params.*``, ``metrics.*``, ``tags.*``).

    Not ``mlflow.search_runs`` itself: it reads the process-wide tracking URI, which the Tune driver's
    callbacks and collation would have to switch back and forth; a client bound to ``uri`` does not.
    """
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame(columns=["run_id", "experiment_id", "status", "start_time", "end_time"])
    rows, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for run in page:
            row = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "status": run.info.status,
                   "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
                   "end_time": pd.to_datetime(run.info.end_time, unit="ms", utc=True),
                   "artifact_uri": run.info.artifact_uri}
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows)


# -- helper for result collation (added by the Tune/collation engineer) --------------------------------
def metric_history(uri: str, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """Every logged value of ``keys`` for ``run_ids`` as a long frame ``run_id, key, step, value``.

    ``runs_dataframe`` only holds each metric's latest value; collation needs the whole history for
    the best epoch of a run (which may have been resumed several times).
    """
    client = _client(uri)
    rows = [
        {"run_id": run_id, "key": key, "step": m.step, "value": m.value}
        for run_id in run_ids
        for key in keys
        for m in client.get_metric_history(run_id, key)
    ]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])
