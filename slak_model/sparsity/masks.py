"""Mask storage: which tensors are masked, a flat bool buffer, exact-count draws, hashes, files.

All masks of a model live in ONE flat bool buffer; each layer's mask is a view of it. One buffer
makes the distributed exchange a single broadcast, keeps the ITOP "ever active" record as one
tensor, and lets density be computed without a Python loop over elements.

The file format (``save_masks``/``load_masks``) is a ``.npz`` of ``np.packbits`` arrays (1 bit
per weight: about 6.3 MB for SLaK-T's 50.6M weights) plus a JSON header with each layer's name,
shape, active count and density, so a tracking artifact can be summarised without unpacking.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .select import top_k_indices

__all__ = [
    "FlatMasks",
    "draw_exact_masks",
    "load_masks",
    "mask_summary",
    "save_masks",
    "select_targets",
]

_FORMAT = "slak-masks"
_VERSION = 1
# Odd multipliers below 2**31 and a Mersenne prime modulus: the sums stay below 2**63.
_HASH_MULTIPLIERS = (1_000_003, 2_147_483_629)
_HASH_MODULUS = 2_147_483_647


def select_targets(model: nn.Module, targets: str) -> dict[str, nn.Parameter]:
    """The parameters the engine may mask, in ``named_parameters()`` order.

    Args:
        model: The unwrapped model.
        targets: ``all`` = every 2-D or 4-D parameter (convs, linears, the head: the reference's
            eligible set; biases and norms never); ``large_kernels`` = only the ``tall`` and
            ``wide`` branch weights of each ``LargeKernelConv`` (the reference's ``--only-L``).

    Raises:
        ValueError: ``large_kernels`` on a model without rectangular branches, or an unknown value.
    """
    if targets == "all":
        return {n: p for n, p in model.named_parameters() if p.dim() in (2, 4)}
    if targets != "large_kernels":
        raise ValueError(f"targets={targets!r} is not one of ['all', 'large_kernels']")
    from slak_model.layers import LargeKernelConv  # late: the layers import timm, the engine does not need it

    wanted = {id(p) for m in model.modules() if isinstance(m, LargeKernelConv) for p in m.rectangular_parameters()}
    selected = {n: p for n, p in model.named_parameters() if id(p) in wanted}
    if not selected:
        raise ValueError(
            "targets='large_kernels' found no rectangular (tall/wide) large-kernel branches in the model: "
            "it needs decomposed large kernels (not the naive/replknet kernel modes); use targets='all' instead"
        )
    return selected


class FlatMasks:
    """Bool masks of several tensors as views of one flat buffer.

    Args:
        shapes: Layer name -> shape, in a fixed order (every rank must use the same order).
        device: Where the buffer lives (the parameters' device).
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], device: torch.device | str = "cpu") -> None:
        self.names: list[str] = list(shapes)
        self.shapes: dict[str, torch.Size] = {n: torch.Size(s) for n, s in shapes.items()}
        self.numels: list[int] = [math.prod(self.shapes[n]) for n in self.names]
        self.offsets: list[int] = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.flat = torch.zeros(self.offsets[-1], dtype=torch.bool, device=device)
        self.views: dict[str, torch.Tensor] = {
            n: self.layer_flat(i).view(self.shapes[n]) for i, n in enumerate(self.names)
        }

    @property
    def total(self) -> int:
        """Number of masked weights."""
        return self.offsets[-1]

    def layer_flat(self, i: int) -> torch.Tensor:
        """1-D view of layer ``i``'s mask."""
        return self.flat[self.offsets[i]: self.offsets[i + 1]]

    def counts(self) -> list[int]:
        """Active weights per layer (one device sync)."""
        if not self.names:
            return []
        sums = torch.stack([self.layer_flat(i).sum() for i in range(len(self.names))])
        return [int(c) for c in sums.cpu()]

    def hashes(self) -> list[tuple[int, int, int]]:
        """Per-layer fingerprint (active count and two position-weighted sums), one device sync.

        Equal masks give equal fingerprints; different masks collide only by accident
        (probability about 2**-60 per layer), which is enough to catch desynchronised ranks.
        """
        if not self.names:
            return []
        rows = []
        for i in range(len(self.names)):
            m = self.layer_flat(i)
            idx = torch.arange(m.numel(), device=m.device, dtype=torch.int64)
            row = [m.sum(dtype=torch.int64)]
            for mult in _HASH_MULTIPLIERS:
                row.append(torch.where(m, (idx * mult + 7) % _HASH_MODULUS, 0).sum())
            rows.append(torch.stack(row))
        table = torch.stack(rows).cpu().tolist()
        return [tuple(r) for r in table]


def draw_exact_masks(
    masks: FlatMasks, counts: Sequence[int], generator: torch.Generator
) -> None:
    """Fill ``masks`` with uniformly random patterns having exactly ``counts[i]`` active entries.

    The reference draws Bernoulli masks (realised counts vary); exact counts make the overall
    sparsity hit the target and keep every rank's count bookkeeping host-side, without syncs.
    """
    masks.flat.zero_()
    for i, count in enumerate(counts):
        view = masks.layer_flat(i)
        n = view.numel()
        if not 0 <= count <= n:
            raise ValueError(f"layer {masks.names[i]!r}: active count {count} outside [0, {n}]")
        if count == n:
            view.fill_(True)
        elif count > 0:
            scores = torch.rand(n, generator=generator, device=view.device)
            view[top_k_indices(scores, count)] = True


def save_masks(masks: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write bool masks bit-packed, with names, shapes, counts and densities.

    Args:
        masks: Layer name -> bool (or 0/1) tensor.
        path: Output file (``.npz`` content; the name is used as given).
    """
    layers = []
    arrays: dict[str, np.ndarray] = {}
    for i, (name, mask) in enumerate(masks.items()):
        m = mask.detach().to("cpu", torch.bool).contiguous()
        nnz = int(m.sum())
        layers.append({
            "name": name,
            "shape": list(m.shape),
            "nnz": nnz,
            "density": nnz / max(m.numel(), 1),
        })
        arrays[f"bits_{i}"] = np.packbits(m.flatten().numpy())
    header = {"format": _FORMAT, "version": _VERSION, "layers": layers}
    arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _read_header(data: np.lib.npyio.NpzFile, path: str | Path) -> dict:
    if "header" not in data.files:
        raise ValueError(f"{path}: not a mask file written by save_masks (no header)")
    header = json.loads(data["header"].tobytes().decode("utf-8"))
    if header.get("format") != _FORMAT or header.get("version") != _VERSION:
        raise ValueError(
            f"{path}: format {header.get('format')!r} version {header.get('version')!r}; "
            f"expected {_FORMAT!r} version {_VERSION}"
        )
    return header


def mask_summary(path: str | Path) -> list[dict]:
    """Per-layer ``{name, shape, nnz, density}`` of a mask file, without unpacking the bits."""
    with np.load(path, allow_pickle=False) as data:
        return _read_header(data, path)["layers"]


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_masks` into name -> bool CPU tensors."""
    out: dict[str, torch.Tensor] = {}
    with np.load(path, allow_pickle=False) as data:
        header = _read_header(data, path)
        for i, layer in enumerate(header["layers"]):
            shape = tuple(layer["shape"])
            n = math.prod(shape)
            bits = np.unpackbits(data[f"bits_{i}"], count=n).astype(bool)
            mask = torch.from_numpy(bits).view(shape)
            if int(mask.sum()) != layer["nnz"]:
                raise ValueError(f"{path}: layer {layer['name']!r} is corrupt (count differs from its header)")
            out[layer["name"]] = mask
    return out
