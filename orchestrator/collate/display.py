"""A table cell summary -> what a reader sees: the paper's layout as strings, Markdown and LaTeX.

One line per paper row and a column group per setting (naive / RepLKNet, decomposed / sparse groups /
+ width, ...). ``Δ`` to the paper is shown only for trials on ImageNet
(:class:`~orchestrator.collate.recipe.Recipe`); beside a proxy the paper column is marked as context.
"""

from __future__ import annotations

import math

import pandas as pd

from orchestrator.collate.recipe import Recipe

__all__ = ["INTERVALS_NOTE", "TABLE_TITLES", "to_display", "to_latex", "to_markdown"]

TABLE_TITLES: dict[str, str] = {
    "table1": "Table 1: naive enlarging vs RepLKNet-style re-parameterisation",
    "table2": "Table 2: decomposed kernels, sparse groups, sparse groups + 1.3x width",
    "table8": "Table 8: sparsity vs width (paired points)",
    "table9": "Table 9: short edge N of the decomposed kernels",
    "adapt_p": "Adaptation rate p (update frequency fixed)",
    "adapt_f": "Adaptation frequency f (p = 0.3)",
}
#: What a cell without a number shows.
_MISSING = "—"

#: What every collated table says about its intervals and its params/FLOPs columns.
INTERVALS_NOTE = (
    "Intervals: 95 % Student-t over seeds; 'no difference detectable' = the row's interval overlaps the table's "
    "best row's. Our params/FLOPs are for the model we trained, sparse weights not counted."
)


def _fmt(value: float, digits: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _human(value: float) -> str:
    """29.0M / 5.02G / 33.8K: the tiny CPU models and SLaK-T share one readable column."""
    if value is None or math.isnan(value):
        return _MISSING
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def _ci_text(low: float, high: float) -> str:
    return _MISSING if math.isnan(low) else f"[{low:.1f}, {high:.1f}]"


def to_display(summary: pd.DataFrame, recipe: Recipe | None = None) -> pd.DataFrame:
    """Strings laid out like the paper: one line per row, a column group per setting.

    ``Δ`` (ours − paper) is shown only for trials on ImageNet (``recipe`` not a proxy); without a recipe,
    or beside a proxy, the paper column is context and no difference is printed.
    """
    show_delta = recipe is not None and not recipe.proxy
    settings = list(dict.fromkeys(summary["setting"]))
    single = len(settings) == 1
    rows = list(dict.fromkeys(summary["row"]))
    out = pd.DataFrame({"row": rows})
    for setting in settings:
        prefix = "" if single else f"{setting} "
        part = summary[summary["setting"] == setting].set_index("row").reindex(rows)
        top1 = [
            _MISSING if math.isnan(t) else (f"{t:.1f} ± {s:.1f}" if not math.isnan(s) else f"{t:.1f}")
            for t, s in zip(part["top1"], part["top1_std"], strict=True)
        ]
        out[f"{prefix}top-1"] = top1
        out[f"{prefix}95% CI"] = [_ci_text(lo, hi) for lo, hi in zip(part["top1_ci_low"], part["top1_ci_high"],
                                                                      strict=True)]
        out[f"{prefix}vs best"] = [v if isinstance(v, str) and v else _MISSING for v in part["vs_best"]]
        out[f"{prefix}best epoch"] = [_fmt(v) for v in part["top1_best"]]
        if part["ema_top1"].notna().any():
            out[f"{prefix}EMA"] = [_fmt(v) for v in part["ema_top1"]]
        if part["density"].notna().any():
            out[f"{prefix}density"] = [_fmt(v, 2) for v in part["density"]]
        out[f"{prefix}params"] = [_human(v * 1e6) for v in part["params_m"]]
        out[f"{prefix}FLOPs"] = [_human(v * 1e9) for v in part["flops_g"]]
        out[f"{prefix}paper{'' if show_delta else ' (context)'}"] = [_fmt(v) for v in part["published_top1"]]
        if show_delta:
            out[f"{prefix}Δ"] = [_fmt(v, signed=True) for v in part["delta"]]
        out[f"{prefix}seeds"] = [str(int(v)) if pd.notna(v) else "0" for v in part["seeds"]]
        out[f"{prefix}status"] = [s if isinstance(s, str) else "missing" for s in part["status"]]
    return out


def to_markdown(display: pd.DataFrame, title: str = "") -> str:
    """A GitHub Markdown table (pandas' own needs ``tabulate``, which the stack does not pin)."""
    header = [str(c) for c in display.columns]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for values in display.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |")
    return "\n".join(lines) + "\n"


def to_latex(display: pd.DataFrame, title: str = "") -> str:
    """A booktabs LaTeX table of the display frame."""
    body = display.rename(columns=lambda c: str(c).replace("Δ", r"$\Delta$"))
    body = body.map(lambda v: str(v).replace("±", r"$\pm$").replace("—", "--").replace("_", r"\_"))
    latex = body.to_latex(index=False, escape=False, column_format="l" * len(body.columns))
    return (f"% {title}\n" if title else "") + latex
