"""The trial side of a Tune grid: one trial is a plain function (the *trial driver*) that owns its MLflow
child run and fits one Ray Train DDP job; a driver-side callback gives each child run its final status.

Shape (Train V2 inside Tune): Ray Train's ``TuneReportCallback`` forwards rank 0's per-epoch metrics to
Tune, so ASHA can stop a trial on ``val/top1`` with ``epochs_done`` as its clock (Tune's own iteration
counter restarts after a restore, the epoch count does not). The inner Train run is named after the Tune
trial id, so a Tune retry or ``Tuner.restore`` finds the inner run's snapshot in the shared
``run.storage_path`` and resumes from its last checkpoint instead of starting over.

MLflow: each trial driver owns one nested *child* run, created on first start and found again by its
``ray_trial_id`` tag on retry or restore (never a second run per trial or per rank; rank 0 logs into it
by id). :class:`TrialStatusCallback` gives each child its final status: FINISHED when the trial
completes, FAILED when it errors (also when it failed before creating its run: the run is then created
to record the failure), and FINISHED with tag ``slak.stopped_early=asha`` when ASHA stopped it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator import tracking
from orchestrator.config import ExperimentConfig, TrackingConfig, replace
from orchestrator.loop import build_meta_model
from orchestrator.search_space import GridPoint

__all__ = ["TIME_ATTR", "METRIC", "TrialStatusCallback", "experiment_config_for_trial", "run_trial",
           "trial_identity", "trial_name"]

logger = logging.getLogger(__name__)

#: Tune's clock (epochs done, which survives a restore) and the metric ASHA ranks trials by.
TIME_ATTR, METRIC = "epochs_done", "val/top1"

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


def run_trial(config: dict[str, Any], base: ExperimentConfig) -> None:
    """One Tune trial: own (or find again) the MLflow child run, then fit one Ray Train DDP job.

    ``config`` is Tune's (the grid point, the seed index, the experiment's name and parent run); the typed
    ``base`` config arrives whole through ``tune.with_parameters``: Tune's param space would take a
    dataclass apart (into a tuple), and the base is not a search dimension anyway.
    """
    from orchestrator import ray_train  # imported here: the trial actor is the only place it runs

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
    trainer = ray_train.build_trainer(
        cfg,
        run_name=f"{config['experiment']}_train_{trial_id}",
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

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get(TIME_ATTR, 0) or 0)
        target = experiment_config_for_trial(self.base, trial.config).train.epochs
        tags = {"slak.stopped_early": "asha", "slak.epochs_done": str(epochs)} if 0 < epochs < target else {}
        self._finish(trial, "FINISHED", tags)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        logger.warning("trial %s failed (%s); the experiment goes on", trial.trial_id, trial.error_file)
        self._finish(trial, "FAILED", {"slak.error_file": str(trial.error_file or "")})
