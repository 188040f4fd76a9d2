"""One training job as a Ray Train (V2) ``TorchTrainer``: DDP workers, checkpoints, retries, MLflow.

This is the only module that touches ``ray.train``; Ray's API moves between versions, so it stays here.
Each worker receives the typed config itself, builds its data shard, wraps
:class:`orchestrator.loop.Trainer` in DDP and reports once per epoch (and every
``train.checkpoint_every_steps`` optimizer steps) with a checkpoint from rank 0. Every rank calls
``ray.train.report`` the same number of times, because it is a barrier.

Reliability:

* Checkpoints hold the whole trainer state (model, EMA, optimizer, scaler, schedule position, sparsity
  engine, every rank's RNG streams), written to a temporary file, renamed, then sealed by a manifest
  with its SHA-256; Ray registers a checkpoint only after it is fully persisted, and a loader refuses a
  checkpoint whose manifest does not match. A crash mid-write therefore never yields a half-written
  "latest".
* The state is tensors and plain Python data only, and is read with ``torch.load(weights_only=True)``:
  the manifest proves integrity, not authorship, and a run folder on shared storage may hold a file
  someone else planted. A file that needs arbitrary unpickling is refused without running it.
* ``run.max_failures`` restarts the worker group from the last checkpoint; re-running the same command
  (same ``run.name`` and ``run.storage_path``) continues the run.
* ``SLAK_FAULT_INJECT="rank:step"`` (read by the driver) makes that rank raise once, right after that
  optimizer step; a marker file in the run folder keeps the retry from raising again. Tests use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orchestrator import preflight, ray_cluster, run_identity, tracking
from orchestrator.config import ExperimentConfig, to_yaml
from orchestrator.loop import Trainer

__all__ = [
    "FAULT_ENV",
    "build_trainer",
    "failure_summary",
    "load_checkpoint_dir",
    "run_name_for",
    "run_training",
    "save_checkpoint_dir",
    "train_loop_per_worker",
]

log = logging.getLogger(__name__)

FAULT_ENV = "SLAK_FAULT_INJECT"
_STATE_FILE, _MANIFEST = "state.pt", "manifest.json"
#: Manifests of checkpoints that hold tensors and plain data only carry this; older ones held NumPy's RNG
#: state as arrays, which load with NumPy's array globals allowed and nothing else.
_LAYOUT = "tensors-and-plain-data"


def _numpy_array_globals() -> list:
    import numpy as np

    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


class InjectedFault(RuntimeError):
    """Raised by the fault-injection switch (never in normal runs)."""


# ---------------------------------------------------------------------- naming and checkpoints
def run_name_for(cfg: ExperimentConfig) -> str:
    """``run.name``, or a name derived from everything that shapes the result, so the same command
    finds and continues its own run."""
    if cfg.run.name:
        return cfg.run.name
    shaping = {k: v for k, v in run_identity.identity(cfg.to_flat()).items()
               if k not in run_identity.CHANGEABLE_ON_CONTINUE}
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.model.variant}-{digest}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint_dir(state: dict[str, Any], directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``state`` into ``directory`` atomically: temp file, fsync, rename, then the manifest last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{_STATE_FILE}.tmp"
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / _STATE_FILE)
    manifest = {"file": _STATE_FILE, "sha256": _sha256(directory / _STATE_FILE), "layout": _LAYOUT,
                "epoch": state.get("epoch"), "step": state.get("step"), **(extra or {})}
    tmp_manifest = directory / f".{_MANIFEST}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, directory / _MANIFEST)
    return directory / _STATE_FILE


def load_checkpoint_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, manifest)`` of a checkpoint folder written by :func:`save_checkpoint_dir`.

    Raises:
        ValueError: the folder has no manifest or the state file does not match it (an interrupted
            write), naming the folder.
    """
    directory = Path(directory)
    manifest_path = directory / _MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {directory} has no {_MANIFEST}: it was not completely written; delete it "
                         "or pick an earlier checkpoint")
    manifest = json.loads(manifest_path.read_text())
    state_path = directory / manifest["file"]
    if not state_path.is_file() or _sha256(state_path) != manifest["sha256"]:
        raise ValueError(f"checkpoint {state_path} does not match its manifest (truncated or modified); delete "
                         f"{directory} or pick an earlier checkpoint")
    try:
        if manifest.get("layout") == _LAYOUT:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        else:  # written before the layout was recorded: NumPy RNG arrays may be in it, nothing else is allowed
            with torch.serialization.safe_globals(_numpy_array_globals()):
                state = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"checkpoint {state_path} holds objects other than tensors and plain Python data, which this project "
            f"never writes; refusing to unpickle it (it could run code). Delete {directory} if you did not put it "
            f"there. Detail: {str(exc).splitlines()[0]}") from None
    return state, manifest


# ---------------------------------------------------------------------- the worker
class _Worker:
    """State of one Ray Train worker process across the epochs of one attempt."""

    def __init__(self, config: dict[str, Any]) -> None:
        from orchestrator import data  # a worker-side import: the driver never needs the datasets

        self.cfg = cfg = config["experiment"]
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.run_name = config.get("run_name") or run_name_for(cfg)
        self.run_dir = Path(cfg.run.storage_path) / self.run_name
        self.fault = config.get("fault_inject")
        device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
        self.bundle = bundle = data.build_datasets(cfg.data, seed=cfg.train.seed)
        self.train_loader, self.val_loader = data.build_loaders(
            bundle, cfg, rank=self.rank, world_size=self.world_size, micro_batch_size=cfg.micro_batch_size,
            seed=cfg.train.seed)
        mixup = data.build_mixup(cfg.data, bundle.num_classes)
        steps = len(self.train_loader) // cfg.accumulation_steps

        def wrap(model: torch.nn.Module) -> torch.nn.Module:
            return ray.train.torch.prepare_model(model, move_to_device=False)

        self.trainer = Trainer(cfg, steps_per_epoch=steps, num_classes=bundle.num_classes, device=device,
                               wrap_model=wrap, mixup=mixup)
        self.last_metrics: dict[str, float] = {}
        self.mlflow_run_id: str | None = config.get("mlflow_run_id")
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state, manifest = load_checkpoint_dir(d)
            self.trainer.load_state_dict(state)
            self.last_metrics = dict(state.get("metrics") or {})
            self.mlflow_run_id = self.mlflow_run_id or state.get("mlflow_run_id")
            log.info("rank %d resumed from %s (epoch %d, step %d)", self.rank, manifest.get("name", d),
                     self.trainer.epoch, self.trainer.step)
        else:
            self.trainer.initialize_sparsity(next(iter(self.train_loader)))
        self.tracker = tracking.create_tracker(
            cfg.tracking, run_id=self.mlflow_run_id, run_name=self.run_name,
            parent_run_id=config.get("mlflow_parent_run_id"), rank=self.rank,
            tags={"slak.role": "train", "slak.run_name": self.run_name}, environment=True)
        if self.rank == 0 and checkpoint is None:
            self.tracker.log_params(cfg.to_flat())
            self.tracker.log_text(to_yaml(cfg), "config/resolved.yaml")
        self.mlflow_run_id = getattr(self.tracker, "run_id", None)
        self._masks_logged_at = self._updates()
        self._t_last_log = time.monotonic()

    def _updates(self) -> int:
        engine = self.trainer.engine
        return engine.updates if engine is not None and self.trainer.sparsity_ready else 0

    # ------------------------------------------------------------------ per step
    def on_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        cfg, step = self.cfg, trainer.step
        if self.rank == 0 and step % cfg.tracking.log_every_steps == 0:
            self.tracker.log_metrics({"train/loss": metrics["train/loss"], "train/lr": metrics["train/lr"]}, step)
        if self.rank == 0 and step % cfg.train.log_every_steps == 0:
            log.info("epoch %d step %d/%d (global %d): train/loss %.4f lr %.3g", trainer.epoch,
                     trainer.step_in_epoch, trainer.steps_per_epoch, step, metrics["train/loss"], metrics["train/lr"])
        self._maybe_log_masks()
        every = cfg.train.checkpoint_every_steps
        if every and step % every == 0 and trainer.step_in_epoch < trainer.steps_per_epoch:
            report = {**self.last_metrics, **metrics, "epochs_done": float(trainer.epoch)}
            self._report(report, f"step_{step:08d}")
        self._maybe_fail(step)

    def _maybe_log_masks(self) -> None:
        every = self.cfg.tracking.masks_every_updates
        updates = self._updates()
        if self.rank == 0 and every and updates - self._masks_logged_at >= every:
            self.tracker.log_masks(self.trainer.engine.masks, self.trainer.step)
            self._masks_logged_at = updates

    def _maybe_fail(self, step: int) -> None:
        if not self.fault:
            return
        rank, at = (int(x) for x in str(self.fault).split(":"))
        if rank != self.rank or step != at:
            return
        marker = self.run_dir / f".fault_injected_rank{rank}_step{at}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{FAULT_ENV} fired at {time.time()}\n")
        raise InjectedFault(f"{FAULT_ENV}: rank {rank} fails at optimizer step {at} (fires once)")

    # ------------------------------------------------------------------ reports and checkpoints
    def _report(self, metrics: dict[str, float], name: str) -> None:
        """Checkpoint (rank 0 writes, every rank's RNG gathered) and report; every rank calls it."""
        rngs = [self.trainer.local_rng()]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, self.trainer.local_rng())
        with tempfile.TemporaryDirectory(prefix="slak-ckpt-") as tmp:
            checkpoint = None
            if self.rank == 0:
                state = self.trainer.state_dict(rng_states=rngs)
                state["metrics"] = dict(self.last_metrics)
                state["mlflow_run_id"] = self.mlflow_run_id
                save_checkpoint_dir(state, tmp, extra={"name": name, "run": self.run_name})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def run(self) -> None:
        trainer, cfg = self.trainer, self.cfg
        if trainer.done:  # re-run of a finished job: report its final state once, train nothing
            ray.train.report(dict(self.last_metrics))
            if self.rank == 0:
                self.tracker.end("FINISHED")  # opening the tracker marked the run RUNNING again
            return
        while not trainer.done:
            epoch = trainer.epoch
            sampler = getattr(self.train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            metrics = trainer.train_one_epoch(self._progress(self.train_loader, epoch), self.on_step)
            last_epoch = epoch + 1 == cfg.train.epochs
            if (epoch + 1) % cfg.train.eval_every_epochs == 0 or last_epoch:
                metrics.update(trainer.evaluate_all(self.val_loader, self.train_loader
                                                    if cfg.train.bn_recalibration_batches else None))
            metrics.update(trainer.sparsity_metrics())
            if cfg.data.on_bad_image == "skip":
                metrics["data/skipped_images"] = self._skipped_images()
            trainer.end_epoch()
            metrics.update({"epoch": float(epoch), "epochs_done": float(trainer.epoch), "step": float(trainer.step)})
            fresh = {k: float(v) for k, v in metrics.items()}
            # Ray/Tune always see val/* and ema/* (the latest evaluation), also on epochs without one;
            # MLflow only gets what was measured this epoch.
            self.last_metrics = {**self.last_metrics, **fresh}
            if self.rank == 0:
                self.tracker.log_metrics(fresh, trainer.step)
                log.info("epoch %d/%d: %s", trainer.epoch, cfg.train.epochs, ", ".join(
                    f"{k} {v:.4g}" for k, v in self.last_metrics.items()
                    if k in ("train/loss", "val/top1", "val/top5", "ema/top1", "sparsity/density", "perf/img_per_s")))
            self._report(self.last_metrics, f"epoch_{trainer.epoch:04d}")
        self._finish()

    def _skipped_images(self) -> float:
        """Distinct unreadable files skipped by any rank (or its loader workers) since the workers started.

        Every rank holds one flag per file of the whole dataset; a MAX all-reduce is their logical OR, so a
        file that two ranks read (padded shards) counts once."""
        from orchestrator import data

        flags = torch.from_numpy(data.bad_file_flags(self.bundle).astype("uint8")).to(self.trainer.device)
        if self.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        total = float(flags.sum().item())
        if total and self.rank == 0:
            log.warning("%d unreadable image(s) skipped so far (data.on_bad_image=skip)", int(total))
        return total

    def _progress(self, loader: Any, epoch: int) -> Any:
        """A tqdm bar on an interactive rank 0; otherwise the loader (the log lines above)."""
        if self.rank != 0 or not sys.stdout.isatty():
            return loader
        from tqdm import tqdm

        return tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", leave=False)

    def _finish(self) -> None:
        if self.rank != 0:
            return
        engine = self.trainer.engine
        if engine is not None and self.trainer.sparsity_ready:
            self.tracker.log_masks(engine.masks, self.trainer.step)
            self.tracker.log_density_table(engine.layer_densities(), self.trainer.step)
        with tempfile.TemporaryDirectory(prefix="slak-final-") as tmp:
            state = self.trainer.state_dict()
            state["metrics"] = dict(self.last_metrics)
            path = save_checkpoint_dir(state, tmp, extra={"name": "final", "run": self.run_name})
            self.tracker.log_artifact(path, "checkpoint")
            self.tracker.log_artifact(Path(tmp) / _MANIFEST, "checkpoint")
        self.tracker.end("FINISHED")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config = {"experiment": ExperimentConfig, "mlflow_run_id": str | None,
    "mlflow_parent_run_id": str | None}`` (plus ``run_name`` and ``fault_inject`` set by :func:`build_trainer`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = _Worker(config)
    try:
        worker.run()
    except BaseException:
        if worker.rank == 0:
            worker.tracker.end("FAILED")  # a retry marks the run RUNNING again
        raise


# ---------------------------------------------------------------------- the driver
def build_trainer(cfg: ExperimentConfig, *, run_name: str, mlflow_run_id: str | None = None,
                  mlflow_parent_run_id: str | None = None,
                  callbacks: Sequence[Any] = ()) -> ray.train.torch.TorchTrainer:
    """A ``TorchTrainer`` for ``cfg`` (gloo on CPU, NCCL on GPU) that resumes the run named ``run_name``."""
    storage = str(Path(cfg.run.storage_path).expanduser().absolute())
    loop_config = {
        "experiment": cfg,  # the typed tree itself: Ray Train pickles the loop config whole
        "mlflow_run_id": mlflow_run_id,
        "mlflow_parent_run_id": mlflow_parent_run_id,
        "run_name": run_name,
        "fault_inject": os.environ.get(FAULT_ENV) or None,
    }
    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": cfg.run.gpus_per_worker} if cfg.run.use_gpu else {})}
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                               resources_per_worker=resources),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=list(callbacks) or None,
        ),
    )


def _ensure_ray(cfg: ExperimentConfig, address: str | None) -> ExperimentConfig:
    """Start or join Ray, then fit ``run.use_gpu``/``run.num_workers`` to what the cluster has."""
    extra = {FAULT_ENV: os.environ[FAULT_ENV]} if FAULT_ENV in os.environ else None
    # locally, one logical CPU per worker plus Train's controller, even on a 2-core box
    num_cpus = ray_cluster.local_num_cpus(cfg, trial_driver_cpus=1)
    ray_cluster.init_ray(address=address, num_cpus=num_cpus, extra_env=extra)
    return ray_cluster.fit_resources(cfg, ray.cluster_resources())


def failure_summary(error: BaseException) -> str:
    """One line for a job that failed for good: which rank, and the exception's own last line (not Ray's
    wrapping traceback)."""
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank, cause = min(failures.items())
        return f"rank {rank}: {_last_line(cause)}"
    return _last_line(error)


def _last_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def run_training(cfg: ExperimentConfig, *, address: str | None = None) -> Any:
    """Run (or continue) one training job and return Ray's ``Result``.

    The MLflow run is created (or found again, by run name) in the driver so every retry and every
    re-run of the same command logs into the same run; its final status is set here too.

    Raises:
        PreflightError: the model or the data cannot work as configured (nothing was started).
        RunConfigMismatchError: a run of this name exists with other settings (nothing was started).
        ResourceError: one worker group can never fit the cluster (nothing was scheduled).
    """
    preflight.check_before_start(cfg)
    cfg = _ensure_ray(cfg, address)  # resources fitted (or refused) before anything is recorded
    run_name = run_name_for(cfg)
    run_identity.check_or_record(cfg.run.storage_path, run_name, run_identity.identity(cfg.to_flat()),
                                 yaml_text=to_yaml(cfg), what="training run")
    run_id = None
    if cfg.tracking.enabled:
        try:
            run_id = tracking.find_or_create_run(
                cfg.tracking, run_name=run_name, tags={"slak.role": "train", "slak.run_name": run_name},
                match_tag=("slak.run_name", run_name))
        except Exception as exc:  # noqa: BLE001 - an unreachable server must not stop training
            log.warning("MLflow is unreachable (%s); rank 0 keeps metrics offline in %s", exc,
                        cfg.tracking.offline_dir)
    log.info("training run %r: %d %s worker(s), storage %s, MLflow run %s", run_name, cfg.run.num_workers,
             "GPU" if cfg.run.use_gpu else "CPU", cfg.run.storage_path, run_id)
    trainer = build_trainer(cfg, run_name=run_name, mlflow_run_id=run_id)
    try:
        result = trainer.fit()
    except BaseException:
        if run_id is not None:
            _safe_status(cfg, run_id, "FAILED")
        raise
    return result


def _safe_status(cfg: ExperimentConfig, run_id: str, status: str) -> None:
    try:
        tracking.set_run_status(cfg.tracking.uri, run_id, status)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)
