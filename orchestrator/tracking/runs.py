"""Queries and status changes of MLflow runs for the Tune driver and result collation (so that only the
tracking package touches mlflow)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.default_context import DefaultRunContext
from mlflow.utils.mlflow_tags import MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

from orchestrator.config.schema import TrackingConfig
from orchestrator.tracking._mlflow import (
    _FINAL_STATUSES,
    _apply,
    _client,
    _experiment_id,
    _is_http,
    _server_reachable,
)

__all__ = [
    "find_or_create_run",
    "log_artifact_to_run",
    "log_metrics_to_run",
    "log_table_to_run",
    "metric_history",
    "mlflow_ui_command",
    "runs_dataframe",
    "runs_table_url",
    "set_run_status",
]


#: Where ``mlflow ui`` listens by default.
LOCAL_UI = "http://127.0.0.1:5000"


def runs_table_url(base: str, experiment_id: str) -> str:
    """The MLflow UI address of an experiment's runs table.

    MLflow 3.x opens a bare experiment link on the tab its *workflow type* picks, and that type comes from the
    ``workflowType`` URL parameter or else from the browser's last choice (GenAI by default: the experiment
    then opens on the traces "Overview"). The runs tab with ``workflowType=machine_learning`` lands on the
    runs table whatever the browser chose before.
    """
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def mlflow_ui_command(uri: str, experiment: str | None = None) -> str:
    """How to open the MLflow UI on ``uri``, and the address of ``experiment``'s runs table when it exists
    (and the store answers: a server that is down only loses the address, never the job's last lines)."""
    try:
        reachable = not _is_http(uri) or _server_reachable(uri)
        exp = _client(uri).get_experiment_by_name(experiment) if experiment and reachable else None
    except Exception:  # noqa: BLE001 - see above
        exp = None
    if _is_http(uri):
        return f"open {runs_table_url(uri, exp.experiment_id) if exp else uri} in a browser"
    command = f"mlflow ui --backend-store-uri {uri}"
    return f"{command}, then open {runs_table_url(LOCAL_UI, exp.experiment_id)}" if exp else command


def _source_tags(client: MlflowClient, parent_run_id: str | None) -> dict[str, str]:
    """``mlflow.source.name``/``.type`` and ``mlflow.user`` of a new run, so that the UI's "Source" and
    "Created by" are filled: MLflow's own defaults (this script, this user) for a top-level run; a child
    copies its parent's, because it is created in a Ray actor whose own script is Ray's worker."""
    if parent_run_id:
        tags = client.get_run(parent_run_id).data.tags
        return {k: tags[k] for k in (MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER) if k in tags}
    return DefaultRunContext().tags()


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
    all_tags = {**_source_tags(client, parent_run_id), **{k: str(v) for k, v in (tags or {}).items()}}
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


def log_metrics_to_run(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log ``metrics`` into an existing run at ``step`` (in batches of MLflow's limit)."""
    _apply(_client(uri), run_id, {"kind": "metrics", "metrics": {k: float(v) for k, v in metrics.items()},
                                  "step": int(step), "timestamp": int(time.time() * 1000)})


def log_table_to_run(uri: str, run_id: str, table: pd.DataFrame, artifact_file: str) -> None:
    """Store ``table`` as an MLflow table artifact of an existing run (the UI shows it as a table)."""
    _client(uri).log_table(run_id, data=table, artifact_file=artifact_file)


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
