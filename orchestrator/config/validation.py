"""Every invalid setting of a config at once, one line each: name, value, what is allowed, the fix.

Why all at once: a job that reports one problem per start costs a Ray start per typo; here the range and
choice checks of every section run on the whole tree (bad names and types already replaced by their
defaults, so these checks still run) and :class:`ConfigError` lists them together. The sparsity section
is checked by the library's own rules (:meth:`slak_model.sparsity.SparsityConfig.problems`), the model's
geometry later by building it (``orchestrator.preflight``); this module checks what only the orchestrator
knows (batch split over workers, resources, tracking).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Sequence
from typing import Any

from orchestrator.config.schema import ExperimentConfig
from slak_model.config import KERNEL_MODES

__all__ = [
    "AUTO_AUGMENT_KINDS",
    "BAD_IMAGE_POLICIES",
    "CROP_MODES",
    "DATA_SOURCES",
    "DISTILL_LOSSES",
    "FINETUNE_MASKS",
    "FINETUNE_WEIGHTS",
    "INTERPOLATIONS",
    "MODEL_VARIANTS",
    "PRECISIONS",
    "ConfigError",
    "invalid_settings",
    "is_slak_variant",
    "validate",
]

#: Registered model variants (timm names registered by ``slak_model``).
MODEL_VARIANTS: tuple[str, ...] = ("slak_test", "slak_tiny", "slak_small", "slak_base")
DATA_SOURCES: tuple[str, ...] = ("shapes", "synthetic", "imagenet")
INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest", "random")
BAD_IMAGE_POLICIES: tuple[str, ...] = ("error", "skip")
#: The first word of timm's augmentation specs (RandAugment, AugMix, AutoAugment policies, 3-Augment).
AUTO_AUGMENT_KINDS: tuple[str, ...] = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")
#: timm's eval crops: resize the short side to ``image_size / crop_pct`` and centre-crop (``center``, the
#: reference below 384 px), resize to the square (``squash``, the reference at 384 px with crop_pct 1), or
#: crop a fixed border (``border``).
CROP_MODES: tuple[str, ...] = ("center", "squash", "border")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
DISTILL_LOSSES: tuple[str, ...] = ("nkd", "kd")


def is_slak_variant(name: str) -> bool:
    """Whether ``name`` is one of our SLaK variants; any other model name is a timm model (checked by building
    it, before Ray starts)."""
    return name in MODEL_VARIANTS

FINETUNE_WEIGHTS: tuple[str, ...] = ("model", "ema")
FINETUNE_MASKS: tuple[str, ...] = ("keep", "reinit")


class ConfigError(ValueError):
    """One or more invalid settings; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str], context: str = "invalid experiment config") -> None:
        self.problems = list(problems)
        lines = "\n  - ".join(self.problems)
        super().__init__(f"{context} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"
                         f"\n  - {lines}")


def _odd_positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % 2 == 1


class _Checks:
    """Collects problems of one config: the range and choice checks every section uses, one line each."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg, self.out = cfg, []

    def choice(self, name: str, allowed: Iterable[str]) -> None:
        section, leaf = name.split(".")
        value = getattr(getattr(self.cfg, section), leaf)
        allowed = tuple(allowed)
        if value not in allowed:
            close = difflib.get_close_matches(str(value).lower(), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.out.append(f"{name}={value!r}: must be one of {list(allowed)}{hint}")

    def rng(self, name: str, lo: float | None, hi: float | None, *, lo_open: bool = False, hi_open: bool = False,
            why: str = "", optional: bool = False) -> None:
        section, leaf = name.split(".")
        value = getattr(getattr(self.cfg, section), leaf)
        if value is None and optional:
            return
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            left = ("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo:g}")
            right = ("inf" if hi is None else f"{hi:g}") + (")" if hi_open else "]")
            self.out.append(f"{name}={value!r}: must lie in {left}, {right}" + (f" ({why})" if why else ""))


def _model_problems(c: _Checks) -> None:
    m = c.cfg.model
    if not isinstance(m.variant, str) or not m.variant:
        c.out.append(f"model.variant={m.variant!r}: name a SLaK variant {list(MODEL_VARIANTS)} or a timm model "
                     "(e.g. convnext_tiny)")
    elif m.variant.lower().startswith("slak"):
        c.choice("model.variant", MODEL_VARIANTS)
    elif c.cfg.sparse.enabled:
        c.out.append(f"model.variant={m.variant!r} is a timm baseline and sparse.enabled=true: dynamic sparsity "
                     "works on SLaK's large kernels; set sparse.enabled=false (or train a SLaK variant)")
    c.rng("model.width_factor", 0, None, lo_open=True, optional=True, why="stage widths are int(dim * width_factor); paper: 1.3")
    ks = m.stage_kernels
    if ks is not None and (len(ks) != 4 or not all(_odd_positive(k_) for k_ in ks)):
        c.out.append(f"model.stage_kernels={m.stage_kernels!r}: must be 4 odd positive integers [M1, M2, M3, M4] "
                   "(the long edge of each stage's large kernel; odd keeps 'same' padding centred), e.g. "
                   "[51, 49, 47, 13], or null for the variant's own")
    for name in ("model.short_edge", "model.small_kernel"):
        value = getattr(m, name.split(".")[1])
        if value is not None and not _odd_positive(value):
            c.out.append(f"{name}={value!r}: must be an odd positive integer (paper: 5), or null for the "
                       "variant's own")
    c.choice("model.kernel_mode", KERNEL_MODES)
    c.rng("model.drop_path_rate", 0, 1, hi_open=True, why="paper: T 0.1, S 0.4, B 0.5")
    c.rng("model.layer_scale_init", 0, None, why="0 disables layer scale; paper 1e-6")
    c.rng("model.head_init_scale", 0, None, lo_open=True, why="multiplies a new head's initial weights; ConvNeXt "
          "fine-tunes 0.001")
    c.rng("model.num_classes", 1, None, optional=True, why="null = the dataset's class count")
    c.out += [f"sparse.{problem}" for problem in c.cfg.sparse.problems()]  # the library's checks, dotted


def _data_problems(c: _Checks) -> None:
    d = c.cfg.data
    c.choice("data.source", DATA_SOURCES)
    if d.source == "imagenet" and not d.path:
        c.out.append("data.path=None: data.source='imagenet' needs the folder holding train/ and val/; "
                   "set data.path=/path/to/imagenet or use data.source=shapes")
    c.rng("data.image_size", 32, None, why="the network downsamples 32x (stem 4x, three 2x stages)")
    c.rng("data.num_classes", 2, None)
    c.rng("data.train_size", 1, None)
    c.rng("data.val_size", 1, None)
    c.rng("data.workers", 0, None, why="loader processes per Ray worker; 0 = in-process")
    c.rng("data.reprob", 0, 1)
    for name, hi in (("data.crop_scale", 1.0), ("data.crop_ratio", None)):
        pair = getattr(d, name.split(".")[1])
        ok = (len(pair) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in pair)
              and pair[0] <= pair[1] and (hi is None or pair[1] <= hi))
        if not ok:
            what = ("fractions of the image area, 0 < min <= max <= 1 (ImageNet [0.08, 1]; small images "
                    "e.g. [0.6, 1])" if hi else "aspect ratios w/h, 0 < min <= max (ImageNet [0.75, 1.333])")
            c.out.append(f"{name}={pair!r}: must be [min, max] {what}")
    c.rng("data.hflip", 0, 1, why="probability; 0 for images whose mirror is another class (digits, text)")
    c.rng("data.vflip", 0, 1, why="probability; 0 unless upside-down images are the same class")
    c.rng("data.color_jitter", 0, None, why="strength of brightness/contrast/saturation jitter; 0 = off")
    aa = d.auto_augment
    if aa and (not isinstance(aa, str) or aa.split("-")[0] not in AUTO_AUGMENT_KINDS):
        c.out.append(f"data.auto_augment={aa!r}: must be a timm augmentation spec starting with one of "
                     f"{list(AUTO_AUGMENT_KINDS)} (e.g. rand-m9-mstd0.5-inc1, or rand-m5-n1 for a milder one), "
                     "or '' / null to turn it off")
    c.choice("data.interpolation", INTERPOLATIONS)
    c.rng("data.crop_pct", 0, 1, lo_open=True)
    c.choice("data.crop_mode", CROP_MODES)
    for name in ("data.mixup", "data.cutmix", "data.smoothing"):
        c.rng(name, 0, None)
    c.rng("data.smoothing", 0, 1, hi_open=True)
    c.rng("data.mixup_prob", 0, 1)
    c.rng("data.mixup_switch_prob", 0, 1)
    c.choice("data.on_bad_image", BAD_IMAGE_POLICIES)


def _train_problems(c: _Checks) -> None:
    cfg, t, r = c.cfg, c.cfg.train, c.cfg.run
    c.rng("train.epochs", 1, None)
    c.rng("train.global_batch_size", 1, None, why="effective batch across workers and accumulation; paper 4096")
    c.rng("train.micro_batch_size", 1, None, optional=True)
    c.rng("run.num_workers", 1, None, optional=True, why="null = fit the cluster (one per GPU, else 2)")
    workers = cfg.workers
    if all(isinstance(x, int) and x > 0 for x in (t.global_batch_size, workers)) and \
            (t.micro_batch_size is None or t.micro_batch_size > 0):
        micro = cfg.micro_batch_size
        per_step = micro * workers
        if t.global_batch_size % per_step:
            fit = [b for b in range(1, t.global_batch_size + 1)
                   if t.global_batch_size % (b * workers) == 0][-3:]
            c.out.append(
                f"train.global_batch_size={t.global_batch_size}: not divisible by train.micro_batch_size "
                f"({micro}) x run.num_workers ({workers}) = {per_step}; gradient accumulation needs an "
                f"exact multiple so the effective batch does not change with the worker count; use e.g. "
                f"train.micro_batch_size in {fit or ['(none fits: change run.num_workers)']}")
    c.rng("train.lr", 0, None, lo_open=True, why="absolute, for the global batch; paper 4e-3 at 4096")
    lr_valid = isinstance(t.lr, (int, float)) and math.isfinite(t.lr) and t.lr > 0
    # the floor is checked against train.lr only when that is valid: a bad lr is one problem, not two
    c.rng("train.min_lr", 0, t.lr if lr_valid else None, why="cosine floor, at most train.lr")
    c.rng("train.warmup_epochs", 0, t.epochs, why="at most train.epochs; paper 20")
    c.rng("train.weight_decay", 0, None)
    c.rng("train.layer_decay", 0, 1, lo_open=True, why="learning-rate factor per depth group; 1 = off, ConvNeXt "
          "fine-tunes 0.7-0.8")
    c.rng("train.opt_eps", 0, None, lo_open=True)
    if len(t.opt_betas) != 2 or not all(0 <= b < 1 for b in t.opt_betas):
        c.out.append(f"train.opt_betas={t.opt_betas!r}: must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    c.rng("train.clip_grad", 0, None, lo_open=True, optional=True, why="max grad norm; null disables")
    c.choice("train.precision", PRECISIONS)
    if t.precision == "fp16" and r.use_gpu is False:
        c.out.append("train.precision='fp16' with run.use_gpu=false: fp16 autocast is a GPU mode; use "
                   "train.precision=bf16 (or fp32) on CPU")
    c.rng("train.ema_decay", 0, 1, hi_open=True)
    c.rng("train.bn_recalibration_batches", 0, None, why="0 = off")
    c.rng("train.log_every_steps", 1, None)
    c.rng("train.checkpoint_every_steps", 0, None, why="0 = one checkpoint per epoch only")
    c.rng("train.eval_every_epochs", 1, None)


def _finetune_problems(c: _Checks) -> None:
    f = c.cfg.finetune
    if f.checkpoint is not None and not str(f.checkpoint).strip():
        c.out.append("finetune.checkpoint='': give the checkpoint to start from (a checkpoint folder, its "
                     "state.pt or a released .pth), or null to train from scratch")
    c.choice("finetune.weights", FINETUNE_WEIGHTS)
    c.choice("finetune.masks", FINETUNE_MASKS)


def _run_tracking_tune_problems(c: _Checks) -> None:
    r, k = c.cfg.run, c.cfg.tracking
    c.rng("run.cpus_per_worker", 1, None)
    c.rng("run.gpus_per_worker", 0, None, lo_open=True, why="below 1 shares a GPU between trials, e.g. 0.25")
    gpw = r.gpus_per_worker
    if isinstance(gpw, (int, float)) and gpw > 1 and not float(gpw).is_integer():
        c.out.append(f"run.gpus_per_worker={r.gpus_per_worker}: above 1 it must be a whole number of GPUs")
    if not r.storage_path:
        c.out.append("run.storage_path='': must name a (shared) directory for checkpoints, e.g. "
                   "run.storage_path=/shared/ray_results")
    if r.name and any(ch in r.name for ch in "/\\ "):
        c.out.append(f"run.name={r.name!r}: must not contain '/', '\\' or spaces (it is a folder name)")
    c.rng("run.max_failures", -1, None, why="-1 = retry forever")
    c.rng("run.checkpoints_to_keep", 1, None)
    c.rng("run.wait_for_resources_s", 0, None, why="seconds an autoscaling cluster (--address) gets to grow; 0 = "
          "refuse at once what does not fit")

    if k.enabled and not k.uri:
        c.out.append("tracking.uri='': set an MLflow URI (sqlite:///abs/path/mlflow.db or http://host:5000) "
                   "or tracking.enabled=false")
    c.rng("tracking.log_every_steps", 1, None)
    c.rng("tracking.masks_every_updates", 0, None, why="0 = masks only at the end")

    c.rng("tune.max_concurrent_trials", 1, None, optional=True, why="unset = as many as fit")
    c.rng("tune.grace_period", 1, None)
    c.rng("tune.seeds", 1, None)
    c.rng("tune.trial_max_failures", -1, None)


def _distill_problems(c: _Checks) -> None:
    d = c.cfg.distill
    if d.teacher is not None and (not isinstance(d.teacher, str) or not d.teacher.strip()):
        c.out.append(f"distill.teacher={d.teacher!r}: name the teacher, a SLaK variant {list(MODEL_VARIANTS)} or "
                     "a timm model, or null for no distillation")
    elif d.teacher and d.teacher.lower().startswith("slak") and not is_slak_variant(d.teacher):
        close = difflib.get_close_matches(d.teacher.lower(), MODEL_VARIANTS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        c.out.append(f"distill.teacher={d.teacher!r}: must be one of {list(MODEL_VARIANTS)} or a timm model{hint}")
    if d.enabled and not d.teacher_checkpoint:
        c.out.append(f"distill.teacher={d.teacher!r} needs distill.teacher_checkpoint=PATH (the teacher's trained "
                     "weights: an official SLaK checkpoint, a checkpoint of our runs or a timm weights file)")
    c.choice("distill.loss", DISTILL_LOSSES)
    c.rng("distill.temperature", 0, None, lo_open=True, why="softens both distributions; official NKD runs 1")
    c.rng("distill.gamma", 0, None, why="weight of NKD's non-target term; official SLaK 1.0, NKD paper 1.5")
    c.rng("distill.ce_weight", 0, None, optional=True, why="null = the loss's official value (nkd 0, kd 0.9)")
    c.rng("distill.kd_weight", 0, None, lo_open=True, optional=True,
          why="null = the loss's official value (nkd 1, kd 0.1)")


def invalid_settings(cfg: ExperimentConfig) -> list[str]:
    """Every invalid setting of ``cfg``, one line each: name, value, what is allowed, the fix."""
    checks = _Checks(cfg)
    for section in (_model_problems, _data_problems, _train_problems, _distill_problems, _finetune_problems,
                    _run_tracking_tune_problems):
        section(checks)
    return checks.out


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every setting; return ``cfg`` unchanged.

    Raises:
        ConfigError: listing all problems at once.
    """
    problems = invalid_settings(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg
