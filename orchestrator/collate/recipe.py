"""What the trials of a table ran on, and so what the paper's column beside them means.

Why it matters: the paper's numbers come from ImageNet-1K runs of 120 or 300 epochs; beside a laptop
proxy (procedural data, tiny images, a few epochs) they are context only, and a difference to them would
measure the recipe, not the model. The recipe is read from the trials' logged params.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from orchestrator import paper

__all__ = ["Recipe", "recipe_of"]


@dataclass(frozen=True)
class Recipe:
    """What the trials of one table ran on, read from their logged params.

    It decides what the paper column means: beside a *proxy* (any ``data.source`` but ``imagenet``) the
    paper's ImageNet numbers are context and no Δ is printed; on ``imagenet`` the Δ is printed, and is
    like-for-like only when ``matches_paper`` (same epochs and resolution as the paper's runs; whether the
    folder really is ImageNet-1K cannot be read from the params, and is assumed).
    """

    source: str = ""
    image_size: int | None = None
    epochs: int | None = None
    train_size: int | None = None
    seeds: int = 0
    data_path: str = ""
    paper_epochs: int | None = None
    paper_image_size: int | None = None

    @property
    def proxy(self) -> bool:
        """True unless the trials trained on an ImageNet-style folder."""
        return self.source != "imagenet"

    @property
    def matches_paper(self) -> bool:
        """ImageNet with the paper's epochs and resolution."""
        return (not self.proxy and self.paper_epochs is not None and self.epochs == self.paper_epochs
                and self.image_size == self.paper_image_size)

    def describe(self) -> str:
        """One paragraph that says what the table's numbers can and cannot be compared with."""
        seeds = f"{self.seeds} seed{'s' if self.seeds != 1 else ''} per row"
        paper = (f"ImageNet-1K top-1 after {self.paper_epochs} epochs at {self.paper_image_size} px"
                 if self.paper_epochs is not None else None)
        if self.proxy:
            what = (f"LAPTOP PROXY, not ImageNet: data.source={self.source or 'unknown'}, "
                    f"{_count(self.train_size)} training images of {_count(self.image_size)} px, "
                    f"{_count(self.epochs)} epochs, {seeds}.")
            if paper is None:
                return what
            return (f"{what} The paper column ({paper}) is context only: no difference to it is computed. "
                    "Compare directions: which row each ranks best, and whether the paper's best-vs-worst "
                    "order shows on ours.")
        where = f"an ImageNet-style folder ({self.data_path})" if self.data_path else "an ImageNet-style folder"
        what = f"{where}, {_count(self.image_size)} px, {_count(self.epochs)} epochs, {seeds}."
        if paper is None:
            return what
        if self.matches_paper:
            return (f"{what} The recipe matches the paper's ({paper}): Δ = ours − paper (assuming the folder "
                    "is ImageNet-1K).")
        return (f"{what} The recipe DIFFERS from the paper's ({paper}): Δ is printed but measures the recipe "
                "as much as the model; it is not a like-for-like comparison.")


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _param(part: pd.DataFrame, name: str) -> Any:
    """The value most trials logged for param ``name`` (None when absent)."""
    if name not in part or part[name].dropna().empty:
        return None
    return part[name].dropna().mode().iloc[0]


def recipe_of(tidy: pd.DataFrame, table: str) -> Recipe:
    """The :class:`Recipe` of ``table``'s trials in ``tidy`` (their ``data.*`` / ``train.*`` params)."""
    part = tidy[tidy["table"] == table] if len(tidy) else tidy
    paper_recipe = paper.paper_recipe(table)

    def number(name: str) -> int | None:
        value = pd.to_numeric(_param(part, name), errors="coerce")
        return None if value is None or pd.isna(value) else int(value)

    seeds = int(part.groupby(["row", "setting"])["seed_index"].nunique().max()) if len(part) else 0
    return Recipe(
        source=str(_param(part, "data.source") or ""),
        image_size=number("data.image_size"),
        epochs=number("train.epochs"),
        train_size=number("data.train_size"),
        seeds=seeds,
        data_path="" if str(_param(part, "data.path")) in ("None", "") else str(_param(part, "data.path")),
        paper_epochs=paper_recipe[0] if paper_recipe else None,
        paper_image_size=paper_recipe[1] if paper_recipe else None,
    )
