"""Helpers shared by the integration tests that run training jobs and read their MLflow runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_train_cli() -> ModuleType:
    """``experiments/train.py`` loaded as a module (the project itself never imports from experiments/)."""
    spec = importlib.util.spec_from_file_location("train_cli", REPO_ROOT / "experiments" / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def all_artifacts(client: Any, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run, recursively, as paths relative to the run's artifact root."""
    out: list[str] = []
    for f in client.list_artifacts(run_id, path):
        out += all_artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out
