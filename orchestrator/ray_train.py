"""One training job as a Ray Train (V2) ``TorchTrainer``: DDP workers, checkpoints, retries, MLflow.

This is the only module that touches ``ray.train``; Ray's API moves between versions, so it stays here.
:func:`run_evaluation` runs a checkpoint's evaluation (:mod:`orchestrator.evaluation`) on the same
worker-group machinery.
Each rank runs :class:`orchestrator.worker.TrainingWorker` (data shard, DDP-wrapped
:class:`orchestrator.loop.Trainer`, one report per epoch and every ``train.checkpoint_every_steps``
optimizer steps, with a checkpoint from rank 0) through a small session object that maps its reports
and restarts onto Ray Train.

Reliability:

* Checkpoints hold the whole trainer state (model, EMA, optimizer, scaler, schedule position, sparsity
  engine, every rank's RNG streams) in a folder sealed by a manifest (:mod:`orchestrator.checkpoints`);
  Ray registers a checkpoint only after it is fully persisted. A crash mid-write therefore never yields
  a half-written "latest", and a planted file that would need unpickling is refused.
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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from orchestrator import evaluation, preflight, ray_cluster, run_identity, tracking, worker
from orchestrator.config.loading import to_yaml
from orchestrator.config.schema import ExperimentConfig
from orchestrator.weights import CheckpointContents
from orchestrator.worker import FAULT_ENV

__all__ = [
    "FAULT_ENV",
    "build_trainer",
    "eval_loop_per_worker",
    "failure_summary",
    "run_evaluation",
    "run_name_for",
    "run_training",
    "train_loop_per_worker",
]

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------- the worker
#: DDP's "Grad strides do not match bucket view strides" (``reducer.cpp``) compares strides literally, also in
#: dimensions of size 1, where a stride is arbitrary and the memory layout the same. timm's ConvNeXt (a
#: distillation student) gets such gradients on every 1x1 ([out, in, 1, 1]) and depthwise ([C, 1, k, k])
#: convolution, so DDP warns that performance "may" suffer when it does not. These patterns match only those
#: messages: the strides of every dimension larger than 1 equal. Any other mismatch still warns.
LAYOUT_EQUIVALENT_STRIDE_WARNINGS = tuple(
    r"(?s)Grad strides do not match bucket view strides\..*" + pattern for pattern in (
        (r"grad\.sizes\(\) = \[(\d+), (\d+), 1, 1\], strides\(\) = \[(\d+), (\d+), \d+, \d+\]\s*"
         r"bucket_view\.sizes\(\) = \[\1, \2, 1, 1\], strides\(\) = \[\3, \4, \d+, \d+\]"),
        (r"grad\.sizes\(\) = \[(\d+), 1, (\d+), (\d+)\], strides\(\) = \[(\d+), \d+, (\d+), (\d+)\]\s*"
         r"bucket_view\.sizes\(\) = \[\1, 1, \2, \3\], strides\(\) = \[\4, \d+, \5, \6\]"),
    ))


def ignore_layout_equivalent_stride_warnings() -> None:
    """Silence DDP's stride warning where the layouts are the same (:data:`LAYOUT_EQUIVALENT_STRIDE_WARNINGS`)."""
    for pattern in LAYOUT_EQUIVALENT_STRIDE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


class _TrainSession:
    """A rank of the Ray Train worker group, as :class:`orchestrator.worker.TrainingWorker` sees it."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        return ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        ignore_layout_equivalent_stride_warnings()
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def latest_checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None, name: str) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` as :class:`orchestrator.worker.TrainingWorker` takes it (set by
    :func:`build_trainer`)."""
    worker.run_worker(config, _TrainSession())


def eval_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point of an evaluation; ``config`` as
    :func:`orchestrator.evaluation.run_evaluation_worker` takes it (set by :func:`run_evaluation`)."""
    evaluation.run_evaluation_worker(config, _TrainSession())


# ---------------------------------------------------------------------- the driver
def build_trainer(cfg: ExperimentConfig, *, run_name: str, mlflow_run_id: str | None = None,
                  mlflow_parent_run_id: str | None = None,
                  callbacks: Sequence[Any] = ()) -> ray.train.torch.TorchTrainer:
    """A ``TorchTrainer`` for ``cfg`` (gloo on CPU, NCCL on GPU) that resumes the run named ``run_name``."""
    loop_config = {
        "experiment": cfg,  # the typed tree itself: Ray Train pickles the loop config whole
        "mlflow_run_id": mlflow_run_id,
        "mlflow_parent_run_id": mlflow_parent_run_id,
        "run_name": run_name,
        "fault_inject": os.environ.get(FAULT_ENV) or None,
    }
    return _torch_trainer(cfg, train_loop_per_worker, loop_config, run_name, callbacks)


def _torch_trainer(cfg: ExperimentConfig, loop: Any, loop_config: dict[str, Any], run_name: str,
                   callbacks: Sequence[Any] = ()) -> ray.train.torch.TorchTrainer:
    storage = str(Path(cfg.run.storage_path).expanduser().absolute())
    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": cfg.run.gpus_per_worker} if cfg.run.use_gpu else {})}
    return ray.train.torch.TorchTrainer(
        loop,
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
    if address is None and not ray.is_initialized():
        ray_cluster.check_local_machine(cfg, num_cpus=num_cpus)
    ray_cluster.init_ray(address=address, num_cpus=num_cpus, extra_env=extra)
    ray_cluster.warn_if_wait_has_no_effect(cfg, address)
    cfg = ray_cluster.fit_resources_waiting(cfg)
    if address is not None:  # a joined cluster: its nodes import the project and share the storage
        ray_cluster.check_nodes(cfg)
    return cfg


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
    re-run of the same command logs into the same run; its final status is set here, and only here. A
    tracking server that does not answer before Ray starts is named in one warning, and rank 0 then keeps
    the run in the offline journal.

    Raises:
        PreflightError: the model or the data cannot work as configured (nothing was started).
        RunConfigMismatchError: a run of this name exists with other settings (nothing was started).
        ResourceError: one worker group can never fit the cluster (nothing was scheduled).
        ClusterError: no cluster at ``address``, or a node of it cannot import the project or see
            ``run.storage_path`` (nothing was scheduled).
    """
    preflight.check_before_start(cfg)
    tracking_online = tracking.check_server(cfg.tracking)  # one warning, before Ray, when it does not answer
    cfg = _ensure_ray(cfg, address)  # resources fitted (or refused) before anything is recorded
    run_name = run_name_for(cfg)
    run_identity.check_or_record(cfg.run.storage_path, run_name, run_identity.identity(cfg.to_flat()),
                                 yaml_text=to_yaml(cfg), what="training run")
    run_id = None
    if cfg.tracking.enabled and tracking_online:
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
    except BaseException as exc:
        if run_id is not None:  # this driver owns the run: its workers never set a final status
            _safe_status(cfg, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if run_id is not None:
        _safe_status(cfg, run_id, "FINISHED")
    return result


def _safe_status(cfg: ExperimentConfig, run_id: str, status: str) -> None:
    """Give the run its final status through a tracker, so an unreachable server keeps it in the offline
    journal (synced with the run's other events) instead of losing it."""
    try:
        tracking.create_tracker(cfg.tracking, run_id=run_id).end(status)
    except Exception as exc:  # noqa: BLE001 - the job's result stands; only its MLflow status is missing
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, exc)


def run_evaluation(cfg: ExperimentConfig, contents: CheckpointContents, *, address: str | None = None
                   ) -> tuple[dict[str, float], evaluation.EvaluationPlan]:
    """Evaluate ``contents`` (read by the driver with :func:`orchestrator.weights.read_weights`) on the
    validation split with ``run.num_workers`` data-parallel workers; return the metrics and the plan.

    The checkpoint is checked against the configured model (and the ``val/`` folder against its layout)
    before Ray starts; each worker then reads the file itself and refuses other bytes than those checked.

    Raises:
        PreflightError: the weights do not fit the model, or the data cannot be read (nothing was started).
        ResourceError: the worker group can never fit the cluster (nothing was scheduled).
    """
    plan = evaluation.plan_evaluation(cfg, contents)
    cfg = _ensure_ray(cfg, address)
    run_id = None
    if cfg.tracking.enabled:
        try:
            run_id = tracking.find_or_create_run(cfg.tracking, run_name=plan.run_name, tags=plan.tags(),
                                                 match_tag=("slak.run_name", plan.run_name))
        except Exception as exc:  # noqa: BLE001 - an unreachable server must not stop the evaluation
            log.warning("MLflow is unreachable (%s); rank 0 keeps metrics offline in %s", exc,
                        cfg.tracking.offline_dir)
    log.info("evaluation %r of %s (sha256 %s): %d %s worker(s), MLflow run %s", plan.run_name, plan.path,
             plan.sha256[:12], cfg.run.num_workers, "GPU" if cfg.run.use_gpu else "CPU", run_id)
    loop_config = {"experiment": cfg, "checkpoint": plan.path, "sha256": plan.sha256, "run_name": plan.run_name,
                   "mlflow_run_id": run_id}
    trainer = _torch_trainer(cfg, eval_loop_per_worker, loop_config, plan.run_name)
    try:
        result = trainer.fit()
    except BaseException as exc:
        if run_id is not None:
            _safe_status(cfg, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if run_id is not None:
        _safe_status(cfg, run_id, "FINISHED")
    return dict(result.metrics or {}), plan
