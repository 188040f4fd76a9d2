"""Keeps ``import slak_model`` cheap while its promises about timm still hold.

Why: ``import slak_model`` imports neither torch nor timm (about 3 s), so that a launcher can validate
the typed settings (:class:`~slak_model.config.SLaKConfig`, :class:`~slak_model.sparsity.SparsityConfig`)
in a fraction of a second. Two things used to ride on the eager import and must not get lost:

- the torchvision guard (:func:`slak_model._compat.install`) has to run before the first ``import timm``
  or ``import torchvision``, or timm fails to import on a CPU-only torch;
- ``timm.create_model("slak_tiny")`` has to work in any process that imported ``slak_model``, whichever
  of the two it imported first.

So, while timm is not imported yet, ``slak_model`` puts a finder in front of :data:`sys.meta_path` that
only looks at the top-level names ``timm`` and ``torchvision``: before either is loaded it runs the
guard, and once timm's own ``__init__`` has run it imports :mod:`slak_model.variants`, whose decorators
register the variants. The finder then removes itself. If timm is already imported, the variants are
registered at once instead.

The module imports only what the interpreter has loaded anyway (``logging`` and the guard are imported
when the finder fires), so that it adds nothing measurable to ``import slak_model``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

__all__ = ["install"]

_VARIANTS = "slak_model.variants"


def _install_guard() -> None:
    from . import _compat

    _compat.install()


def _register_variants() -> None:
    """Import the module whose ``@register_model`` decorators put the SLaK variants into timm's registry.

    It is skipped while that module is already being imported (timm was imported from inside it): its
    decorators run once the import finishes.
    """
    if _VARIANTS in sys.modules:
        return
    try:
        importlib.import_module(_VARIANTS)
    except Exception:  # a broken model stack must not make ``import timm`` itself fail
        import logging

        logging.getLogger(__name__).warning(
            "the SLaK variants could not be registered with timm; slak_model.create_model() shows why",
            exc_info=True,
        )


class _RegisterAfterExec:
    """Runs timm's own loader, then registers the variants and hands the module its real loader back."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        _register_variants()


class _TimmImportHook:
    """Sees only the first import of ``timm`` / ``torchvision``; every other name goes to the next finder."""

    _NAMES = frozenset({"timm", "torchvision"})

    def __init__(self) -> None:
        self._busy = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self._NAMES or self._busy:
            return None
        self._busy = True  # the guard and the lookup below ask the finders for these names again
        try:
            _install_guard()
            if fullname != "timm":
                return None  # the guard was all torchvision needed; the normal finders load it
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        _remove(self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def _remove(hook: _TimmImportHook) -> None:
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)


def install() -> None:
    """Register the variants now if timm is imported, else when it is (running the guard before it)."""
    if "timm" in sys.modules:
        _register_variants()
        return
    if not any(isinstance(finder, _TimmImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())
