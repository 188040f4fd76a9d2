"""The SLaK paper's published numbers (ICLR 2023), as data.

These are the paper's printed cells, transcribed once so that ``python -m slak_model.info`` and the
orchestrator's result collation can put our measured numbers beside them. Conventions:

- ``params_m`` / ``flops_g`` are what the paper prints: sparsity-aware (nonzero weights only), in
  millions and in G multiply-accumulates (the paper calls them FLOPs);
- Table 3 prints "sparse / dense" for SLaK; the dense figures are in ``dense_params_m`` /
  ``dense_flops_g``;
- keys follow the grids: Table 1 ``row`` = kernel (``"31-29-27-13"``), ``setting`` = ``naive`` or
  ``replknet``; Table 2 settings ``decomposed``, ``sparse_groups`` (40 % sparsity),
  ``sparse_groups_wide`` (40 % + 1.3x width); Table 8 ``row`` = ``"<sparsity:.2f>/<width:g>x"``,
  setting ``slak``; Table 9 ``row`` = ``"N=<n>"``, setting ``slak``; Table 3 ``row`` = model name,
  ``setting`` = input size.
- Table 2's second row is printed as "31-29-37-13" in the paper; every other place (text, README,
  released checkpoints) says 31-29-27-13, which is what is stored here.
- Table 10 (effective receptive field) holds area ratios, not accuracies: its rows are
  :class:`PublishedErf` in :data:`TABLE10`, apart from the top-1 cells of :data:`PUBLISHED`.
- ``l2s`` is the repository's second paper (Huang et al., "Are Large Kernels Better Teachers than
  Transformers for ConvNets?", ICML 2023) as its README tabulates it: ConvNeXt students distilled from
  SLaK teachers with NKD for 300 epochs; ``row`` = student, ``setting`` = teacher (``"none"`` for the
  students trained on labels alone, the ConvNeXt paper's numbers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = [
    "ERF_THRESHOLDS",
    "L2S_STUDENTS",
    "L2S_TEACHERS",
    "PUBLISHED",
    "TABLE8_PAIRS",
    "TABLE10",
    "TABLE10_CAPTION",
    "TABLES",
    "PublishedErf",
    "PublishedResult",
    "kernel_row",
    "published",
    "reference_cell",
    "table8_row",
]


@dataclass(frozen=True)
class PublishedResult:
    """One published cell (ImageNet-1K top-1 %, with the paper's params/FLOPs where printed)."""

    table: str
    row: str
    setting: str
    top1: float | None
    params_m: float | None = None
    flops_g: float | None = None
    dense_params_m: float | None = None
    dense_flops_g: float | None = None
    epochs: int = 120
    image_size: int = 224
    #: The number the row stands for on its table's axis (the stage-1 kernel, the width factor, N), so
    #: that nobody has to parse it back out of ``row``; None where the table has no numeric axis.
    axis: float | None = None

    def to_dict(self) -> dict:
        """Plain dict (e.g. one row of a data frame)."""
        return asdict(self)


#: Table id -> caption.
TABLES: dict[str, str] = {
    "table1": "ConvNeXt-T, 120 epochs: naive kernel enlarging vs RepLKNet-style re-parameterisation",
    "table2": "ConvNeXt-T, 120 epochs: decomposed, + sparse groups (40 %), + 1.3x width",
    "table3": "300 epochs, ImageNet-1K (SLaK: sparse / dense-equivalent counts)",
    "table8": "SLaK-T, 120 epochs: paired (sparsity, width) trade-off",
    "table9": "SLaK-T, 120 epochs: short edge N of the decomposed kernels",
    "l2s": "ConvNeXt students distilled from SLaK teachers (NKD), 300 epochs (ICML 2023)",
}

#: The ``l2s`` student rows -> the timm model of that architecture, and the teacher settings -> our variant.
L2S_STUDENTS: dict[str, str] = {"ConvNeXt-T": "convnext_tiny", "ConvNeXt-S": "convnext_small"}
L2S_TEACHERS: dict[str, str] = {"SLaK-T": "slak_tiny", "SLaK-S": "slak_small"}


def kernel_row(stage_kernels: tuple[int, ...]) -> str:
    """Tables 1/2's row key of a set of stage kernels, e.g. ``"51-49-47-13"`` (grid points use the same)."""
    return "-".join(str(k) for k in stage_kernels)


def _t1() -> list[PublishedResult]:
    rows = [
        ((7, 7, 7, 7), (81.0, 29, 4.5), None),
        ((31, 29, 27, 13), (80.5, 32, 6.5), (81.5, 32, 6.1)),
        ((51, 49, 47, 13), (80.4, 38, 9.4), (81.3, 38, 9.3)),
        ((61, 59, 57, 13), (80.3, 43, 11.6), (81.3, 43, 11.5)),
    ]
    out = []
    for kernels, naive, rep in rows:
        out.append(PublishedResult("table1", kernel_row(kernels), "naive", *naive, axis=kernels[0]))
        if rep is not None:
            out.append(PublishedResult("table1", kernel_row(kernels), "replknet", *rep, axis=kernels[0]))
    return out


def _t2() -> list[PublishedResult]:
    rows = {
        (7, 7, 7, 7): ((81.0, 29, 4.5), (80.0, 17, 2.6), (81.1, 29, 4.5)),
        (31, 29, 27, 13): ((81.3, 30, 5.0), (80.4, 18, 2.9), (81.5, 30, 4.8)),
        (51, 49, 47, 13): ((81.5, 31, 5.4), (80.5, 18, 3.1), (81.6, 30, 5.0)),
        (61, 59, 57, 13): ((81.4, 31, 5.6), (80.4, 19, 3.2), (81.5, 31, 5.2)),
    }
    out = []
    for kernels, cells in rows.items():
        for setting, cell in zip(("decomposed", "sparse_groups", "sparse_groups_wide"), cells, strict=True):
            out.append(PublishedResult("table2", kernel_row(kernels), setting, *cell, axis=kernels[0]))
    return out


def _t3() -> list[PublishedResult]:
    def r(
        model: str,
        size: int,
        top1: float,
        params: float,
        flops: float,
        dense_params: float | None = None,
        dense_flops: float | None = None,
    ) -> PublishedResult:
        return PublishedResult(
            "table3",
            model,
            str(size),
            top1,
            params,
            flops,
            dense_params,
            dense_flops,
            epochs=300,
            image_size=size,
        )

    return [
        r("ConvNeXt-T", 224, 82.1, 29, 4.5),
        r("SLaK-T", 224, 82.5, 30, 5.0, 50, 8.7),
        r("ConvNeXt-S", 224, 83.1, 50, 8.7),
        r("SLaK-S", 224, 83.8, 55, 9.8, 91, 16.7),
        r("ConvNeXt-B", 224, 83.8, 89, 15.4),
        r("SLaK-B", 224, 84.0, 95, 17.1, 158, 28.5),
        r("SLaK-B", 384, 85.5, 95, 50.3, 158, 83.8),
    ]


#: Table 8's paired (sparsity, width factor) points with their params (M), FLOPs (G) and top-1.
_TABLE8 = (
    ((0.20, 1.1), 29, 5.0, 81.3),
    ((0.40, 1.3), 30, 5.0, 81.6),
    ((0.55, 1.5), 30, 4.9, 81.7),
    ((0.70, 1.9), 32, 5.0, 81.6),
    ((0.82, 2.5), 32, 5.1, 81.3),
)
#: The (sparsity, width factor) points of Table 8, in the paper's order.
TABLE8_PAIRS: tuple[tuple[float, float], ...] = tuple(pair for pair, *_ in _TABLE8)


def table8_row(sparsity: float, width: float) -> str:
    """Table 8's row key of a (sparsity, width) point, e.g. ``"0.40/1.3x"`` (grid points use the same)."""
    return f"{sparsity:.2f}/{width:g}x"


def _t8() -> list[PublishedResult]:
    return [PublishedResult("table8", table8_row(s, w), "slak", top1, p, f, axis=w) for (s, w), p, f, top1 in _TABLE8]


def _t9() -> list[PublishedResult]:
    return [
        PublishedResult("table9", f"N={n}", "slak", top1, axis=n) for n, top1 in ((3, 81.5), (5, 81.6), (7, 81.4))
    ]


def _l2s() -> list[PublishedResult]:
    rows = (("ConvNeXt-T", "none", 82.1, 29, 4.5), ("ConvNeXt-T", "SLaK-T", 83.1, 29, 4.5),
            ("ConvNeXt-S", "none", 83.1, 50, 8.7), ("ConvNeXt-S", "SLaK-S", 84.3, 50, 8.7))
    return [PublishedResult("l2s", row, setting, top1, params, flops, epochs=300)
            for row, setting, top1, params, flops in rows]


#: Every published cell, in the papers' order (Tables 1, 2, 3, 8, 9, then the distillation's).
PUBLISHED: tuple[PublishedResult, ...] = tuple(_t1() + _t2() + _t3() + _t8() + _t9() + _l2s())


def published(table: str | None = None) -> list[PublishedResult]:
    """The published cells of ``table`` (``"table1"`` ... ``"table9"``, ``"l2s"``), or all of them.

    Raises:
        ValueError: ``table`` is not one of :data:`TABLES`.
    """
    if table is None:
        return list(PUBLISHED)
    if table not in TABLES:
        raise ValueError(f"table={table!r} is not a published table; choose one of {sorted(TABLES)}")
    return [r for r in PUBLISHED if r.table == table]


#: Our variants -> the model names of Table 3.
_TABLE3_MODELS = {"slak_tiny": "SLaK-T", "slak_small": "SLaK-S", "slak_base": "SLaK-B"}


def reference_cell(variant: str, image_size: int, epochs: int | None = None,
                   stage_kernels: tuple[int, ...] | list[int] | None = None) -> PublishedResult | None:
    """The published cell a model of this recipe is compared with, or None where the paper has none.

    Table 3 holds the 300-epoch SLaK-T/S/B at 224 px and the SLaK-B fine-tuned at 384 px; the 120-epoch
    SLaK-T of the released 31/51/61 checkpoints is Table 2's "+ 1.3x width" row of its kernels. ``epochs``
    None (not recorded) means the 300-epoch recipe the released T/S/B files were trained with.
    """
    if epochs is not None and epochs != 300 and variant == "slak_tiny" and image_size == 224 and stage_kernels:
        row = kernel_row(tuple(stage_kernels))
        for cell in published("table2"):
            if cell.row == row and cell.setting == "sparse_groups_wide":
                return cell if epochs == cell.epochs else None
        return None
    model = _TABLE3_MODELS.get(variant)
    for cell in published("table3"):
        if cell.row == model and cell.setting == str(image_size):
            return cell
    return None


#: The thresholds t of Table 10: the share of the total contribution the centred square must exceed.
ERF_THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)

TABLE10_CAPTION = (
    "Effective receptive field: high-contribution area ratio r (% of the input area) at thresholds t, "
    "1024x1024 inputs, 50 ImageNet validation images"
)


@dataclass(frozen=True)
class PublishedErf:
    """One row of Table 10: the area ratios r, in % of the input area, at each of :data:`ERF_THRESHOLDS`."""

    model: str
    kernel: str
    ratios_pct: tuple[float, ...]
    image_size: int = 1024
    images: int = 50

    def ratio_pct(self, threshold: float) -> float:
        """r at ``threshold`` (one of :data:`ERF_THRESHOLDS`), in %."""
        return dict(zip(ERF_THRESHOLDS, self.ratios_pct, strict=True))[threshold]


#: Table 10's rows in the paper's order. ``model`` names are the paper's; "ConvNeXt-T (RepLKNet)" is
#: ConvNeXt-T with RepLKNet-style 31-29-27-13 kernels (plus the 5x5 small kernel).
TABLE10: tuple[PublishedErf, ...] = (
    PublishedErf("ResNet-101", "3-3-3-3", (0.9, 1.5, 3.2, 22.4)),
    PublishedErf("ResNet-152", "3-3-3-3", (1.1, 1.8, 3.9, 34.4)),
    PublishedErf("ConvNeXt-T", "7-7-7-7", (2.0, 3.6, 7.7, 55.5)),
    PublishedErf("ConvNeXt-T (RepLKNet)", "31-29-27-13", (4.0, 9.1, 19.1, 97.5)),
    PublishedErf("SLaK-T", "51-49-47-13", (6.9, 11.5, 23.4, 97.5)),
)
