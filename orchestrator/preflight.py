"""Checks a job's driver runs before Ray starts: what can be known from the config and the disk is known
in seconds, reported in one message, and never retried by Ray as if it were a passing fault.

The config's own validation (``orchestrator.config``) needs neither torch nor timm. These checks do: the
model is built on the ``meta`` device (its architecture checks, e.g. a short edge longer than a stage
kernel, without allocating weights), and an ImageNet-layout folder is checked for its layout, matching
class sets and a sample of decodable images.
"""

from __future__ import annotations

import logging

from orchestrator import data, distill
from orchestrator.config.schema import ExperimentConfig
from orchestrator.loop import build_meta_model

__all__ = ["PreflightError", "check_before_start", "check_data", "check_model", "check_teacher"]

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


def check_before_start(cfg: ExperimentConfig) -> None:
    """Raise :class:`PreflightError` listing every model and data problem of ``cfg``."""
    problems = check_model(cfg) + check_teacher(cfg) + check_data(cfg)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PreflightError(f"the job cannot start ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
                             f"\n{lines}")
