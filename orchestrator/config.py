"""``ExperimentConfig``: every setting of a training job as one frozen, validated dataclass tree.

Why one tree: the reference threads an ``argparse`` namespace through everything and packs unrelated
numbers into one flag. Here every setting has exactly one dotted name (``sparse.sparsity``,
``train.global_batch_size``) that is at once the YAML key path, the CLI override ``key=value``, the Ray
Tune search-space key and the MLflow param name. The frozen tree itself crosses process boundaries (Ray
Train workers, Tune trials); the flat form (:meth:`ExperimentConfig.to_flat`) is what MLflow params,
grid-point overrides and run identities are made of.

Validation happens once, before Ray starts, and reports every problem together (name, value, what is
allowed, the fix); a typo in a key suggests the nearest valid name.

The library's typed settings are the source of the schema: the ``sparse`` section *is* a
:class:`slak_model.sparsity.SparsityConfig` (a field added there is ``sparse.<field>`` everywhere at once,
checked by the library's own rules), and the ``model`` section holds :class:`slak_model.SLaKConfig`
fields under their own names. Both import without torch, so a bad config fails in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import typing
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from slak_model.config import KERNEL_MODES
from slak_model.sparsity.config import SparsityConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "RunConfig",
    "SparseConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "MODEL_VARIANTS",
    "MODEL_ALIASES",
    "expand_aliases",
    "ignored_settings",
    "load_config",
    "parse_overrides",
    "replace",
    "to_yaml",
    "validate",
    "warn_newly_ignored",
]

logger = logging.getLogger(__name__)

#: Registered model variants (timm names registered by ``slak_model``).
MODEL_VARIANTS: tuple[str, ...] = ("slak_test", "slak_tiny", "slak_small", "slak_base")
DATA_SOURCES: tuple[str, ...] = ("shapes", "synthetic", "imagenet")
INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest", "random")
BAD_IMAGE_POLICIES: tuple[str, ...] = ("error", "skip")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """One or more invalid settings; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str], context: str = "invalid experiment config") -> None:
        self.problems = list(problems)
        lines = "\n  - ".join(self.problems)
        super().__init__(f"{context} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"
                         f"\n  - {lines}")


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

    The reference's five numbers ``kernel_size: [M1, M2, M3, M4, N]`` are accepted as input (YAML, CLI,
    grid points; see :data:`MODEL_ALIASES`) and set ``stage_kernels``, ``short_edge`` and ``small_kernel``
    (= N), as ``SLaKConfig`` does; the flat form and MLflow show the three fields.
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
    :func:`validate` reports its problems together with the rest of the experiment's; values are taken
    as given (the library's ``ERK`` spelling is not rewritten but suggested as ``erk``). The engine gets
    :meth:`engine_config`, a plain ``SparsityConfig`` with the seed resolved.
    """

    seed: int | None = None
    enabled: bool = True

    def __post_init__(self) -> None:
        """No checks here: :func:`validate` runs :meth:`problems` with the whole experiment config."""

    def _seed_problem(self) -> str | None:
        return None if self.seed is None else super()._seed_problem()

    def engine_config(self, seed: int) -> SparsityConfig:
        """The settings the engine takes (``enabled`` dropped, ``seed`` resolved); validated on creation."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SparsityConfig)}
        values["seed"] = seed
        return SparsityConfig(**values)


@dataclass(frozen=True)
class DataConfig:
    """Dataset and augmentation (``orchestrator.data``); sizes apply to generated sources only."""

    source: str = "shapes"
    path: str | None = None
    image_size: int = 32
    num_classes: int = 10
    train_size: int = 512
    val_size: int = 128
    workers: int = 0
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    on_bad_image: str = "error"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe (spec section 4). ``micro_batch_size`` None = no accumulation."""

    epochs: int = 2
    global_batch_size: int = 32
    micro_batch_size: int | None = None
    lr: float = 4e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
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


#: Workers of a CPU job when ``run.num_workers`` is left to fit the cluster.
CPU_DEFAULT_WORKERS = 2


@dataclass(frozen=True)
class RunConfig:
    """Where and how the Ray Train job runs; ``name`` "" = derived from the config (same config, same run).

    ``use_gpu`` "auto" takes GPUs when the cluster has them; ``num_workers`` None fits the resources: one
    worker per GPU on GPUs (one per trial when ``gpus_per_worker`` < 1 shares a GPU between trials),
    ``CPU_DEFAULT_WORKERS`` on CPUs. Both are resolved against the cluster before any trial starts
    (``orchestrator.ray_cluster.fit_resources``); a request that can never fit is an error.
    """

    name: str = ""
    num_workers: int | None = None
    use_gpu: bool | Literal["auto"] = "auto"
    gpus_per_worker: float = 1.0
    cpus_per_worker: int = 1
    storage_path: str = field(default_factory=lambda: _cwd_path("ray_results"))
    max_failures: int = 0
    checkpoints_to_keep: int = 2


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


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "sparse": SparseConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "run": RunConfig,
    "tracking": TrackingConfig,
    "tune": TuneConfig,
}


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole job. Build it with :func:`load_config`, :meth:`from_flat` or :func:`replace` (they validate)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    #: Dotted names the user set (preset, ``key=value`` overrides) to a value other than the default. Only
    #: these are reported as having no effect (:func:`ignored_settings`): a default that a mode does not
    #: use is no mistake. Not a setting: absent from the flat form, identities and comparisons.
    user_set: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    # ------------------------------------------------------------------ flat views
    def to_flat(self) -> dict[str, Any]:
        """``{"section.field": value}`` with JSON/YAML-able values (lists, never tuples)."""
        out: dict[str, Any] = {}
        for section in _SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                out[f"{section}.{f.name}"] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> ExperimentConfig:
        """Inverse of :meth:`to_flat`; missing names take their defaults. Validates.

        Raises:
            ConfigError: unknown names (with the nearest valid one), wrong types or bad values.
        """
        problems: list[str] = []
        return _build(_expand_aliases(flat, problems), problems)

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


# ---------------------------------------------------------------------- coercion
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(section_cls: type) -> dict[str, Any]:
    if section_cls not in _HINTS:
        _HINTS[section_cls] = typing.get_type_hints(section_cls)
    return _HINTS[section_cls]


def _describe(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if len(args) > 1:  # a union such as ``bool | Literal["auto"]``
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {args[0].__name__}" if args else "a list"
    if args and origin is not list:
        inner = _describe(args[0])
        return f"{inner} or null" if type(None) in typing.get_args(tp) else inner
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Convert ``value`` to the annotated type; raise TypeError when it cannot be done losslessly."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner)
    if origin is typing.Literal:
        if value in args:
            return value
        raise TypeError
    if len(args) > 1 and origin is not list:  # a union: the first member that takes the value
        for member in args:
            try:
                return _coerce(value, member)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_coerce(v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            number = float(value)
            if number.is_integer():
                return int(number)
        raise TypeError
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)  # accepts "4e-3", which YAML 1.1 reads as a string
        raise TypeError
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    raise TypeError


def _all_names() -> list[str]:
    return [f"{s}.{f.name}" for s, c in _SECTIONS.items() for f in dataclasses.fields(c)]


def _unknown_problem(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    known = [*_all_names(), *MODEL_ALIASES]
    close = [n for n in known if n.endswith("." + leaf)][:1]  # right field, wrong section
    if not close:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid sections: {list(_SECTIONS)}"
    return f"{name}: unknown setting{hint}"


def _expand_aliases(layer: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """One layer of input (a YAML file, the CLI overrides, one set of updates) with the reference's
    ``model.kernel_size`` shorthand replaced by the typed fields it sets.

    Layers are expanded one at a time, so a later layer's shorthand or field overrides an earlier
    layer's; within one layer, the shorthand together with one of its fields is a problem (which one
    was meant is unknown).
    """
    out = {str(k): v for k, v in layer.items()}
    for alias, targets in MODEL_ALIASES.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        both = [t for t in targets if t in out]
        if both:
            problems.append(
                f"{alias}={value!r} and {', '.join(f'{t}={out[t]!r}' for t in both)} are both given: "
                f"{alias} is the reference's shorthand [M1, M2, M3, M4, N] that sets {', '.join(targets)}; "
                f"give either the shorthand or the fields")
            continue
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if value is None:
            out.update(dict.fromkeys(targets))
        elif isinstance(value, (list, tuple)) and len(value) == 5:
            stage_kernels, short_edge = list(value[:4]), value[4]
            out.update(zip(targets, (stage_kernels, short_edge, short_edge), strict=True))
        else:
            problems.append(
                f"{alias}={value!r}: the reference's shorthand needs exactly 5 numbers [M1, M2, M3, M4, N] "
                "(four stage kernels, then the short edge, which is also the small kernel), e.g. "
                f"[51, 49, 47, 13, 5]; or set {', '.join(targets)} one by one")
    return out


def expand_aliases(layer: Mapping[str, Any]) -> dict[str, Any]:
    """``layer`` with the input-only names of :data:`MODEL_ALIASES` replaced by the fields they set.

    Raises:
        ConfigError: a shorthand given together with one of its fields, or not 5 numbers.
    """
    problems: list[str] = []
    out = _expand_aliases(layer, problems)
    if problems:
        raise ConfigError(problems)
    return out


def _build(flat: Mapping[str, Any], problems: list[str] | None = None, *,
           given: Iterable[str] | None = None, defaults: Mapping[str, Any] | None = None,
           preset_only: Collection[str] = (), unused_sections: Mapping[str, str] | None = None
           ) -> ExperimentConfig:
    """The validated config of alias-free dotted names; ``problems`` already found are reported with it.

    With ``given`` (the names the user wrote), those whose value differs from ``defaults`` (the flat
    defaults the user started from) become :attr:`ExperimentConfig.user_set`, and the settings among
    them that would have no effect are reported: errors with the other problems, warnings logged once
    the config is valid (``preset_only``: see :func:`ignored_settings`). ``unused_sections`` names whole
    sections the caller never reads, with why.
    """
    problems = list(problems or [])
    per_section: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for name, value in flat.items():
        section, _, leaf = str(name).partition(".")
        cls = _SECTIONS.get(section)
        if cls is None or leaf not in _hints(cls):
            problems.append(_unknown_problem(str(name)))
            continue
        tp = _hints(cls)[leaf]
        try:
            per_section[section][leaf] = _coerce(value, tp)
        except (TypeError, ValueError):
            problems.append(f"{name}={value!r}: must be {_describe(tp)}; fix the type, e.g. "
                            f"{name}={_example(cls, leaf)!r}")
    # Bad names and types keep their defaults so the value checks below still run: one error lists all.
    cfg = ExperimentConfig(**{s: _SECTIONS[s](**kw) for s, kw in per_section.items()})
    problems += _problems(cfg)
    warnings: list[str] = []
    if given is not None:
        base = ExperimentConfig().to_flat() if defaults is None else defaults
        values = cfg.to_flat()
        user_set = frozenset(n for n in given if n in values and values[n] != base.get(n))
        cfg = dataclasses.replace(cfg, user_set=user_set)
        errors, warnings = ignored_settings(cfg, preset_only)
        problems += errors
        for section, why in (unused_sections or {}).items():
            warnings += [f"{n}={values[n]!r} has no effect: {why}" for n in sorted(user_set)
                         if n.startswith(f"{section}.")]
    if problems:
        raise ConfigError(problems)
    for line in warnings:
        logger.warning("%s", line)
    return cfg


def _default_flat(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The flat defaults with an embedded defaults layer applied (values coerced, bad ones left out: the
    layer itself is validated as part of the config)."""
    out = ExperimentConfig().to_flat()
    for name, value in defaults.items():
        section, _, leaf = str(name).partition(".")
        cls = _SECTIONS.get(section)
        if cls is None or leaf not in _hints(cls):
            continue
        try:
            out[name] = _coerce(value, _hints(cls)[leaf])
        except (TypeError, ValueError):
            continue
    return out


def _example(cls: type, leaf: str) -> Any:
    default = cls()
    return getattr(default, leaf)


# ---------------------------------------------------------------------- validation
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
    c.choice("model.variant", MODEL_VARIANTS)
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
    c.choice("data.interpolation", INTERPOLATIONS)
    c.rng("data.crop_pct", 0, 1, lo_open=True)
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

    if k.enabled and not k.uri:
        c.out.append("tracking.uri='': set an MLflow URI (sqlite:///abs/path/mlflow.db or http://host:5000) "
                   "or tracking.enabled=false")
    c.rng("tracking.log_every_steps", 1, None)
    c.rng("tracking.masks_every_updates", 0, None, why="0 = masks only at the end")

    c.rng("tune.max_concurrent_trials", 1, None, optional=True, why="unset = as many as fit")
    c.rng("tune.grace_period", 1, None)
    c.rng("tune.seeds", 1, None)
    c.rng("tune.trial_max_failures", -1, None)


def _problems(cfg: ExperimentConfig) -> list[str]:
    """Every invalid setting of ``cfg``, one line each: name, value, what is allowed, the fix."""
    checks = _Checks(cfg)
    for section in (_model_problems, _data_problems, _train_problems, _run_tracking_tune_problems):
        section(checks)
    return checks.out


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check every setting; return ``cfg`` unchanged.

    Raises:
        ConfigError: listing all problems at once.
    """
    problems = _problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


# ---------------------------------------------------------------------- settings without effect
#: Generated sources (``orchestrator.datasets_procedural``) render their images: no file is read and
#: none of timm's transforms run, so these settings apply to ``data.source=imagenet`` only.
_IMAGE_FOLDER_ONLY: tuple[str, ...] = ("data.auto_augment", "data.interpolation", "data.crop_pct",
                                       "data.on_bad_image")
#: Sizes of the generated sources; an image folder has the images it has.
_GENERATED_ONLY: tuple[str, ...] = ("data.train_size", "data.val_size")
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
    if cfg.model.kernel_mode != "decomposed":
        flag(warnings, ["model.short_edge"], f"model.kernel_mode={cfg.model.kernel_mode!r} has square "
             "kernels; the short edge of the strips applies to kernel_mode=decomposed only")
    if cfg.model.kernel_mode == "naive":
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


# ---------------------------------------------------------------------- building
def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested YAML sections (or already dotted keys) -> ``{"section.field": value}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "." not in name:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.stage_kernels=[51,49,47,13]"]`` -> dict (values parsed as YAML).

    Raises:
        ConfigError: items without ``=``.
    """
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out: dict[str, Any] = {}
    bad = []
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            bad.append(f"{item!r}: overrides are dotted key=value pairs, e.g. train.epochs=10")
            continue
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    if bad:
        raise ConfigError(bad)
    return out


def load_config(path: str | Path | None = None,
                overrides: Sequence[str] | Mapping[str, Any] | None = None, *,
                defaults: Mapping[str, Any] | None = None,
                unused_sections: Mapping[str, str] | None = None) -> ExperimentConfig:
    """Defaults <- ``defaults`` <- YAML preset (nested sections or dotted keys) <- dotted overrides, then
    validate.

    What the preset and the overrides set to a non-default value is the user's
    (:attr:`ExperimentConfig.user_set`); such a setting that would have no effect is an error when the
    run would silently differ from what was asked (``data.path`` with a generated source), else a
    logged warning (:func:`ignored_settings`).

    Args:
        path: A YAML preset, or None.
        overrides: Dotted ``key=value`` items or a mapping; they win over the preset.
        defaults: An embedded defaults layer under the preset (a script's built-in default). Its values
            count as defaults: a setting of it that a mode does not use is not reported.
        unused_sections: Sections the caller never reads, with why (e.g. ``tune`` in a single training
            run); settings the user gives in them are warned about.

    Raises:
        ConfigError: a missing/unreadable preset, unknown keys, wrong types, invalid values or settings
            that would silently have no effect.
    """
    problems: list[str] = []
    flat: dict[str, Any] = _expand_aliases(defaults or {}, problems)
    given: set[str] = set()
    preset: set[str] = set()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"--config {str(p)!r}: no such file; presets live in experiments/configs/"])
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"--config {str(p)!r}: not valid YAML ({exc})"]) from exc
        if not isinstance(tree, Mapping):
            raise ConfigError([f"--config {str(p)!r}: must hold a mapping of sections, got {type(tree).__name__}"])
        layer = _expand_aliases(_flatten(tree), problems)
        flat.update(layer)
        given.update(layer)
        preset.update(layer)
    layer = _expand_aliases(parse_overrides(overrides), problems)
    flat.update(layer)
    given.update(layer)
    return _build(flat, problems, given=given, defaults=_default_flat(_expand_aliases(defaults or {}, [])),
                  preset_only=preset - set(layer), unused_sections=unused_sections)


def replace(cfg: ExperimentConfig, updates: Mapping[str, Any]) -> ExperimentConfig:
    """A copy of ``cfg`` with dotted-name updates applied, validated; ``updates`` may use the
    ``model.kernel_size`` shorthand (a Tune experiment stored before the typed fields holds such points).

    The copy keeps ``cfg``'s :attr:`~ExperimentConfig.user_set`: updates come from the program (grid
    points, resources fitted to the cluster), not from the user, and are not checked for effect here.
    """
    problems: list[str] = []
    flat = cfg.to_flat()
    flat.update(_expand_aliases(updates, problems))
    return dataclasses.replace(_build(flat, problems), user_set=cfg.user_set)


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as nested YAML (a preset that reproduces this job)."""
    tree: dict[str, dict[str, Any]] = {}
    for name, value in cfg.to_flat().items():
        section, leaf = name.split(".", 1)
        tree.setdefault(section, {})[leaf] = value
    return yaml.safe_dump(tree, sort_keys=False)
