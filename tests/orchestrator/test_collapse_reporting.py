"""Collapsed sparse layers in experiments: none in the embedded default's grid, and a run that has them says so.

The paper's SNIP init can leave whole block layers without a weight (on small models and at high
sparsity); the embedded default sets ``sparse.min_density`` so that none of its Table 8 trials does. A
run where layers collapse anyway carries the ``sparsity/collapsed_layers`` metric, the
``slak.collapsed_layers`` tag and a note in its description.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from orchestrator import cli, data, loop, tracking, worker
from orchestrator.config.loading import load_config, replace
from orchestrator.config.schema import ExperimentConfig
from orchestrator.search_space import sparsity_width_grid
from orchestrator.tracking import NullTracker
from tests.orchestrator.sessions import CpuSession


def _initialised_engines(base: ExperimentConfig) -> Iterator[tuple[str, Any]]:
    """(row, engine after SNIP on the run's own first training batch) of every Table 8 point of ``base``."""
    bundle = data.build_datasets(base.data, seed=base.train.seed)
    for point in sparsity_width_grid(base):
        cfg = replace(base, dict(point.overrides))
        train, _ = data.build_loaders(bundle, cfg, rank=0, world_size=1, micro_batch_size=cfg.micro_batch_size,
                                      seed=cfg.train.seed)
        trainer = loop.Trainer(cfg, steps_per_epoch=1, num_classes=bundle.num_classes)
        trainer.initialize_sparsity(next(iter(train)))
        yield point.row, trainer.engine


def test_no_trial_of_the_embedded_default_grid_collapses() -> None:
    base = load_config(None, cli.LAPTOP_DEFAULTS)
    assert base.sparse.min_density > 0 and base.sparse.init == "snip"
    for row, engine in _initialised_engines(base):
        densities = engine.layer_densities()
        assert engine.collapsed_layers() == [], row
        assert engine.stats()["sparsity/collapsed_layers"] == 0.0, row
        assert min(densities.values()) >= base.sparse.min_density, (row, min(densities, key=densities.get))


def test_the_paper_allocation_empties_layers_of_the_embedded_default_grid() -> None:
    """Why the default needs its floor: without it SNIP leaves block layers empty at the sparsest points."""
    base = load_config(None, {**cli.LAPTOP_DEFAULTS, "sparse.min_density": 0.0})
    collapsed = {row: engine.collapsed_layers() for row, engine in _initialised_engines(base)}
    assert collapsed["0.20/1.1x"] == [] and collapsed["0.82/2.5x"], collapsed
    assert all(".blocks." in name for names in collapsed.values() for name in names)


class _RecordingTracker(NullTracker):
    def __init__(self) -> None:
        self.tags: dict[str, str] = {}
        self.metrics: list[dict[str, float]] = []

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append(dict(metrics))


def _run_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_density: float
                ) -> tuple[_RecordingTracker, CpuSession]:
    """One epoch of the embedded default's sparsest Table 8 point, tracked by a recording tracker."""
    base = load_config(None, {**cli.LAPTOP_DEFAULTS, "train.epochs": 1, "data.train_size": 64, "data.val_size": 32,
                              "run.num_workers": 1, "run.storage_path": str(tmp_path),
                              "sparse.min_density": min_density})
    (point,) = [p for p in sparsity_width_grid(base) if p.row == "0.82/2.5x"]
    cfg = replace(base, dict(point.overrides))
    recorder = _RecordingTracker()
    monkeypatch.setattr(tracking, "create_tracker", lambda *args, **kwargs: recorder)
    session = CpuSession()
    with contextlib.chdir(tmp_path):
        worker.TrainingWorker({"experiment": cfg, "run_name": "collapse"}, session).run()
    return recorder, session


def test_a_run_with_collapsed_layers_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    recorder, session = _run_worker(tmp_path, monkeypatch, min_density=0.0)
    names = recorder.tags[worker.COLLAPSE_TAG].split(",")
    assert names and all(name.startswith("stages.") for name in names)
    assert recorder.metrics[-1]["sparsity/collapsed_layers"] == float(len(names))
    assert session.reports[-1]["sparsity/collapsed_layers"] == float(len(names))
    note = recorder.tags["mlflow.note.content"]
    assert f"{len(names)} sparse layer(s) collapsed" in note and names[0] in note and "sparse.min_density" in note
    assert any("collapsed" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_a_run_without_collapsed_layers_has_no_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder, _ = _run_worker(tmp_path, monkeypatch, min_density=0.05)
    assert worker.COLLAPSE_TAG not in recorder.tags and "mlflow.note.content" not in recorder.tags
    assert recorder.metrics[-1]["sparsity/collapsed_layers"] == 0.0
