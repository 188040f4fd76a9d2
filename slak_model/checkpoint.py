"""Load the paper's released checkpoints into our parameter names, strictly, with a useful error.

The reference names its modules after history (``LoRA1``/``LoRA2`` are the rectangular strips, not
low-rank adapters; ``downsample_layers.0`` is the stem). :func:`reference_to_ours` maps every reference
key onto the names of :class:`~slak_model.model.SLaK`; :func:`checkpoint_filter_fn` applies it to a
whole state dict (timm's ``pretrained_filter_fn`` hook), and :func:`load_official_checkpoint` loads a
file or dict with ``strict=True``.

Why the error is long: users of the reference mostly failed at this step (a forgotten ``--Decom True``,
the wrong ``--kernel_size``, the wrong width), and ``load_state_dict`` only lists keys. The error here
names every missing, unexpected and mis-shaped key and then the likely cause, read off the checkpoint
itself (its kernel sizes, widths, depths, branches), with the config change that fixes it.

Files are read with ``torch.load(weights_only=True)``. The reference pickles its ``argparse``
``Namespace`` of training arguments into every checkpoint; a plain attribute holder stands in for that
class while unpickling, so nothing but data is ever constructed.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "HEAD_KEYS",
    "CheckpointMismatchError",
    "LoadReport",
    "check_state_dict",
    "checkpoint_filter_fn",
    "extract_state_dict",
    "load_official_checkpoint",
    "load_pretrained",
    "ours_to_reference",
    "read_checkpoint",
    "reference_to_ours",
    "to_reference_state_dict",
]

log = logging.getLogger(__name__)

_STRIP_PREFIXES = ("module.", "backbone.")
_STATE_KEYS = ("model", "state_dict", "model_ema")
_BRANCH_NAMES = {
    "LoRA1": "tall",
    "LoRA2": "wide",
    "Decom1": "tall",
    "Decom2": "wide",
    "small_conv": "small",
    "lkb_origin": "square",
}
_BLOCK_RE = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)$")
_DOWNSAMPLE_RE = re.compile(r"^downsample_layers\.(\d+)\.(.+)$")
_OURS_BLOCK_RE = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")
_KERNEL_RE = re.compile(r"^stages\.(\d+)\.blocks\.\d+\.large_kernel\.(tall|square)\.conv\.weight$")


#: The classifier's tensors: the only ones a fine-tune may re-initialise (another class count).
HEAD_KEYS: tuple[str, ...] = ("head.weight", "head.bias")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists every bad key and the likely cause."""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_pretrained` did with each tensor of the model and of the checkpoint.

    Attributes:
        loaded: Model keys whose values came from the checkpoint.
        reinitialised: Model keys kept at their fresh initialisation (the head, for another class count).
        ignored: Checkpoint keys the model has no use for (the old head's tensors when it was replaced).
        classes: ``(checkpoint, model)`` class counts when the head was replaced, else None.
    """

    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    classes: tuple[int, int] | None = None

    def lines(self) -> list[str]:
        """A readable account, one line per category (tensor counts, then the names that are not loaded)."""
        out = [f"loaded {len(self.loaded)} tensor(s) from the checkpoint"]
        if self.reinitialised:
            why = (f" (the checkpoint's head has {self.classes[0]} classes, the model {self.classes[1]})"
                   if self.classes else "")
            out.append(f"re-initialised {len(self.reinitialised)}{why}: {', '.join(self.reinitialised)}")
        if self.ignored:
            out.append(f"ignored {len(self.ignored)} tensor(s) of the checkpoint: {', '.join(self.ignored)}")
        return out


class _ReferenceArgs:
    """Stand-in for ``argparse.Namespace`` while unpickling reference checkpoints (data only)."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __repr__(self) -> str:
        return f"ReferenceArgs({self.__dict__})"


def reference_to_ours(key: str) -> str:
    """Our name for one reference state-dict key (keys already in our naming pass through).

    ``downsample_layers.0.*`` -> ``stem.*``; ``downsample_layers.i.*`` -> ``stages.i.downsample.*``;
    ``stages.s.b.*`` -> ``stages.s.blocks.b.*`` with ``LoRA1``/``LoRA2``/``small_conv``/``lkb_origin`` ->
    ``tall``/``wide``/``small``/``square``, ``lkb_reparam`` -> ``deploy_square``,
    ``pwconv1``/``pwconv2`` -> ``mlp.fc1``/``mlp.fc2``.
    """
    for prefix in _STRIP_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix) :]
    m = _DOWNSAMPLE_RE.match(key)
    if m:
        stage, rest = int(m.group(1)), m.group(2)
        return f"stem.{rest}" if stage == 0 else f"stages.{stage}.downsample.{rest}"
    m = _BLOCK_RE.match(key)
    if m:
        rest = m.group(3)
        parts = rest.split(".")
        if parts[0] == "large_kernel" and len(parts) > 1:
            if parts[1] == "lkb_reparam":
                parts[1] = "deploy_square"
            else:
                parts[1] = _BRANCH_NAMES.get(parts[1], parts[1])
        elif parts[0] in ("pwconv1", "pwconv2"):
            parts = ["mlp", "fc" + parts[0][-1], *parts[1:]]
        return f"stages.{m.group(1)}.blocks.{m.group(2)}.{'.'.join(parts)}"
    return key


_OURS_TO_REF_BRANCH = {
    "tall": "LoRA1",
    "wide": "LoRA2",
    "small": "small_conv",
    "square": "lkb_origin",
    "deploy_square": "lkb_reparam",
}
_OURS_STAGE_RE = re.compile(r"^stages\.(\d+)\.(downsample|blocks)\.(.+)$")


def ours_to_reference(key: str) -> str:
    """The reference name of one of our keys (inverse of :func:`reference_to_ours`).

    Raises:
        ValueError: the key has no reference counterpart (``deploy_tall``/``deploy_wide``: the reference
            cannot represent a merged decomposed kernel).
    """
    if key.startswith("stem."):
        return "downsample_layers.0." + key[len("stem.") :]
    m = _OURS_STAGE_RE.match(key)
    if not m:
        return key
    stage, kind, rest = m.groups()
    if kind == "downsample":
        return f"downsample_layers.{stage}.{rest}"
    block, _, rest = rest.partition(".")
    parts = rest.split(".")
    if parts[0] == "large_kernel" and len(parts) > 1:
        if parts[1] not in _OURS_TO_REF_BRANCH:
            raise ValueError(
                f"{key!r} has no reference counterpart: the reference cannot hold merged "
                "decomposed kernels; export the unmerged model"
            )
        parts[1] = _OURS_TO_REF_BRANCH[parts[1]]
    elif parts[0] == "mlp":
        parts = ["pwconv" + parts[1][-1], *parts[2:]]
    return f"stages.{stage}.{block}.{'.'.join(parts)}"


def to_reference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights under the reference's names, e.g. for the reference's downstream code."""
    return {ours_to_reference(k): v for k, v in model.state_dict().items()}


def extract_state_dict(checkpoint: Mapping[str, Any], key: str | None = None) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict: ``key`` if given, else ``model``, ``state_dict``, ``model_ema``
    (first present), else the dict itself."""
    if key is not None:
        if key not in checkpoint:
            raise ValueError(f"key={key!r} is not in the checkpoint; it holds {sorted(checkpoint)[:20]}")
        return dict(checkpoint[key])
    for candidate in _STATE_KEYS:
        if candidate in checkpoint and isinstance(checkpoint[candidate], Mapping):
            return dict(checkpoint[candidate])
    return dict(checkpoint)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` that also accepts the reference's pickled ``args``."""
    with torch.serialization.safe_globals([(_ReferenceArgs, "argparse.Namespace")]):
        return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
    """Map a reference (or already-ours) state dict onto our names (timm ``pretrained_filter_fn``)."""
    sd = extract_state_dict(state_dict) if any(k in state_dict for k in _STATE_KEYS) else dict(state_dict)
    return {reference_to_ours(k): v for k, v in sd.items()}


def load_official_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    key: str | None = None,
) -> nn.Module:
    """Load a released SLaK checkpoint (or any reference/our state dict) into ``model`` strictly.

    Args:
        model: A :class:`~slak_model.model.SLaK` built with the checkpoint's architecture.
        path_or_state_dict: A file (read with ``weights_only=True``), a checkpoint dict holding
            ``model``/``state_dict``/``model_ema``, or a bare state dict. ``module.``/``backbone.``
            prefixes are stripped.
        key: Which entry of the checkpoint dict to load (e.g. ``"model_ema"``); default: the first of
            ``model``, ``state_dict``, ``model_ema``.

    Returns:
        ``model``, with every parameter and buffer replaced.

    Raises:
        CheckpointMismatchError: (a ``ValueError``) any missing, unexpected or mis-shaped key; the
            message names each one and the likely cause (kernel sizes, width, Decom flag, BN, depths).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        checkpoint: Mapping[str, Any] = read_checkpoint(path_or_state_dict)
    else:
        checkpoint = path_or_state_dict
    raw = extract_state_dict(checkpoint, key)
    ours = {reference_to_ours(k): v for k, v in raw.items()}
    check_state_dict(model, ours, args=checkpoint.get("args") if isinstance(checkpoint, Mapping) else None)
    model.load_state_dict(ours, strict=True)
    log.info("loaded %d tensors into %s", len(ours), type(model).__name__)
    return model


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], *, new_head: bool = False,
                     args: Any = None) -> LoadReport:
    """What loading ``state_dict`` (our names) into ``model`` would do, without loading it.

    Works on a model built on the ``meta`` device: only names and shapes are compared, so a driver can
    refuse a checkpoint of the wrong architecture before any weight is allocated.

    Args:
        model: The model the weights are meant for.
        state_dict: Weights under our names (see :func:`reference_to_ours`).
        new_head: Allow a classifier of another class count (:data:`HEAD_KEYS` of another shape): it is
            reported as re-initialised instead of a mismatch. Everything else must match exactly.
        args: The checkpoint's own training arguments (quoted in the error when present).

    Raises:
        CheckpointMismatchError: any missing, unexpected or mis-shaped key other than an allowed new head.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        (k, tuple(state_dict[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    replaced = [k for k, _, _ in mis_shaped if k in HEAD_KEYS] if new_head else []
    if replaced and len(replaced) == len([k for k in HEAD_KEYS if k in expected]):
        mis_shaped = [m for m in mis_shaped if m[0] not in replaced]
    else:
        replaced = []
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(
            _mismatch_message(model, state_dict, expected, missing, unexpected, mis_shaped, args)
        )
    classes = None
    if replaced:
        classes = (int(state_dict["head.weight"].shape[0]), int(expected["head.weight"].shape[0]))
    return LoadReport(loaded=[k for k in expected if k not in replaced], reinitialised=replaced,
                      ignored=list(replaced), classes=classes)


def load_pretrained(model: nn.Module, state_dict: Mapping[str, Any], *, new_head: bool = True,
                    args: Any = None) -> LoadReport:
    """Load pre-trained weights for fine-tuning: everything strictly, except a classifier for another
    class count, which keeps its fresh initialisation (as ConvNeXt's and the reference's ``--finetune``).

    Args:
        model: The freshly built model (its head sized for the new dataset).
        state_dict: Weights under reference or our names (``module.``/``backbone.`` prefixes stripped).
        new_head: Allow the head to be replaced (see :func:`check_state_dict`).
        args: The checkpoint's training arguments, for the error message.

    Returns:
        The :class:`LoadReport`: what was loaded, re-initialised and ignored.

    Raises:
        CheckpointMismatchError: the checkpoint is of another architecture (variant, kernels, width, ...).
    """
    ours = {reference_to_ours(k): v for k, v in state_dict.items()}
    report = check_state_dict(model, ours, new_head=new_head, args=args)
    model.load_state_dict({k: ours[k] for k in report.loaded}, strict=False)
    for line in report.lines():
        log.info("%s", line)
    return report


# --- diagnosis ----------------------------------------------------------------------------------------


def _depths(keys: Any) -> list[int]:
    blocks: dict[int, int] = {}
    for k in keys:
        m = _OURS_BLOCK_RE.match(k)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            blocks[s] = max(blocks.get(s, 0), b + 1)
    return [blocks[s] for s in sorted(blocks)]


def _widths(sd: Mapping[str, Any]) -> list[int]:
    out = []
    if "stem.0.weight" in sd:
        out.append(int(sd["stem.0.weight"].shape[0]))
    s = 1
    while f"stages.{s}.downsample.1.weight" in sd:
        out.append(int(sd[f"stages.{s}.downsample.1.weight"].shape[0]))
        s += 1
    return out


def _kernel_sizes(sd: Mapping[str, Any]) -> dict[int, tuple[int, int]]:
    """Stage -> (M, N) of the first tall (or square) kernel in the stage."""
    out: dict[int, tuple[int, int]] = {}
    for k, v in sd.items():
        m = _KERNEL_RE.match(k)
        if m and int(m.group(1)) not in out:
            out[int(m.group(1))] = (int(v.shape[2]), int(v.shape[3]))
    return out


def _has(keys: Any, fragment: str) -> bool:
    return any(fragment in k for k in keys)


def _width_hint(model: nn.Module, ckpt_widths: list[int]) -> str:
    """The roundest width_factor with ``int(d * f) == w`` for every stage, if one exists."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not ckpt_widths:
        return ""
    dims = cfg.dims[: len(ckpt_widths)]
    lo = max(w / d for w, d in zip(ckpt_widths, dims, strict=True))
    hi = min((w + 1) / d for w, d in zip(ckpt_widths, dims, strict=True))
    for digits in (1, 2, 3):
        step = 10.0**-digits
        factor = round(math.ceil(lo / step - 1e-9) * step, digits)
        while factor < hi:
            if [int(d * factor) for d in dims] == ckpt_widths:
                return f" (width_factor={factor:g} reproduces them)"
            factor = round(factor + step, digits)
    return ""


def _likely_causes(model: nn.Module, ours: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    causes: list[str] = []
    ck, mk = set(ours), set(expected)
    ck_dec, mk_dec = _has(ck, ".large_kernel.tall."), _has(mk, ".large_kernel.tall.")
    ck_sq, mk_sq = _has(ck, ".large_kernel.square."), _has(mk, ".large_kernel.square.")
    if ck_dec and mk_sq:
        causes.append(
            "the checkpoint is decomposed (reference LoRA1/LoRA2, --Decom True) but the model is not: "
            "build it with kernel_mode='decomposed'"
        )
    if ck_sq and mk_dec:
        causes.append(
            "the checkpoint has square kernels (reference lkb_origin, --Decom False) but the model is "
            "decomposed: build it with kernel_mode='replknet' (with small_conv) or 'naive' (without)"
        )
    if _has(ck, ".deploy_") != _has(mk, ".deploy_"):
        causes.append(
            "one side is merged for inference (lkb_reparam / deploy_*) and the other is not: load the "
            "training-form checkpoint first, then call model.merge_for_inference()"
        )
    ck_small, mk_small = _has(ck, ".large_kernel.small."), _has(mk, ".large_kernel.small.")
    if ck_small != mk_small:
        where = "has a" if ck_small else "has no"
        causes.append(
            f"the checkpoint {where} small_conv branch: set small_kernel / the 5th kernel_size number "
            "(a small kernel exists only where it is smaller than the stage kernel)"
        )
    ck_bn, mk_bn = _has(ck, ".bn."), _has(mk, ".bn.")
    if ck_bn != mk_bn:
        causes.append(f"BatchNorm in the branches differs: build with use_bn={ck_bn}")
    ck_g, mk_g = _has(ck, ".gamma"), _has(mk, ".gamma")
    if ck_g != mk_g:
        causes.append(
            "layer scale differs: "
            + (
                "use layer_scale_init > 0 (e.g. 1e-6)"
                if ck_g
                else "use layer_scale_init=0 (the checkpoint has no gamma)"
            )
        )
    cd, md = _depths(ck), _depths(mk)
    if cd and cd != md:
        causes.append(
            f"the checkpoint has depths {cd}, the model {md}: wrong variant "
            "(slak_tiny = [3, 3, 9, 3], slak_small/slak_base = [3, 3, 27, 3])"
        )
    cw, mw = _widths(ours), _widths(expected)
    if cw and cw != mw:
        causes.append(
            f"the checkpoint has stage widths {cw}, the model {mw}: wrong width_factor or "
            f"variant{_width_hint(model, cw)}"
        )
    ckk, mkk = _kernel_sizes(ours), _kernel_sizes(expected)
    if ckk and ckk != mkk and (ck_dec == mk_dec):
        ms = [ckk[s][0] for s in sorted(ckk)]
        n = min(ckk[s][1] for s in sorted(ckk)) if ck_dec else None
        suggestion = f"kernel_size={[*ms, n]}" if n is not None else f"stage_kernels={ms}"
        causes.append(
            f"wrong kernel sizes: the checkpoint's stage kernels are "
            f"{[f'{ckk[s][0]}x{ckk[s][1]}' for s in sorted(ckk)]}, the model's "
            f"{[f'{mkk[s][0]}x{mkk[s][1]}' for s in sorted(mkk)]}: build with {suggestion}"
        )
    head = "head.weight"
    if head in ours and head in expected and ours[head].shape[0] != expected[head].shape[0] and cw == mw:
        causes.append(
            f"the classifier has {ours[head].shape[0]} classes in the checkpoint: num_classes={ours[head].shape[0]}"
        )
    return causes


def _mismatch_message(
    model: nn.Module,
    ours: Mapping[str, Any],
    expected: Mapping[str, Any],
    missing: list[str],
    unexpected: list[str],
    mis_shaped: list[tuple[str, tuple, tuple]],
    args: Any,
) -> str:
    lines = [
        f"checkpoint does not match the model: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(mis_shaped)} mis-shaped key(s) (names below are ours; reference names were mapped)"
    ]
    causes = _likely_causes(model, ours, expected)
    if args is not None:
        trained = {
            k: getattr(args, k)
            for k in ("model", "kernel_size", "Decom", "width_factor", "bn")
            if hasattr(args, k)
        }
        if trained:
            causes.append(f"the checkpoint's own training arguments: {trained}")
    lines.append("likely cause(s):" if causes else "likely cause: unknown (compare the key lists below)")
    lines += [f"  * {c}" for c in causes]
    lines += [f"missing: {k}" for k in missing]
    lines += [f"unexpected: {k}" for k in unexpected]
    lines += [f"mis-shaped: {k} checkpoint {c} vs model {m}" for k, c, m in mis_shaped]
    return "\n".join(lines)
