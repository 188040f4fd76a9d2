"""MLflow tracking for training jobs: rank 0 only, batched, and never the reason a job dies.

This is the only package that imports ``mlflow``; a change of MLflow API touches it alone. Its modules,
one job each: ``tracker`` (what a training job logs through), ``journal`` (the offline store and its
replay), ``runs`` (run queries and status changes for the Tune driver and collation), ``environment``
(the tags that say where and with what a run was computed), ``server`` (whether the server answers,
checked once before a job starts), ``_mlflow`` (the shared client calls).

Every logging call becomes an *event* (a small JSON-able dict). One function, :func:`_apply`, turns an
event into MLflow client calls, and it serves both live logging and replay. When the tracking server
cannot be reached, events are appended instead to a journal under ``tracking.offline_dir/<run>/``
(``events.jsonl`` + copies of artifact files), training goes on, and one warning says so. The tracker
probes the server every few seconds; once it answers, new events go live again and the journal is
replayed into the run at :meth:`Tracker.end`. Whatever is still in a journal (the job died, or the
server never came back) is replayed later by :func:`sync_offline` or from the shell::

    python -m orchestrator.tracking sync DIR --tracking-uri URI

An event the server *rejects* while it is reachable (say, a param whose value changed on resume) is
not retried forever: it goes to ``rejected.jsonl`` beside the journal with the server's message.
"""

from __future__ import annotations

from orchestrator.tracking.environment import run_tags_for_environment
from orchestrator.tracking.journal import pending_offline, sync_command, sync_offline
from orchestrator.tracking.runs import (
    find_or_create_run,
    log_artifact_to_run,
    log_metrics_to_run,
    log_table_to_run,
    metric_history,
    mlflow_ui_command,
    runs_dataframe,
    runs_table_url,
    set_run_status,
)
from orchestrator.tracking.server import check_server, server_problem
from orchestrator.tracking.tracker import MlflowTracker, NullTracker, Tracker, create_tracker

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "check_server",
    "create_tracker",
    "find_or_create_run",
    "log_artifact_to_run",
    "log_metrics_to_run",
    "log_table_to_run",
    "metric_history",
    "mlflow_ui_command",
    "pending_offline",
    "run_tags_for_environment",
    "runs_dataframe",
    "runs_table_url",
    "server_problem",
    "set_run_status",
    "sync_command",
    "sync_offline",
]
