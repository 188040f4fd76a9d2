"""Checkpoint folders: the trainer's whole state in one file, sealed by a manifest with its SHA-256.

Why a manifest: a run folder may sit on shared storage, be interrupted mid-write, or hold a file someone
else planted. The state file is written to a temporary name, flushed, renamed, and only then is the
manifest written, so a folder without a manifest (or whose file does not match it) was never completely
written and is refused by name. The state is tensors and plain Python data only, and is read with
``torch.load(weights_only=True)``: the manifest proves integrity, not authorship, and a file that would
need arbitrary unpickling is refused without running it.

Both ways a training process reports checkpoints (Ray Train workers, single-process Tune trials) write
and read these folders; nothing here depends on Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

__all__ = ["MANIFEST", "STATE_FILE", "load_checkpoint_dir", "save_checkpoint_dir"]

STATE_FILE, MANIFEST = "state.pt", "manifest.json"
#: Manifests of checkpoints that hold tensors and plain data only carry this; older ones held NumPy's RNG
#: state as arrays, which load with NumPy's array globals allowed and nothing else.
_LAYOUT = "tensors-and-plain-data"


def _numpy_array_globals() -> list:
    import numpy as np

    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (checkpoint manifests, teacher and fine-tune identities)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint_dir(state: dict[str, Any], directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``state`` into ``directory`` atomically: temp file, fsync, rename, then the manifest last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.tmp"
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / STATE_FILE)
    manifest = {"file": STATE_FILE, "sha256": file_sha256(directory / STATE_FILE), "layout": _LAYOUT,
                "epoch": state.get("epoch"), "step": state.get("step"), **(extra or {})}
    tmp_manifest = directory / f".{MANIFEST}.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, directory / MANIFEST)
    return directory / STATE_FILE


def load_checkpoint_dir(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, manifest)`` of a checkpoint folder written by :func:`save_checkpoint_dir`.

    Raises:
        ValueError: the folder has no manifest or the state file does not match it (an interrupted
            write), naming the folder.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {directory} has no {MANIFEST}: it was not completely written; delete it "
                         "or pick an earlier checkpoint")
    manifest = json.loads(manifest_path.read_text())
    state_path = directory / manifest["file"]
    if not state_path.is_file() or file_sha256(state_path) != manifest["sha256"]:
        raise ValueError(f"checkpoint {state_path} does not match its manifest (truncated or modified); delete "
                         f"{directory} or pick an earlier checkpoint")
    try:
        if manifest.get("layout") == _LAYOUT:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        else:  # written before the layout was recorded: NumPy RNG arrays may be in it, nothing else is allowed
            with torch.serialization.safe_globals(_numpy_array_globals()):
                state = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"checkpoint {state_path} holds objects other than tensors and plain Python data, which this project "
            f"never writes; refusing to unpickle it (it could run code). Delete {directory} if you did not put it "
            f"there. Detail: {str(exc).splitlines()[0]}") from None
    return state, manifest
