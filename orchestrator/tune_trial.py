"""The trial side of a Tune grid: one trial is a plain function (the *trial driver*) that owns its MLflow
child run and trains one grid point.

How a trial trains depends on its worker count:

* **One worker** (every trial on one GPU or a GPU share, and ``run.num_workers=1`` on CPUs): the trial
  trains inside its own Tune actor, which reserves the worker's CPUs and GPU share itself. Tune reuses
  that actor for the next trial (``reuse_actors``), so imports, CUDA initialisation and the compiled
  kernels are paid once per concurrent slot, not once per trial, and no worker group is started or torn
  down. Checkpoints are Tune's trial checkpoints; a failed trial restarts from its latest one, up to
  ``run.max_failures + tune.trial_max_failures`` times.
* **Several workers**: the trial fits one Ray Train DDP job (Train V2 inside Tune). Ray Train's
  ``TuneReportCallback`` forwards rank 0's per-epoch metrics to Tune; the inner Train run is named after
  the Tune trial id, so a Tune retry or ``Tuner.restore`` finds its snapshot in ``run.storage_path`` and
  resumes from its last checkpoint.

Either way the same :class:`orchestrator.worker.TrainingWorker` trains, ASHA can stop a trial on
``val/top1`` with ``epochs_done`` as its clock (Tune's own iteration counter restarts after a restore, the
epoch count does not).

MLflow: each trial driver owns one nested *child* run, created on first start and found again by its
``ray_trial_id`` tag on retry or restore (never a second run per trial or per rank; rank 0 logs into it
by id). :class:`TrialStatusCallback` gives each child its final status: FINISHED when the trial
completes, FAILED when it errors (also when it failed before creating its run: the run is then created
to record the failure), and FINISHED with tag ``slak.stopped_early=asha`` when ASHA stopped it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator import tracking, worker
from orchestrator.config.loading import replace
from orchestrator.config.schema import ExperimentConfig, TrackingConfig
from orchestrator.loop import build_meta_model
from orchestrator.search_space import GridPoint

__all__ = [
    "METRIC",
    "TIME_ATTR",
    "TrialStatusCallback",
    "experiment_config_for_trial",
    "in_process",
    "run_trial",
    "trial_cpus",
    "trial_identity",
    "trial_name",
    "trial_resources",
]

logger = logging.getLogger(__name__)

#: Tune's clock (epochs done, which survives a restore) and the metric ASHA ranks trials by.
TIME_ATTR, METRIC = "epochs_done", "val/top1"

def in_process(cfg: ExperimentConfig) -> bool:
    """Whether a trial of ``cfg`` (resources fitted) trains inside its own Tune actor (one worker)."""
    return cfg.run.num_workers == 1


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial's Tune actor reserves: the worker itself when it trains in process, else one CPU for
    the driver (the Train workers reserve theirs when their group starts)."""
    if not in_process(cfg):
        return {"cpu": 1}
    return {"cpu": cfg.run.cpus_per_worker, **({"gpu": cfg.run.gpus_per_worker} if cfg.run.use_gpu else {})}


def trial_cpus(cfg: ExperimentConfig) -> int:
    """CPUs one running trial holds in all (its actor, plus its Train workers when it has several)."""
    if in_process(cfg):
        return max(1, int(cfg.run.cpus_per_worker))
    return 1 + cfg.run.num_workers * max(1, int(cfg.run.cpus_per_worker))


class _TrialSession:
    """A single-worker trial trained in its Tune actor, as :class:`orchestrator.worker.TrainingWorker` sees
    it: rank 0 of 1, Tune's checkpoints, the GPU share Ray gave the actor (``CUDA_VISIBLE_DEVICES``)."""

    rank, world_size = 0, 1

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda", 0) if use_gpu else torch.device("cpu")

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def latest_checkpoint(self) -> tune.Checkpoint | None:
        return tune.get_checkpoint()

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None, name: str) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def experiment_config_for_trial(base: ExperimentConfig, config: Mapping[str, Any]) -> ExperimentConfig:
    """The typed config of one trial: the experiment's base config with the trial's point and seed applied."""
    point = GridPoint.from_dict(config["point"])
    seed_index = int(config["seed_index"])
    overrides = dict(point.overrides)
    if seed_index:
        overrides["train.seed"] = base.train.seed + seed_index
        if base.sparse.seed is not None:
            overrides["sparse.seed"] = base.sparse.seed + seed_index
    return replace(base, overrides)


def trial_identity(config: Mapping[str, Any], trial_id: str) -> tuple[str, dict[str, str]]:
    """Run name and tags of a trial's MLflow run; the same for the trial driver and the callback."""
    point = GridPoint.from_dict(config["point"])
    seed_index = int(config["seed_index"])
    tags = {
        "slak.grid_role": "trial",
        "slak.experiment": str(config["experiment"]),
        "slak.table": point.table,
        "slak.row": point.row,
        "slak.setting": point.setting,
        "slak.point": point.label,
        **({"slak.axis": repr(float(point.axis))} if point.axis is not None else {}),
        "slak.seed_index": str(seed_index),
        "ray_trial_id": trial_id,
    }
    return f"{point.label}-seed{seed_index}", tags


def trial_name(trial: Any) -> str:
    """Short, path-safe trial names (Tune would otherwise spell the whole point dict into the folder)."""
    name, _ = trial_identity(trial.config, trial.trial_id)
    return f"{name}_{trial.trial_id}"


def _find_trial_run(tracking_cfg: TrackingConfig, config: Mapping[str, Any], trial_id: str) -> str:
    run_name, tags = trial_identity(config, trial_id)
    return tracking.find_or_create_run(
        tracking_cfg,
        run_name=run_name,
        tags=tags,
        parent_run_id=config.get("parent_run_id"),
        match_tag=("ray_trial_id", trial_id),
    )


def _complexity_metrics(cfg: ExperimentConfig) -> dict[str, float]:
    """Params and FLOPs of this trial's model, logged once so that collation can read them.

    The model is built on the ``meta`` device (no memory, any size). With sparsity on, the counts are
    ``count_complexity``'s uniform-sparsity estimate (sparse weights not counted, as in the paper).
    """
    from slak_model import count_complexity

    model = build_meta_model(cfg)
    counts = count_complexity(
        model, image_size=cfg.data.image_size, sparsity=cfg.sparse.sparsity if cfg.sparse.enabled else None
    )
    return {
        "complexity/params": float(counts.nonzero_params),
        "complexity/flops": float(counts.sparse_macs),
        "complexity/dense_params": float(counts.params),
        "complexity/dense_flops": float(counts.macs),
    }


_trials_in_this_process = 0


def _first_trial_in_process() -> bool:
    """True once per process: a reused actor pays its start and imports only for its first trial."""
    global _trials_in_this_process
    _trials_in_this_process += 1
    return _trials_in_this_process == 1


def _seconds_since_process_start() -> float | None:
    """Seconds since this actor's process started (worker start, imports, Tune's set-up); None where
    ``/proc`` cannot say (not Linux)."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return max(0.0, time.time() - (boot + started_ticks / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_trial(config: dict[str, Any], base: ExperimentConfig) -> None:
    """One Tune trial: own (or find again) the MLflow child run, then train the point (in this actor with
    one worker, as a Ray Train DDP job with several).

    ``config`` is Tune's (the grid point, the seed index, the experiment's name and parent run); the typed
    ``base`` config arrives whole through ``tune.with_parameters``: Tune's param space would take a
    dataclass apart (into a tuple), and the base is not a search dimension anyway.
    """
    entered = time.perf_counter()
    since_start = _seconds_since_process_start() if _first_trial_in_process() else None
    startup = {"process": since_start} if since_start is not None else {}
    trial_id = tune.get_context().get_trial_id()
    cfg = experiment_config_for_trial(base, config)
    tracking_cfg = base.tracking
    run_id = None
    if tracking_cfg.enabled:
        try:
            run_id = _find_trial_run(tracking_cfg, config, trial_id)
        except Exception as exc:  # noqa: BLE001 - rank 0 then keeps its metrics in the offline journal
            logger.warning("MLflow is unreachable for trial %s (%s); metrics go offline", trial_id, exc)
        if run_id is not None:
            tracker = tracking.create_tracker(tracking_cfg, run_id=run_id)  # RUNNING again on retry
            tracker.log_params(cfg.to_flat())
            try:
                tracker.log_metrics(_complexity_metrics(cfg), step=0)
            except Exception as exc:  # noqa: BLE001 - a counting problem must not cost the training run
                logger.warning("could not count params/FLOPs for trial %s: %s", trial_id, exc)
    run_name = f"{config['experiment']}_train_{trial_id}"
    if in_process(cfg):
        startup["trial_driver"] = time.perf_counter() - entered
        worker_config = {"experiment": cfg, "run_name": run_name, "mlflow_run_id": run_id,
                         "mlflow_parent_run_id": config.get("parent_run_id"),
                         "fault_inject": os.environ.get(worker.FAULT_ENV) or None, "startup": startup}
        worker.run_worker(worker_config, _TrialSession())
        return
    from orchestrator import ray_train  # only trials of several workers start a Ray Train job

    trainer = ray_train.build_trainer(
        cfg,
        run_name=run_name,
        mlflow_run_id=run_id,
        mlflow_parent_run_id=config.get("parent_run_id"),
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


class TrialStatusCallback(tune.Callback):
    """Driver-side: shows progress and gives every trial's MLflow run its final status."""

    def __init__(self, base: ExperimentConfig, total_trials: int) -> None:
        self.base = base
        self.tracking = base.tracking
        self.total_epochs = base.train.epochs
        self.total_trials = total_trials
        self._started: dict[str, float] = {}
        self._costs: dict[str, dict[str, float]] = {}

    def _finish(self, trial: Any, status: str, tags: Mapping[str, str]) -> None:
        if not self.tracking.enabled:
            return
        try:
            run_id = _find_trial_run(self.tracking, trial.config, trial.trial_id)
            tracker = tracking.create_tracker(self.tracking, run_id=run_id, tags=dict(tags))
            tracker.end(status)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the experiment
            logger.warning("could not mark the MLflow run of trial %s %s: %s", trial.trial_id, status, exc)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._started[trial.trial_id] = time.monotonic()
        point = trial.config["point"]
        logger.info(
            "trial %s started: %s / %s, seed %s",
            trial.trial_id,
            point["row"],
            point["setting"],
            trial.config["seed_index"],
        )

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        costs = self._costs.setdefault(trial.trial_id, {"epochs": 0.0})
        costs["epochs"] += float(result.get("perf/epoch_s", 0.0))
        costs.update({k.removeprefix("perf/startup/").removesuffix("_s"): float(v) for k, v in result.items()
                      if k.startswith("perf/startup/")})
        done = sum(t.status == "TERMINATED" for t in trials)
        elapsed = time.monotonic() - self._started.get(trial.trial_id, time.monotonic())
        logger.info(
            "[%d/%d trials done] %s %s epoch %s/%d  val/top1=%.2f  train/loss=%.3f  (%.0f s)",
            done,
            max(self.total_trials, len(trials)),
            trial.trial_id,
            trial.config["point"]["row"],
            result.get(TIME_ATTR, "?"),
            self.total_epochs,
            float(result.get(METRIC, float("nan"))),
            float(result.get("train/loss", float("nan"))),
            elapsed,
        )

    def _log_costs(self, trial: Any) -> None:
        """Where one trial's wall time went: its start-up phases, its epochs, and the rest (reports,
        checkpoints, teardown), as the trial's own reports measured them."""
        started, costs = self._started.get(trial.trial_id), self._costs.get(trial.trial_id)
        if started is None or not costs:
            return
        wall = time.monotonic() - started
        phases = {k: v for k, v in costs.items() if k != "epochs"}
        startup = phases.pop("worker", 0.0) + sum(phases.pop(k, 0.0) for k in ("process", "trial_driver"))
        other = max(0.0, wall - startup - costs["epochs"])
        logger.info("trial %s took %.1f s: start-up %.1f s (%s), epochs %.1f s, reports/checkpoints/other "
                    "%.1f s", trial.trial_id, wall, startup,
                    ", ".join([*(f"{k} {costs[k]:.1f}" for k in ("process", "trial_driver") if k in costs),
                               *(f"{k} {v:.1f}" for k, v in phases.items())]), costs["epochs"], other)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log_costs(trial)
        epochs = int((trial.last_result or {}).get(TIME_ATTR, 0) or 0)
        target = experiment_config_for_trial(self.base, trial.config).train.epochs
        tags = {"slak.stopped_early": "asha", "slak.epochs_done": str(epochs)} if 0 < epochs < target else {}
        self._finish(trial, "FINISHED", tags)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        logger.warning("trial %s failed (%s); the experiment goes on", trial.trial_id, trial.error_file)
        self._finish(trial, "FAILED", {"slak.error_file": str(trial.error_file or "")})
