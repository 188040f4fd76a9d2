"""Checks a job's driver runs before Ray starts: what can be known from the config and the disk is known
in seconds, reported in one message, and never retried by Ray as if it were a passing fault.

The config's own validation (``orchestrator.config``) needs neither torch nor timm. These checks do: the
model is built on the ``meta`` device (its architecture checks, e.g. a short edge longer than a stage
kernel, without allocating weights), and an ImageNet-layout folder is checked for its layout, matching
class sets and a sample of decodable images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from orchestrator import data, distill
from orchestrator.config.schema import ExperimentConfig
from orchestrator.loop import build_meta_model, build_model
from orchestrator.weights import read_weights
from slak_model.checkpoint import check_state_dict
from slak_model.sparsity.masks import select_targets

__all__ = ["PreflightError", "check_before_start", "check_data", "check_finetune", "check_model", "check_teacher"]

#: A kept sparse pattern at or above this overall density is no sparse pattern (a dense checkpoint).
_DENSE_PATTERN = 0.99

log = logging.getLogger(__name__)


class PreflightError(ValueError):
    """The job cannot succeed as configured; the message lists every cause and its fix."""


def check_model(cfg: ExperimentConfig) -> list[str]:
    """Problems building the configured model (on the meta device)."""
    try:
        build_meta_model(cfg)
    except (ValueError, TypeError) as exc:
        text = " ".join(line.strip().removeprefix("- ") for line in str(exc).splitlines() if line.strip())
        return [f"model ({cfg.model.variant}): {text}"]
    return []


def check_teacher(cfg: ExperimentConfig) -> list[str]:
    """Problems loading the distillation teacher (its checkpoint, network and class count), loaded on the CPU."""
    if not cfg.distill.enabled:
        return []
    classes = cfg.model.num_classes or cfg.data.num_classes
    return [f"teacher: {p}" for p in distill.teacher_problems(cfg.distill, classes)]


def check_data(cfg: ExperimentConfig) -> list[str]:
    """Problems of the configured dataset on disk (none for generated sources); logs sample-image warnings."""
    try:
        for warning in data.preflight_image_folder(cfg.data):
            log.warning("%s", warning)
    except data.DataError as exc:
        return [f"data: {line}" for line in str(exc).splitlines()]
    return []


def _dataset_classes(cfg: ExperimentConfig) -> int:
    if cfg.model.num_classes:
        return cfg.model.num_classes
    if cfg.data.source == "imagenet" and cfg.data.path:
        return len(data.check_image_folder(Path(cfg.data.path).expanduser()))
    return cfg.data.num_classes


def check_finetune(cfg: ExperimentConfig) -> list[str]:
    """Problems of ``finetune.checkpoint`` against the configured model (none without one), checked on the
    ``meta`` device: the file reads, holds the weights asked for, and fits the model exactly but for a head
    of another class count; a kept sparse pattern is one. Logs what will be loaded and re-initialised."""
    f = cfg.finetune
    if not f.checkpoint:
        return []
    try:
        contents = read_weights(f.checkpoint)
        weights = contents.weights(f.weights)
    except ValueError as exc:
        return [f"finetune.checkpoint: {exc}"]
    with torch.device("meta"):
        model = build_model(cfg, _dataset_classes(cfg))
    try:
        report = check_state_dict(model, weights, new_head=True, args=contents.args)
    except ValueError as exc:
        return [f"finetune.checkpoint={f.checkpoint!r} does not fit the configured model {cfg.model.variant}: {exc}"]
    for line in report.lines():
        log.info("finetune.checkpoint: %s", line)
    if not report.reinitialised and "model.head_init_scale" in cfg.user_set:
        log.warning("model.head_init_scale=%g has no effect: the checkpoint's head fits the %d classes and is "
                    "loaded, not re-initialised; drop it", cfg.model.head_init_scale, model.head.weight.shape[0])
    if cfg.sparse.enabled and f.masks == "keep":
        names = [n for n in select_targets(model, cfg.sparse.targets) if n not in report.reinitialised]
        masks = contents.pattern_masks(names)
        active = sum(int(m.count_nonzero()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        if total and active / total >= _DENSE_PATTERN:
            return [f"finetune.masks=keep: the checkpoint's weights are dense ({100 * active / total:.1f} % of the "
                    f"targeted weights are non-zero), so there is no sparse pattern to keep and sparse.enabled would "
                    "train dense; set finetune.masks=reinit to sparsify by sparse.init, or sparse.enabled=false"]
        log.info("finetune.masks=keep: the checkpoint's sparse pattern has density %.4f", active / max(total, 1))
    return []


def check_before_start(cfg: ExperimentConfig) -> None:
    """Raise :class:`PreflightError` listing every model, teacher, data and starting-checkpoint problem of ``cfg``."""
    problems = check_model(cfg) + check_teacher(cfg) + check_data(cfg)
    if not problems:
        problems = check_finetune(cfg)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PreflightError(f"the job cannot start ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
                             f"\n{lines}")
