"""The paper's experiment grids as lists of points, validated before Ray starts.

A grid point is a set of dotted-name overrides of one ``ExperimentConfig`` (the same names as the YAML
keys, the CLI overrides and the MLflow params) plus the paper cell it stands for (table, row, setting).
Table 8 is a list of *paired* (sparsity, width) points, not a cross product: one ``tune.grid_search``
runs over whole point dicts, and seeds are the only axis crossed with it.

Kernel sizes and tiny images. The paper's kernels (7 / 31-29-27-13 / 51-49-47-13 / 61-59-57-13) are
meant for 224 px inputs, where stage 1 sees a 56x56 map. On the embedded default's small procedural
images a 51x51 kernel would be many times larger than every feature map, so :func:`scale_kernel_sizes`
shrinks each stage's large kernel by ``image_size / 224`` (rounded to the nearest odd number), so that
the kernel keeps the paper's size *relative to its feature map*. It never goes below the short edge N
(``model.short_edge``; a decomposed ``k x N`` strip needs ``k >= N``) nor below 3, and N itself is kept as
the paper states it, because Table 9 studies exactly that number. At 224 px and above nothing changes.
At 64 px: 7 -> 5, 31-29-27-13 -> 9-9-7-5, 51-49-47-13 -> 15-15-13-5, 61-59-57-13 -> 17-17-17-5 (N=5).
Kernel points set the typed fields ``model.stage_kernels``, ``model.short_edge`` and ``model.small_kernel``
(= N, the paper's small kernel).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from ray import tune

from orchestrator.config.ignored import ignored_settings
from orchestrator.config.loading import replace
from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.validation import ConfigError, validate
from orchestrator.loop import build_meta_model
from slak_model import published

__all__ = [
    "ADAPTATION_F_VALUES",
    "ADAPTATION_P_VALUES",
    "PAPER_KERNELS",
    "TABLE8_PAIRS",
    "TABLES",
    "GridError",
    "GridPoint",
    "adaptation_grid",
    "build_grid",
    "kernel_size_grid",
    "param_space",
    "parse_point",
    "scale_kernel_sizes",
    "settings_the_grid_ignores",
    "sparsity_width_grid",
    "validate_points",
]

logger = logging.getLogger(__name__)

#: Table 8: the paired (sparsity, width factor) points of SLaK-T (the published table's own list).
TABLE8_PAIRS = published.TABLE8_PAIRS
#: The paper's stage kernels by their headline size; the short edge N is appended separately.
PAPER_KERNELS: dict[int, tuple[int, int, int, int]] = {
    7: (7, 7, 7, 7),
    31: (31, 29, 27, 13),
    51: (51, 49, 47, 13),
    61: (61, 59, 57, 13),
}
#: The adaptation sweeps: prune rate p with f fixed, update frequency f (steps) with p = 0.3.
ADAPTATION_P_VALUES: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7)
ADAPTATION_F_VALUES: tuple[int, ...] = (100, 500, 1000, 2000)
ADAPTATION_FIXED_P = 0.3
ADAPTATION_FIXED_F = 100
#: SLaK-T's recipe: 51-49-47-13 with N = 5, 40 % sparsity, 1.3x width.
SLAK_KERNEL = 51
SLAK_SHORT_EDGE = 5
SLAK_SPARSITY = 0.4
SLAK_WIDTH = 1.3
REFERENCE_IMAGE_SIZE = 224

#: Every table a grid can be built for (``build_grid`` names).
TABLES: tuple[str, ...] = ("table1", "table2", "table8", "table9", "adapt_p", "adapt_f")


class GridError(ValueError):
    """One or more grid points are invalid; the message lists every bad point and its problems."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"{len(self.problems)} invalid grid point(s); fix or drop them before starting Ray:\n{lines}"
        )


@dataclass(frozen=True)
class GridPoint:
    """One cell of a paper table: the overrides that produce it and where its number goes.

    Attributes:
        table: grid name, one of :data:`TABLES`.
        row: the paper's row key (``"51-49-47-13"``, ``"0.20/1.1x"``, ``"N=5"``, ``"p=0.3"``).
        setting: the paper's column group (``"naive"``, ``"sparse_groups"``, ``"slak"``, ...).
        overrides: dotted config names -> values applied on top of the base config.
        axis: the number the point stands for on its table's axis (width factor, p, f, the paper's
            stage-1 kernel, N), typed here so that collation never parses it back out of ``row``.
    """

    table: str
    row: str
    setting: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    axis: float | None = None

    @property
    def label(self) -> str:
        """A stable, filesystem-safe name for the cell (run names, MLflow tags)."""
        raw = f"{self.row}__{self.setting}"
        return "".join(c if c.isalnum() or c in "-._" else "_" for c in raw)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for Tune's param space (must survive pickling and Tuner.restore)."""
        return {
            "table": self.table,
            "row": self.row,
            "setting": self.setting,
            "overrides": dict(self.overrides),
            "axis": self.axis,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GridPoint:
        """Inverse of :meth:`to_dict` (points of experiments recorded before ``axis`` existed have none)."""
        return cls(data["table"], data["row"], data["setting"], dict(data["overrides"]), data.get("axis"))


def _odd_round(value: float) -> int:
    """Nearest odd integer (ties go up): kernels must be odd to keep 'same' padding centred."""
    low = int(value) if int(value) % 2 == 1 else int(value) - 1
    return low if value - low < (low + 2) - value else low + 2


def scale_kernel_sizes(stage_kernels: Sequence[int], short_edge: int, image_size: int) -> list[int]:
    """Map the paper's stage kernels to ``image_size`` inputs (see the module docstring for why).

    Args:
        stage_kernels: the four large kernels as the paper gives them for 224 px inputs.
        short_edge: N, the short edge of the decomposed strips (not scaled; the kernels stay >= N).
        image_size: the training resolution of the run.

    Returns:
        ``model.stage_kernels``: the four scaled stage kernels.
    """
    ratio = min(1.0, image_size / REFERENCE_IMAGE_SIZE)
    if ratio >= 1.0:
        return [int(k) for k in stage_kernels]
    floor = max(3, short_edge if short_edge % 2 == 1 else short_edge + 1)
    return [max(floor, _odd_round(k * ratio)) for k in stage_kernels]


def _kernel(base: ExperimentConfig, size: int, short_edge: int = SLAK_SHORT_EDGE) -> dict[str, Any]:
    """The kernel overrides of a point: the paper's ``size`` kernels scaled to the run, N as given."""
    return {
        "model.stage_kernels": scale_kernel_sizes(PAPER_KERNELS[size], short_edge, base.data.image_size),
        "model.short_edge": int(short_edge),
        "model.small_kernel": int(short_edge),
    }


def _kernel_row(size: int) -> str:
    return published.kernel_row(PAPER_KERNELS[size])


def sparsity_width_grid(
    base: ExperimentConfig, extra_pairs: Iterable[tuple[float, float]] = ()
) -> list[GridPoint]:
    """Table 8: SLaK (51-49-47-13, N = 5, decomposed) at the paired (sparsity, width) points.

    Args:
        base: the experiment's base config (its image size decides the kernel scaling).
        extra_pairs: more (sparsity, width) points, e.g. from the CLI; they get rows of their own.
    """
    points = []
    for sparsity, width in [*TABLE8_PAIRS, *extra_pairs]:
        overrides = {
            "sparse.enabled": True,
            "sparse.sparsity": float(sparsity),
            "model.width_factor": float(width),
            "model.kernel_mode": "decomposed",
            **_kernel(base, SLAK_KERNEL),
        }
        points.append(GridPoint("table8", published.table8_row(sparsity, width), "slak", overrides, axis=width))
    return points


def kernel_size_grid(
    base: ExperimentConfig, table: str, short_edges: Sequence[int] = (3, 5, 7)
) -> list[GridPoint]:
    """Tables 1, 2 and 9 as grid points.

    Table 1: naive enlarging vs RepLKNet-style (large + 5x5 re-parameterised branch) at 7/31/51/61,
    dense, width 1.0 (the paper has no RepLKNet cell at 7x7). Table 2: decomposed (dense), sparse
    groups (40 % sparsity), sparse groups + 1.3x width at 7/31/51/61. Table 9: SLaK at 51-49-47-13
    with short edge N in ``short_edges``.
    """
    points: list[GridPoint] = []
    dense = {"sparse.enabled": False, "model.width_factor": 1.0}
    if table == "table1":
        for size in PAPER_KERNELS:
            for mode in ("naive", "replknet"):
                if mode == "replknet" and size == 7:
                    continue
                overrides = {**dense, "model.kernel_mode": mode, **_kernel(base, size)}
                points.append(GridPoint(table, _kernel_row(size), mode, overrides, axis=PAPER_KERNELS[size][0]))
    elif table == "table2":
        settings = {
            "decomposed": dense,
            "sparse_groups": {
                "sparse.enabled": True,
                "sparse.sparsity": SLAK_SPARSITY,
                "model.width_factor": 1.0,
            },
            "sparse_groups_wide": {
                "sparse.enabled": True,
                "sparse.sparsity": SLAK_SPARSITY,
                "model.width_factor": SLAK_WIDTH,
            },
        }
        for size in PAPER_KERNELS:
            for setting, extra in settings.items():
                overrides = {
                    **extra,
                    "model.kernel_mode": "decomposed",
                    **_kernel(base, size),
                }
                points.append(GridPoint(table, _kernel_row(size), setting, overrides, axis=PAPER_KERNELS[size][0]))
    elif table == "table9":
        for n in short_edges:
            overrides = {
                "sparse.enabled": True,
                "sparse.sparsity": SLAK_SPARSITY,
                "model.width_factor": SLAK_WIDTH,
                "model.kernel_mode": "decomposed",
                **_kernel(base, SLAK_KERNEL, short_edge=int(n)),
            }
            points.append(GridPoint(table, f"N={n}", "slak", overrides, axis=int(n)))
    else:
        raise ValueError(f"table={table!r} is not a kernel-size table; allowed: 'table1', 'table2', 'table9'")
    return points


def adaptation_grid(
    base: ExperimentConfig,
    sweep: str,
    values: Sequence[float] | None = None,
) -> list[GridPoint]:
    """The adaptation sweeps: ``"p"`` varies ``sparse.prune_rate`` at f = 100, ``"f"`` varies
    ``sparse.update_frequency`` at p = 0.3; both on the SLaK recipe (51-49-47-13, 40 %, 1.3x)."""
    recipe = {
        "sparse.enabled": True,
        "sparse.sparsity": SLAK_SPARSITY,
        "model.width_factor": SLAK_WIDTH,
        "model.kernel_mode": "decomposed",
        **_kernel(base, SLAK_KERNEL),
    }
    if sweep == "p":
        grid = values if values is not None else ADAPTATION_P_VALUES
        return [
            GridPoint(
                "adapt_p",
                f"p={p:g}",
                "slak",
                {**recipe, "sparse.prune_rate": float(p), "sparse.update_frequency": ADAPTATION_FIXED_F},
                axis=float(p),
            )
            for p in grid
        ]
    if sweep == "f":
        grid = values if values is not None else ADAPTATION_F_VALUES
        return [
            GridPoint(
                "adapt_f",
                f"f={int(f)}",
                "slak",
                {**recipe, "sparse.prune_rate": ADAPTATION_FIXED_P, "sparse.update_frequency": int(f)},
                axis=int(f),
            )
            for f in grid
        ]
    raise ValueError(
        f"sweep={sweep!r} is not an adaptation sweep; allowed: 'p' (prune rate) or 'f' (frequency)"
    )


def build_grid(base: ExperimentConfig, table: str, **kwargs: Any) -> list[GridPoint]:
    """Dispatch on a table name from :data:`TABLES` (kwargs go to the table's builder)."""
    if table == "table8":
        return sparsity_width_grid(base, **kwargs)
    if table in ("table1", "table2", "table9"):
        return kernel_size_grid(base, table, **kwargs)
    if table in ("adapt_p", "adapt_f"):
        return adaptation_grid(base, table[-1], **kwargs)
    raise ValueError(f"table={table!r} is unknown; allowed: {', '.join(TABLES)}")


def parse_point(text: str, table: str, setting: str = "extra") -> GridPoint:
    """Parse an extra CLI point ``"sparse.sparsity=0.9,model.width_factor=3.0"`` into a GridPoint.

    Values go through YAML, so ``0.9`` is a float, ``[9,9,7,5]`` a list and ``true`` a bool. The
    point becomes a row of its own under ``setting`` (use the table's setting, e.g. ``"slak"`` for
    Table 8, to show it in the same column group as the paper's points).
    """
    overrides: dict[str, Any] = {}
    for part in _split_top_level(text):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"point={text!r}: {part!r} is not 'dotted.name=value'; write e.g. "
                "'sparse.sparsity=0.9,model.width_factor=3.0'"
            )
        overrides[key.strip()] = yaml.safe_load(value.strip())
    row = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
    return GridPoint(table, row, setting, overrides)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets (so list values survive)."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += char in "[{("
        depth -= char in "]})"
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in (s.strip() for s in parts) if p]


def validate_points(
    base: ExperimentConfig, points: Sequence[GridPoint], *, seeds: int = 1
) -> list[ExperimentConfig]:
    """Build every point's config through the config's own validation; report all bad points at once.

    Raises:
        GridError: listing each invalid point with its label, its overrides and the problems found by
            the experiment config and the model config (e.g. sparsity >= 1, width <= 0, an even kernel,
            a short edge longer than a stage kernel), or duplicate points.
    """
    problems: list[str] = []
    configs: list[ExperimentConfig] = []
    seen: dict[str, int] = {}
    if not points:
        problems.append("the grid is empty; give at least one point")
    if seeds < 1:
        problems.append(f"tune.seeds={seeds} must be >= 1 (number of seeds per grid point)")
    for index, point in enumerate(points):
        if point.label in seen:
            problems.append(
                f"point #{index} ({point.row} / {point.setting}) duplicates point #{seen[point.label]}"
            )
            continue
        seen[point.label] = index
        try:
            cfg = replace(base, dict(point.overrides))
            validate(cfg)
            build_meta_model(cfg)
        except (ConfigError, ValueError, TypeError, KeyError) as err:
            detail = str(err).replace("\n", "; ")
            problems.append(
                f"point #{index} ({point.row} / {point.setting}) {dict(point.overrides)}: {detail}"
            )
            continue
        configs.append(cfg)
    if problems:
        raise GridError(problems)
    return configs


def settings_the_grid_ignores(base: ExperimentConfig, points: Sequence[GridPoint],
                              names: Iterable[str]) -> list[str]:
    """Of the user's ``names`` (e.g. the command line's ``key=value`` overrides), those that no point of the
    grid uses, one line each: every point sets the name to a value of its own (``sparse.sparsity`` on
    Table 8) or turns off the feature it belongs to (``sparse.*`` on Table 1's dense points)."""
    flat = base.to_flat()

    def used_by(name: str, point: GridPoint) -> bool:
        if name in point.overrides and point.overrides[name] != flat[name]:
            return False
        try:
            cfg = dataclasses.replace(replace(base, dict(point.overrides)), user_set=frozenset([name]))
        except (ConfigError, ValueError, TypeError):
            return True  # an invalid point is validate_points' to report
        return ignored_settings(cfg) == ([], [])

    return [f"{name}={flat[name]!r} has no effect: every point of the {points[0].table} grid sets it or turns "
            "its feature off; drop it, or add points with the grid script's own options"
            for name in names if name in flat and points and not any(used_by(name, p) for p in points)]


def param_space(points: Sequence[GridPoint], *, seeds: int, constants: Mapping[str, Any]) -> dict[str, Any]:
    """Tune's param space: one grid over whole point dicts (paired, never crossed) times the seeds.

    ``constants`` (the experiment's name, its parent MLflow run) ride along unchanged so that
    ``Tuner.restore`` finds them in each trial's own stored config.
    """
    return {
        **constants,
        "point": tune.grid_search([p.to_dict() for p in points]),
        "seed_index": tune.grid_search(list(range(seeds))),
    }
