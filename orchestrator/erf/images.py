"""The images an ERF job averages over, read as the reference reads them, or random ones for the benchmark.

Order: class folders sorted by name, files sorted inside each (torchvision's ``ImageFolder``), so the
ImageNet ``val/`` folder gives the reference's 50 images (the first class's). Transform: ``size x size``
bicubic (aspect ratio not kept), then the ImageNet mean and std.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from orchestrator.erf.settings import RANDOM_SEED, ErfError, ErfSettings

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "image_batches", "image_files", "random_batches"]

#: torchvision's ``ImageFolder`` extensions (the reference reads its images through it).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The images of ``folder`` in the reference's order.

    With class subfolders (ImageNet's ``val/``): the subfolders sorted by name, each walked recursively with
    files sorted, as torchvision's ``ImageFolder`` lists them (files directly in ``folder`` are then not
    images of any class and are left out). Without subfolders: the folder's own images, sorted.
    """
    root = Path(folder)
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not subdirs:
        return sorted((p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                      key=lambda p: p.name)
    files: list[Path] = []
    for sub in subdirs:
        for dirpath, _, names in sorted(os.walk(root / sub, followlinks=True)):
            files += [Path(dirpath) / n for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return files


class ImageFolder:
    """``size x size`` RGB images, bicubic-resized (aspect ratio not kept) and normalised: the reference's
    transform (``Resize((s, s), BICUBIC)``, ``ToTensor``, ``Normalize(ImageNet mean, std)``)."""

    def __init__(self, files: Sequence[Path], size: int) -> None:
        self.files, self.size = list(files), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        """``(image, "")``, or ``(zeros, why)`` for a file that does not decode: the error is raised in the main
        process (:func:`image_batches`), not inside a loader worker, whose traceback would bury it."""
        import numpy as np
        import torch
        from PIL import Image
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        path = self.files[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return torch.zeros(3, self.size, self.size), f"cannot decode image {path}: {err}; fix or delete the file"
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = (x - np.asarray(IMAGENET_DEFAULT_MEAN, np.float32)) / np.asarray(IMAGENET_DEFAULT_STD, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), ""


def image_batches(settings: ErfSettings) -> Iterator[Any]:
    """Batches of ``settings.batch_size`` normalised images of ``settings.data``, decoded by ``settings.workers``
    loader processes; a file that does not decode stops the job with its name."""
    from torch.utils.data import DataLoader

    assert settings.data is not None
    dataset = ImageFolder(image_files(settings.data), settings.size)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=settings.workers,
                        pin_memory=settings.device.startswith("cuda"))
    for images, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            raise ErfError(bad[0])
        yield images


def random_batches(settings: ErfSettings, count: int) -> Iterator[Any]:
    """Standard-normal images (what normalised natural images look like to the first layer), drawn on the device
    from a fixed seed, so every precision sees the same ones."""
    import torch

    gen = torch.Generator(device=settings.device).manual_seed(RANDOM_SEED)
    drawn = 0
    while drawn < count:
        n = min(settings.batch_size, count - drawn)
        yield torch.randn(n, 3, settings.size, settings.size, generator=gen, device=settings.device)
        drawn += n

