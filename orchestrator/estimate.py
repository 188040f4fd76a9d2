"""A rough wall-clock estimate of a grid before it starts, from a few timed training steps per point.

A grid on a laptop can take minutes to hours; printing the estimate first lets the user stop a run that
would not fit the time they have. The estimate times forward, backward and AdamW of each point's model on
random data in this process (CPU only: on GPUs the first steps are dominated by kernel builds and autotuning,
and would mislead), multiplies by the steps of the recipe, and adds the start-up a trial pays (measured on a
2-core laptop, see experiments/RESULTS.md). Data loading, evaluation and the sparsity engine are covered by
one overhead factor, so read the result as "about", not as a promise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from orchestrator.config.loading import replace
from orchestrator.config.schema import ExperimentConfig
from orchestrator.search_space import GridPoint

__all__ = ["GridEstimate", "estimate_grid"]

#: Measured on the 2-core laptop (RESULTS.md): a one-worker trial in a reused actor pays ~7 s of its own
#: start-up, each concurrent actor ~15 s once; a trial of several workers starts a Ray Train job (~35 s).
_TRIAL_START_S, _ACTOR_START_S, _TRAIN_JOB_START_S = 7.0, 15.0, 35.0
#: Loader, evaluation, EMA, sparsity updates and reports on top of the bare steps, and Ray's start plus the
#: collation at the end: fitted to the embedded Table 8 and Table 1 grids on the 2-core laptop (3.0x, 25 s).
_LOOP_OVERHEAD, _RAY_AND_COLLATION_S = 3.0, 25.0


@dataclass(frozen=True)
class GridEstimate:
    """The estimate and what it was made of."""

    seconds: float
    trials: int
    concurrent: int
    step_s: float  # mean bare step time over the points

    def describe(self) -> str:
        rounds = math.ceil(self.trials / self.concurrent)
        return (f"estimated wall time ~{self.seconds / 60:.1f} min: {self.trials} trial(s), {self.concurrent} at "
                f"once ({rounds} round(s)), {self.step_s * 1e3:.0f} ms per bare training step here (rough: "
                "other load on this machine makes it longer)")


def _step_seconds(cfg: ExperimentConfig, steps: int = 2) -> float:
    """Median seconds of one optimizer step (all micro-batches) of ``cfg``'s model on random data."""
    from orchestrator.loop import build_model

    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    size, batch = cfg.data.image_size, cfg.micro_batch_size
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, cfg.data.num_classes, (batch,))
    times = []
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        started = time.perf_counter()
        for _ in range(cfg.accumulation_steps):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def estimate_grid(cfg: ExperimentConfig, points: Sequence[GridPoint], *, seeds: int,
                  concurrent: int) -> GridEstimate | None:
    """The estimate for ``points`` x ``seeds`` with ``concurrent`` trials at once; None on GPUs.

    ``cfg`` has its resources fitted (``run.use_gpu`` and ``run.num_workers`` resolved). A step is timed as
    one worker runs it (its micro-batch, ``run.cpus_per_worker`` threads); the workers of a trial run their
    micro-batches side by side, so their gradient exchange is not counted. None for ImageNet folders too.
    """
    if cfg.run.use_gpu or not points or cfg.data.source == "imagenet":
        return None  # a folder's size is known only once the workers read it
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.run.cpus_per_worker))
    try:
        step_times = [_step_seconds(replace(cfg, dict(p.overrides))) for p in points]
    finally:
        torch.set_num_threads(threads)
    steps = math.ceil(cfg.data.train_size / cfg.train.global_batch_size)
    workers = max(1, cfg.run.num_workers or 1)
    per_point = [cfg.train.epochs * steps * s * _LOOP_OVERHEAD for s in step_times]
    start = _TRIAL_START_S if workers == 1 else _TRAIN_JOB_START_S
    trials = len(points) * seeds
    work = sum(per_point) * seeds + trials * start
    seconds = work / max(1, concurrent) + (_ACTOR_START_S if workers == 1 else 0.0) + _RAY_AND_COLLATION_S
    return GridEstimate(seconds, trials, concurrent, sum(step_times) / len(step_times))
