"""Datasets that ship as code: ``shapes`` (learnable, long-range) and ``synthetic`` (throughput).

Both are map-style and stateless: sample ``i`` is a pure function of ``(seed, split, i)``, so every
rank, every DataLoader worker and every resumed attempt sees the same image for the same index
without files, downloads or shared state.

``shapes``: a red mark and a green mark sit far apart on a noisy background with blue distractor
blobs; the class is the direction from the red mark to the green one, quantised into
``num_classes`` equal angular sectors (a margin at each sector edge keeps labels unambiguous).
Each mark is trivial to detect locally, but the label exists only in their *relative* position,
a third to a half of the image apart, so a network must carry information across that distance:
a larger receptive field (larger kernels) helps, as it does for SLaK on ImageNet. Geometric
augmentation (flips, crops) would change the label, so these images bypass the timm transforms.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SPLIT_IDS", "ShapesDataset", "SyntheticDataset", "shapes_class_names"]

#: Separate random streams for the splits: index 0 of ``val`` is not index 0 of ``train``.
SPLIT_IDS = {"train": 0, "val": 1}

_MEAN, _STD = 0.5, 0.25  # per-channel normalisation of the generated [0, 1] images
_MARGIN = 0.15  # fraction of a sector kept empty at each edge
_DIST = (0.30, 0.55)  # mark distance as a fraction of the image side
_RED = np.array([0.95, 0.12, 0.10], dtype=np.float32)
_GREEN = np.array([0.10, 0.90, 0.15], dtype=np.float32)
_BLUE = np.array([0.15, 0.20, 0.95], dtype=np.float32)


def _check_split(split: str) -> int:
    if split not in SPLIT_IDS:
        raise ValueError(f"split={split!r}: allowed {sorted(SPLIT_IDS)}")
    return SPLIT_IDS[split]


def shapes_class_names(num_classes: int) -> list[str]:
    """Human-readable names: the centre angle of each sector (0 deg = green to the right of red)."""
    return [f"dir_{round(360.0 * (k + 0.5) / num_classes):03d}deg" for k in range(num_classes)]


class ShapesDataset(Dataset):
    """Procedural images whose class is the direction between two distant marks.

    Args:
        size: Number of samples in the split.
        image_size: Side of the square image in pixels (>= 16).
        num_classes: Number of angular sectors (>= 2).
        seed: Dataset seed; with ``split`` and the index it fixes every pixel.
        split: ``"train"`` or ``"val"`` (independent streams).
    """

    def __init__(
        self, size: int, image_size: int = 32, num_classes: int = 4, *, seed: int = 0, split: str = "train"
    ) -> None:
        if size < 1:
            raise ValueError(
                f"size={size}: a dataset needs at least 1 sample; raise data.train_size/val_size"
            )
        if image_size < 16:
            raise ValueError(
                f"image_size={image_size}: the marks need at least 16 px; set data.image_size >= 16"
            )
        if num_classes < 2:
            raise ValueError(
                f"num_classes={num_classes}: at least 2 sectors are needed; set data.num_classes >= 2"
            )
        self.size, self.image_size, self.num_classes = size, image_size, num_classes
        self.seed, self.split = seed, split
        self._split_id = _check_split(split)
        self.classes = shapes_class_names(num_classes)

    def __len__(self) -> int:
        return self.size

    def target(self, index: int) -> int:
        """Balanced labels by construction (index modulo classes): accuracy has a clear chance level."""
        return index % self.num_classes

    def render(self, index: int) -> np.ndarray:
        """The ``HxWx3`` float32 image in [0, 1] (also handy to look at the data)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a {self.split} split of {self.size}")
        s = self.image_size
        rng = np.random.default_rng([self.seed, self._split_id, index])
        img = np.full((s, s, 3), rng.uniform(0.3, 0.6), dtype=np.float32)
        img += rng.uniform(-0.08, 0.08, size=3).astype(np.float32)  # a random tint
        img += rng.normal(0.0, 0.06, size=img.shape).astype(np.float32)  # pixel noise
        m = max(3, s // 10)
        for _ in range(int(rng.integers(1, 4))):  # distractors
            y, x = rng.integers(0, s - m + 1, size=2)
            img[y : y + m, x : x + m] = _BLUE * rng.uniform(0.7, 1.0)
        k = self.target(index)
        theta = 2.0 * math.pi * (k + rng.uniform(_MARGIN, 1.0 - _MARGIN)) / self.num_classes
        dist = rng.uniform(*_DIST) * s
        dx, dy = dist * math.cos(theta), -dist * math.sin(theta)  # image y grows downwards
        ax = rng.uniform(max(0.0, -dx), s - m - max(0.0, dx))
        ay = rng.uniform(max(0.0, -dy), s - m - max(0.0, dy))
        bx, by = ax + dx, ay + dy
        for (x, y), colour in (((ax, ay), _RED), ((bx, by), _GREEN)):
            xi, yi = round(x), round(y)
            img[yi : yi + m, xi : xi + m] = colour * rng.uniform(0.8, 1.0)
        return np.clip(img, 0.0, 1.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.render(index)).permute(2, 0, 1).contiguous()
        return (img - _MEAN) / _STD, self.target(index)


class SyntheticDataset(Dataset):
    """Uniform-noise uint8 images with fixed labels (``index % num_classes``): no signal, all throughput.

    uint8 like a decoded photo, so a throughput run moves the same bytes through the loader as ImageNet
    does (the loader's prefetcher normalises them). Each sample is drawn from its own generator seeded by
    ``(seed, split, index)``, so it costs no decoding and is identical wherever it is read.
    """

    def __init__(
        self,
        size: int,
        image_size: int = 224,
        num_classes: int = 1000,
        *,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        if size < 1:
            raise ValueError(
                f"size={size}: a dataset needs at least 1 sample; raise data.train_size/val_size"
            )
        self.size, self.image_size, self.num_classes = size, image_size, num_classes
        self.seed, self.split = seed, split
        self._split_id = _check_split(split)
        self.classes = [f"class_{k:04d}" for k in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a {self.split} split of {self.size}")
        key = ((self.seed * 1_000_003 + self._split_id) * 1_000_000_007 + index) % (2**63 - 1)
        g = torch.Generator().manual_seed(key)
        x = torch.randint(0, 256, (3, self.image_size, self.image_size), generator=g, dtype=torch.uint8)
        return x, index % self.num_classes
