"""PEP 562 lazy attributes for a package: public names resolved from their submodule on first access.

Why: ``import slak_model`` (and ``slak_model.sparsity``) must stay light (no torch, no timm) so that the
orchestrator's config can use the library's own dataclasses and still answer a bad setting in a fraction of
a second; the model and engine code load only when something uses them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def attach(package: str, lazy: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``lazy`` maps a public name to the submodule defining it."""

    def __getattr__(name: str) -> Any:
        module = lazy.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(lazy))

    return __getattr__, __dir__
