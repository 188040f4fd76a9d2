"""A training-process session without Ray, for tests that run :class:`orchestrator.worker.TrainingWorker`
directly: rank 0 of 1 on the CPU, no checkpoint to resume, reports recorded (or a failure injected)."""

from __future__ import annotations

import torch


class CpuSession:
    """Records every report; ``fail_on_report`` raises at the first one (a worker dying after epoch 1)."""

    rank, world_size = 0, 1

    def __init__(self, fail_on_report: bool = False) -> None:
        self.reports: list[dict[str, float]] = []
        self.fail_on_report = fail_on_report

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cpu")

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def latest_checkpoint(self) -> None:
        return None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None, name: str) -> None:
        if self.fail_on_report:
            raise RuntimeError("the worker dies here")
        self.reports.append(dict(metrics))
