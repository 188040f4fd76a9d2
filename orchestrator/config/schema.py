"""The schema: every setting of a training job as one frozen dataclass tree, and its flat dotted form.

Every setting has exactly one dotted name (``sparse.sparsity``, ``train.global_batch_size``) that is at
once the YAML key path, the CLI override ``key=value``, the Ray Tune search-space key and the MLflow
param name. The frozen tree itself crosses process boundaries (Ray Train workers, Tune trials); the flat
form (:meth:`ExperimentConfig.to_flat`) is what MLflow params, grid-point overrides and run identities
are made of.

The library's typed settings are the source of the schema: the ``sparse`` section *is* a
:class:`slak_model.sparsity.SparsityConfig` (a field added there is ``sparse.<field>`` everywhere at once,
checked by the library's own rules), and the ``model`` section holds :class:`slak_model.SLaKConfig`
fields under their own names. Both import without torch, so a bad config fails in a fraction of a second.

Building a section does not check it: :mod:`orchestrator.config.validation` checks the whole tree at
once, so that one error lists every problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slak_model.sparsity.config import SparsityConfig

__all__ = [
    "CPU_DEFAULT_WORKERS",
    "DISTILL_LOSS_WEIGHTS",
    "MODEL_ALIASES",
    "SECTIONS",
    "DataConfig",
    "DistillConfig",
    "ExperimentConfig",
    "FinetuneConfig",
    "ModelConfig",
    "RunConfig",
    "SparseConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "setting_names",
]


def _cwd_path(name: str) -> str:
    return str(Path.cwd().absolute() / name)


def _default_tracking_uri() -> str:
    """A local sqlite store beside the current directory (MLflow's file store is disabled in 3.x)."""
    return f"sqlite:///{_cwd_path('mlflow.db')}"


@dataclass(frozen=True)
class ModelConfig:
    """The network: ``slak_model.create_model(variant, **overrides)``.

    Every field but ``variant`` is the :class:`slak_model.SLaKConfig` field of the same name; None means
    the variant's own value (``width_factor`` 1.3 and kernels 51-49-47-13 with N = 5 for T/S/B), and
    ``num_classes`` None takes the dataset's. ``stage_kernels`` are the four long edges M1..M4, ``short_edge``
    the N of the decomposed ``M x N`` strips, ``small_kernel`` the side of the parallel square kernel (a
    stage gets it only when it is smaller than the stage's M; ``kernel_mode=naive`` has none).
    ``head_init_scale`` multiplies the classifier's initial weights (ConvNeXt's fine-tunes use 0.001 for a
    new head); a head loaded from ``finetune.checkpoint`` is not rescaled.

    The reference's five numbers ``kernel_size: [M1, M2, M3, M4, N]`` are accepted as input (YAML, CLI,
    grid points; see :data:`MODEL_ALIASES`) and set ``stage_kernels``, ``short_edge`` and ``small_kernel``
    (= N), as ``SLaKConfig`` does; the flat form and MLflow show the three fields.

    ``variant`` may also name a timm model (``convnext_tiny``, ``test_convnext``): a baseline such as a
    distillation student (``orchestrator.networks``). It takes ``drop_path_rate``, ``num_classes`` and, for
    ConvNeXt, ``layer_scale_init``; the SLaK geometry fields and dynamic sparsity do not apply to it.
    """

    variant: str = "slak_test"
    width_factor: float | None = None
    stage_kernels: list[int] | None = None
    short_edge: int | None = None
    small_kernel: int | None = None
    kernel_mode: str = "decomposed"
    use_bn: bool = True
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6
    head_init_scale: float = 1.0
    num_classes: int | None = None


#: Input-only names: the reference's ``model.kernel_size`` shorthand and the typed fields it sets.
MODEL_ALIASES: dict[str, tuple[str, ...]] = {
    "model.kernel_size": ("model.stage_kernels", "model.short_edge", "model.small_kernel"),
}


@dataclass(frozen=True)
class SparseConfig(SparsityConfig):
    """Dynamic sparsity: the library's :class:`~slak_model.sparsity.SparsityConfig`, field for field.

    Being that class (not a copy of its fields), a setting added to the library is ``sparse.<field>`` in
    YAML, CLI overrides, Tune points and MLflow params with no edit here, and is checked by the library's
    own rules. Two differences: ``enabled`` (False trains dense), and ``seed`` None, which follows
    ``train.seed`` (:attr:`ExperimentConfig.sparse_seed`). Building one does not validate it, so that
    :func:`~orchestrator.config.validation.validate` reports its problems together with the rest of the
    experiment's; values are taken as given (the library's ``ERK`` spelling is not rewritten but suggested
    as ``erk``). The engine gets :meth:`engine_config`, a plain ``SparsityConfig`` with the seed resolved.
    """

    seed: int | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        """No checks here: validation runs :meth:`problems` with the whole experiment config."""

    def _seed_problem(self) -> str | None:
        return None if self.seed is None else super()._seed_problem()

    def engine_config(self, seed: int) -> SparsityConfig:
        """The settings the engine takes (``enabled`` dropped, ``seed`` resolved); validated on creation."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SparsityConfig)}
        values["seed"] = seed
        return SparsityConfig(**values)


@dataclass(frozen=True)
class DataConfig:
    """Dataset and augmentation (``orchestrator.data``); sizes apply to generated sources only.

    The training augmentation of an image folder is timm's ``create_transform`` with these arguments, the
    ImageNet recipe by default: ``RandomResizedCrop`` over ``crop_scale`` of the area and ``crop_ratio``
    aspect ratios, flips with probabilities ``hflip``/``vflip``, RandAugment ``auto_augment`` (a timm spec
    such as ``rand-m9-mstd0.5-inc1``; "" or null turns it off), ``color_jitter`` (timm applies it only
    without RandAugment), then random erasing ``reprob``. Small or non-photographic images usually want a
    milder crop and no flips (``docs/finetune.md``). ``crop_pct``/``crop_mode``/``interpolation`` shape the
    eval transform (and ``interpolation`` the training resize too).
    """

    source: str = "shapes"
    path: str | None = None
    image_size: int = 32
    num_classes: int = 10
    train_size: int = 512
    val_size: int = 128
    workers: int = 0
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333333333333])
    hflip: float = 0.5
    vflip: float = 0.0
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    reprob: float = 0.25
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    on_bad_image: str = "error"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe (spec section 4). ``micro_batch_size`` None = no accumulation.

    ``layer_decay`` < 1 scales each parameter's learning rate by ``layer_decay ** (13 - layer)``, the
    ConvNeXt fine-tuning rule over 14 depth groups (stem 0 ... last stage 12, norm and head 13): early layers
    move least. 1.0 = one learning rate for all.
    """

    epochs: int = 2
    global_batch_size: int = 32
    micro_batch_size: int | None = None
    lr: float = 4e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    opt_eps: float = 1e-8
    opt_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    clip_grad: float | None = None
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    ema: bool = True
    ema_decay: float = 0.9999
    bn_recalibration_batches: int = 0
    seed: int = 0
    log_every_steps: int = 10
    checkpoint_every_steps: int = 0
    eval_every_epochs: int = 1


#: Official values of each distillation loss where ``distill.ce_weight`` / ``distill.kd_weight`` are None:
#: the SLaK repository's NKD is the NKD loss alone (its target term is the cross-entropy with the true
#: class, weighted by the teacher's confidence); its KD is ``alpha * KD + (1 - alpha) * CE`` with alpha 0.1.
DISTILL_LOSS_WEIGHTS: dict[str, tuple[float, float]] = {"nkd": (0.0, 1.0), "kd": (0.9, 0.1)}


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher (``orchestrator.distill``); off while ``teacher`` is None.

    The student is ``model.*``; the teacher is ``teacher`` (a SLaK variant or a timm model name) with the
    weights of ``teacher_checkpoint``: an official SLaK checkpoint, a checkpoint folder or ``state.pt`` of
    this project's training runs (whose ``model.*`` settings rebuild the teacher), or a timm weights file.
    ``teacher_ema`` takes the checkpoint's EMA weights instead of its model weights (the official
    large-to-small runs use the model weights).

    The loss is ``ce_weight * CE(student, labels) + kd_weight * D(student, teacher)``, with ``D`` the
    ``loss``: ``nkd`` (Normalized KD: the teacher-weighted target-class term plus ``gamma * T^2`` times the
    cross-entropy of the normalised non-target distributions at temperature ``T``) or ``kd`` (Hinton's
    ``T^2 * KL``). ``ce_weight`` / ``kd_weight`` None take the loss's official values
    (:data:`DISTILL_LOSS_WEIGHTS`); CE is the job's usual criterion (soft targets under Mixup).
    """

    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_ema: bool = False
    loss: str = "nkd"
    temperature: float = 1.0
    gamma: float = 1.0
    ce_weight: float | None = None
    kd_weight: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)

    def weights(self) -> tuple[float, float]:
        """``(ce_weight, kd_weight)`` with the loss's official values for those left None."""
        ce, kd = DISTILL_LOSS_WEIGHTS.get(self.loss, (0.0, 1.0))
        return (ce if self.ce_weight is None else self.ce_weight, kd if self.kd_weight is None else self.kd_weight)


@dataclass(frozen=True)
class FinetuneConfig:
    """Start a training job from a checkpoint's weights: a fresh optimizer, schedule and run, not a resume.

    ``checkpoint`` None trains from scratch. Otherwise every weight of the checkpoint is loaded (ours: a
    checkpoint folder or its ``state.pt``; a released ``.pth``), except a classifier for another class
    count, which is re-initialised (scaled by ``model.head_init_scale``); another architecture is refused
    before Ray starts. ``weights`` picks the trained weights (``model``) or their EMA (``ema``). With
    ``sparse.enabled``, ``masks=keep`` continues from the checkpoint's sparse pattern (its saved masks, or
    the zeros of a released file's weights) and ``masks=reinit`` draws new masks by ``sparse.init``;
    ``sparse.enabled=false`` trains every weight (dense).
    """

    checkpoint: str | None = None
    weights: str = "model"
    masks: str = "keep"


#: Workers of a CPU job when ``run.num_workers`` is left to fit the cluster.
CPU_DEFAULT_WORKERS = 2


@dataclass(frozen=True)
class RunConfig:
    """Where and how the Ray Train job runs; ``name`` "" = derived from the config (same config, same run).

    ``use_gpu`` "auto" takes GPUs when the cluster has them; ``num_workers`` None fits the resources: one
    worker per GPU on GPUs (one per trial when ``gpus_per_worker`` < 1 shares a GPU between trials),
    ``CPU_DEFAULT_WORKERS`` on CPUs. Both are resolved against the cluster before any trial starts
    (``orchestrator.ray_cluster.fit_resources``); a request that can never fit is an error, unless
    ``wait_for_resources_s`` > 0 on a joined cluster: an autoscaling cluster is then given that long to grow.
    """

    name: str = ""
    num_workers: int | None = None
    use_gpu: bool | Literal["auto"] = "auto"
    gpus_per_worker: float = 1.0
    cpus_per_worker: int = 1
    storage_path: str = field(default_factory=lambda: _cwd_path("ray_results"))
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    wait_for_resources_s: float = 0.0


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow on rank 0 (``orchestrator.tracking``)."""

    enabled: bool = True
    uri: str = field(default_factory=_default_tracking_uri)
    experiment: str = "slak"
    log_every_steps: int = 10
    masks_every_updates: int = 1
    offline_dir: str = field(default_factory=lambda: _cwd_path("mlflow-offline"))


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune grids (``orchestrator.tune_runner``). ``max_concurrent_trials`` None = as many trials at once
    as the cluster's CPUs and GPUs hold (a local Ray has the machine's CPUs)."""

    max_concurrent_trials: int | None = None
    asha: bool = False
    grace_period: int = 1
    seeds: int = 1
    trial_max_failures: int = 0


#: Section name -> its dataclass, in the order of the flat form.
SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "sparse": SparseConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "distill": DistillConfig,
    "finetune": FinetuneConfig,
    "run": RunConfig,
    "tracking": TrackingConfig,
    "tune": TuneConfig,
}


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole job. Build it with :func:`~orchestrator.config.loading.load_config`, :meth:`from_flat` or
    :func:`~orchestrator.config.loading.replace` (they validate)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    #: Dotted names the user set (preset, ``key=value`` overrides) to a value other than the default. Only
    #: these are reported as having no effect (:func:`~orchestrator.config.ignored.ignored_settings`): a
    #: default that a mode does not use is no mistake. Not a setting: absent from the flat form, identities
    #: and comparisons.
    user_set: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    # ------------------------------------------------------------------ flat views
    def to_flat(self) -> dict[str, Any]:
        """``{"section.field": value}`` with JSON/YAML-able values (lists, never tuples)."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                out[f"{section}.{f.name}"] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_flat`; missing names take their defaults. Validates
        (:func:`orchestrator.config.loading.from_flat`).

        Raises:
            ConfigError: unknown names (with the nearest valid one), wrong types or bad values.
        """
        # imported here: building validates, and validation is written against this schema
        from orchestrator.config.loading import from_flat

        return from_flat(flat)

    @property
    def workers(self) -> int:
        """``run.num_workers``, or the CPU default while it is still to be fitted to the cluster."""
        return self.run.num_workers or CPU_DEFAULT_WORKERS

    @property
    def micro_batch_size(self) -> int:
        """Per-worker batch of one forward pass."""
        t = self.train
        return t.micro_batch_size or max(1, t.global_batch_size // max(1, self.workers))

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step, so the effective batch is the same on any worker count."""
        return max(1, self.train.global_batch_size // (self.micro_batch_size * max(1, self.workers)))

    @property
    def sparse_seed(self) -> int:
        """Seed of the sparsity engine (``sparse.seed`` or, when None, ``train.seed``)."""
        return self.train.seed if self.sparse.seed is None else self.sparse.seed


def setting_names() -> list[str]:
    """Every dotted name of the schema, section by section (input-only aliases not included)."""
    return [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]
