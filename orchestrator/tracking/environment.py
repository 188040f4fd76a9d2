"""Tags that make a run reproducible: where it was computed (host, devices), with what (package versions,
kernel backend) and from which commit. Written by the training rank only (see ``create_tracker``)."""

from __future__ import annotations

import importlib.metadata
import json

from kernels import environment
from orchestrator.tracking._mlflow import _MAX_TAG_LEN

__all__ = ["run_tags_for_environment"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def run_tags_for_environment() -> dict[str, str]:
    """Tags that make a run reproducible: git commit, package versions, kernel backends, devices."""
    env = environment.describe()
    tags = {"slak.python": env["python"], "slak.hostname": env["hostname"], "slak.devices": env["device"],
            "slak.cuda": env["cuda"], "slak.cudnn": env["cudnn"]}
    for dist in ("torch", "timm", "ray", "mlflow", "numpy", "numba", "slak-orchestrator"):
        tags[f"slak.version.{dist}"] = _version(dist)
    commit, dirty = environment.git_commit()  # an image without .git reads the commit from SLAK_GIT_COMMIT
    tags["slak.git.commit"] = commit
    if not commit.startswith("unknown"):
        tags["mlflow.source.git.commit"] = commit
    if dirty is not None:
        tags["slak.git.dirty"] = str(dirty).lower()
    try:
        import kernels

        tags["slak.kernel.backend"] = kernels.active_backend()
        tags["slak.kernel.report"] = json.dumps(kernels.backend_report(), default=str)[:_MAX_TAG_LEN]
    except Exception as exc:  # noqa: BLE001 - a broken backend must still be recorded, not crash
        tags["slak.kernel.backend"] = f"error: {exc}"[:_MAX_TAG_LEN]
    return tags
