"""``SLaKConfig``: every architectural choice of a SLaK network as one frozen, validated dataclass.

Why a dataclass and not the reference's argument list: the reference packs the four stage kernels and
the short edge into one CLI list (``--kernel_size 51 49 47 13 5``) and switches the decomposition with
a ``Decom`` flag that defaults to off. Both are easy to get wrong silently (a forgotten flag builds the
51x51 model; ``Decom`` with ``7 7 7 7 100`` builds 7x100 strips). Here each choice is a typed field,
the 5-number list is accepted only as an alias with the reference's exact meaning, and every problem is
reported at once, before a single tensor exists.

Meaning of the kernel fields (reference semantics, kept so released checkpoints load):

- ``stage_kernels`` = M1..M4, the long edge of each stage's large kernel;
- ``short_edge`` = N, the short edge of the ``M x N`` (``tall``) and ``N x M`` (``wide``) strips;
- ``small_kernel`` = the side of the parallel square small kernel (``None`` = no small branch). A stage
  gets the small branch only when ``small_kernel < M`` of that stage, exactly as the reference, so
  ``kernel_size=[7, 7, 7, 7, 100]`` is its way of saying "no small branch" (the ConvNeXt baseline).

The alias ``kernel_size=[M1, M2, M3, M4, N]`` sets all three (``small_kernel = N``, as in the reference
where one number plays both roles).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import InitVar, asdict, dataclass, fields
from difflib import get_close_matches
from typing import Any

__all__ = ["KERNEL_MODES", "SLaKConfig"]

#: ``naive`` = one M x M kernel; ``replknet`` = M x M plus the small square kernel, each with BN;
#: ``decomposed`` = M x N + N x M + the small square kernel (SLaK).
KERNEL_MODES: tuple[str, ...] = ("naive", "replknet", "decomposed")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    """NumPy/other integral and real scalars as Python ``int``/``float`` (Tune and YAML may hand them in)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _odd_positive_problem(name: str, value: Any) -> str | None:
    if not _is_int(value) or value <= 0 or value % 2 == 0:
        return (
            f"{name}={value!r}: kernel sizes must be odd positive integers (the depthwise conv pads "
            f"k//2 on each side to keep the feature-map size); use e.g. {_nearest_odd(value)}"
        )
    return None


def _nearest_odd(value: Any) -> int:
    try:
        v = max(1, int(value))
    except (TypeError, ValueError):
        return 3
    return v if v % 2 == 1 else v + 1


@dataclass(frozen=True)
class SLaKConfig:
    """Architecture of one SLaK / ConvNeXt-style network (defaults: SLaK-T at width 1.0).

    Attributes:
        depths: Blocks per stage.
        dims: Base stage widths before ``width_factor``.
        stage_kernels: Long edge M of the large kernel in each stage (odd).
        short_edge: N, short edge of the decomposed strips (odd; unused unless ``decomposed``).
        small_kernel: Side of the parallel small square kernel, or ``None`` for no small branch. Ignored
            in ``naive`` mode; a stage only gets it when ``small_kernel < M``.
        kernel_mode: One of :data:`KERNEL_MODES`.
        use_bn: BatchNorm after every depthwise branch (the reference's ``bn``).
        width_factor: Stage widths are ``int(d * width_factor)`` (Python truncation, as the reference).
        drop_path_rate: Stochastic depth of the last block; earlier blocks get linspace(0, rate).
        layer_scale_init: Initial per-channel layer scale ``gamma``; ``<= 0`` removes ``gamma``.
        head_init_scale: Multiplies the initial head weight and bias.
        num_classes: Classifier outputs; 0 gives pooled features from ``forward``.
        in_chans: Input image channels.
        kernel_size: Init-only alias: the reference's ``[M1, M2, M3, M4, N]``. When given it sets
            ``stage_kernels``, ``short_edge`` and ``small_kernel`` (= N).
    """

    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    stage_kernels: tuple[int, ...] = (51, 49, 47, 13)
    short_edge: int = 5
    small_kernel: int | None = 5
    kernel_mode: str = "decomposed"
    use_bn: bool = True
    width_factor: float = 1.0
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6
    head_init_scale: float = 1.0
    num_classes: int = 1000
    in_chans: int = 3
    kernel_size: InitVar[Sequence[int] | None] = None

    def __post_init__(self, kernel_size: Sequence[int] | None) -> None:
        problems: list[str] = []
        if kernel_size is not None:
            ks = list(kernel_size) if isinstance(kernel_size, (list, tuple)) else None
            if ks is None or len(ks) != 5:
                problems.append(
                    f"kernel_size={kernel_size!r}: the reference alias needs exactly 5 numbers "
                    "[M1, M2, M3, M4, N] (four stage kernels, then the short edge / small kernel), "
                    "e.g. [51, 49, 47, 13, 5]"
                )
            else:
                object.__setattr__(self, "stage_kernels", tuple(ks[:4]))
                object.__setattr__(self, "short_edge", ks[4])
                object.__setattr__(self, "small_kernel", ks[4])
        for name in ("depths", "dims", "stage_kernels"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(_plain(v) for v in value))
        for name in (
            "short_edge",
            "small_kernel",
            "width_factor",
            "drop_path_rate",
            "layer_scale_init",
            "head_init_scale",
            "num_classes",
            "in_chans",
        ):
            object.__setattr__(self, name, _plain(getattr(self, name)))
        problems += self._problems()
        if problems:
            raise ValueError("invalid SLaKConfig:\n  - " + "\n  - ".join(problems))

    def _problems(self) -> list[str]:
        """Every invalid field, each with its value, what is allowed and the fix."""
        out: list[str] = []
        depths, dims, kernels = self.depths, self.dims, self.stage_kernels
        for name, value in (("depths", depths), ("dims", dims)):
            if not isinstance(value, tuple) or not value or not all(_is_int(v) and v > 0 for v in value):
                out.append(f"{name}={value!r}: must be a non-empty sequence of positive integers")
        if not isinstance(kernels, tuple) or not kernels:
            out.append(
                f"stage_kernels={kernels!r}: must be a sequence of odd positive integers, one per stage"
            )
            kernels = ()
        for i, k in enumerate(kernels):
            problem = _odd_positive_problem(f"stage_kernels[{i}] (stage {i + 1})", k)
            if problem:
                out.append(problem)
        if (
            isinstance(depths, tuple)
            and isinstance(dims, tuple)
            and len({len(depths), len(dims), len(kernels)}) != 1
        ):
            out.append(
                f"depths, dims and stage_kernels have lengths {len(depths)}, {len(dims)}, {len(kernels)}: "
                "give one entry per stage in each"
            )
        if self.kernel_mode not in KERNEL_MODES:
            out.append(f"kernel_mode={self.kernel_mode!r}: allowed values are {list(KERNEL_MODES)}")
        if not isinstance(self.use_bn, bool):
            out.append(f"use_bn={self.use_bn!r}: must be True or False")
        valid_kernels = [k for k in kernels if _is_int(k) and k > 0]
        if self.kernel_mode == "decomposed":
            n = self.short_edge
            if _is_int(n) and n > 0 and valid_kernels and n > min(valid_kernels):
                out.append(
                    f"short_edge={n} is larger than the long edge {min(valid_kernels)} of "
                    f"stage_kernels={list(kernels)} in decomposed mode: the strips would be "
                    f"{min(valid_kernels)}x{n} (the reference silently builds such kernels); "
                    "use kernel_mode='naive' or 'replknet' for a square kernel (e.g. the ConvNeXt baseline "
                    "kernel_size=[7, 7, 7, 7, 100]), or a short edge <= every stage kernel"
                )
            else:
                problem = _odd_positive_problem("short_edge", n)
                if problem:
                    out.append(problem)
        if self.small_kernel is not None and self.kernel_mode != "naive":
            if not _is_int(self.small_kernel) or self.small_kernel <= 0:
                out.append(f"small_kernel={self.small_kernel!r}: must be None or an odd positive integer")
            elif any(self.small_kernel < k for k in valid_kernels):
                problem = _odd_positive_problem("small_kernel", self.small_kernel)
                if problem:
                    out.append(problem)
        if (
            not isinstance(self.width_factor, (int, float))
            or isinstance(self.width_factor, bool)
            or not self.width_factor > 0
        ):
            out.append(f"width_factor={self.width_factor!r}: must be a number > 0 (SLaK uses 1.3)")
        elif (
            isinstance(dims, tuple)
            and all(_is_int(d) for d in dims)
            and any(int(d * self.width_factor) < 1 for d in dims)
        ):
            out.append(
                f"width_factor={self.width_factor!r} makes a stage of dims={list(dims)} zero channels wide"
            )
        if not isinstance(self.drop_path_rate, (int, float)) or not 0.0 <= self.drop_path_rate < 1.0:
            out.append(f"drop_path_rate={self.drop_path_rate!r}: must be in [0, 1) (the paper uses 0.1-0.5)")
        for name in ("layer_scale_init", "head_init_scale"):
            if not isinstance(getattr(self, name), (int, float)):
                out.append(f"{name}={getattr(self, name)!r}: must be a number")
        if not _is_int(self.num_classes) or self.num_classes < 0:
            out.append(f"num_classes={self.num_classes!r}: must be an integer >= 0 (0 = no classifier)")
        if not _is_int(self.in_chans) or self.in_chans < 1:
            out.append(f"in_chans={self.in_chans!r}: must be a positive integer")
        return out

    @property
    def widths(self) -> tuple[int, ...]:
        """Actual stage widths: ``int(d * width_factor)`` (124, 249, 499, 998 for SLaK-T at 1.3)."""
        return tuple(int(d * self.width_factor) for d in self.dims)

    @property
    def decomposed(self) -> bool:
        """True for SLaK's M x N + N x M strips (the reference's ``Decom=True``)."""
        return self.kernel_mode == "decomposed"

    def stage_small_kernel(self, stage: int) -> int | None:
        """Small-branch size of ``stage`` or ``None`` (reference rule: only when smaller than M)."""
        if self.kernel_mode == "naive" or self.small_kernel is None:
            return None
        return self.small_kernel if self.small_kernel < self.stage_kernels[stage] else None

    def reference_kernel_size(self) -> list[int]:
        """The reference's 5-number ``--kernel_size`` for this config (``[M1, M2, M3, M4, N]``)."""
        return [*self.stage_kernels, self.short_edge]

    def to_dict(self) -> dict[str, Any]:
        """Plain field -> value dict (tuples as lists), e.g. for logging as parameters."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def replace(self, **overrides: Any) -> SLaKConfig:
        """A copy with ``overrides`` applied; accepts the ``kernel_size`` alias and rejects unknown names."""
        known = {f.name for f in fields(self)} | {"kernel_size"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            hints = [
                f"{u!r} (did you mean {m[0]!r}?)" if (m := get_close_matches(u, known, 1)) else repr(u)
                for u in unknown
            ]
            raise ValueError(
                f"unknown SLaKConfig field(s) {', '.join(hints)}; valid fields are {sorted(known)}"
            )
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(overrides)
        return SLaKConfig(**values)
