"""Settings the user gave that the job would not use: every setting takes effect or is named.

Why: a setting that silently does nothing is a run other than the one asked for (a data folder beside a
generated source) or an option the user believes in (an EMA decay with the EMA off). Only what the user
set to a non-default value (:attr:`~orchestrator.config.schema.ExperimentConfig.user_set`) is checked: a
default that a mode does not use is no mistake.

The warnings are logged under the package's name, ``orchestrator.config``, which is what the console
shows beside them: they are about the config, whichever module found them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Mapping

from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.validation import is_slak_variant

__all__ = ["ignored_settings", "unused_section_settings", "warn_newly_ignored"]

logger = logging.getLogger(__package__)

#: Generated sources (``orchestrator.datasets_procedural``) render their images: no file is read and
#: none of timm's transforms run, so these settings apply to ``data.source=imagenet`` only.
_IMAGE_FOLDER_ONLY: tuple[str, ...] = ("data.auto_augment", "data.interpolation", "data.crop_pct",
                                       "data.crop_mode", "data.on_bad_image", "data.crop_scale", "data.crop_ratio",
                                       "data.hflip", "data.vflip", "data.color_jitter")
#: Sizes of the generated sources; an image folder has the images it has.
_GENERATED_ONLY: tuple[str, ...] = ("data.train_size", "data.val_size")
#: ``model.*`` fields of the SLaK geometry: a timm baseline has its own architecture.
_SLAK_ONLY_MODEL: tuple[str, ...] = ("model.width_factor", "model.stage_kernels", "model.short_edge",
                                     "model.small_kernel", "model.kernel_mode", "model.use_bn")
_DISTILL_OPTIONS: tuple[str, ...] = ("distill.teacher_checkpoint", "distill.teacher_ema", "distill.loss",
                                     "distill.temperature", "distill.gamma", "distill.ce_weight",
                                     "distill.kd_weight")
_TRACKING_OPTIONS: tuple[str, ...] = ("tracking.uri", "tracking.experiment", "tracking.log_every_steps",
                                      "tracking.masks_every_updates", "tracking.offline_dir")


def ignored_settings(cfg: ExperimentConfig, preset_only: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """The settings in ``cfg.user_set`` that the job would not use, as ``(errors, warnings)``.

    An error where the run would quietly be another experiment than the one asked for (a data folder
    or dataset sizes that the source does not read); a warning where the run is the one asked for and
    an option of a feature that is off has no effect (tracking, EMA, sparsity, mixing, GPU shares).
    Each line names the setting, its value, why it has no effect and the fix.

    Args:
        cfg: The config, with :attr:`~ExperimentConfig.user_set`.
        preset_only: Names set by the preset and not by the command line. Such a data setting that the
            command line's ``data.source`` leaves without effect is a warning: the preset was written for
            another source (the smoke preset's sizes under ``data.source=imagenet``).
    """
    errors: list[str] = []
    warnings: list[str] = []
    values = cfg.to_flat()
    source_from_command_line = "data.source" in cfg.user_set and "data.source" not in preset_only

    def flag(out: list[str], names: Iterable[str], why: str) -> None:
        for n in names:
            if n in cfg.user_set:
                demote = out is errors and source_from_command_line and n in preset_only
                (warnings if demote else out).append(f"{n}={values[n]!r} has no effect: {why}")

    d, t = cfg.data, cfg.train
    if d.source in ("shapes", "synthetic"):
        generated = f"data.source={d.source!r} generates its images"
        flag(errors, ["data.path"], f"{generated} and reads no folder; set data.source=imagenet to train on "
             "that folder, or drop data.path")
        flag(warnings, _IMAGE_FOLDER_ONLY, f"{generated} and applies no transforms; it is an option of "
             "data.source=imagenet, drop it")
        if d.source == "shapes":
            flag(warnings, ["data.reprob"], "data.source='shapes' renders normalised images and random "
                 "erasing runs on uint8 image batches (data.source=synthetic or imagenet); drop it")
    elif d.source == "imagenet":
        flag(errors, _GENERATED_ONLY, "data.source='imagenet' uses every image under data.path (train/ and "
             "val/); sizes apply to the generated sources (shapes, synthetic) only; drop it, or use a "
             "subset folder")
    if d.source == "imagenet" and d.auto_augment and not d.auto_augment.startswith("3a"):
        flag(warnings, ["data.color_jitter"], f"timm applies colour jitter only without RandAugment, and "
             f"data.auto_augment={d.auto_augment!r}; drop it or set data.auto_augment='' (off)")
    mixup_on, cutmix_on = d.mixup > 0, d.cutmix > 0
    if d.mixup_prob <= 0:
        flag(warnings, ["data.mixup", "data.cutmix", "data.mixup_switch_prob"],
             "data.mixup_prob=0 turns Mixup/CutMix off; raise data.mixup_prob or drop it")
    elif not (mixup_on or cutmix_on):
        flag(warnings, ["data.mixup_prob", "data.mixup_switch_prob"],
             "data.mixup and data.cutmix are 0, so no batch is mixed; drop it or set data.mixup/data.cutmix")
    elif mixup_on != cutmix_on:
        flag(warnings, ["data.mixup_switch_prob"], "it chooses between Mixup and CutMix, and only "
             f"{'data.mixup' if mixup_on else 'data.cutmix'} is on; drop it or turn both on")
    if not t.ema:
        flag(warnings, ["train.ema_decay", "train.bn_recalibration_batches"],
             "train.ema=false (both configure the EMA model); drop it or set train.ema=true")
    if not cfg.sparse.enabled:
        names = [f"sparse.{f.name}" for f in dataclasses.fields(cfg.sparse) if f.name != "enabled"]
        flag(warnings, names, "sparse.enabled=false trains dense; drop it or set sparse.enabled=true")
        if cfg.tracking.enabled:
            flag(warnings, ["tracking.masks_every_updates"], "sparse.enabled=false trains dense, so there "
                 "are no masks to log; drop it or set sparse.enabled=true")
    variant = cfg.model.variant
    if isinstance(variant, str) and not is_slak_variant(variant):
        flag(errors, _SLAK_ONLY_MODEL, f"model.variant={variant!r} is a timm model with its own architecture; "
             "these settings shape SLaK variants only; drop it, or train a SLaK variant")
        if not variant.startswith("convnext_"):
            flag(errors, ["model.layer_scale_init"], f"model.variant={variant!r} takes no layer-scale init (timm's "
                 "ConvNeXt models do); drop it")
    if not cfg.distill.enabled:
        flag(errors, _DISTILL_OPTIONS, "distill.teacher is not set, so nothing is distilled and the job trains on "
             "labels alone; set distill.teacher=<variant> and distill.teacher_checkpoint=PATH, or drop it")
    elif cfg.distill.loss != "nkd":
        flag(warnings, ["distill.gamma"], f"it weights NKD's non-target term and distill.loss={cfg.distill.loss!r}; "
             "drop it or set distill.loss=nkd")
    f = cfg.finetune
    if f.checkpoint is None:
        flag(warnings, ["finetune.weights", "finetune.masks"], "finetune.checkpoint is not set, so the job trains "
             "from scratch; set finetune.checkpoint=PATH or drop it")
    elif not cfg.sparse.enabled:
        flag(warnings, ["finetune.masks"], "sparse.enabled=false fine-tunes every weight (dense); drop it or set "
             "sparse.enabled=true")
    elif f.masks == "keep":
        flag(warnings, ["sparse.sparsity", "sparse.init", "sparse.min_density"], "finetune.masks=keep continues "
             "from the checkpoint's sparse pattern, which fixes every layer's density; drop it or set "
             "finetune.masks=reinit")
    slak = not isinstance(variant, str) or is_slak_variant(variant)
    if slak and cfg.model.kernel_mode != "decomposed":
        flag(warnings, ["model.short_edge"], f"model.kernel_mode={cfg.model.kernel_mode!r} has square "
             "kernels; the short edge of the strips applies to kernel_mode=decomposed only")
    if slak and cfg.model.kernel_mode == "naive":
        flag(warnings, ["model.small_kernel"], "model.kernel_mode='naive' has no small-kernel branch; use "
             "kernel_mode=replknet or decomposed for one")
    if cfg.run.use_gpu is False:
        flag(warnings, ["run.gpus_per_worker"], "the workers run on CPUs (run.use_gpu=false); drop it or "
             "set run.use_gpu=true or auto")
    if not cfg.tracking.enabled:
        flag(warnings, _TRACKING_OPTIONS, "tracking.enabled=false; drop it or set tracking.enabled=true")
    if not cfg.tune.asha:
        flag(warnings, ["tune.grace_period"], "it is the minimum number of epochs before ASHA stops a trial, "
             "and tune.asha=false; drop it or set tune.asha=true")
    return errors, warnings


def warn_newly_ignored(before: ExperimentConfig, after: ExperimentConfig, why: str) -> None:
    """Log the user's settings that ``after`` (``before`` resolved, e.g. against the cluster) no longer
    uses, such as ``run.gpus_per_worker`` once ``run.use_gpu=auto`` found no GPU."""
    known = set(ignored_settings(before)[1])
    for line in ignored_settings(after)[1]:
        if line not in known:
            logger.warning("%s (%s)", line, why)


def unused_section_settings(cfg: ExperimentConfig, unused_sections: Mapping[str, str]) -> list[str]:
    """Warnings for the settings in ``cfg.user_set`` of whole sections the caller never reads (such as
    ``tune`` in a single training run), given as ``{section: why}``; one line each, sorted by name."""
    values = cfg.to_flat()
    return [f"{n}={values[n]!r} has no effect: {why}" for section, why in unused_sections.items()
            for n in sorted(cfg.user_set) if n.startswith(f"{section}.")]
