"""The adaptation-rate (prune-rate) schedule and the topology-update calendar.

The reference steps a ``CosineAnnealingLR`` attached to a dummy optimizer once per optimizer
step; its value after ``t`` steps has the closed form used here. A closed form needs no state,
so a resumed run gets exactly the rate of the uninterrupted one (the reference fast-forwards
the scheduler but restarts its step counter, shifting every later update).

Deliberate differences from the reference:
    * Past ``total_steps`` the reference's cosine would rise again (it is periodic); here the rate
      stays at ``p_min``.
    * ``stop_fraction`` < 1 stops topology updates after that fraction of training (the
      reference has no such switch; 1.0 reproduces it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AdaptationSchedule", "cosine_prune_rate"]


def cosine_prune_rate(step: int, p0: float, p_min: float, total_steps: int) -> float:
    """Adaptation rate after ``step`` optimizer steps.

    p(t) = p_min + (p0 - p_min) * (1 + cos(pi * t / T)) / 2, clamped at ``p_min`` for t >= T.

    Args:
        step: Optimizer steps taken so far (t >= 0).
        p0: Initial rate.
        p_min: Floor of the schedule.
        total_steps: T, the optimizer steps of the whole run.

    Returns:
        The rate as a float.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps!r} must be a positive number of optimizer steps")
    t = min(max(step, 0), total_steps)
    return p_min + (p0 - p_min) * (1.0 + math.cos(math.pi * t / total_steps)) / 2.0


@dataclass(frozen=True)
class AdaptationSchedule:
    """When topology updates happen and at which rate.

    Attributes:
        p0: Initial adaptation rate.
        p_min: Floor of the cosine.
        update_frequency: f; updates happen at optimizer steps t = k*f, k >= 1.
        total_steps: T, optimizer steps of the whole run.
        stop_fraction: No update after ``stop_fraction * T`` unless it is 1.0 (never stop).
    """

    p0: float
    p_min: float
    update_frequency: int
    total_steps: int
    stop_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.total_steps, int) or self.total_steps <= 0:
            raise ValueError(
                f"total_steps={self.total_steps!r} must be a positive integer "
                "(optimizer steps of the whole run: steps_per_epoch * epochs)"
            )

    def rate(self, step: int) -> float:
        """The adaptation rate p(step)."""
        return cosine_prune_rate(step, self.p0, self.p_min, self.total_steps)

    @property
    def last_update_step(self) -> float:
        """The last step at which an update may happen (inf when updates never stop)."""
        if self.stop_fraction >= 1.0:
            return math.inf
        return self.stop_fraction * self.total_steps

    def is_update_step(self, step: int) -> bool:
        """True when a topology update happens right after optimizer step ``step`` (1-based)."""
        return step > 0 and step % self.update_frequency == 0 and step <= self.last_update_step

    def next_update_step(self, step: int) -> int | None:
        """The first update step strictly after ``step``, or None when no update remains."""
        nxt = (step // self.update_frequency + 1) * self.update_frequency
        return nxt if nxt <= self.last_update_step else None
