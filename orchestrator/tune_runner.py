"""Run one paper grid as a Ray Tune experiment whose trials are Ray Train DDP jobs (see
:mod:`orchestrator.tune_trial` for what one trial does).

The experiment driver validates every point (and the data) before Ray starts, records the experiment's
identity, owns one MLflow *parent* run per experiment, sizes concurrency to the cluster, and collates the
tables when the grid ends. Runs of trials that were still going when the experiment was interrupted
become KILLED, and RUNNING again when ``--resume`` picks them up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from orchestrator import estimate, preflight, ray_cluster, run_identity, tracking
from orchestrator.collate.experiment import CollatedExperiment, collate_experiment
from orchestrator.config.loading import replace, to_yaml
from orchestrator.config.schema import ExperimentConfig, TrackingConfig
from orchestrator.search_space import GridPoint, param_space, validate_points
from orchestrator.tune_trial import (
    METRIC,
    TIME_ATTR,
    TrialStatusCallback,
    in_process,
    run_trial,
    trial_cpus,
    trial_name,
    trial_resources,
)

__all__ = ["TUNE_CONSOLE_ENV", "TUNE_VERBOSITY", "ExperimentOutcome", "TrialStatusCallback", "fitting_concurrency",
           "grid_params", "init_ray", "quiet_tune_console", "result_loggers", "run_experiment"]

logger = logging.getLogger(__name__)

#: Ray Tune's console verbosity (``tune.RunConfig(verbose=...)``). Our :class:`TrialStatusCallback` logs a
#: line per trial start and report and the grid script prints the collated table, so Tune's own output is
#: noise: at 1 it dumps every trial's config (a box of the point's overrides) at its start and a status
#: table every 30 s. At 0 it still prints a failed trial's error file, and the experiment's name, trial
#: count and folder once at the start.
TUNE_VERBOSITY = 0
#: Ray Tune's environment switches set while a grid runs (a value the caller exported wins).
#: ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``: Tune adds no logger callbacks of its own, so it writes no
#: TensorBoard event files (MLflow is this project's tracker) and prints no hint to open them; the CSV and
#: JSON result files it would add are passed explicitly (:func:`result_loggers`).
#: ``TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0``: single-worker trials keep
#: ``run.checkpoints_to_keep`` Tune checkpoints, which makes Tune snapshot the experiment state at each
#: checkpoint (small JSON files on the driver) and warn about it several times a minute; the snapshots stay.
TUNE_CONSOLE_ENV: dict[str, str] = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
                                    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}


def result_loggers() -> list[tune.Callback]:
    """The per-trial result files Tune keeps (``progress.csv``, ``result.json``), without TensorBoard's."""
    return [CSVLoggerCallback(), JsonLoggerCallback()]


@contextlib.contextmanager
def quiet_tune_console() -> Iterator[None]:
    """Apply :data:`TUNE_CONSOLE_ENV` (where the caller has not set a variable) for the duration of a Tune
    run, then restore the environment."""
    added = {k: v for k, v in TUNE_CONSOLE_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@dataclass
class ExperimentOutcome:
    """What one experiment left behind: where, how its trials ended, and the collated tables."""

    name: str
    path: Path
    parent_run_id: str | None
    trials: int
    errors: int
    interrupted: bool
    seconds: float
    collated: CollatedExperiment | None = None
    files: list[Path] = field(default_factory=list)


def init_ray(cfg: ExperimentConfig, address: str | None = None) -> ExperimentConfig:
    """Join ``address`` or start a local Ray sized for the grid, then fit ``run.use_gpu`` and
    ``run.num_workers`` to the cluster (see ``ray_cluster.fit_resources``).

    Locally the logical CPU count is raised to what one round of concurrent trials needs (a driver CPU
    plus the workers' CPUs per trial). The dashboard stays on: Train V2 inside Tune needs its state API to
    release the workers of a stopped trial.

    Raises:
        ResourceError: one trial can never fit the cluster (before any trial is scheduled).
        ClusterError: no cluster at ``address``, or a node of it cannot import the project or see
            ``run.storage_path`` (before any trial is scheduled).
    """
    num_cpus = ray_cluster.local_num_cpus(cfg, cfg.tune.max_concurrent_trials or 1, trial_driver_cpus=1)
    if address is None and not ray.is_initialized():
        ray_cluster.check_local_machine(cfg, num_cpus=num_cpus, trial_driver_cpus=1)
    ray_cluster.init_ray(
        address=address,
        num_cpus=num_cpus,
        include_dashboard=True,
        object_store_memory=512 * 2**20,
        log_to_driver=False,
    )
    ray_cluster.warn_if_wait_has_no_effect(cfg, address)
    cfg = ray_cluster.fit_resources_waiting(cfg, trial_driver_cpus=1)
    if address is not None:  # a joined cluster: its nodes import the project and share the storage
        ray_cluster.check_nodes(cfg)
    return cfg


def fitting_concurrency(cfg: ExperimentConfig, cluster: Mapping[str, float],
                        gpu_memory_gib: float | None = None) -> int:
    """``tune.max_concurrent_trials`` (unset: as many as fit), lowered to what the cluster's CPUs and GPUs can
    hold at once.

    A trial of several workers reserves one CPU for its driver at once and its Train workers' CPUs (and GPU
    shares) only later: if more drivers start than there are resources for their workers, every trial waits
    forever. With ``run.gpus_per_worker`` below 1, several small trials share one GPU; ``gpu_memory_gib``
    (each GPU's memory, where known) caps them at one trial per ``SHARED_TRIAL_GPU_GIB`` of it, so that 1/16
    of a laptop's 4 GiB GPU does not start 16 processes that each need a CUDA context.
    """
    r = cfg.run
    per_trial_cpus = trial_cpus(cfg)
    fits = max(1, ray_cluster.how_many(cluster.get("CPU", 0), per_trial_cpus))
    if r.use_gpu:
        share = r.num_workers * r.gpus_per_worker
        fits_gpus = max(1, ray_cluster.how_many(cluster.get("GPU", 0), share))
        if share < 1 and gpu_memory_gib:
            per_gpu = min(ray_cluster.how_many(1.0, share), int(gpu_memory_gib // ray_cluster.SHARED_TRIAL_GPU_GIB))
            by_memory = max(1, per_gpu * int(cluster.get("GPU", 0)))
            if by_memory < fits_gpus:
                logger.info("%d trial(s) share the GPUs at once, not %d: each GPU has %.0f GiB and a trial process "
                            "is counted at %.0f GiB", by_memory, fits_gpus, gpu_memory_gib,
                            ray_cluster.SHARED_TRIAL_GPU_GIB)
                fits_gpus = by_memory
        fits = min(fits, fits_gpus)
    if cfg.tune.max_concurrent_trials is None:
        return fits
    wanted = int(cfg.tune.max_concurrent_trials)
    if wanted > fits:
        logger.warning(
            "tune.max_concurrent_trials=%d does not fit the cluster (%g CPUs, %g GPUs; one trial needs %d CPUs"
            "%s); running %d trial(s) at a time",
            wanted, cluster.get("CPU", 0), cluster.get("GPU", 0), per_trial_cpus,
            f" and {r.num_workers * r.gpus_per_worker:g} GPUs" if r.use_gpu else "", fits,
        )
    return min(wanted, fits)


def _announce_estimate(cfg: ExperimentConfig, points: Sequence[GridPoint], concurrent: int) -> None:
    """Log the grid's estimated wall time before any trial starts (CPU grids on generated data)."""
    try:
        found = estimate.estimate_grid(cfg, points, seeds=cfg.tune.seeds, concurrent=concurrent)
    except Exception as exc:  # noqa: BLE001 - an estimate must never stop the experiment
        logger.warning("could not estimate the grid's time: %s", exc)
        return
    if found is not None:
        logger.info("%s", found.describe())


def _live_placement_groups() -> set[str] | None:
    """Ids of this driver job's placement groups that still hold (or wait for) resources.

    Returns None when the state API cannot answer (the release below is best effort).
    """
    from ray.util.state import list_placement_groups

    context = ray.get_runtime_context()
    try:  # the address is explicit: with several local Ray instances, discovery is ambiguous
        groups = list_placement_groups(
            address=context.gcs_address,
            filters=[("creator_job_id", "=", context.get_job_id())],
            limit=10_000,
            raise_on_missing_output=False,
        )
    except Exception as exc:  # noqa: BLE001 - best effort: never fail the experiment over it
        logger.warning("could not list placement groups: %s", exc)
        return None
    return {
        g.placement_group_id for g in groups if g.state in ("CREATED", "PENDING", "RESCHEDULING", "PREPARED")
    }


def _release_leaked_placement_groups(before: set[str] | None) -> int:
    """Remove the Train worker groups that an interrupted experiment left behind.

    When Tune stops a running trial because the experiment was interrupted, the trial's Train
    controller dies without removing its workers' placement group; in a Ray session that lives on
    (a notebook, a test session, ``--address``) the next trial would then wait forever for those CPUs.
    Only groups created by this job during the experiment are touched.
    """
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    after = _live_placement_groups()
    if before is None or after is None:
        return 0
    try:
        leaked = after - before
        for pg_id in leaked:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
    except Exception as exc:  # noqa: BLE001 - best effort; the state API may be unavailable
        logger.warning("could not check for leftover placement groups: %s", exc)
        return 0
    if leaked:
        logger.info("released %d placement group(s) left by interrupted trials", len(leaked))
    return len(leaked)


def _latest_experiment(storage: Path, table: str) -> str | None:
    candidates = sorted(
        (p for p in storage.glob(f"{table}-*") if tune.Tuner.can_restore(p)), key=lambda p: p.stat().st_mtime
    )
    return candidates[-1].name if candidates else None


def _scheduler(cfg: ExperimentConfig) -> ASHAScheduler | None:
    if not cfg.tune.asha:
        return None
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=METRIC,
        mode="max",
        max_t=cfg.train.epochs,
        grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
        reduction_factor=2,
    )


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """Trials run in their own working directory: every path they receive must be absolute."""
    updates = {"run.storage_path": str(Path(cfg.run.storage_path).expanduser().absolute())}
    for name in ("tracking.offline_dir", "data.path"):
        section, leaf = name.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value and "://" not in str(value):
            updates[name] = str(Path(value).expanduser().absolute())
    return replace(cfg, updates)


def _close_unfinished_runs(tracking_cfg: TrackingConfig, experiment: str) -> int:
    """Runs of this experiment still RUNNING after Tune returned were interrupted: mark them KILLED."""
    runs = tracking.runs_dataframe(tracking_cfg.uri, tracking_cfg.experiment)
    if runs.empty or "tags.slak.experiment" not in runs:
        return 0
    stale = runs[
        (runs["tags.slak.experiment"] == experiment)
        & (runs["status"] == "RUNNING")
        & (runs.get("tags.slak.grid_role") == "trial")
    ]
    for run_id in stale["run_id"]:
        tracking.set_run_status(tracking_cfg.uri, run_id, "KILLED")
    return len(stale)


def _parent_run(
    tracking_cfg: TrackingConfig,
    name: str,
    table: str,
    points: Sequence[GridPoint],
    cfg: ExperimentConfig,
    resume: bool,
) -> str | None:
    """Create (or find again on resume) the experiment's parent MLflow run; None if MLflow is down."""
    try:
        parent = tracking.find_or_create_run(
            tracking_cfg,
            run_name=name,
            match_tag=("slak.parent_of", name),
            tags={
                "slak.grid_role": "experiment",
                "slak.experiment": name,
                "slak.table": table,
                "slak.grid_points": str(len(points)),
                "slak.seeds": str(cfg.tune.seeds),
            },
        )
    except Exception as exc:  # noqa: BLE001 - tracking is never the reason an experiment dies
        logger.warning(
            "MLflow at %s is unreachable (%s): the grid runs, each trial keeps its metrics offline in %s",
            tracking_cfg.uri,
            exc,
            tracking_cfg.offline_dir,
        )
        return None
    parent_tracker = tracking.create_tracker(tracking_cfg, run_id=parent)  # RUNNING again on resume
    if not resume:
        parent_tracker.log_params(grid_params(cfg, points))
        parent_tracker.log_dict([p.to_dict() for p in points], "grid.json")
    return parent


def grid_params(cfg: ExperimentConfig, points: Sequence[GridPoint]) -> dict[str, object]:
    """The parent run's params: what the trials varied and what they shared.

    Every setting whose value differs between points becomes ``grid.<name>``, the list of its values point by
    point (paired grids stay paired), and the seeds become ``grid.train.seed`` (and ``grid.sparse.seed`` when
    set); every other setting keeps its own name, because every trial ran with it. The base config's value of a
    varied setting (``sparse.sparsity=0.4``) is not logged: no trial ran it as such.
    """
    flat = cfg.to_flat()
    axes = list(dict.fromkeys(name for p in points for name in p.overrides))
    params: dict[str, object] = {name: value for name, value in flat.items() if name not in axes}
    for name in axes:
        values = [p.overrides.get(name, flat[name]) for p in points]
        if all(v == values[0] for v in values):  # set by the grid, but the same for every trial
            params[name] = values[0]
        else:
            params[f"grid.{name}"] = values
    params["grid.points"] = [p.label for p in points]
    seeds = cfg.tune.seeds
    if "train.seed" not in axes:
        params.pop("train.seed", None)
        params["grid.train.seed"] = [cfg.train.seed + i for i in range(seeds)]
    if cfg.sparse.seed is not None and "sparse.seed" not in axes:
        params.pop("sparse.seed", None)
        params["grid.sparse.seed"] = [cfg.sparse.seed + i for i in range(seeds)]
    return params


def _finish_parent(
    tracking_cfg: TrackingConfig, parent: str, outcome: ExperimentOutcome, collate_into: str | Path | None
) -> None:
    """Close interrupted trial runs, collate the tables into the parent run, give it its final status."""
    killed = _close_unfinished_runs(tracking_cfg, outcome.name)
    if killed:
        logger.warning(
            "%d trial run(s) of %s were interrupted and marked KILLED; --resume continues them",
            killed,
            outcome.name,
        )
    out_dir = Path(collate_into) if collate_into else outcome.path / "tables"
    outcome.collated = collate_experiment(
        tracking_cfg.uri, tracking_cfg.experiment, outcome.name, out_dir
    )
    outcome.files = list(outcome.collated.files)
    tags = {"slak.failed_trials": str(outcome.errors), "slak.trials": str(outcome.trials)}
    tracking.create_tracker(tracking_cfg, run_id=parent, tags=tags).end(
        "KILLED" if outcome.interrupted else "FINISHED"
    )


def _check_before_start(cfg: ExperimentConfig, points: Sequence[GridPoint]) -> None:
    """Every point's config and model (meta device) and the data, before Ray starts."""
    validate_points(cfg, points, seeds=cfg.tune.seeds)
    data_problems = preflight.check_data(cfg)
    if data_problems:
        lines = "\n".join(f"  - {p}" for p in data_problems)
        raise preflight.PreflightError(f"the experiment cannot start:\n{lines}")


def _experiment_name(cfg: ExperimentConfig, table: str, resume: bool) -> str:
    """``run.name``, the newest restorable experiment of ``table`` (resume), or ``<table>-<UTC time>``.

    Raises:
        ValueError: nothing to resume, or a new experiment would overwrite an existing one.
    """
    storage = Path(cfg.run.storage_path)
    name = cfg.run.name or None
    if resume:
        name = name or _latest_experiment(storage, table)
        if name is None or not tune.Tuner.can_restore(storage / name):
            raise ValueError(
                f"--resume: no restorable experiment {name or table + '-*'} under "
                f"run.storage_path={storage}; start a new one without --resume"
            )
        return name
    name = name or f"{table}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    if tune.Tuner.can_restore(storage / name):
        raise ValueError(
            f"run.name={name!r} already exists under run.storage_path={storage}; pass --resume "
            "to continue it, or choose another run.name"
        )
    return name


def _build_tuner(cfg: ExperimentConfig, points: Sequence[GridPoint], name: str, parent: str | None, resume: bool,
                 callbacks: Sequence[tune.Callback], local: bool = False) -> tune.Tuner:
    """A new Tuner for the grid, or the experiment's own restored.

    The typed config travels whole to every trial (also after a restore, where the identity check guaranteed
    that it equals the experiment's own in everything that shapes a result). With one worker per trial the
    trial trains in its own actor, which Tune reuses and retries from the trial's checkpoints. ``local``: Ray
    runs on this machine, so the memory of its GPUs is known (see :func:`fitting_concurrency`).
    """
    storage = Path(cfg.run.storage_path)
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg), trial_resources(cfg))
    if resume:
        logger.info("resuming experiment %s from %s", name, storage / name)
        return tune.Tuner.restore(str(storage / name), trainable=trainable, resume_errored=True)
    single = in_process(cfg)
    shares_local_gpu = local and cfg.run.use_gpu and cfg.run.gpus_per_worker < 1
    concurrent = fitting_concurrency(cfg, ray.cluster_resources(),
                                     ray_cluster.local_gpu_memory_gib() if shares_local_gpu else None)
    _announce_estimate(cfg, points, concurrent)
    expected = len(points) * cfg.tune.seeds  # Tune creates grid trials lazily: count them ourselves
    return tune.Tuner(
        trainable,
        param_space=param_space(points, seeds=cfg.tune.seeds, constants={"experiment": name, "parent_run_id": parent}),
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent,
            scheduler=_scheduler(cfg),
            reuse_actors=single,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=tune.FailureConfig(
                max_failures=cfg.tune.trial_max_failures + (cfg.run.max_failures if single else 0)
            ),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep) if single else None,
            verbose=TUNE_VERBOSITY,
            callbacks=[TrialStatusCallback(cfg, expected), *result_loggers(), *callbacks],
        ),
    )


def _fit(tuner: tune.Tuner, tracking_cfg: TrackingConfig, name: str, parent: str | None) -> Any:
    """``tuner.fit()``; if it raises (Ctrl-C, a driver error), the experiment's MLflow runs become KILLED."""
    try:
        with quiet_tune_console():
            return tuner.fit()
    except BaseException:
        if parent is not None:
            try:
                _close_unfinished_runs(tracking_cfg, name)
                tracking.set_run_status(tracking_cfg.uri, parent, "KILLED")
            except Exception as exc:  # noqa: BLE001 - keep the original error
                logger.warning("could not mark the MLflow runs of %s KILLED: %s", name, exc)
        raise


def run_experiment(
    cfg: ExperimentConfig,
    points: Sequence[GridPoint],
    *,
    table: str,
    address: str | None = None,
    resume: bool = False,
    collate_into: str | Path | None = None,
    callbacks: Sequence[tune.Callback] = (),
) -> ExperimentOutcome:
    """Run (or resume) one grid and collate its tables.

    Args:
        cfg: the base config; each point's overrides are applied on top of it.
        points: the grid (see :mod:`orchestrator.search_space`); validated before Ray starts.
        table: grid name, used in the experiment name ``<table>-<UTC time>`` unless ``run.name`` is set.
        address: Ray cluster address (``"auto"``); ``None`` starts a local Ray.
        resume: continue the experiment called ``run.name`` or, if unset, the newest one of ``table``
            under ``run.storage_path``; finished trials are kept, errored and unfinished ones resume.
        collate_into: folder for the tables (default ``<storage_path>/<name>/tables``).
        callbacks: more Tune callbacks for a new experiment (a restored one keeps its own).

    Raises:
        GridError: some points are invalid (nothing was started).
        ValueError: a new experiment would overwrite an existing one, or there is nothing to resume.
        RunConfigMismatchError: ``resume`` with settings (or a grid) other than the experiment's own.
    """
    started = time.monotonic()
    cfg = _absolute_paths(cfg)
    _check_before_start(cfg, points)
    name = _experiment_name(cfg, table, resume)
    storage = Path(cfg.run.storage_path)
    tracking_online = tracking.check_server(cfg.tracking)  # one warning, before Ray, when it does not answer
    cfg = init_ray(cfg, address)  # resources fitted (or refused) before anything is recorded or created
    settings = {
        **run_identity.identity(cfg.to_flat()),
        "tune.seeds": cfg.tune.seeds,
        "grid": [{"row": p.row, "setting": p.setting, **p.overrides} for p in points],
    }
    run_identity.check_or_record(str(storage), name, settings, yaml_text=to_yaml(cfg), what="experiment")
    tracking_cfg = cfg.tracking
    parent = (_parent_run(tracking_cfg, name, table, points, cfg, resume)
              if tracking_cfg.enabled and tracking_online else None)
    groups_before = _live_placement_groups()
    tuner = _build_tuner(cfg, points, name, parent, resume, callbacks, local=address is None)
    results = _fit(tuner, tracking_cfg, name, parent)
    errors = results.num_errors
    trials = max(len(points) * cfg.tune.seeds, len(results))
    interrupted = results.num_terminated + errors < trials
    if interrupted:
        _release_leaked_placement_groups(groups_before)
    outcome = ExperimentOutcome(name, storage / name, parent, trials, errors, interrupted, time.monotonic() - started)
    if parent is not None:
        try:
            _finish_parent(tracking_cfg, parent, outcome, collate_into)
        except Exception as exc:  # noqa: BLE001 - the trials are done; the tables can be rebuilt later
            logger.warning("could not collate %s from MLflow (%s); rebuild the tables later with "
                           "python experiments/collate_tables.py --experiment %s", name, exc, name)
    outcome.seconds = time.monotonic() - started
    return outcome
