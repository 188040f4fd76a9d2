"""Evaluate a checkpoint's weights on the validation split: the checks before Ray, and one worker's job.

An evaluation is a training job's evaluation without the training: every rank reads a disjoint shard of
the validation split with the eval transform (:func:`orchestrator.data.build_eval_dataset`), runs the
checkpoint's weights (and its EMA weights, when the file holds them) and the counts are summed over the
ranks, so the numbers are those of one process reading the whole split. Rank 0 logs them to the MLflow
run that the driver created, tagged with the checkpoint's SHA-256 and the paper's cell it compares with.

What runs the worker is a :class:`~orchestrator.worker.WorkerSession` (Ray Train's in
``orchestrator.ray_train``; a plain one in tests). Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from orchestrator import data, tracking
from orchestrator.config.loading import to_yaml
from orchestrator.config.schema import ExperimentConfig, setting_names
from orchestrator.loop import build_model, evaluate_model
from orchestrator.preflight import PreflightError, check_model
from orchestrator.weights import CheckpointContents, WeightsError, read_weights
from orchestrator.worker import WorkerSession
from slak_model.checkpoint import check_state_dict, load_pretrained
from slak_model.published import PublishedResult, reference_cell

__all__ = [
    "EVAL_TRANSFORM",
    "RESULT_FILE",
    "EvaluationPlan",
    "checkpoint_defaults",
    "plan_evaluation",
    "published_label",
    "run_evaluation_worker",
    "transform_differences",
    "unused_overrides",
]

log = logging.getLogger(__name__)

#: The file of the evaluation's result in the job's storage (``run.storage_path/<run>/eval/``).
RESULT_FILE = "evaluation.json"
#: The settings of the eval transform; an evaluation takes them from the checkpoint unless told otherwise.
EVAL_TRANSFORM: tuple[str, ...] = ("data.image_size", "data.crop_pct", "data.interpolation", "data.crop_mode")


def checkpoint_defaults(contents: CheckpointContents) -> dict[str, Any]:
    """The settings the checkpoint records, as a defaults layer for ``load_config`` (under the preset and
    the command line): its eval transform always, and for our own files the model and data sections they
    were trained with, so ``evaluate.py --checkpoint RUN/epoch_0010`` needs no preset. Names the current
    schema does not know (a file written by another version) are left out."""
    known = set(setting_names()) | {"model.kernel_size"}
    return {k: v for k, v in contents.recipe.items() if k in known}


#: Settings an evaluation reads besides ``model.*``, ``run.*`` and ``tracking.*``: the validation data and
#: its transform, the batch size, numerics, and the seed of a generated validation split.
EVAL_READS: frozenset[str] = frozenset({
    "data.source", "data.path", "data.image_size", "data.num_classes", "data.val_size", "data.workers",
    "data.interpolation", "data.crop_pct", "data.crop_mode", "data.on_bad_image", "train.seed",
    "train.global_batch_size", "train.micro_batch_size", "train.precision", "train.channels_last",
})


def unused_overrides(names: list[str] | set[str]) -> list[str]:
    """The command line's settings (``names``) that an evaluation does not read, one warning line each:
    training augmentation and optimisation, ``sparse.*`` (the weights are run as they are) and
    ``finetune.*`` (``--checkpoint`` is evaluated as it is). A preset's are not reported: a training preset
    describes the model the checkpoint holds."""
    why = {"sparse.": "the checkpoint's weights are evaluated as they are, sparse or not",
           "finetune.": "--checkpoint is evaluated as it is; finetune.* configure a training job",
           "data.": "an evaluation reads the validation split with the eval transform",
           "train.": "an evaluation trains nothing"}
    return [f"{n} has no effect: {why[n.split('.')[0] + '.']}; drop it" for n in sorted(names)
            if n.startswith(tuple(why)) and n not in EVAL_READS]


def transform_differences(cfg: ExperimentConfig, contents: CheckpointContents) -> list[str]:
    """One line per eval-transform setting of ``cfg`` that differs from what the checkpoint records."""
    flat = cfg.to_flat()
    return [f"{name}={flat[name]!r} differs from the checkpoint's {contents.recipe[name]!r}: this evaluates "
            "another transform than the one it was trained with" for name in EVAL_TRANSFORM
            if name in contents.recipe and flat[name] != contents.recipe[name]]


def published_label(cell: PublishedResult | None) -> str:
    """``"SLaK-T 224 px, 300 ep: 82.5"`` (or ``""`` without a cell)."""
    if cell is None:
        return ""
    name = cell.row if cell.table == "table3" else f"SLaK-T {cell.row}"
    return f"{name} {cell.image_size} px, {cell.epochs} ep: {cell.top1:g}"


@dataclass(frozen=True)
class EvaluationPlan:
    """What the driver knows before any worker starts: the file, its hash, and what it is compared with."""

    path: str
    sha256: str
    layout: str
    has_ema: bool
    num_classes: int
    published: PublishedResult | None
    run_name: str

    def tags(self) -> dict[str, str]:
        """The MLflow tags of the evaluation run."""
        tags = {"slak.role": "eval", "slak.run_name": self.run_name, "slak.checkpoint": self.path,
                "slak.checkpoint_sha256": self.sha256, "slak.checkpoint_layout": self.layout}
        if self.published is not None:
            tags.update({"slak.published": published_label(self.published),
                         "slak.published_top1": f"{self.published.top1:g}",
                         "slak.table": self.published.table, "slak.row": self.published.row,
                         "slak.setting": self.published.setting})
        return tags


def _num_classes(cfg: ExperimentConfig) -> int:
    if cfg.model.num_classes:
        return cfg.model.num_classes
    if cfg.data.source == "imagenet" and cfg.data.path:
        return len(data.check_image_folder(Path(cfg.data.path).expanduser(), ("val",)))
    return cfg.data.num_classes


def plan_evaluation(cfg: ExperimentConfig, contents: CheckpointContents) -> EvaluationPlan:
    """Everything checked before Ray starts: the model builds, the ``val/`` folder is usable, and the
    checkpoint's weights (and EMA weights) fit the configured model exactly.

    Raises:
        PreflightError: every problem found, one per line; a checkpoint of another architecture is
            described by :class:`~slak_model.checkpoint.CheckpointMismatchError`'s diagnosis (variant,
            kernel sizes, width, class count) with the setting that fixes it.
    """
    problems = check_model(cfg)
    try:
        for warning in data.preflight_image_folder(cfg.data, splits=("val",)):
            log.warning("%s", warning)
    except data.DataError as exc:
        problems += [f"data: {line}" for line in str(exc).splitlines()]
    num_classes = cfg.data.num_classes
    if not problems:
        num_classes = _num_classes(cfg)
        with torch.device("meta"):
            model = build_model(cfg, num_classes)
        for which, weights in (("model", contents.model), ("model_ema", contents.ema)):
            if weights is None:
                continue
            try:
                check_state_dict(model, weights, args=contents.args)
            except ValueError as exc:
                problems.append(f"checkpoint {contents.path} ({which} weights) does not fit the configured "
                                f"model {cfg.model.variant}: {exc}")
                break
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PreflightError(f"the evaluation cannot start ({len(problems)} problem"
                             f"{'s' if len(problems) > 1 else ''}):\n{lines}")
    epochs = contents.recipe.get("train.epochs")
    cell = reference_cell(cfg.model.variant, cfg.data.image_size, epochs,
                          cfg.model.stage_kernels or _variant_kernels(cfg))
    shaping = json.dumps({"sha256": contents.sha256, "config": cfg.to_flat()}, sort_keys=True, default=str)
    # never a training run's own name (a preset's run.name): its MLflow run and storage folder are not ours
    name = (f"eval-{cfg.run.name or cfg.model.variant}-{contents.sha256[:10]}-"
            f"{hashlib.sha256(shaping.encode()).hexdigest()[:8]}")
    return EvaluationPlan(contents.path, contents.sha256, contents.layout, contents.ema is not None, num_classes,
                          cell, name)


def _variant_kernels(cfg: ExperimentConfig) -> tuple[int, ...]:
    from slak_model import variant_config

    return tuple(variant_config(cfg.model.variant).stage_kernels)


def _autocast(precision: str, device: torch.device) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def run_evaluation_worker(config: dict[str, Any], session: WorkerSession) -> dict[str, float]:
    """One rank of an evaluation: its shard, the weights, ``val/*`` and (with EMA weights) ``ema/*``.

    ``config``: ``{"experiment": ExperimentConfig, "checkpoint": path, "sha256": str, "run_name": str,
    "mlflow_run_id": str | None}``. Every rank reads the file itself (it must be on storage every worker
    sees, as ``data.path``) and refuses it when its bytes are not the ones the driver checked.

    Returns:
        The metrics, also handed to ``session.report`` (every rank reports once; rank 0 with a folder
        holding :data:`RESULT_FILE`: the metrics, the file and its hash, the config).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg: ExperimentConfig = config["experiment"]
    device = session.device(cfg.run.use_gpu)
    contents = read_weights(config["checkpoint"])
    if contents.sha256 != config["sha256"]:
        raise WeightsError(f"{contents.path} changed since the driver checked it (SHA-256 {config['sha256'][:12]}... "
                           f"then, {contents.sha256[:12]}... now); run the evaluation again")
    bundle = data.build_eval_dataset(cfg.data, seed=cfg.train.seed)
    loader = data.build_eval_loader(bundle, cfg, rank=session.rank, world_size=session.world_size,
                                    batch_size=max(1, math.floor(1.5 * cfg.micro_batch_size)), device=device)
    autocast = _autocast(cfg.train.precision, device)
    metrics: dict[str, float] = {}
    for prefix, weights in (("val", contents.model), ("ema", contents.ema)):
        if weights is None:
            continue
        model = build_model(cfg, bundle.num_classes)
        load_pretrained(model, weights, new_head=False, args=contents.args)
        model.to(device)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        result = evaluate_model(model, loader, device=device, autocast=autocast,
                                channels_last=cfg.train.channels_last)
        metrics.update({f"{prefix}/{k}": v for k, v in result.items()})
    metrics["eval/images"] = float(len(bundle.val))
    if session.rank == 0:
        log.info("evaluation of %s: %s", contents.path, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        tracker = tracking.create_tracker(cfg.tracking, run_id=config.get("mlflow_run_id"),
                                          run_name=config["run_name"], rank=0,
                                          tags={"slak.role": "eval", "slak.run_name": config["run_name"]},
                                          environment=True)
        try:
            tracker.log_params(cfg.to_flat())
            tracker.log_text(to_yaml(cfg), "config/resolved.yaml")
            tracker.log_metrics(metrics, 0)
        finally:
            tracker.close()
    with tempfile.TemporaryDirectory(prefix="slak-eval-") as tmp:
        folder = None
        if session.rank == 0:  # the result is kept in the job's storage too, beside the config it came from
            record = {"checkpoint": contents.path, "sha256": contents.sha256, "metrics": metrics,
                      "config": cfg.to_flat()}
            (Path(tmp) / RESULT_FILE).write_text(json.dumps(record, indent=1, default=str))
            folder = tmp
        session.report(metrics, folder, "eval")
    return metrics

