"""Compatibility guard that lets ``torchvision`` (and therefore ``timm``) import on CPU-only torch.

Why this exists: the torchvision wheel on the Python package index is a CUDA build. On a CPU-only
torch its compiled ``_C`` library cannot load; torchvision swallows that error and then, in
``_meta_registrations``, registers fake kernels for ``torchvision::nms`` -- an operator that was never
defined -- which raises ``RuntimeError: operator torchvision::nms does not exist``. ``import timm``
imports torchvision, so the whole model stack would fail to import.

What it does: before the first torchvision import it (1) does nothing if the real operators are already
registered, (2) tries to load torchvision's own compiled library (succeeds on a CUDA machine, so this is
a no-op there), and only if that fails (3) declares the two operator *schemas* that the meta
registrations refer to. torchvision then imports with its C++ ops reported as unavailable; every pure
Python part (transforms, datasets, models) works, which is all SLaK needs.

It must run before ``import timm`` / ``import torchvision`` anywhere: ``import slak_model`` arranges
that it runs just before the first import of either (:mod:`slak_model._timm_hook`), and the test
``conftest.py`` calls it too.
It is deliberately not a ``.pth`` hook, which would import torch into every Python process (Ray's
daemons included).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

__all__ = ["install", "torchvision_ops_available"]

_LOG = logging.getLogger(__name__)
_SCHEMA_LIB = None  # keeps the torch.library.Library alive for the life of the process
_INSTALLED = False


def _real_ops_registered() -> bool:
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute access resolves the op or raises
        return True
    except (AttributeError, RuntimeError):
        return False


def install() -> None:
    """Make ``import torchvision`` safe on a CPU-only torch; idempotent and cheap."""
    global _SCHEMA_LIB, _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    if "torchvision" in sys.modules:
        return  # already imported (successfully or not): nothing we can change now
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    if _real_ops_registered():
        return
    package_dir = os.path.dirname(spec.origin)
    for filename in sorted(os.listdir(package_dir)):
        if filename.startswith("_C") and filename.endswith(".so"):
            try:
                torch.ops.load_library(os.path.join(package_dir, filename))
                return
            except (OSError, RuntimeError, ImportError) as error:
                _LOG.debug("torchvision's compiled ops did not load (%s); declaring schemas only", error)
            break
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SCHEMA_LIB = library


def torchvision_ops_available() -> bool:
    """True when torchvision's compiled operators (nms, roi_align, ...) really work."""
    return _SCHEMA_LIB is None and _real_ops_registered()
