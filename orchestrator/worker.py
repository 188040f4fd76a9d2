"""One training process of a job: its data shard, the :class:`~orchestrator.loop.Trainer`, rank 0's
MLflow tracker, per-epoch reports with checkpoints, and the final artifacts.

What runs the process is a :class:`WorkerSession`, so the same code serves both ways a job runs:

* a rank of a Ray Train DDP worker group (``orchestrator.ray_train``), and
* a single-worker Tune trial trained inside the trial's own actor (``orchestrator.tune_trial``): Tune
  reuses that actor for the next trial, so imports, CUDA initialisation, the compiled kernels and the
  generated datasets are paid once per actor instead of once per trial.

Every rank reports the same number of times (a report is a barrier under Ray Train); rank 0 writes the
checkpoint and every rank's RNG streams go into it. Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from orchestrator import tracking
from orchestrator.checkpoints import MANIFEST, load_checkpoint_dir, save_checkpoint_dir
from orchestrator.config.loading import to_yaml
from orchestrator.loop import Trainer

__all__ = ["COLLAPSE_TAG", "FAULT_ENV", "InjectedFault", "ReportedCheckpoint", "TrainingWorker", "WorkerSession",
           "run_worker"]

log = logging.getLogger(__name__)

FAULT_ENV = "SLAK_FAULT_INJECT"
#: Run tag naming the sparse layers that collapsed (comma-separated); absent when none did.
COLLAPSE_TAG = "slak.collapsed_layers"


class InjectedFault(RuntimeError):
    """Raised by the fault-injection switch (never in normal runs)."""


class ReportedCheckpoint(Protocol):
    """A checkpoint handed back by the runner on a restart (Ray's ``Checkpoint``)."""

    def as_directory(self) -> AbstractContextManager[str]: ...


class WorkerSession(Protocol):
    """What a training process needs from whatever runs it (Ray Train or a Tune trial)."""

    rank: int
    world_size: int

    def device(self, use_gpu: bool) -> torch.device:
        """This process's device."""

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model's distributed form (DDP), or the model itself in a single process."""

    def latest_checkpoint(self) -> ReportedCheckpoint | None:
        """The checkpoint to resume from after a restart, or None on a first start."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None, name: str) -> None:
        """Report ``metrics`` and, from rank 0, the checkpoint folder ``checkpoint_dir`` (persisted before
        returning, so the folder may be deleted afterwards)."""


class TrainingWorker:
    """State of one training process across the epochs of one attempt.

    ``config``: ``{"experiment": ExperimentConfig, "run_name": str, "mlflow_run_id": str | None,
    "mlflow_parent_run_id": str | None, "fault_inject": "rank:step" | None}``, optionally ``"startup":
    {phase: seconds}`` spent before the worker (by a trial driver), which joins the worker's own phases.

    Where the time goes is measured, not guessed: ``perf/startup/<phase>_s`` (data, model, sparsity init or
    resume, tracking, and what the caller passed) and ``perf/epoch_s`` (one epoch's training and
    evaluation, wall clock) are reported with every epoch's metrics, to Tune and MLflow alike.
    """

    def __init__(self, config: dict[str, Any], session: WorkerSession) -> None:
        from orchestrator import data  # a worker-side import: drivers never need the datasets

        started = time.perf_counter()
        self.session = session
        self.cfg = cfg = config["experiment"]
        self.rank, self.world_size = session.rank, session.world_size
        self.run_name = config["run_name"]
        self.run_dir = Path(cfg.run.storage_path) / self.run_name
        self.fault = config.get("fault_inject")
        device = session.device(cfg.run.use_gpu)
        phases: dict[str, float] = dict(config.get("startup") or {})

        t = time.perf_counter()
        self.bundle = bundle = data.build_datasets(cfg.data, seed=cfg.train.seed)
        self.train_loader, self.val_loader = data.build_loaders(
            bundle, cfg, rank=self.rank, world_size=self.world_size, micro_batch_size=cfg.micro_batch_size,
            seed=cfg.train.seed, device=device)
        mixup = data.build_mixup(cfg.data, bundle.num_classes)
        steps = len(self.train_loader) // cfg.accumulation_steps
        phases["data"] = time.perf_counter() - t

        t = time.perf_counter()
        self.trainer = Trainer(cfg, steps_per_epoch=steps, num_classes=bundle.num_classes, device=device,
                               wrap_model=session.wrap_model, mixup=mixup)
        phases["model"] = time.perf_counter() - t
        self.last_metrics: dict[str, float] = {}
        self.mlflow_run_id: str | None = config.get("mlflow_run_id")

        t = time.perf_counter()
        start_lines: list[str] = []
        start_tags: dict[str, str] = {}
        checkpoint = session.latest_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state, manifest = load_checkpoint_dir(d)
            self.trainer.load_state_dict(state)
            self.last_metrics = dict(state.get("metrics") or {})
            self.mlflow_run_id = self.mlflow_run_id or state.get("mlflow_run_id")
            log.info("rank %d resumed from %s (epoch %d, step %d)", self.rank, manifest.get("name", d),
                     self.trainer.epoch, self.trainer.step)
            phases["resume"] = time.perf_counter() - t
        else:
            start_lines, start_tags = self._start_from_checkpoint()
            self.trainer.initialize_sparsity(next(iter(self.train_loader)))
            phases["sparsity_init"] = time.perf_counter() - t

        t = time.perf_counter()
        self.tracker = tracking.create_tracker(
            cfg.tracking, run_id=self.mlflow_run_id, run_name=self.run_name,
            parent_run_id=config.get("mlflow_parent_run_id"), rank=self.rank,
            tags={"slak.role": "train", "slak.run_name": self.run_name}, environment=True)
        if self.rank == 0 and checkpoint is None:
            self.tracker.log_params(cfg.to_flat())
            self.tracker.log_text(to_yaml(cfg), "config/resolved.yaml")
            if start_tags:
                self.tracker.set_tags(start_tags)
                self.tracker.log_text("\n".join(start_lines) + "\n", "finetune/load_report.txt")
        self.mlflow_run_id = getattr(self.tracker, "run_id", None)
        self._tag_hosts()
        phases["tracking"] = time.perf_counter() - t
        if self.trainer.teacher is not None:
            t = time.perf_counter()
            self._start_distillation(first_start=checkpoint is None)
            phases["teacher_eval"] = time.perf_counter() - t
        phases["worker"] = time.perf_counter() - started
        self.startup = {f"perf/startup/{k}_s": float(v) for k, v in phases.items()}
        if self.rank == 0:
            log.info("worker ready in %.2f s (%s)", phases["worker"], ", ".join(
                f"{k} {v:.2f} s" for k, v in phases.items() if k != "worker"))
        self._startup_reported = False
        self._masks_logged_at = self._updates()
        self._collapse_tagged: list[str] = []
        self._tag_collapse()

    def _start_distillation(self, first_start: bool) -> None:
        """Tag the run with the teacher's identity and, on a run's first start, measure the teacher on the
        validation set (``teacher/top1``, ``teacher/top5``): what the student is distilled from, in numbers."""
        teacher = self.trainer.teacher
        assert teacher is not None
        if self.rank == 0:
            self.tracker.set_tags(teacher.identity.tags())
        if not first_start:
            return
        measured = self.trainer.evaluate(self.val_loader, teacher.model)  # every rank: the sums are all-reduced
        metrics = {f"teacher/{k}": float(v) for k, v in measured.items()}
        self.last_metrics.update(metrics)
        if self.rank == 0:
            self.tracker.log_metrics(metrics, 0)
            log.info("teacher %s: val top-1 %.2f %%, top-5 %.2f %%", teacher.identity.variant, metrics["teacher/top1"],
                     metrics["teacher/top5"])

    def _tag_hosts(self) -> None:
        """Record which host each rank runs on (``slak.rank_hostnames``: ``rank:host`` by rank), so a
        multi-node run shows where its ranks were placed; rewritten after a restart moves them."""
        hosts: list[Any] = [socket.gethostname()]
        if self.world_size > 1:
            hosts = [None] * self.world_size
            dist.all_gather_object(hosts, socket.gethostname())
        if self.rank == 0:
            placed = ",".join(f"{rank}:{host}" for rank, host in enumerate(hosts))
            self.tracker.set_tags({"slak.rank_hostnames": placed})
            log.info("ranks on hosts: %s", placed)

    def _start_from_checkpoint(self) -> tuple[list[str], dict[str, str]]:
        """Load ``finetune.checkpoint`` into the fresh trainer (no-op without one); return the account of
        what was loaded, re-initialised and ignored, and the MLflow tags naming the file."""
        path = self.cfg.finetune.checkpoint
        if not path:
            return [], {}
        from orchestrator.weights import read_weights

        contents = read_weights(path)
        report = self.trainer.start_from(contents)
        f = self.cfg.finetune
        lines = [f"fine-tuning from {contents.path} ({contents.layout} layout, sha256 {contents.sha256}), "
                 f"finetune.weights={f.weights}", *report.lines()]
        unused = list(contents.unused)
        if f.weights == "model" and contents.ema is not None:
            unused.append("the EMA weights (finetune.weights=model)")
        if f.weights == "ema":
            unused.append("the trained weights (finetune.weights=ema)")
        if self.trainer.engine is None and (contents.masks or contents.layout == "official"):
            unused.append("the sparse pattern (sparse.enabled=false: every weight is trained)")
        elif self.trainer.engine is not None and f.masks == "reinit":
            unused.append("the sparse pattern (finetune.masks=reinit: masks drawn by sparse.init)")
        if unused:
            lines.append(f"not used from the file: {', '.join(unused)}")
        if self.rank == 0:
            for line in lines:
                log.info("%s", line)
        tags = {"slak.finetune.checkpoint": contents.path, "slak.finetune.sha256": contents.sha256,
                "slak.finetune.layout": contents.layout}
        return lines, tags

    def _updates(self) -> int:
        engine = self.trainer.engine
        return engine.updates if engine is not None and self.trainer.sparsity_ready else 0

    # ------------------------------------------------------------------ per step
    def on_step(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        cfg, step = self.cfg, trainer.step
        if self.rank == 0 and step % cfg.tracking.log_every_steps == 0:
            self.tracker.log_metrics({"train/loss_step": metrics["train/loss"], "train/lr": metrics["train/lr"]}, step)
        if self.rank == 0 and step % cfg.train.log_every_steps == 0:
            log.info("epoch %d step %d/%d (global %d): train/loss %.4f lr %.3g", trainer.epoch,
                     trainer.step_in_epoch, trainer.steps_per_epoch, step, metrics["train/loss"], metrics["train/lr"])
        self._maybe_log_masks()
        every = cfg.train.checkpoint_every_steps
        if every and step % every == 0 and trainer.step_in_epoch < trainer.steps_per_epoch:
            report = {**self.last_metrics, **metrics, "epochs_done": float(trainer.epoch)}
            self._report(report, f"step_{step:08d}")
        self._maybe_fail(step)

    def _collapsed_layers(self) -> list[str]:
        engine = self.trainer.engine
        return engine.collapsed_layers() if engine is not None and self.trainer.sparsity_ready else []

    def _tag_collapse(self) -> None:
        """Tag the run ``slak.collapsed_layers`` (comma-separated layer names) once layers collapse, so that
        tables and the MLflow UI can mark it; a run without collapsed layers gets no such tag."""
        collapsed = self._collapsed_layers()
        if self.rank == 0 and collapsed and collapsed != self._collapse_tagged:
            self.tracker.set_tags({COLLAPSE_TAG: ",".join(collapsed)})
            self._collapse_tagged = collapsed

    def _note_collapse(self) -> None:
        """Say in the finished run's description and the log that its result comes from a model with empty
        layers: the run is FINISHED like any other, so nothing else would tell."""
        collapsed = self._collapsed_layers()
        if self.rank != 0 or not collapsed:
            return
        s = self.cfg.sparse
        note = (f"{len(collapsed)} sparse layer(s) collapsed (density <= sparse.collapse_threshold="
                f"{s.collapse_threshold:g}), so this result is of a model without them: {', '.join(collapsed)}. "
                "Set sparse.min_density (e.g. 0.05) to keep a floor in every layer.")
        log.warning("run %s: %s", self.run_name, note)
        self.tracker.set_tags({"mlflow.note.content": note})

    def _maybe_log_masks(self) -> None:
        every = self.cfg.tracking.masks_every_updates
        updates = self._updates()
        if self.rank == 0 and every and updates - self._masks_logged_at >= every:
            self.tracker.log_masks(self.trainer.engine.masks, self.trainer.step)
            self.tracker.log_density_table(self.trainer.engine.layer_densities(), self.trainer.step)
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
            folder = None
            if self.rank == 0:
                state = self.trainer.state_dict(rng_states=rngs)
                state["metrics"] = dict(self.last_metrics)
                state["mlflow_run_id"] = self.mlflow_run_id
                save_checkpoint_dir(state, tmp, extra={"name": name, "run": self.run_name})
                folder = tmp
            self.session.report(metrics, folder, name)

    def run(self) -> None:
        trainer, cfg = self.trainer, self.cfg
        if trainer.done:  # re-run of a finished job: report its final state once, train nothing
            self.session.report(dict(self.last_metrics), None, "final")
            return
        while not trainer.done:
            started = time.perf_counter()
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
            self._tag_collapse()
            if cfg.data.on_bad_image == "skip":
                metrics["data/skipped_images"] = self._skipped_images()
            trainer.end_epoch()
            metrics.update({"epoch": float(epoch), "epochs_done": float(trainer.epoch), "step": float(trainer.step),
                            "perf/epoch_s": time.perf_counter() - started})
            if not self._startup_reported:  # this attempt's start-up, with its first epoch
                metrics.update(self.startup)
                self._startup_reported = True
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
        self._note_collapse()
        engine = self.trainer.engine
        if engine is not None and self.trainer.sparsity_ready:
            self.tracker.log_final_sparsity(engine.masks, engine.layer_densities(), self.trainer.step)
        with tempfile.TemporaryDirectory(prefix="slak-final-") as tmp:
            state = self.trainer.state_dict()
            state["metrics"] = dict(self.last_metrics)
            path = save_checkpoint_dir(state, tmp, extra={"name": "final", "run": self.run_name})
            self.tracker.log_artifact(path, "checkpoint")
            self.tracker.log_artifact(Path(tmp) / MANIFEST, "checkpoint")


def run_worker(config: dict[str, Any], session: WorkerSession,
               on_ready: Callable[[TrainingWorker], None] | None = None) -> None:
    """Build the worker and train to the end, then flush what it logged (also when training raises). The
    MLflow run's final status is its owner's to set: the driver that created it, which also marks a re-run
    of a finished job FINISHED again (opening the run made it RUNNING)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = TrainingWorker(config, session)
    if on_ready is not None:
        on_ready(worker)
    try:
        worker.run()
    finally:
        worker.tracker.close()
