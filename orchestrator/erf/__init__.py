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

Modules, one job each: ``settings`` (checks the inputs), ``images`` (reading them as the reference does),
``models`` (network, weights, Table 10 row), ``job`` (:func:`run_erf`), ``report`` (heat-map and tables),
``benchmark`` (:func:`run_benchmark`).
"""

from __future__ import annotations

from orchestrator.erf.benchmark import BenchmarkRow, benchmark_text, run_benchmark
from orchestrator.erf.images import image_files
from orchestrator.erf.job import ErfResult, run_erf
from orchestrator.erf.models import build_erf_model
from orchestrator.erf.report import save_heatmap, table_rows, to_markdown, write_tables
from orchestrator.erf.settings import (
    BENCHMARK_PRECISIONS,
    PRECISIONS,
    ErfError,
    ErfSettings,
    cuda_available,
    make_settings,
)

__all__ = [
    "BENCHMARK_PRECISIONS",
    "PRECISIONS",
    "BenchmarkRow",
    "ErfError",
    "ErfResult",
    "ErfSettings",
    "benchmark_text",
    "build_erf_model",
    "cuda_available",
    "image_files",
    "make_settings",
    "run_benchmark",
    "run_erf",
    "save_heatmap",
    "table_rows",
    "to_markdown",
    "write_tables",
]
