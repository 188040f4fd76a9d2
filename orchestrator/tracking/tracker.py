"""The tracker a training job logs through: MLflow on rank 0, batched, with the offline journal as a
safety net, and never the reason a job dies."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from orchestrator.config.schema import TrackingConfig
from orchestrator.tracking._mlflow import (
    _FINAL_STATUSES,
    _MAX_TAG_LEN,
    _apply,
    _client,
    _experiment_id,
    _is_http,
    _param_value,
    _server_reachable,
)
from orchestrator.tracking.environment import run_tags_for_environment
from orchestrator.tracking.journal import _Journal, _replay, sync_command

__all__ = ["MlflowTracker", "NullTracker", "Tracker", "create_tracker"]

logger = logging.getLogger(__name__)


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
        """Add one topology update's bool masks (bit-packed) to the run's mask history: one archive per
        training process, ``masks/history_from_step<first>.zip`` holding ``masks_step<step>.npz`` members,
        uploaded when the process closes its tracker (not one file per update)."""

    @abstractmethod
    def log_density_table(self, densities: Mapping[str, float], step: int) -> None:
        """Add one update's per-layer densities to the history table ``masks/density_history_from_step<first>.json``
        (columns layer, density, step; uploaded with the mask history)."""

    @abstractmethod
    def log_final_sparsity(self, masks: Mapping[str, torch.Tensor], densities: Mapping[str, float],
                           step: int) -> None:
        """The final masks and per-layer density table at fixed top-level paths, ``masks.npz`` and
        ``density.json``: the same names in every run, so MLflow's compare view finds them."""

    @abstractmethod
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""

    @abstractmethod
    def end(self, status: str | None = "FINISHED") -> None:
        """Finish the run and replay what was kept offline; a second call does nothing.

        ``status`` None leaves the run's status to its owner (see :meth:`close`). Events logged after
        ``end`` are still recorded (never dropped), the status stays as set.
        """

    def close(self) -> None:
        """Flush and replay what was kept offline, without a final status: what a training process calls.
        The run's owner (the driver that created it: ``train.py``'s job driver or the Tune status callback)
        sets FINISHED or FAILED, once, so retries never flip a run between RUNNING and FAILED."""
        self.end(None)

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

    def log_final_sparsity(self, masks: Mapping[str, torch.Tensor], densities: Mapping[str, float],
                           step: int) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def end(self, status: str | None = "FINISHED") -> None:
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
        self._mask_history: Path | None = None  # this process's mask archive, uploaded by end()
        self._density_history: list[tuple[str, float, int]] = []
        self._density_history_from = 0
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

    def end(self, status: str | None = "FINISHED") -> None:
        if self._ended:
            return
        if status is not None and status not in _FINAL_STATUSES:
            raise ValueError(f"status={status!r} is not a final run status; use one of {_FINAL_STATUSES}")
        self._upload_history()
        self._next_probe = 0.0  # probe once more: the server may be back
        journal = self._journal
        if journal is not None and journal.pending() and (self._online or self._maybe_reconnect()):
            try:
                applied, rejected = _replay(journal, self._client, self.uri, self._meta["run_id"])
                logger.info("synced %d offline events into MLflow run %s (%d rejected)",
                            applied, self._meta["run_id"], rejected)
            except ConnectionError as exc:
                self._go_offline(exc)
        if status is not None:
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
        if self._mask_history is None:
            self._mask_history = self._stage(f"history_from_step{int(step):08d}.zip")
        with zipfile.ZipFile(self._mask_history, "a", compression=zipfile.ZIP_STORED) as archive:
            archive.write(path, path.name)  # the npz inside is compressed already
        path.unlink()

    def log_density_table(self, densities: Mapping[str, float], step: int) -> None:
        if not self._density_history:
            self._density_history_from = int(step)
        self._density_history += [(name, float(value), int(step)) for name, value in densities.items()]

    def log_final_sparsity(self, masks: Mapping[str, torch.Tensor], densities: Mapping[str, float],
                           step: int) -> None:
        path = self._stage("masks.npz")
        _save_masks(masks, path)
        self._emit_file(path, "masks.npz")
        names = list(densities)
        data = {"layer": names, "density": [float(densities[n]) for n in names], "step": [int(step)] * len(names)}
        self._emit({"kind": "table", "data": data, "artifact_file": "density.json"})

    def _upload_history(self) -> None:
        """The mask archive and the density table of this process, once, when the tracker closes."""
        if self._mask_history is not None:
            self._emit_file(self._mask_history, f"masks/{self._mask_history.name}")
            self._mask_history = None
        if self._density_history:
            layer, density, step = (list(column) for column in zip(*self._density_history))
            name = f"masks/density_history_from_step{self._density_history_from:08d}.json"
            self._emit({"kind": "table", "data": {"layer": layer, "density": density, "step": step},
                        "artifact_file": name})
            self._density_history = []


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
