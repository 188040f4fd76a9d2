"""MLflow tracking for training jobs: rank 0 only, batched, and never the reason a job dies.

This is the only module that imports ``mlflow``; Ray Tune callbacks and result collation reach MLflow
through the helpers at the bottom, so a change of MLflow API touches one file.

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

import argparse
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kernels import environment
from orchestrator.config import TrackingConfig

__all__ = [
    "NullTracker",
    "MlflowTracker",
    "Tracker",
    "create_tracker",
    "find_or_create_run",
    "log_artifact_to_run",
    "metric_history",
    "mlflow_ui_command",
    "run_tags_for_environment",
    "runs_dataframe",
    "pending_offline",
    "set_run_status",
    "sync_offline",
    "sync_command",
]

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
_META, _EVENTS, _SYNCED, _REJECTED = "meta.json", "events.jsonl", "synced.json", "rejected.jsonl"


def mlflow_ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on ``uri`` (a server URI is simply opened in a browser)."""
    if _is_http(uri):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def sync_command(offline_dir: str | Path, uri: str) -> str:
    """The shell command that replays ``offline_dir`` into ``uri`` (quoted for messages)."""
    return f"python -m orchestrator.tracking sync {offline_dir} --tracking-uri {uri}"


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


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """Id of experiment ``name``, created on first use (artifacts beside a sqlite file, not the cwd)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Without a location MLflow puts artifacts under the *current* directory, which differs
        # between the driver and every Ray worker; anchor them next to the database instead.
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / safe).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(name)  # created concurrently by another process
        if exp is None:
            raise
        return exp.experiment_id


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


class _Journal:
    """Append-only event log of one run on local disk, with a replay cursor."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def create(cls, offline_dir: Path, key: str, meta: dict) -> _Journal:
        journal = cls(offline_dir / key)
        (journal.root / "artifacts").mkdir(parents=True, exist_ok=True)
        if not (journal.root / _META).exists():
            journal.write_meta(meta)
        return journal

    def meta(self) -> dict:
        return json.loads((self.root / _META).read_text())

    def write_meta(self, meta: dict) -> None:
        tmp = self.root / f"{_META}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(self.root / _META)

    def append(self, event: dict) -> None:
        if event["kind"] == "artifact":  # keep a copy: the staging file is temporary
            src = Path(event["path"])
            rel = Path("artifacts") / uuid.uuid4().hex[:8] / src.name
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, self.root / rel)
            else:
                shutil.copy2(src, self.root / rel)
            event = {**event, "path": str(rel)}
        with open(self.root / _EVENTS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def events(self) -> list[dict]:
        path = self.root / _EVENTS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def synced(self) -> int:
        path = self.root / _SYNCED
        return json.loads(path.read_text())["events"] if path.exists() else 0

    def set_synced(self, n: int) -> None:
        (self.root / _SYNCED).write_text(json.dumps({"events": n}))

    def pending(self) -> int:
        return len(self.events()) - self.synced()

    def reject(self, event: dict, error: BaseException) -> None:
        with open(self.root / _REJECTED, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": event, "error": str(error)[:2000]}) + "\n")


def _replay(journal: _Journal, client: MlflowClient, uri: str, run_id: str) -> tuple[int, int]:
    """Apply the journal's unsynced events to ``run_id``; returns (applied, rejected).

    Stops (raising ``ConnectionError``) at the first failure while the server is unreachable, so the
    cursor never moves past an event that was not stored.
    """
    events, start = journal.events(), journal.synced()
    applied = rejected = 0
    for i in range(start, len(events)):
        try:
            _apply(client, run_id, events[i], root=journal.root)
            applied += 1
        except Exception as exc:  # noqa: BLE001 - classify below
            if not _server_reachable(uri, client):
                raise ConnectionError(f"tracking server {uri} unreachable during sync: {exc}") from exc
            journal.reject(events[i], exc)
            rejected += 1
            logger.warning("MLflow rejected a %s event (kept in %s): %s",
                           events[i]["kind"], journal.root / _REJECTED, exc)
        journal.set_synced(i + 1)
    return applied, rejected


class Tracker(ABC):
    """What the training loop logs through; :class:`NullTracker` and :class:`MlflowTracker` implement it."""

    run_id: str | None = None

    @abstractmethod
    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log the flat (dotted-name) config as params."""

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metrics of one step in one batched call."""

    @abstractmethod
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file into the run's artifacts."""

    @abstractmethod
    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as artifact ``artifact_file`` (a run-relative posix path)."""

    @abstractmethod
    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Store ``obj`` as JSON (or YAML when the name ends in .yaml/.yml)."""

    @abstractmethod
    def log_masks(self, masks: Mapping[str, torch.Tensor], step: int) -> None:
        """Store bool masks bit-packed as ``masks/masks_step<step>.npz``."""

    @abstractmethod
    def log_density_table(self, densities: Mapping[str, float], step: int) -> None:
        """Store a per-layer density table the MLflow UI previews."""

    @abstractmethod
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""

    @abstractmethod
    def end(self, status: str = "FINISHED") -> None:
        """Finish the run and replay what was kept offline; a second call does nothing.

        Events logged after ``end`` are still recorded (never dropped), the status stays as set.
        """

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))


class NullTracker(Tracker):
    """Does nothing: used on ranks other than 0 and when ``tracking.enabled`` is false."""

    def log_params(self, flat: Mapping[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        return None

    def log_text(self, text: str, artifact_file: str) -> None:
        return None

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        return None

    def log_masks(self, masks: Mapping[str, torch.Tensor], step: int) -> None:
        return None

    def log_density_table(self, densities: Mapping[str, float], step: int) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        return None


def _save_masks(masks: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        from slak_model.sparsity import save_masks
    except ImportError:  # package __init__ not exporting it (yet): use the module directly
        from slak_model.sparsity.masks import save_masks
    save_masks(masks, path)


class MlflowTracker(Tracker):
    """One MLflow run, written through ``MlflowClient`` with an offline journal as a safety net.

    Args:
        uri: Tracking URI (``sqlite:///abs/path.db`` or ``http://host:port``).
        experiment: Experiment name (created when missing).
        offline_dir: Where journals go when the server is unreachable.
        run_id: Log into this existing run (e.g. created by the Tune trial driver) instead of a new one.
        run_name: Name of a new run.
        parent_run_id: Makes a new run a nested child (Tune sweep -> trials).
        tags: Extra tags of the run.
        reconnect_interval_s: How often an offline tracker probes the server again.
    """

    def __init__(self, uri: str, experiment: str, offline_dir: str | Path, *, run_id: str | None = None,
                 run_name: str | None = None, parent_run_id: str | None = None,
                 tags: Mapping[str, Any] | None = None, reconnect_interval_s: float = 5.0) -> None:
        self.uri, self.experiment = uri, experiment
        self.offline_dir = Path(offline_dir).absolute()
        self.reconnect_interval_s = reconnect_interval_s
        self._client = _client(uri)
        self._staging: Path | None = None  # created on the first staged file, removed by end()
        self._journal: _Journal | None = None
        self._warned = self._ended = False
        self._next_probe = 0.0
        self._meta = {"tracking_uri": uri, "experiment": experiment, "run_name": run_name, "run_id": run_id,
                      "parent_run_id": parent_run_id, "tags": {k: str(v) for k, v in (tags or {}).items()}}
        self.run_id = run_id
        self._online = (not _is_http(uri)) or _server_reachable(uri)
        if self._online:
            try:
                self._start_run()
            except Exception as exc:  # noqa: BLE001 - never fail the job over tracking
                self._go_offline(exc)
        else:
            self._go_offline(ConnectionError(f"{uri}/health did not answer"))
        if self.run_id is None:
            self.run_id = f"offline-{uuid.uuid4().hex[:16]}"

    # -- run lifecycle -------------------------------------------------------------------------------
    def _start_run(self) -> None:
        tags = dict(self._meta["tags"])
        if self._meta["run_id"] is None:
            if self._meta["parent_run_id"]:
                tags["mlflow.parentRunId"] = self._meta["parent_run_id"]
            exp_id = _experiment_id(self._client, self.uri, self.experiment)
            run = self._client.create_run(exp_id, run_name=self._meta["run_name"], tags=tags)
            self._meta["run_id"] = run.info.run_id
            if self._journal is not None:  # the journal began before the run existed
                self._journal.write_meta(self._meta)
        else:
            self._client.update_run(self._meta["run_id"], status="RUNNING")
            if tags:
                _apply(self._client, self._meta["run_id"], {"kind": "tags", "tags": tags})
        if self.run_id is None or self.run_id.startswith("offline-"):
            if self.run_id is not None:
                logger.info("MLflow run %s created for offline run %s", self._meta["run_id"], self.run_id)
            self.run_id = self._meta["run_id"]

    def _go_offline(self, exc: BaseException) -> None:
        self._online = False
        self._next_probe = time.monotonic() + self.reconnect_interval_s
        if self._journal is None:
            key = self._meta["run_id"] or self.run_id or f"offline-{uuid.uuid4().hex[:16]}"
            self.run_id = self.run_id or key
            self._journal = _Journal.create(self.offline_dir, key, self._meta)
        if not self._warned:
            self._warned = True
            logger.warning(
                "MLflow tracking server %s is unreachable (%s); training continues and metrics are kept in %s. "
                "They are sent when the server answers again; to send them by hand: %s",
                self.uri, exc, self._journal.root, sync_command(self.offline_dir, self.uri))

    def _maybe_reconnect(self) -> bool:
        if time.monotonic() < self._next_probe:
            return False
        self._next_probe = time.monotonic() + self.reconnect_interval_s
        if not _server_reachable(self.uri, self._client):
            return False
        if self._meta["run_id"] is None:  # offline since the start: the run is created now
            try:
                self._start_run()
            except Exception:  # noqa: BLE001 - still not usable; keep journaling
                return False
        self._online = True
        logger.info("MLflow tracking server %s is reachable again; the gap is synced at end()", self.uri)
        return True

    def _emit(self, event: dict) -> None:
        if self._online or self._maybe_reconnect():
            try:
                _apply(self._client, self._meta["run_id"], event)
                return
            except Exception as exc:  # noqa: BLE001 - classify: rejected vs unreachable
                if _server_reachable(self.uri, self._client):
                    logger.warning("MLflow rejected a %s event: %s", event["kind"], exc)
                    journal = self._journal or _Journal.create(self.offline_dir, self._meta["run_id"], self._meta)
                    self._journal = journal
                    journal.reject(event, exc)
                    return
                self._go_offline(exc)
        assert self._journal is not None
        self._journal.append(event)

    def end(self, status: str = "FINISHED") -> None:
        if self._ended:
            return
        if status not in _FINAL_STATUSES:
            raise ValueError(f"status={status!r} is not a final run status; use one of {_FINAL_STATUSES}")
        self._next_probe = 0.0  # probe once more: the server may be back
        journal = self._journal
        if journal is not None and journal.pending() and (self._online or self._maybe_reconnect()):
            try:
                applied, rejected = _replay(journal, self._client, self.uri, self._meta["run_id"])
                logger.info("synced %d offline events into MLflow run %s (%d rejected)",
                            applied, self._meta["run_id"], rejected)
            except ConnectionError as exc:
                self._go_offline(exc)
        self._emit({"kind": "status", "status": status})
        self._ended = True
        if journal is None:
            journal = self._journal
        if journal is not None and journal.pending():
            logger.warning("%d tracking events of run %s are kept in %s; sync them with: %s",
                           journal.pending(), self.run_id, journal.root,
                           sync_command(self.offline_dir, self.uri))
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    # -- logging -------------------------------------------------------------------------------------
    def log_params(self, flat: Mapping[str, Any]) -> None:
        self._emit({"kind": "params", "params": {k: _param_value(v) for k, v in flat.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        if values:
            self._emit({"kind": "metrics", "metrics": values, "step": int(step),
                        "timestamp": int(time.time() * 1000)})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._emit({"kind": "tags", "tags": {k: str(v)[:_MAX_TAG_LEN] for k, v in tags.items()}})

    def _stage(self, artifact_file: str) -> Path:
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="slak-track-"))
        path = self._staging / uuid.uuid4().hex[:8] / Path(artifact_file).name
        path.parent.mkdir(parents=True)
        return path

    def _emit_file(self, path: Path, artifact_file: str) -> None:
        parent = str(Path(artifact_file).parent)
        self._emit({"kind": "artifact", "path": str(path), "artifact_path": None if parent == "." else parent})

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._emit({"kind": "artifact", "path": str(Path(local_path).absolute()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self._stage(artifact_file)
        path.write_text(text, encoding="utf-8")
        self._emit_file(path, artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if artifact_file.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(obj, sort_keys=False)
        else:
            text = json.dumps(obj, indent=2, default=str)
        self.log_text(text, artifact_file)

    def log_masks(self, masks: Mapping[str, torch.Tensor], step: int) -> None:
        path = self._stage(f"masks_step{int(step):08d}.npz")
        _save_masks(masks, path)
        self._emit_file(path, f"masks/{path.name}")

    def log_density_table(self, densities: Mapping[str, float], step: int) -> None:
        names = list(densities)
        data = {"layer": names, "density": [float(densities[n]) for n in names], "step": [int(step)] * len(names)}
        self._emit({"kind": "table", "data": data, "artifact_file": f"masks/density_step{int(step):08d}.json"})


def create_tracker(tracking_cfg: TrackingConfig, *, run_id: str | None = None, run_name: str | None = None,
                   parent_run_id: str | None = None, rank: int = 0,
                   tags: Mapping[str, Any] | None = None, environment: bool = False) -> Tracker:
    """The tracker of one training job: MLflow on rank 0 when enabled, else a :class:`NullTracker`.

    Args:
        environment: Add :func:`run_tags_for_environment` (commit, packages, kernel backend, devices, host).
            Only the process that trains passes True (rank 0 of the job), so the tags describe where the
            run was computed; a driver that reopens a run to set its status must not overwrite them with
            its own machine (and must not build the CUDA extension just to describe itself).
    """
    if rank != 0 or not tracking_cfg.enabled:
        return NullTracker()
    all_tags = {**(run_tags_for_environment() if environment else {}), **(tags or {})}
    return MlflowTracker(tracking_cfg.uri, tracking_cfg.experiment, tracking_cfg.offline_dir, run_id=run_id,
                         run_name=run_name, parent_run_id=parent_run_id, tags=all_tags)


def pending_offline(offline_dir: str | Path) -> int:
    """Events kept in ``offline_dir``'s journals that have not reached a server yet (0 if there is none)."""
    root = Path(offline_dir)
    if not root.is_dir():
        return 0
    roots = [root] if (root / _META).exists() else [p.parent for p in root.glob(f"*/{_META}")]
    return sum(_Journal(r).pending() for r in roots)


def sync_offline(offline_dir: str | Path, uri: str | None = None) -> list[dict]:
    """Replay every journal under ``offline_dir`` (or the journal ``offline_dir`` itself) into MLflow.

    A journal whose run exists on the server continues it; otherwise a new run is created in the
    journal's experiment with tag ``slak.offline_synced=true``. Safe to re-run: a cursor records what
    was sent. Returns one summary dict per journal.
    """
    root = Path(offline_dir)
    if not root.is_dir():
        raise ValueError(f"offline_dir={str(root)!r} is not a directory; pass the tracking.offline_dir of the job")
    roots = [root] if (root / _META).exists() else sorted(p.parent for p in root.glob(f"*/{_META}"))
    results = []
    for jroot in roots:
        journal = _Journal(jroot)
        meta = journal.meta()
        target = uri or meta["tracking_uri"]
        client = _client(target)
        summary = {"journal": str(jroot), "run_id": meta.get("run_id"), "applied": 0, "rejected": 0}
        if journal.pending() == 0:
            results.append({**summary, "pending": 0})
            continue
        run_id = meta.get("run_id")
        try:
            client.get_run(run_id) if run_id else None
        except mlflow.exceptions.MlflowException:
            run_id = None
        if run_id is None:
            tags = {**meta.get("tags", {}), "slak.offline_synced": "true", "slak.offline_journal": jroot.name}
            if meta.get("parent_run_id"):
                tags["mlflow.parentRunId"] = meta["parent_run_id"]
            if meta.get("run_id"):
                tags["slak.offline_original_run_id"] = meta["run_id"]
            exp_id = _experiment_id(client, target, meta["experiment"])
            run_id = client.create_run(exp_id, run_name=meta.get("run_name"), tags=tags).info.run_id
            journal.write_meta({**meta, "run_id": run_id, "tracking_uri": target})
        applied, rejected = _replay(journal, client, target, run_id)
        results.append({**summary, "run_id": run_id, "applied": applied, "rejected": rejected,
                        "pending": journal.pending()})
    return results


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
    """All runs of ``experiment`` as ``mlflow.search_runs`` lays them out (``params.*``, ``metrics.*``, ``tags.*``)."""
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


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def run_tags_for_environment() -> dict[str, str]:
    """Tags that make a run reproducible: git commit, package versions, kernel backends, devices."""
    env = environment.describe()
    tags = {"slak.python": env["python"], "slak.hostname": env["hostname"], "slak.devices": env["device"],
            "slak.cuda": env["cuda"], "slak.cudnn": env["cudnn"]}
    for dist in ("torch", "timm", "ray", "mlflow", "numpy", "numba", "slak-orchestrator"):
        tags[f"slak.version.{dist}"] = _version(dist)
    commit, dirty = environment.git_commit()  # an image without .git reads the commit from SLAK_GIT_COMMIT
    tags["slak.git.commit"] = commit
    if not commit.startswith("unknown"):
        tags["mlflow.source.git.commit"] = commit
    if dirty is not None:
        tags["slak.git.dirty"] = str(dirty).lower()
    try:
        import kernels

        tags["slak.kernel.backend"] = kernels.active_backend()
        tags["slak.kernel.report"] = json.dumps(kernels.backend_report(), default=str)[:_MAX_TAG_LEN]
    except Exception as exc:  # noqa: BLE001 - a broken backend must still be recorded, not crash
        tags["slak.kernel.backend"] = f"error: {exc}"[:_MAX_TAG_LEN]
    return tags


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.tracking",
                                     description="Replay MLflow events kept offline by a training job.")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="send offline journals to a tracking server")
    sync.add_argument("offline_dir", help="the job's tracking.offline_dir (or one journal inside it)")
    sync.add_argument("--tracking-uri", default=None, help="target URI (default: the one the job used)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        results = sync_offline(args.offline_dir, args.tracking_uri)
    except (ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{'journal':<40} {'run_id':<34} {'applied':>7} {'rejected':>8} {'pending':>7}")
    for r in results:
        print(f"{Path(r['journal']).name:<40} {str(r['run_id']):<34} {r['applied']:>7} {r['rejected']:>8} "
              f"{r['pending']:>7}")
    return 0 if all(r["pending"] == 0 for r in results) else 2


if __name__ == "__main__":
    sys.exit(_main())
