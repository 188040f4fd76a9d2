"""Any checkpoint a job may start from or evaluate, read into one shape: weights, EMA, masks, recipe, hash.

Two layouts reach the entry scripts. Our own: a checkpoint folder written by
:mod:`orchestrator.checkpoints` (sealed by its manifest) or its ``state.pt`` (the whole trainer state:
``model``, ``ema``, ``sparsity`` masks, the flat ``config`` it was trained with). The paper's released
files: a dict with ``model`` (and maybe ``model_ema``) under the reference's parameter names, possibly
behind ``module.`` prefixes, and the reference's pickled training ``args``. Both are read with
``torch.load(weights_only=True)``.

What the rest of the project needs from either is the same (:class:`CheckpointContents`): the weights
under our names, the EMA weights when the file holds them, the sparsity masks when it has them, the
settings it records as dotted config names (resolution and eval transform, architecture, epochs), the
SHA-256 of the file (an evaluation or a fine-tune is tied to the exact bytes it read), and the entries of
the file that a fresh start leaves unused (optimizer, schedule, RNG streams), so they can be named.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator.checkpoints import MANIFEST, file_sha256, load_checkpoint_dir
from slak_model.checkpoint import read_checkpoint, reference_to_ours

__all__ = ["CheckpointContents", "WeightsError", "read_weights"]

log = logging.getLogger(__name__)

#: ``format`` of the trainer state this project writes (``orchestrator.loop``).
_TRAINER_FORMAT = "slak-orchestrator-trainer"
#: The reference's ``--model`` names -> our variants.
_REFERENCE_VARIANTS = {"SLaK_tiny": "slak_tiny", "SLaK_small": "slak_small", "SLaK_base": "slak_base"}
#: Entries of our trainer state that carry weights (the rest is optimizer, schedule, RNG, counters).
_OUR_WEIGHT_ENTRIES = ("model", "ema", "sparsity", "config")


class WeightsError(ValueError):
    """A checkpoint path that cannot be read as weights; the message names the path and the fix."""


@dataclass(frozen=True)
class CheckpointContents:
    """The weights of one checkpoint file, under our parameter names.

    Attributes:
        path: The file read (a folder's ``state.pt`` for our checkpoint folders).
        sha256: SHA-256 of that file's bytes.
        layout: ``"ours"`` (a trainer state of this project) or ``"official"`` (the reference's layout).
        model: The trained weights.
        ema: The EMA weights, or None when the file has none.
        masks: Our checkpoints' sparsity masks (masked layers only), or None; for official files the pattern
            is in the weights themselves (``weight != 0``).
        recipe: Settings the file records, as dotted config names (``data.image_size``, ``data.crop_pct``,
            ``data.interpolation``, ``train.epochs``, ``model.variant``, ...); only those it records. Our
            files record their whole ``model`` and ``data`` sections; the reference's ``kernel_size`` comes
            as the ``model.kernel_size`` shorthand.
        args: The reference's training arguments (official files), quoted by mismatch messages.
        unused: What else the file holds that a fresh start does not use (optimizer, schedule, ...).
    """

    path: str
    sha256: str
    layout: str
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None
    masks: dict[str, torch.Tensor] | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    args: Any = None
    unused: list[str] = field(default_factory=list)

    def weights(self, which: str) -> dict[str, torch.Tensor]:
        """``"model"`` or ``"ema"`` weights.

        Raises:
            WeightsError: ``"ema"`` from a file without EMA weights.
        """
        if which == "model":
            return self.model
        if self.ema is None:
            raise WeightsError(f"{self.path} holds no EMA weights (it was trained without train.ema, or is a "
                               "released file with `model` only); use finetune.weights=model")
        return self.ema

    def pattern_masks(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The sparse pattern of the trained weights for the layers ``names``: the saved masks where the
        file has them, else ``weight != 0`` (a layer kept dense gives an all-true mask)."""
        saved = self.masks or {}
        missing = [n for n in names if n not in saved and n not in self.model]
        if missing:
            raise WeightsError(f"{self.path} has no weights for the targeted layer(s) {missing[:5]}")
        return {n: saved[n].to(torch.bool) if n in saved else self.model[n] != 0 for n in names}


def _ours(state: Mapping[str, Any], path: Path, sha256: str) -> CheckpointContents:
    config = dict(state.get("config") or {})
    keep = ("model.", "data.", "train.epochs", "train.seed")
    recipe = {k: v for k, v in config.items() if k.startswith(keep)}
    sparsity = state.get("sparsity")
    masks = dict(sparsity["masks"]) if isinstance(sparsity, Mapping) and sparsity.get("masks") else None
    unused = sorted(k for k in state if k not in _OUR_WEIGHT_ENTRIES and state[k] is not None)
    return CheckpointContents(str(path), sha256, "ours", dict(state["model"]),
                              dict(state["ema"]) if state.get("ema") is not None else None,
                              masks, recipe, None, unused)


def _official_recipe(args: Any) -> dict[str, Any]:
    """The reference's training arguments as our dotted settings (those it records)."""
    if args is None:
        return {}
    get = args.__dict__.get if hasattr(args, "__dict__") else dict(args).get
    recipe: dict[str, Any] = {}
    size = get("input_size")
    if isinstance(size, int):
        recipe["data.image_size"] = size
        # the reference's eval transform: resize + centre crop at crop_pct (default 224/256) below 384,
        # a direct resize to the square at 384 and above
        crop_pct = get("crop_pct")
        if size >= 384:
            recipe.update({"data.crop_pct": 1.0, "data.crop_mode": "squash"})
        else:
            recipe["data.crop_pct"] = float(crop_pct) if crop_pct else 0.875
    if isinstance(get("train_interpolation"), str):
        recipe["data.interpolation"] = get("train_interpolation")
    if isinstance(get("epochs"), int):
        recipe["train.epochs"] = get("epochs")
    if get("model") in _REFERENCE_VARIANTS:
        recipe["model.variant"] = _REFERENCE_VARIANTS[get("model")]
    kernel = get("kernel_size")
    if isinstance(kernel, (list, tuple)) and len(kernel) == 5:
        recipe["model.kernel_size"] = [int(k) for k in kernel]
    if isinstance(get("width_factor"), (int, float)):
        recipe["model.width_factor"] = float(get("width_factor"))
    if get("Decom") is True:
        recipe["model.kernel_mode"] = "decomposed"
    if isinstance(get("bn"), bool):
        recipe["model.use_bn"] = get("bn")
    if isinstance(get("nb_classes"), int):
        recipe["data.num_classes"] = get("nb_classes")
    return recipe


def _official(checkpoint: Mapping[str, Any], path: Path, sha256: str) -> CheckpointContents:
    def ours(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {reference_to_ours(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}

    for key in ("model", "state_dict", "module"):
        if isinstance(checkpoint.get(key), Mapping):
            model_key = key
            break
    else:
        model_key = None
    if model_key is None and isinstance(checkpoint.get("model_ema"), Mapping):
        raise WeightsError(f"{path} holds only `model_ema` weights; the trained weights are read from "
                           "`model` (the EMA beside them): save the file as {'model': weights}")
    model = ours(checkpoint[model_key]) if model_key else ours(checkpoint)
    if not model:
        raise WeightsError(f"{path} holds no tensors under `model`, `state_dict` or at its top level; is it a "
                           "SLaK checkpoint?")
    ema = ours(checkpoint["model_ema"]) if isinstance(checkpoint.get("model_ema"), Mapping) else None
    args = checkpoint.get("args")
    unused = sorted(k for k in checkpoint if k not in (model_key, "model_ema", "args")
                    and not isinstance(checkpoint[k], torch.Tensor))
    return CheckpointContents(str(path), sha256, "official", model, ema, None, _official_recipe(args), args,
                              unused)


def read_weights(path: str | os.PathLike[str]) -> CheckpointContents:
    """Read a checkpoint of either layout (see the module docstring).

    Args:
        path: Our checkpoint folder (with ``manifest.json``), its ``state.pt``, or a released ``.pth``.

    Raises:
        WeightsError: no such file, or not a checkpoint of weights.
        ValueError: a folder whose file does not match its manifest, or a file that would need unpickling
            code (:func:`orchestrator.checkpoints.load_checkpoint_dir`).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / MANIFEST).is_file():
            raise WeightsError(f"{p} is a folder without {MANIFEST}: give a checkpoint folder of this project "
                               "(e.g. RUN/epoch_0300), its state.pt, or a released .pth file")
        state, manifest = load_checkpoint_dir(p)
        return _ours(state, p / manifest["file"], manifest["sha256"])
    if not p.is_file():
        raise WeightsError(f"checkpoint {str(p)!r}: no such file or folder")
    sha256 = file_sha256(p)
    try:
        checkpoint = read_checkpoint(p)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a non-checkpoint file
        raise WeightsError(f"{p} cannot be read as a checkpoint with torch.load(weights_only=True): "
                           f"{str(exc).splitlines()[0]}") from None
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{p} holds a {type(checkpoint).__name__}, not a dict of weights")
    if checkpoint.get("format") == _TRAINER_FORMAT:
        return _ours(checkpoint, p, sha256)
    return _official(checkpoint, p, sha256)
