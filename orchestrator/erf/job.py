"""One ERF job: the model's mean contribution map, its ratios, the files, the MLflow run (:func:`run_erf`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.checkpoints import file_sha256
from orchestrator.erf.images import image_batches
from orchestrator.erf.models import build_erf_model
from orchestrator.erf.report import ROW_SUFFIX, pct, save_heatmap, write_tables
from orchestrator.erf.settings import ErfError, ErfSettings

__all__ = ["ErfResult", "exact_precision", "run_erf"]

log = logging.getLogger(__name__)


@contextmanager
def exact_precision(precision: str) -> Iterator[None]:
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
        with exact_precision(settings.precision):
            measurement = erf.measure_erf(model, image_batches(settings), images=settings.images,
                                          device=settings.device, precision=settings.precision)
        ratios = erf.area_ratios(measurement.mean_map, ERF_THRESHOLDS)
    except ValueError as err:  # too few usable images, or a map without any contribution
        raise ErfError(str(err)) from err
    row: dict[str, Any] = {
        "label": settings.label, "model": settings.model, "paper_row": info.paper_row, "kernel": info.kernel,
        "weights": settings.weights_text(), "checkpoint_sha256": file_sha256(settings.checkpoint) if settings.checkpoint
        else None, "images": measurement.images, "skipped": measurement.skipped, "size": settings.size,
        "precision": settings.precision, "device": settings.device, "batch_size": measurement.batch_size,
        "seconds_per_image": measurement.seconds / measurement.images, "data": str(Path(settings.data).absolute()),
    }
    for r in ratios:
        row[f"r{pct(r.threshold)}_pct"] = None if r.ratio is None else 100 * r.ratio
        row[f"side{pct(r.threshold)}"] = r.side
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    map_path, png_path, row_path = (out / f"{settings.label}{s}" for s in (".npy", ".png", ROW_SUFFIX))
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
        metrics = {f"erf/{key}": row[key] for t in ERF_THRESHOLDS for key in (f"r{pct(t)}_pct", f"side{pct(t)}")
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

