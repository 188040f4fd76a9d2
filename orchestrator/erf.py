"""The effective-receptive-field job (the paper's Table 10 and Figure 1-style maps) for one model.

One call, :func:`run_erf`, takes validated :class:`ErfSettings` (build them with :func:`make_settings`) and:

1. builds the model: a SLaK variant (with ``model.*`` overrides, the training config's names) loaded with
   :func:`slak_model.load_official_checkpoint`, or any timm model loaded through timm;
2. reads the first ``images`` images of a folder, resized to ``size x size`` (bicubic, aspect ratio not
   kept) and normalised with the ImageNet mean and std, as the reference scripts do;
3. measures the mean contribution map with :func:`slak_model.erf.measure_erf` (batched, streamed, bf16
   when asked) and the area ratios r at t = 20/30/50/99 %;
4. writes into ``out/``: ``<label>.npy`` (the mean map, not log-scaled), ``<label>.png`` (the log-scaled
   heat-map), ``<label>.erf.json`` (the row), and ``erf_table.md`` / ``erf_table.csv``, which list every
   model measured into that folder beside the published Table 10 rows, so measuring one model after
   another into the same folder builds up the whole table;
5. with a tracking URI, logs one MLflow run (params, r as metrics, the files as artifacts).

:func:`run_benchmark` times the measurement itself per precision on a device (random images and random
weights unless given), for the time per image at 1024 x 1024 and the bf16 / fp32 comparison.

Image order is the reference's: class folders sorted by name, files sorted inside each (torchvision's
``ImageFolder``), so the ImageNet ``val/`` folder gives the same 50 images (the first class's).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import statistics
import textwrap
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slak_model  # cheap (settings only); installs the torchvision guard before any timm import below
from orchestrator.config import ConfigError, ModelConfig, TrackingConfig, load_config, parse_overrides
from slak_model.published import TABLE10

__all__ = [
    "BENCHMARK_PRECISIONS",
    "PRECISIONS",
    "BenchmarkRow",
    "ErfError",
    "ErfResult",
    "ErfSettings",
    "benchmark_text",
    "cuda_available",
    "image_files",
    "make_settings",
    "run_benchmark",
    "run_erf",
    "table_rows",
]

log = logging.getLogger(__name__)

#: ``--precision`` choices. fp32 is the default: bf16 moves single pixels of the map by a few per cent and the
#: squares' shares by up to ~1e-3, enough to shift a side by one step (0.1 point of r at the paper's sizes)
#: now and then (docs/erf.md); 50 images take seconds in fp32 on a GPU, so bf16 is there for larger runs.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
#: What ``--benchmark`` times when no precision is given: both, to compare them.
BENCHMARK_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
#: torchvision's ``ImageFolder`` extensions (the reference reads its images through it).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: The smallest input: one feature pixel at the stride of 32 that SLaK, ConvNeXt and ResNet end with.
MIN_SIZE = 32
#: ``model.*`` settings that change the measured network; the others of the training config do not apply.
MODEL_KEYS = ("width_factor", "stage_kernels", "short_edge", "small_kernel", "kernel_mode", "use_bn",
              "layer_scale_init", "num_classes", "kernel_size")
#: ``tracking.*`` settings an ERF run uses.
TRACKING_KEYS = ("uri", "experiment", "offline_dir")
#: timm architectures -> their row of Table 10.
_TIMM_ROWS = {"resnet101": "ResNet-101", "resnet152": "ResNet-152", "convnext_tiny": "ConvNeXt-T"}
_TABLE_MD, _TABLE_CSV, _ROW_SUFFIX = "erf_table.md", "erf_table.csv", ".erf.json"
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


# ------------------------------------------------------------------------------------------ settings
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

    from orchestrator.config import MODEL_VARIANTS

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


# ------------------------------------------------------------------------------------------ images
def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The images of ``folder`` in the reference's order.

    With class subfolders (ImageNet's ``val/``): the subfolders sorted by name, each walked recursively with
    files sorted, as torchvision's ``ImageFolder`` lists them (files directly in ``folder`` are then not
    images of any class and are left out). Without subfolders: the folder's own images, sorted.
    """
    root = Path(folder)
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not subdirs:
        return sorted((p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                      key=lambda p: p.name)
    files: list[Path] = []
    for sub in subdirs:
        for dirpath, _, names in sorted(os.walk(root / sub, followlinks=True)):
            files += [Path(dirpath) / n for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def _data_problems(root: Path, images: int) -> list[str]:
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


class _ImageFolder:
    """``size x size`` RGB images, bicubic-resized (aspect ratio not kept) and normalised: the reference's
    transform (``Resize((s, s), BICUBIC)``, ``ToTensor``, ``Normalize(ImageNet mean, std)``)."""

    def __init__(self, files: Sequence[Path], size: int) -> None:
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        """``(image, "")``, or ``(zeros, why)`` for a file that does not decode: the error is raised in the main
        process (:func:`_image_batches`), not inside a loader worker, whose traceback would bury it."""
        import numpy as np
        import torch
        from PIL import Image
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        path = self.files[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return torch.zeros(3, self.size, self.size), f"cannot decode image {path}: {err}; fix or delete the file"
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = (x - np.asarray(IMAGENET_DEFAULT_MEAN, np.float32)) / np.asarray(IMAGENET_DEFAULT_STD, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), ""


def _image_batches(settings: ErfSettings) -> Iterator[Any]:
    from torch.utils.data import DataLoader

    assert settings.data is not None
    dataset = _ImageFolder(image_files(settings.data), settings.size)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=settings.workers,
                        pin_memory=settings.device.startswith("cuda"))
    for images, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            raise ErfError(bad[0])
        yield images


def _random_batches(settings: ErfSettings, count: int) -> Iterator[Any]:
    """Standard-normal images (what normalised natural images look like to the first layer), drawn on the device
    from a fixed seed, so every precision sees the same ones."""
    import torch

    gen = torch.Generator(device=settings.device).manual_seed(RANDOM_SEED)
    drawn = 0
    while drawn < count:
        n = min(settings.batch_size, count - drawn)
        yield torch.randn(n, 3, settings.size, settings.size, generator=gen, device=settings.device)
        drawn += n


# ------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class _ModelInfo:
    kernel: str
    paper_row: str | None


def _slak_paper_row(cfg: Any) -> str | None:
    """Which Table 10 row a SLaK-code network is: SLaK-T, or ConvNeXt-T as RepLKNet or plain."""
    if tuple(cfg.depths) != (3, 3, 9, 3) or tuple(cfg.dims) != (96, 192, 384, 768):
        return None
    kernels, mode, width = tuple(cfg.stage_kernels), cfg.kernel_mode, cfg.width_factor
    if mode == "decomposed" and kernels == (51, 49, 47, 13) and cfg.short_edge == 5 and width == 1.3:
        return "SLaK-T"
    if mode == "replknet" and kernels == (31, 29, 27, 13) and cfg.small_kernel == 5 and width == 1.0:
        return "ConvNeXt-T (RepLKNet)"
    if mode == "naive" and kernels == (7, 7, 7, 7) and width == 1.0:
        return "ConvNeXt-T"
    return None


def _timm_paper_row(name: str) -> tuple[str, str | None]:
    """``(kernel sizes, Table 10 row)`` of a timm model: its architecture (the name before any ``.tag``)
    decides; which weights it carries is the table's ``weights`` column."""
    row = _TIMM_ROWS.get(name.split(".")[0])
    return (next(p.kernel for p in TABLE10 if p.model == row) if row else "-"), row


def _first_line(err: BaseException) -> str:
    """The first line of an error: torch's unpickling errors go on for paragraphs about ``weights_only``."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def build_erf_model(settings: ErfSettings) -> tuple[Any, _ModelInfo]:
    """The network with its weights, and its kernel sizes and Table 10 row.

    Raises:
        CheckpointMismatchError: a SLaK checkpoint of another architecture (its message names the cause).
        ErfError: an unreadable checkpoint, a timm checkpoint that does not fit the model, or timm's pretrained
            weights out of reach.
    """
    import torch

    from slak_model.published import kernel_row

    torch.manual_seed(RANDOM_SEED)
    if settings.is_slak:
        model = slak_model.SLaK(settings.slak_config)
        if settings.checkpoint:
            from slak_model.checkpoint import load_official_checkpoint, read_checkpoint

            try:
                state = read_checkpoint(settings.checkpoint)
            except Exception as err:  # any unreadable file gets the same message
                raise ErfError(f"cannot read checkpoint {settings.checkpoint}: {_first_line(err)}") from err
            load_official_checkpoint(model, state)
        return model, _ModelInfo(kernel_row(model.cfg.stage_kernels), _slak_paper_row(model.cfg))

    import timm

    try:
        model = timm.create_model(settings.model, pretrained=settings.pretrained)
    except Exception as err:  # only the download can fail here: the name was checked
        raise ErfError(f"could not get timm's pretrained weights of {settings.model!r}: {err}; fetch them on a "
                       "machine with network access and pass the file with --checkpoint") from err
    if settings.checkpoint:
        try:  # timm's reader: .safetensors or torch files, the non-EMA weights first, "module." stripped
            state = timm.models.load_state_dict(settings.checkpoint, use_ema=False)
        except Exception as err:  # any unreadable file gets the same message
            raise ErfError(f"cannot read checkpoint {settings.checkpoint}: {_first_line(err)}") from err
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ErfError(f"checkpoint {settings.checkpoint} does not fit timm model {settings.model!r}: {err}") from err
    return model, _ModelInfo(*_timm_paper_row(settings.model))


# ------------------------------------------------------------------------------------------ the job
@contextmanager
def _exact_precision(precision: str) -> Iterator[None]:
    """``fp32`` means float32 arithmetic: TF32 (cuDNN convolutions use it by default on Ampere and later) is
    switched off for the duration, and the previous switches come back after."""
    import torch

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if precision == "fp32":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@dataclass(frozen=True)
class ErfResult:
    """What :func:`run_erf` measured and wrote.

    Attributes:
        row: This model's table row (as in ``<label>.erf.json``).
        markdown: The whole table of the output folder, beside the published rows.
        files: The files written (map, heat-map, row, tables).
        run_id: The MLflow run, or None without tracking.
    """

    row: dict[str, Any]
    markdown: str
    files: list[Path]
    run_id: str | None = None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pct(t: float) -> str:
    return f"{100 * t:g}"


def run_erf(settings: ErfSettings) -> ErfResult:
    """Measure one model's ERF, write its map, heat-map, row and the folder's table, and log them to MLflow."""
    import numpy as np
    import torch

    from slak_model import erf
    from slak_model.published import ERF_THRESHOLDS

    if settings.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # one input size for the whole run
    model, info = build_erf_model(settings)
    model.to(settings.device)
    log.info("measuring the ERF of %s (%s) on %d image(s) of %d px, %s, batch %d, on %s", settings.label,
             settings.weights_text(), settings.images, settings.size, settings.precision, settings.batch_size,
             settings.device)
    try:
        with _exact_precision(settings.precision):
            measurement = erf.measure_erf(model, _image_batches(settings), images=settings.images,
                                          device=settings.device, precision=settings.precision)
        ratios = erf.area_ratios(measurement.mean_map, ERF_THRESHOLDS)
    except ValueError as err:  # too few usable images, or a map without any contribution
        raise ErfError(str(err)) from err
    row: dict[str, Any] = {
        "label": settings.label, "model": settings.model, "paper_row": info.paper_row, "kernel": info.kernel,
        "weights": settings.weights_text(), "checkpoint_sha256": _sha256(settings.checkpoint) if settings.checkpoint
        else None, "images": measurement.images, "skipped": measurement.skipped, "size": settings.size,
        "precision": settings.precision, "device": settings.device, "batch_size": measurement.batch_size,
        "seconds_per_image": measurement.seconds / measurement.images, "data": str(Path(settings.data).absolute()),
    }
    for r in ratios:
        row[f"r{_pct(r.threshold)}_pct"] = None if r.ratio is None else 100 * r.ratio
        row[f"side{_pct(r.threshold)}"] = r.side
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    map_path, png_path, row_path = (out / f"{settings.label}{s}" for s in (".npy", ".png", _ROW_SUFFIX))
    np.save(map_path, measurement.mean_map.astype(np.float32))
    title = (f"{settings.label}\n{settings.weights_text()}, {measurement.images} image(s) at {settings.size} px, "
             f"{settings.precision}")
    save_heatmap(erf.log_scaled(measurement.mean_map), png_path, title, ratios)
    row_path.write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")
    markdown, md_path, csv_path = write_tables(out)
    files = [map_path, png_path, row_path, md_path, csv_path]
    run_id = _log_to_mlflow(settings, row, files) if settings.tracking is not None else None
    return ErfResult(row, markdown, files, run_id)


def _log_to_mlflow(settings: ErfSettings, row: Mapping[str, Any], files: Sequence[Path]) -> str:
    from orchestrator import tracking
    from slak_model.published import ERF_THRESHOLDS

    assert settings.tracking is not None
    tracker = tracking.create_tracker(settings.tracking, run_name=f"erf-{settings.label}", environment=True,
                                      tags={"slak.job": "erf", "slak.erf.label": settings.label,
                                            "slak.erf.paper_row": row["paper_row"] or "none"})
    try:
        params = {k: row[k] for k in ("model", "label", "kernel", "weights", "size", "precision", "device", "data")}
        params.update({"images": settings.images, "batch_size": settings.batch_size,
                       "checkpoint": settings.checkpoint or "none",
                       "checkpoint_sha256": row["checkpoint_sha256"] or "none", **settings.model_overrides})
        tracker.log_params(params)
        metrics = {f"erf/{key}": row[key] for t in ERF_THRESHOLDS for key in (f"r{_pct(t)}_pct", f"side{_pct(t)}")
                   if row[key] is not None}
        metrics.update({"erf/images": row["images"], "erf/skipped": row["skipped"],
                        "perf/s_per_image": row["seconds_per_image"]})
        tracker.log_metrics(metrics, step=0)
        for path in files:
            tracker.log_artifact(path, "erf")
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    return str(getattr(tracker, "run_id", ""))


def save_heatmap(scaled: Any, path: Path, title: str, ratios: Sequence[Any] = ()) -> Path:
    """The log-scaled map as an image: the upper half of a red-yellow-green scale over [0, 1], RepLKNet's look
    (its heat-map centres the diverging scale at 0), with a colour bar and the ratios under the title (its
    lines wrapped, since labels with ``model.*`` settings run long)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(matplotlib.colormaps["RdYlGn"](np.linspace(0.5, 1.0, 256)))
    fig, ax = plt.subplots(figsize=(6.0, 6.4), dpi=120)
    image = ax.imshow(scaled, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    subtitle = ", ".join(f"r({_pct(r.threshold)} %) = {100 * r.ratio:.1f} %" for r in ratios if r.ratio is not None)
    lines = [*title.splitlines(), subtitle] if subtitle else title.splitlines()
    ax.set_title("\n".join(textwrap.fill(line, 72) for line in lines), fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="log10(1 + contribution), scaled to [0, 1]")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ tables
def _read_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(out.glob(f"*{_ROW_SUFFIX}")):
        try:
            rows.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as err:
            log.warning("left %s out of the table: %s", path, err)
    return rows


def table_rows(measured: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Measured rows beside the published ones: the paper's rows in its order (each followed by what was measured
    for it), then measured rows without a published counterpart. Every row has ``r<t>_pct`` (ours) and
    ``paper_r<t>_pct``."""
    from slak_model.published import ERF_THRESHOLDS, TABLE10

    def with_paper(row: Mapping[str, Any], paper: Any) -> dict[str, Any]:
        out = dict(row)
        for t in ERF_THRESHOLDS:
            out[f"paper_r{_pct(t)}_pct"] = paper.ratio_pct(t) if paper is not None else None
        return out

    rows: list[dict[str, Any]] = []
    for paper in TABLE10:
        mine = [r for r in measured if r.get("paper_row") == paper.model]
        if not mine:
            rows.append(with_paper({"label": "-", "model": "-", "paper_row": paper.model, "kernel": paper.kernel,
                                    "weights": "-", "images": None}, paper))
        rows += [with_paper(r, paper) for r in mine]
    known = {p.model for p in TABLE10}
    rows += [with_paper(r, None) for r in measured if r.get("paper_row") not in known]
    return rows


def _cell(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table as markdown: r in % of the input area, ours beside the paper's for each threshold."""
    from slak_model.published import ERF_THRESHOLDS, TABLE10_CAPTION

    head = ["ours", "paper row", "kernel", "weights", "images", "px"]
    for t in ERF_THRESHOLDS:
        head += [f"r t={_pct(t)} %", "paper"]
    lines = [f"{TABLE10_CAPTION}; ours: the rows measured into this folder", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.get("label", "-"), r.get("paper_row") or "-", r.get("kernel", "-"), r.get("weights", "-"),
                 _cell(r.get("images")), _cell(r.get("size"))]
        for t in ERF_THRESHOLDS:
            cells += [_cell(r.get(f"r{_pct(t)}_pct")), _cell(r.get(f"paper_r{_pct(t)}_pct"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path) -> tuple[str, Path, Path]:
    """``erf_table.md`` and ``erf_table.csv`` of every ``*.erf.json`` row in ``out``; returns the markdown."""
    from slak_model.published import ERF_THRESHOLDS

    rows = table_rows(_read_rows(out))
    markdown = to_markdown(rows)
    md_path, csv_path = out / _TABLE_MD, out / _TABLE_CSV
    md_path.write_text(markdown, encoding="utf-8")
    columns = ["label", "model", "paper_row", "kernel", "weights", "checkpoint_sha256", "images", "skipped", "size",
               "precision", "device", "batch_size", "seconds_per_image", "data"]
    for t in ERF_THRESHOLDS:
        columns += [f"r{_pct(t)}_pct", f"side{_pct(t)}", f"paper_r{_pct(t)}_pct"]
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return markdown, md_path, csv_path


# ------------------------------------------------------------------------------------------ benchmark
@dataclass(frozen=True)
class BenchmarkRow:
    """One precision's timing: median seconds per image over the timed batches, peak device memory, and the
    area ratios its maps give (to compare precisions)."""

    precision: str
    seconds_per_image: float
    images: int
    batch_size: int
    peak_memory_gib: float | None
    ratios_pct: tuple[float | None, ...]
    sides: tuple[int | None, ...]


def run_benchmark(settings: ErfSettings) -> tuple[list[BenchmarkRow], dict[str, Any]]:
    """Time :func:`slak_model.erf.contribution_maps` per precision on ``settings.device``.

    Each precision first runs one untimed batch (cuDNN's algorithm search, the allocator), then its batches of
    the first ``images`` images (random ones without ``data``; the same images for every precision), each
    timed on its own with a device synchronisation; a row reports the median seconds per image. Besides the
    rows: the largest difference between the precisions' log-scaled mean maps (``max_abs_diff``) and between
    their shares of the centred squares (``max_share_diff``; r moves only when a share crosses a threshold),
    which say whether bf16 changes the result.
    """
    import numpy as np
    import torch

    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, info = build_erf_model(settings)
    model.to(device)
    rows: list[BenchmarkRow] = []
    means: dict[str, Any] = {}

    def batches() -> Iterator[Any]:
        if settings.data is None:
            return _random_batches(settings, settings.images)
        return _image_batches(settings)

    for precision in settings.benchmark_precisions:
        with _exact_precision(precision):
            rows.append(_time_precision(settings, model, device, precision, batches, means))
    extra: dict[str, Any] = {"kernel": info.kernel, "paper_row": info.paper_row}
    if len(means) > 1:
        from slak_model import erf

        a, b = (means[p] for p in settings.benchmark_precisions[:2])
        extra["max_abs_diff"] = float(np.max(np.abs(erf.log_scaled(a) - erf.log_scaled(b))))
        extra["max_share_diff"] = float(np.max(np.abs(erf.square_shares(a)[1] - erf.square_shares(b)[1])))
    return rows, extra


def _time_precision(settings: ErfSettings, model: Any, device: Any, precision: str, batches: Any,
                    means: dict[str, Any]) -> BenchmarkRow:
    """One row of :func:`run_benchmark`; the mean map goes into ``means[precision]``."""
    import torch

    from slak_model import erf
    from slak_model.published import ERF_THRESHOLDS

    first = next(iter(batches())).to(device)
    with erf.measuring(model):
        erf.contribution_maps(model, first, precision=precision)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    acc = erf.ErfAccumulator(settings.images)
    per_image = []
    with erf.measuring(model):
        for batch in batches():
            batch = batch.to(device)
            started = time.perf_counter()
            maps = erf.contribution_maps(model, batch, precision=precision)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_image.append((time.perf_counter() - started) / batch.shape[0])
            acc.add(maps)
            if acc.done:
                break
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    mean = acc.mean()
    ratios = erf.area_ratios(mean, ERF_THRESHOLDS)
    means[precision] = mean
    return BenchmarkRow(precision, statistics.median(per_image), acc.images, settings.batch_size, peak,
                        tuple(None if r.ratio is None else 100 * r.ratio for r in ratios), tuple(r.side for r in ratios))


def benchmark_text(settings: ErfSettings, rows: Sequence[BenchmarkRow], extra: Mapping[str, Any]) -> str:
    """What ``--benchmark`` prints: what was timed (with random weights and images said so), one line per
    precision, and whether bf16 changed the ratios."""
    from kernels import environment
    from slak_model.published import ERF_THRESHOLDS

    images = f"images of {settings.data}" if settings.data else f"random images (seed {RANDOM_SEED})"
    lines = [
        (f"ERF benchmark: {settings.label} ({extra['kernel']}), {settings.weights_text()}, {images}, "
        f"{settings.size} x {settings.size} px, batch {settings.batch_size}, {rows[0].images if rows else 0} images "
        "per precision after one warm-up batch"),
        environment.summary_line(environment.describe(settings.device)),
    ]
    if not settings.checkpoint and not settings.pretrained:
        lines.append("weights are RANDOM: the timings hold for any weights, the ratios are not Table 10's")
    head = ["precision", "ms / image", "img / s", "peak GiB"] + [f"r t={_pct(t)} %" for t in ERF_THRESHOLDS]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peak = "-" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f}"
        cells = [r.precision, f"{1000 * r.seconds_per_image:.1f}", f"{1 / r.seconds_per_image:.1f}", peak]
        cells += [_cell(v, 2) for v in r.ratios_pct]
        lines.append("| " + " | ".join(cells) + " |")
    if "max_abs_diff" in extra and len(rows) > 1:
        same = rows[0].sides == rows[1].sides
        lines += ["", (f"{rows[0].precision} vs {rows[1].precision}: largest difference of the log-scaled maps "
                       f"{extra['max_abs_diff']:.2e} (of 1), of the centred squares' shares {extra['max_share_diff']:.2e}; "
                       f"square sides {'identical' if same else 'DIFFER'}: {list(rows[0].sides)} vs {list(rows[1].sides)}")]
    return "\n".join(lines)
