"""Typed, validated settings of the dynamic sparsity engine.

The reference implementation threads an argparse namespace into its sparsity class and
silently accepts any string for the init mode (a typo zeroes the whole network). Here every
setting is a field of one frozen dataclass, validated when it is built, and every problem is
reported at once with the allowed values and the fix.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "GROWTH_MODES",
    "INIT_MODES",
    "PRUNE_MODES",
    "TARGETS",
    "SparsityConfig",
]

INIT_MODES: tuple[str, ...] = ("snip", "erk", "uniform")
PRUNE_MODES: tuple[str, ...] = ("magnitude",)
GROWTH_MODES: tuple[str, ...] = ("random", "gradient", "momentum")
TARGETS: tuple[str, ...] = ("all", "large_kernels")


def _choice_problem(field: str, value: Any, allowed: tuple[str, ...]) -> str | None:
    """Describe a bad choice, suggesting the nearest valid name (None when the value is valid)."""
    if isinstance(value, str) and value in allowed:
        return None
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value.lower(), allowed, n=1)
        if close:
            hint = f"; did you mean {close[0]!r}?"
    return f"{field}={value!r}: must be one of {list(allowed)}{hint}"


@dataclass(frozen=True)
class SparsityConfig:
    """Settings of :class:`~slak_model.sparsity.engine.DynamicSparsity`.

    Attributes:
        sparsity: Fraction of the targeted weights that are zero (0 <= s < 1). The paper uses 0.4.
        init: How per-layer densities are chosen: ``snip`` (global |w*g| ranking on one batch,
            the reference default), ``erk`` (Erdos-Renyi-Kernel) or ``uniform``. ``ERK`` is
            accepted and normalised to lower case, as the reference spells it that way.
        prune: Prune rule; only ``magnitude`` (layer-wise smallest |w|) is implemented.
        growth: Regrowth rule: ``random`` (the reference recipes), ``gradient`` (top |grad|)
            or ``momentum`` (top |Adam first moment / sqrt(second moment)|).
        prune_rate: p0, the initial adaptation rate (fraction of active weights replaced at an
            update), in (0, 1].
        prune_rate_min: The floor of the cosine schedule (0.005 in the reference), in [0, p0].
        update_frequency: f, optimizer steps between topology updates (> 0).
        stop_fraction: Stop topology updates after this fraction of the training steps
            (1.0 never stops, as the reference). In (0, 1].
        targets: ``all`` (every 2-D/4-D weight) or ``large_kernels`` (only the rectangular
            branches of each large-kernel module, the reference's ``--only-L``).
        dense_threshold: Layers whose density after initialisation is at or above this value
            stay dense and leave the mask set (0.99 in the reference), in (0, 1].
        min_density: Floor of every targeted layer's density at initialisation, in [0, 1 - sparsity].
            0 (the reference's behaviour and the paper presets') lets the SNIP ranking give a layer no
            weights at all: on small or heavily sparsified models the stem, downsample and head layers,
            whose |w * grad| dwarfs that of the blocks (layer scale 1e-6), can fill the whole budget. With
            a floor, every layer keeps at least ``ceil(min_density * numel)`` active weights, the rest of
            the budget is allocated by the init rule as before, and the total stays exactly
            ``int(sparsity budget)``. Updates keep each layer's count, so the floor holds for the whole run.
        collapse_threshold: A targeted layer whose density is at or below this value is reported as
            collapsed (a warning naming it, ``sparsity/collapsed_layers``), in [0, 1). 0 = only layers
            with no active weight at all.
        seed: Seed of the engine's private random generator (mask draws and random growth).
            Every rank must use the same seed.
    """

    sparsity: float = 0.4
    init: str = "snip"
    prune: str = "magnitude"
    growth: str = "random"
    prune_rate: float = 0.3
    prune_rate_min: float = 0.005
    update_frequency: int = 100
    stop_fraction: float = 1.0
    targets: str = "all"
    dense_threshold: float = 0.99
    min_density: float = 0.0
    collapse_threshold: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self._normalise()
        problems = self.problems()
        if problems:
            raise ValueError(
                "invalid SparsityConfig:\n  - " + "\n  - ".join(problems)
                + "\nFix the listed fields (e.g. SparsityConfig(sparsity=0.4, init='snip', growth='random'))."
            )

    def _normalise(self) -> None:
        """Accept the reference's spellings (``ERK``) by storing the canonical lower-case name."""
        if isinstance(self.init, str):
            object.__setattr__(self, "init", self.init.lower())

    def problems(self) -> list[str]:
        """Every invalid field, one line each starting with ``field=value``; empty when all are valid.

        It does not raise, so that a caller holding these settings inside a larger config (the
        orchestrator's ``sparse.*`` section) can report them together with its own problems, each line
        under its own dotted name.
        """
        problems = [
            p
            for p in (
                _choice_problem("init", self.init, INIT_MODES),
                _choice_problem("prune", self.prune, PRUNE_MODES),
                _choice_problem("growth", self.growth, GROWTH_MODES),
                _choice_problem("targets", self.targets, TARGETS),
            )
            if p is not None
        ]
        problems += self._numeric_problems()
        seed = self._seed_problem()
        if seed is not None:
            problems.append(seed)
        return problems

    def _numeric_problems(self) -> list[str]:
        """Range checks of the numeric fields, one message per bad field."""
        problems: list[str] = []

        def finite(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not (finite(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            problems.append(f"sparsity={self.sparsity!r}: must lie in [0, 1) (0.4 = 40% of weights zero)")
        if not (finite(self.prune_rate) and 0.0 < self.prune_rate <= 1.0):
            problems.append(f"prune_rate={self.prune_rate!r}: must lie in (0, 1] (reference recipes: 0.3 or 0.5)")
        p0 = self.prune_rate if finite(self.prune_rate) else 1.0
        if not (finite(self.prune_rate_min) and 0.0 <= self.prune_rate_min <= p0):
            problems.append(
                f"prune_rate_min={self.prune_rate_min!r}: must lie in [0, prune_rate={p0}] (reference: 0.005)"
            )
        if not (isinstance(self.update_frequency, int) and not isinstance(self.update_frequency, bool)
                and self.update_frequency > 0):
            problems.append(
                f"update_frequency={self.update_frequency!r}: must be a positive integer number of optimizer steps"
            )
        if not (finite(self.stop_fraction) and 0.0 < self.stop_fraction <= 1.0):
            problems.append(f"stop_fraction={self.stop_fraction!r}: must lie in (0, 1] (1.0 = never stop updating)")
        if not (finite(self.dense_threshold) and 0.0 < self.dense_threshold <= 1.0):
            problems.append(f"dense_threshold={self.dense_threshold!r}: must lie in (0, 1] (reference: 0.99)")
        density = 1.0 - self.sparsity if finite(self.sparsity) and 0.0 <= self.sparsity < 1.0 else 1.0
        # a little slack, so that sparsity=0.9 with min_density=0.1 (1 - 0.9 = 0.0999...98) is accepted
        if not (finite(self.min_density) and 0.0 <= self.min_density <= density + 1e-9):
            problems.append(
                f"min_density={self.min_density!r}: must lie in [0, 1 - sparsity = {density:g}] (0 = no floor, the "
                "paper's behaviour; e.g. 0.05 keeps 5% of every layer)"
            )
        if not (finite(self.collapse_threshold) and 0.0 <= self.collapse_threshold < 1.0):
            problems.append(
                f"collapse_threshold={self.collapse_threshold!r}: must lie in [0, 1) (0 = a layer with no active "
                "weight is collapsed)"
            )
        return problems

    def _seed_problem(self) -> str | None:
        """The seed check, separate so that a subclass may give ``seed`` another meaning (e.g. None)."""
        if isinstance(self.seed, int) and not isinstance(self.seed, bool):
            return None
        return f"seed={self.seed!r}: must be an integer"

    @property
    def density(self) -> float:
        """Target fraction of non-zero weights (1 - sparsity)."""
        return 1.0 - self.sparsity

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for checkpoints and tracking params)."""
        return asdict(self)
