"""The ERF measurement's time per image on a device, per precision, and whether bf16 changes the ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.erf.images import image_batches, random_batches
from orchestrator.erf.job import exact_precision
from orchestrator.erf.models import build_erf_model
from orchestrator.erf.report import cell, pct
from orchestrator.erf.settings import RANDOM_SEED, ErfSettings

__all__ = ["BenchmarkRow", "benchmark_text", "run_benchmark"]


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
            return random_batches(settings, settings.images)
        return image_batches(settings)

    for precision in settings.benchmark_precisions:
        with exact_precision(precision):
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
    ratios_pct = tuple(None if r.ratio is None else 100 * r.ratio for r in ratios)
    return BenchmarkRow(precision, statistics.median(per_image), acc.images, settings.batch_size, peak, ratios_pct,
                        tuple(r.side for r in ratios))


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
    head = ["precision", "ms / image", "img / s", "peak GiB"] + [f"r t={pct(t)} %" for t in ERF_THRESHOLDS]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peak = "-" if r.peak_memory_gib is None else f"{r.peak_memory_gib:.1f}"
        cells = [r.precision, f"{1000 * r.seconds_per_image:.1f}", f"{1 / r.seconds_per_image:.1f}", peak]
        cells += [cell(v, 2) for v in r.ratios_pct]
        lines.append("| " + " | ".join(cells) + " |")
    if "max_abs_diff" in extra and len(rows) > 1:
        a, b = rows[0], rows[1]
        same = "identical" if a.sides == b.sides else "DIFFER"
        lines += ["", (f"{a.precision} vs {b.precision}: largest difference of the log-scaled maps "
                       f"{extra['max_abs_diff']:.2e} (of 1), of the centred squares' shares "
                       f"{extra['max_share_diff']:.2e}; square sides {same}: {list(a.sides)} vs {list(b.sides)}")]
    return "\n".join(lines)

