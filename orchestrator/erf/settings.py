"""The settings of one ERF job: :func:`make_settings` checks every input and reports each problem once.

Why the job has its own settings rather than a section of :class:`orchestrator.config.ExperimentConfig`: it
shares only two sections with a training job, ``model.*`` (for SLaK variants, read and checked by the
training config's own rules) and ``tracking.*`` (the MLflow settings); everything else is a flag of
``experiments/erf.py``, and a training setting passed to it is refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slak_model  # cheap (settings only); installs the torchvision guard before any timm import below
from orchestrator.config.loading import load_config, parse_overrides
from orchestrator.config.schema import ModelConfig, TrackingConfig
from orchestrator.config.validation import ConfigError

__all__ = [
    "BENCHMARK_PRECISIONS",
    "MIN_SIZE",
    "PRECISIONS",
    "RANDOM_SEED",
    "ErfError",
    "ErfSettings",
    "cuda_available",
    "make_settings",
]

#: ``--precision`` choices. fp32 is the default: bf16 moves single pixels of the map by a few per cent and the
#: squares' shares by up to ~1e-3, enough to shift a side by one step (0.1 point of r at the paper's sizes)
#: now and then (docs/erf.md); 50 images take seconds in fp32 on a GPU, so bf16 is there for larger runs.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
#: What ``--benchmark`` times when no precision is given: both, to compare them.
BENCHMARK_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
#: The smallest input: one feature pixel at the stride of 32 that SLaK, ConvNeXt and ResNet end with.
MIN_SIZE = 32
#: ``model.*`` settings that change the measured network; the others of the training config do not apply.
MODEL_KEYS = ("width_factor", "stage_kernels", "short_edge", "small_kernel", "kernel_mode", "use_bn",
              "layer_scale_init", "num_classes", "kernel_size")
#: ``tracking.*`` settings an ERF run uses.
TRACKING_KEYS = ("uri", "experiment", "offline_dir")
#: Seed of random weights and random images, so that two runs without a checkpoint measure the same thing.
RANDOM_SEED = 0


class ErfError(ValueError):
    """The job's inputs cannot be used (images, checkpoint file, device); the message says which and why."""


@dataclass(frozen=True)
class ErfSettings:
    """Everything one ERF job reads. Build with :func:`make_settings`, which checks every field.

    Attributes:
        model: A SLaK variant (``slak_tiny``, ...) or a timm model name (``resnet101``, ``resnet101.tv_in1k``).
        checkpoint: Weights file; SLaK variants load it with ``load_official_checkpoint``, timm models read it
            with ``timm.models.load_state_dict`` and load it strictly. Both take the non-EMA weights when a file
            holds both, as the reference script loads ``model``.
        pretrained: Ask timm for its own published weights of ``model`` (downloads; timm models only).
        random_init: Measure the untrained network (deliberate; the benchmark's default without weights).
        data: Folder of images (``.../imagenet/val``, or a flat folder); None = random images (benchmark).
        images: Images averaged (the paper: 50).
        size: Input side in pixels (the paper: 1024).
        batch_size: Images per forward/backward pass (halved automatically when a GPU runs out of memory).
        precision: ``fp32`` or ``bf16`` (the passes; maps are summed in float64 either way).
        device: ``cpu`` or ``cuda[:N]`` (resolved from ``auto``).
        workers: DataLoader processes that decode and resize images.
        out: Output folder.
        label: Name of this model's row and files.
        model_overrides: ``model.*`` settings of a SLaK variant (training-config names).
        slak_config: The :class:`slak_model.SLaKConfig` they give (None for timm models).
        tracking: MLflow settings, or None for no MLflow run.
        benchmark_precisions: The precisions :func:`run_benchmark` times.
    """

    model: str
    checkpoint: str | None = None
    pretrained: bool = False
    random_init: bool = False
    data: str | None = None
    images: int = 50
    size: int = 1024
    batch_size: int = 8
    precision: str = "fp32"
    device: str = "cpu"
    workers: int = 0
    out: str = "erf_results"
    label: str = ""
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    slak_config: Any = None
    tracking: TrackingConfig | None = None
    benchmark_precisions: tuple[str, ...] = ("fp32",)

    @property
    def is_slak(self) -> bool:
        return self.model in slak_model.VARIANTS

    def weights_text(self) -> str:
        """Where the weights come from, in words (table, MLflow, the benchmark's header)."""
        if self.checkpoint:
            return f"checkpoint {Path(self.checkpoint).name}"
        if self.pretrained:
            return "timm pretrained"
        return f"random initialisation (seed {RANDOM_SEED})"


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (torch is imported only here, not at module import)."""
    import torch

    return torch.cuda.is_available()


def _resolve_device(device: str, problems: list[str]) -> str:
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device):
        import torch

        if not cuda_available():
            problems.append(f"--device {device}: CUDA is not available here; use --device cpu (or auto)")
        elif device != "cuda" and int(device.split(":")[1]) >= torch.cuda.device_count():
            problems.append(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    problems.append(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")
    return "cpu"


def _timm_model_problem(name: str) -> str | None:
    import timm

    if timm.is_model(name):
        return None
    import difflib

    from orchestrator.config.validation import MODEL_VARIANTS

    close = difflib.get_close_matches(name, [*MODEL_VARIANTS, *timm.list_models()], n=3)
    hint = f" (similar: {', '.join(close)})" if close else ""
    return (f"--model {name!r} is neither a SLaK variant ({', '.join(MODEL_VARIANTS)}) nor a timm model{hint}")


def _slak_config(model: str, model_overrides: Mapping[str, Any]) -> Any:
    """The :class:`slak_model.SLaKConfig` a variant with ``model.*`` overrides builds (checked, no tensors)."""
    m = load_config(None, {"model.variant": model, **model_overrides}).model
    fields = {f.name: getattr(m, f.name) for f in dataclasses.fields(ModelConfig)
              if f.name != "variant" and getattr(m, f.name) is not None}
    return slak_model.variant_config(model, **fields)


def _default_label(model: str, model_overrides: Mapping[str, Any], cfg: Any) -> str:
    """The model's name; with ``model.*`` settings also its kernel mode and sizes (short edge N when decomposed)
    and width, and any other setting given (``use_bn``, ``layer_scale_init``, ``num_classes``), so that two
    different networks never share a row."""
    if not model_overrides:
        return model
    from slak_model.published import kernel_row

    kernels = kernel_row(cfg.stage_kernels) + (f"-N{cfg.short_edge}" if cfg.kernel_mode == "decomposed" else "")
    label = f"{model}-{cfg.kernel_mode}-{kernels}-w{cfg.width_factor:g}"
    for key in ("model.use_bn", "model.layer_scale_init", "model.num_classes"):
        if key in model_overrides:
            label += f"-{key.split('.')[1]}={model_overrides[key]}"
    return re.sub(r"[^A-Za-z0-9_.=-]+", "", label)


def _split_overrides(overrides: Sequence[str] | Mapping[str, Any], problems: list[str]
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    model: dict[str, Any] = {}
    tracking: dict[str, Any] = {}
    for key, value in parse_overrides(overrides).items():
        section, _, leaf = key.partition(".")
        if section == "model" and leaf in MODEL_KEYS:
            model[key] = value
        elif section == "tracking" and leaf in TRACKING_KEYS:
            tracking[key] = value
        elif section == "model":
            why = ("use --model" if leaf == "variant" else
                   "it has no effect in eval mode, where the ERF is measured" if leaf == "drop_path_rate" else
                   f"not a model setting the ERF job reads ({', '.join(MODEL_KEYS)})")
            problems.append(f"{key}={value!r}: {why}")
        elif section == "tracking":
            problems.append(f"{key}={value!r}: the ERF job reads only tracking.{{{','.join(TRACKING_KEYS)}}}")
        else:
            problems.append(f"{key}={value!r}: the ERF job takes only model.* (SLaK variants) and tracking.* "
                            "settings; everything else has flags (see --help)")
    return model, tracking


def _data_problems(root: Path, images: int) -> list[str]:
    from orchestrator.erf.images import IMAGE_EXTENSIONS, image_files  # that module imports this one

    if not root.is_dir():
        return [(f"--data {str(root)!r}: no such folder; point it at a folder of images, e.g. the ImageNet val/ "
                "folder (class subfolders) or a flat folder of images")]
    if (root / "train").is_dir() and (root / "val").is_dir():
        return [(f"--data {str(root)!r} holds train/ and val/: pass {str(root / 'val')!r}, the images the paper "
                "averages over")]
    found = len(image_files(root))
    if found == 0:
        return [(f"--data {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}), neither directly nor in "
                "class subfolders")]
    if found < images:
        return [f"--images {images}: {str(root)!r} holds only {found} image(s); ask for at most {found}"]
    return []


def make_settings(
    model: str,
    *,
    checkpoint: str | None = None,
    pretrained: bool = False,
    random_init: bool = False,
    data: str | None = None,
    images: int = 50,
    size: int = 1024,
    batch_size: int = 8,
    precision: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    out: str | None = None,
    name: str | None = None,
    tracking_uri: str | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    benchmark: bool = False,
) -> ErfSettings:
    """Check every input and resolve the defaults; all problems are reported together.

    ``workers``, ``out`` and ``name`` are None when not given, so that a value that would have no effect
    (the benchmark writes no files; random images need no loader processes) is refused rather than dropped.

    Raises:
        ConfigError: one line per problem (bad numbers, missing files or folders, a setting without effect,
            weights asked for in two ways, a SLaK-only setting on a timm model, ...).
    """
    problems: list[str] = []
    is_slak = model in slak_model.VARIANTS
    if not is_slak:
        problem = _timm_model_problem(model)
        if problem:
            problems.append(problem)
    model_over, tracking_over = _split_overrides(overrides, problems)
    if tracking_uri:
        tracking_over["tracking.uri"] = tracking_uri
    if model_over and not is_slak:
        problems.append(f"{', '.join(sorted(model_over))}: model.* settings shape a SLaK variant; {model!r} is a "
                        "timm model, whose architecture is fixed by its name")
    slak_config = None
    if is_slak:
        try:
            slak_config = _slak_config(model, model_over)
        except ConfigError as err:
            problems += err.problems
        except ValueError as err:  # the architecture's own checks (e.g. a short edge longer than a kernel)
            problems.append(str(err))

    if sum((checkpoint is not None, pretrained, random_init)) > 1:
        problems.append("--checkpoint, --pretrained and --random-init exclude each other: pick one source of weights")
    if checkpoint is not None and not Path(checkpoint).is_file():
        problems.append(f"--checkpoint {checkpoint!r}: no such file")
    if pretrained and is_slak:
        problems.append(f"--pretrained: timm has no download for the SLaK variant {model!r}; pass the released "
                        "checkpoint with --checkpoint PATH")
    if not benchmark and checkpoint is None and not pretrained and not random_init:
        problems.append("no weights: pass --checkpoint PATH, --pretrained (timm models) or --random-init to measure "
                        "the untrained network")

    if images < 1:
        problems.append(f"--images {images}: at least 1 image is needed (the paper averages 50)")
    if size < MIN_SIZE:
        problems.append(f"--size {size}: at least {MIN_SIZE} px (the models end with a stride of 32; the paper "
                        "uses 1024)")
    if batch_size < 1:
        problems.append(f"--batch {batch_size}: at least 1 image per batch")
    if workers is not None and workers < 0:
        problems.append(f"--workers {workers}: 0 (decode in this process) or more")
    if precision is not None and precision not in PRECISIONS:
        problems.append(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    resolved_device = _resolve_device(device, problems)

    if data is not None:
        problems += _data_problems(Path(data), images)
    elif not benchmark:
        problems.append("--data is required: the folder of images to average over (e.g. /data/imagenet/val)")
    elif workers is not None:
        problems.append("--workers: the benchmark without --data draws random images on the device; no loader runs")

    if benchmark:
        for flag, value in (("--out", out), ("--name", name), ("--tracking-uri / tracking.*", tracking_over or None)):
            if value is not None:
                problems.append(f"{flag}: the benchmark prints its timings and writes no files or MLflow run")
    elif not tracking_over.get("tracking.uri") and tracking_over:
        problems.append(f"{', '.join(sorted(tracking_over))}: no effect without --tracking-uri (no MLflow run is "
                        "made then)")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_.=-]+", name):
        problems.append(f"--name {name!r}: use letters, digits and _ . = - (it names files)")
    if problems:
        raise ConfigError(problems, "invalid ERF settings")

    tracking = None
    if tracking_over:
        tracking = load_config(None, tracking_over).tracking
    resolved = precision or "fp32"
    bench_precisions = (precision,) if precision else BENCHMARK_PRECISIONS
    return ErfSettings(
        model=model, checkpoint=checkpoint, pretrained=pretrained, random_init=random_init, data=data,
        images=images, size=size, batch_size=batch_size, precision=resolved, device=resolved_device,
        workers=(min(4, os.cpu_count() or 1) if workers is None else workers) if data is not None else 0,
        out=out or "erf_results", label=name or _default_label(model, model_over, slak_config),
        model_overrides=model_over, slak_config=slak_config, tracking=tracking, benchmark_precisions=bench_precisions,
    )

