"""Effective receptive field (ERF): how strongly each input pixel moves the centre of the last feature map.

The measurement is RepLKNet's (Ding et al., CVPR 2022), which the SLaK paper follows for its Table 10:

1. the feature map is the output of the model's **last stage**, before global pooling, the final norm
   and the classifier (``forward_features`` of our SLaK, of timm's ResNets and ConvNeXts);
2. the score of an image is the sum over channels of ``ReLU(feature[c, h // 2, w // 2])``, the central
   position of that map;
3. the image's contribution map is the **positive part** of the gradient of that score with respect to
   the input, summed over the three input channels: ``sum_c ReLU(d score / d x[c])``. It is not ``|g|``:
   negative gradients count as zero;
4. the maps are averaged over the images; an image whose map is not finite is skipped and the next
   image takes its place;
5. for the ratios and the heat-map the mean map ``M`` becomes ``A = log10(1 + M) / max(log10(1 + M))``
   (the raw scores span orders of magnitude; the division makes models comparable);
6. the high-contribution area ratio at threshold ``t`` is the smallest centred square, side ``2i + 1``
   for ``i >= 1`` around ``(H // 2, W // 2)``, whose share of ``sum(A)`` is strictly above ``t``, as a
   fraction of the input area: ``r = side * side / (H * W)``.

The squares are centred on the pixel ``(H // 2, W // 2)``; for an even side (1024) the central feature of a
stride-32 map covers the pixels 512 .. 543 instead, a half-feature offset the reference has too and that is
kept here, so that the ratios stay comparable with the published ones.

Why images can be batched without changing the result: the model runs in eval mode (BatchNorm uses its
running statistics, drop-path is off), so no image influences another, and the gradient of the summed
scores with respect to image ``b`` is the gradient of image ``b``'s own score.

Why the weights are frozen while measuring: only the input gradient is needed, and custom autograd
functions (our depthwise kernels) compute a weight gradient whenever their weight requires one.

The accumulation is streamed: only the running float64 sum of the maps (one ``H x W`` array on the
device) outlives a batch, so the number of images costs time, not memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._wrappers import unwrap_model
from .published import ERF_THRESHOLDS

__all__ = [
    "PRECISIONS",
    "THRESHOLDS",
    "AreaRatio",
    "ErfAccumulator",
    "ErfMeasurement",
    "area_ratios",
    "contribution_maps",
    "feature_map",
    "log_scaled",
    "measure_erf",
    "measuring",
    "square_shares",
]

log = logging.getLogger(__name__)

#: The thresholds t of the paper's Table 10 (and of RepLKNet's analysis script).
THRESHOLDS: tuple[float, ...] = ERF_THRESHOLDS
#: Precision of the forward and backward pass -> autocast dtype (None: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}

_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if e
)


def feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last stage's feature map of ``model`` for ``x`` as ``(N, C, h, w)``.

    ``forward_features`` is the last stage's output for our SLaK and timm's CNNs. A model that returns it
    channels-last (timm marks its channel count in ``feature_info``) is permuted to channels-first, so the
    central position is found on the spatial axes.

    Raises:
        ValueError: the model has no ``forward_features`` or it does not return a 4-D map.
    """
    inner = unwrap_model(model)
    forward = getattr(inner, "forward_features", None)
    if forward is None:
        raise ValueError(
            f"{type(inner).__name__} has no forward_features(); the ERF needs the last stage's feature map "
            "(N, C, h, w), not the logits"
        )
    out = forward(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{type(inner).__name__}.forward_features returned {shape}; the ERF needs the last stage's "
            "spatial feature map (N, C, h, w) before pooling"
        )
    info = getattr(inner, "feature_info", None)
    channels = None
    if info is not None:
        try:
            channels = int(info[-1]["num_chs"])
        except (KeyError, IndexError, TypeError, ValueError):
            channels = None
    if channels is not None and out.shape[1] != channels and out.shape[-1] == channels:
        out = out.permute(0, 3, 1, 2)
    return out


def contribution_maps(model: nn.Module, images: torch.Tensor, *, precision: str = "fp32") -> torch.Tensor:
    """Per-image contribution maps ``(N, H, W)`` in float32: steps 1-3 of the module docstring.

    ``model`` must be in eval mode (see :func:`measure_erf`, which also freezes the weights). Under
    ``precision="bf16"`` the forward and backward run under autocast; the input stays float32 and the
    gradient is summed over channels in float32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    x = images.detach().float().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        features = feature_map(model, x)
    h, w = features.shape[-2:]
    score = F.relu(features[:, :, h // 2, w // 2].float()).sum()
    if not score.requires_grad:  # nothing between the input and the centre depends on the input
        return torch.zeros(x.shape[0], *x.shape[-2:], device=x.device)
    (grad,) = torch.autograd.grad(score, x)
    return F.relu(grad.float()).sum(dim=1)


class ErfAccumulator:
    """Running float64 sum of contribution maps, with the images used and skipped.

    ``add`` takes up to ``wanted - images`` finite maps of a batch (in order) and counts the non-finite
    ones it passes over as skipped, so a stream of batches stops at exactly ``wanted`` images.
    """

    def __init__(self, wanted: int) -> None:
        if wanted < 1:
            raise ValueError(f"images={wanted}: at least one image is needed")
        self.wanted = wanted
        self.images = 0
        self.skipped = 0
        self.total: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.images >= self.wanted

    def add(self, maps: torch.Tensor) -> int:
        """Add the finite maps of ``maps`` ``(N, H, W)`` until ``wanted`` are in; returns how many were added."""
        finite = torch.isfinite(maps).flatten(1).all(dim=1).tolist()
        keep: list[int] = []
        for i, ok in enumerate(finite):
            if self.images + len(keep) >= self.wanted:
                break
            if ok:
                keep.append(i)
            else:
                self.skipped += 1
                log.warning("an image gave a non-finite contribution map; skipped, the next image is used")
        if keep:
            part = maps[keep].to(torch.float64).sum(dim=0)
            self.total = part if self.total is None else self.total + part
            self.images += len(keep)
        return len(keep)

    def mean(self) -> np.ndarray:
        """The mean map over the images added so far (float64, on the CPU)."""
        if self.total is None or self.images == 0:
            raise ValueError("no finite contribution map was added; the mean is undefined")
        return (self.total / self.images).cpu().numpy()


@dataclass(frozen=True)
class ErfMeasurement:
    """The mean contribution map of a model and how it was obtained.

    Attributes:
        mean_map: ``(H, W)`` float64, the mean over ``images`` of the per-image maps (not log-scaled).
        images: Images averaged.
        skipped: Images skipped because their map was not finite.
        seconds: Wall time of the forward and backward passes (data loading included when the batches
            are produced lazily).
        batch_size: The largest batch that ran (smaller than asked when the device ran out of memory).
    """

    mean_map: np.ndarray
    images: int
    skipped: int
    seconds: float
    batch_size: int


@contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode with every parameter frozen; the model's mode and ``requires_grad`` flags come back after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def measure_erf(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    images: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> ErfMeasurement:
    """Mean contribution map of ``model`` over the first ``images`` usable images of ``batches``.

    Args:
        model: Any module with ``forward_features`` returning the last stage's map; it is measured in
            eval mode with frozen weights and returned to its previous state afterwards.
        batches: ``(N, 3, H, W)`` tensors, already normalised; consumed lazily, only until ``images``
            finite maps are in.
        images: How many images to average (the paper: 50).
        device: Where to run; each batch is moved there.
        precision: ``"fp32"`` or ``"bf16"`` (autocast) for the passes; the maps are summed in float64.

    When the device runs out of memory on a batch, the batch is split in halves (and the smaller size
    kept for the rest of the run) until a single image fails; the result is the same, since images are
    independent.

    Raises:
        ValueError: fewer than ``images`` usable images in ``batches``, or a bad ``precision``.
        torch.OutOfMemoryError: a single image does not fit on the device.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: choose one of {sorted(PRECISIONS)}")
    device = torch.device(device)
    acc = ErfAccumulator(images)
    chunk: int | None = None
    largest = 0
    started = time.perf_counter()
    with measuring(model):
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            chunk = chunk or batch.shape[0]
            start = 0
            while start < batch.shape[0] and not acc.done:
                part = batch[start:start + chunk]
                try:
                    maps = contribution_maps(model, part, precision=precision)
                except _OOM_ERRORS:
                    if chunk == 1:
                        raise
                    chunk = max(1, chunk // 2)
                    log.warning("out of memory on a batch of %d; going on with batches of %d", part.shape[0], chunk)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                largest = max(largest, part.shape[0])
                acc.add(maps)
                start += part.shape[0]
            if acc.done:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if not acc.done:
        raise ValueError(
            f"only {acc.images} usable image(s) ({acc.skipped} skipped as non-finite) where {images} were asked "
            "for; give more images or ask for fewer"
        )
    return ErfMeasurement(acc.mean(), acc.images, acc.skipped, seconds, largest)


def log_scaled(mean_map: np.ndarray) -> np.ndarray:
    """``log10(1 + M) / max(log10(1 + M))``: the map the ratios and the heat-map are computed on.

    Raises:
        ValueError: the map is all zero (no image's centre responded: ReLU of the central features was 0).
    """
    m = np.asarray(mean_map, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"expected an (H, W) map, got shape {m.shape}")
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise ValueError("the contribution map must be finite and non-negative")
    scaled = np.log10(m + 1.0)
    top = scaled.max()
    if top <= 0:
        raise ValueError(
            "the contribution map is zero everywhere: the central features were never positive (their ReLU "
            "is 0 for every image), so no pixel contributes; check the weights and the input normalisation"
        )
    return scaled / top


@dataclass(frozen=True)
class AreaRatio:
    """The smallest centred square holding more than ``threshold`` of the (log-scaled) contribution.

    ``side`` and ``ratio`` are None when no square of side below the input's holds that much.
    """

    threshold: float
    side: int | None
    ratio: float | None


def square_shares(mean_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sides, shares)``: for every centred square the reference scans (half-sides ``i = 1 .. H // 2 - 1``
    around ``(H // 2, W // 2)``, side ``2i + 1``), its share of the log-scaled map's total (step 5)."""
    a = log_scaled(mean_map)
    h, w = a.shape
    # summed-area table with a zero row and column in front: the sum over rows [r0, r1) and columns [c0, c1)
    # is s[r1, c1] - s[r0, c1] - s[r1, c0] + s[r0, c0]
    s = np.zeros((h + 1, w + 1))
    s[1:, 1:] = a.cumsum(axis=0).cumsum(axis=1)
    cy, cx = h // 2, w // 2
    half = np.arange(1, h // 2)
    r0, r1 = np.clip(cy - half, 0, h), np.clip(cy + half + 1, 0, h)
    c0, c1 = np.clip(cx - half, 0, w), np.clip(cx + half + 1, 0, w)
    shares = (s[r1, c1] - s[r0, c1] - s[r1, c0] + s[r0, c0]) / s[h, w]
    return 2 * half + 1, shares


def area_ratios(mean_map: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> list[AreaRatio]:
    """High-contribution area ratios of a mean contribution map (steps 5-6 of the module docstring).

    A threshold that no square of :func:`square_shares` passes gets ``side = ratio = None``.
    """
    for t in thresholds:
        if not 0.0 < t < 1.0:
            raise ValueError(f"threshold {t!r}: must lie strictly between 0 and 1")
    h, w = np.shape(mean_map)
    sides, shares = square_shares(mean_map)
    out = []
    for t in thresholds:
        above = np.nonzero(shares > t)[0]
        if above.size == 0:
            log.warning("no centred square smaller than the input holds %.0f %% of the contribution", 100 * t)
            out.append(AreaRatio(t, None, None))
            continue
        side = int(sides[above[0]])
        out.append(AreaRatio(t, side, side / h * side / w))
    return out
