"""Datasets, per-worker loaders and Mixup/CutMix for training jobs (spec section 4.5).

Three sources behind one call, :func:`build_datasets`:

* ``imagenet``: the folder layout ``data.path/{train,val}/<class>/<image>`` read through timm's
  ``ImageDataset`` and ``create_transform`` (RandomResizedCrop, hflip, RandAugment, random erasing,
  bicubic; eval resizes to ``image_size / crop_pct`` and centre-crops). The layout is checked before
  any training starts, and every image is decoded through a wrapper so a broken file is reported by
  name (or skipped and counted when ``data.on_bad_image="skip"``) instead of timm's silent retry.
* ``shapes``: a learnable procedural dataset where long-range structure decides the label
  (:mod:`orchestrator.datasets_procedural`); for demos, CI and the kernel-size ablation on CPU.
* ``synthetic``: noise with fixed labels, for throughput runs.

Image sources (``imagenet``, ``synthetic``) hand the loader **uint8** images; timm's ``PrefetchLoader``
then normalises them (and applies random erasing) where the model runs, as timm's own training script
does: a batch crosses processes, pinned memory and the bus at a quarter of its float32 size, and on a
GPU its copy runs on a side stream ahead of the step that uses it. ``shapes`` renders normalised float
images directly (32 px; nothing to gain).

Loss for the training loop: with :func:`build_mixup` returning a ``Mixup`` the targets are soft,
use ``timm.loss.SoftTargetCrossEntropy``; when it returns None use
``timm.loss.LabelSmoothingCrossEntropy(data.smoothing)`` (or plain cross-entropy if smoothing is 0).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

# isort: off
import slak_model  # noqa: F401  (installs the torchvision guard before the first timm import)
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, Mixup, auto_augment, create_transform
from timm.data.loader import PrefetchLoader
# isort: on
from timm.data.readers.img_extensions import get_img_extensions
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from orchestrator.datasets_procedural import ShapesDataset, SyntheticDataset

__all__ = [
    "SOURCES",
    "CheckedImageDataset",
    "DataBundle",
    "DataError",
    "EpochIndexSampler",
    "PerSampleSeeded",
    "ShardSampler",
    "bad_file_flags",
    "build_datasets",
    "build_eval_dataset",
    "build_eval_loader",
    "build_loaders",
    "build_mixup",
    "build_transforms",
    "check_image_folder",
    "preflight_image_folder",
    "skipped_images",
]

log = logging.getLogger(__name__)

SOURCES = ("shapes", "synthetic", "imagenet")
#: Consecutive unreadable files after which "skip" gives up: a corrupt mount fails fast, never spins.
MAX_CONSECUTIVE_BAD = 50


class DataError(ValueError):
    """The data on disk cannot be used as configured; the message names the path and the fix."""


@dataclass(frozen=True)
class DataBundle:
    """The two splits of one source and the class names, which fix ``num_classes`` for the model;
    ``uint8_images``: samples are uint8 images that the loader's prefetcher normalises."""

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    uint8_images: bool = False


# ---------------------------------------------------------------------- folder layout
def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def check_image_folder(root: str | os.PathLike, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """Check the ``train/`` + ``val/`` layout (or only ``splits``, e.g. ``("val",)`` for an evaluation) and
    return the sorted class names.

    Raises:
        DataError: missing or empty folders, images directly under a split (no class folders),
            or train/val class sets that differ (the message lists the differences).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data.path={str(root)!r} does not exist or is not a folder; point data.path at the "
            "folder that holds train/<class>/* and val/<class>/*"
        )
    found: dict[str, list[str]] = {}
    layout = " and ".join(f"{split}/<class>/*" for split in splits)
    for split in splits:
        d = root / split
        if not d.is_dir():
            raise DataError(f"{d} is missing: data.path must hold {layout}")
        classes = _class_dirs(d)
        if not classes:
            exts = get_img_extensions(as_set=True)
            loose = [e.name for e in os.scandir(d) if Path(e.name).suffix.lower() in exts]
            what = (
                f"has {len(loose)} images but no class subfolders; move them into {d}/<class>/"
                if loose
                else "is empty; it needs one subfolder of images per class"
            )
            raise DataError(f"{d} {what}")
        found[split] = classes
    if set(found) != {"train", "val"}:
        return found[splits[0]]
    train, val = set(found["train"]), set(found["val"])
    if train != val:
        only_train, only_val = sorted(train - val), sorted(val - train)
        raise DataError(
            f"class folders of {root / 'train'} and {root / 'val'} differ: only in train "
            f"{_preview(only_train)}, only in val {_preview(only_val)}; both splits need the same "
            "class folders"
        )
    return found["train"]


def preflight_image_folder(data_cfg: Any, *, decode: int = 8, splits: tuple[str, ...] = ("train", "val")
                           ) -> list[str]:
    """What a job's driver checks before Ray starts: layout, class sets, an image in every class folder, and
    ``decode`` images (spread over the classes, every split of ``splits``) read through. Cheap on a full
    ImageNet: each class folder is listed only up to its first image.

    Returns:
        Warnings (unreadable sample images under ``data.on_bad_image=skip``).

    Raises:
        DataError: every problem found, one per line.
    """
    if data_cfg.source != "imagenet":
        return []
    if not data_cfg.path:
        raise DataError("data.path=None: data.source='imagenet' needs the folder holding train/ and val/")
    root = Path(data_cfg.path).expanduser()
    classes = check_image_folder(root, splits)
    exts = get_img_extensions(as_set=True)
    problems: list[str] = []
    warnings: list[str] = []
    for split in splits:
        firsts: dict[str, str] = {}
        for c in classes:
            with os.scandir(root / split / c) as entries:
                first = next((e.path for e in entries if e.is_file() and Path(e.name).suffix.lower() in exts), None)
            if first is not None:
                firsts[c] = first
        empty = [c for c in classes if c not in firsts]
        if empty:
            problems.append(_empty_classes(root / split, empty))
        samples = list(firsts.values())[:: max(1, len(firsts) // max(1, decode // 2))][: max(1, decode // 2)]
        for path in samples:
            try:
                with Image.open(path) as im:
                    im.convert("RGB")
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                if data_cfg.on_bad_image == "error":
                    problems.append(f"cannot decode image {path}: {e}; fix or delete the file, or set "
                                    "data.on_bad_image=skip to skip unreadable images")
                else:
                    warnings.append(f"unreadable image {path} ({e}) will be skipped (data.on_bad_image=skip)")
    if problems:
        raise DataError("\n".join(problems))
    return warnings


def _empty_classes(split_dir: Path, empty: list[str]) -> str:
    return (f"{split_dir}: class folders without images: {_preview(empty)}; add images or remove the folders "
            "from both splits")


def _preview(names: list[str], n: int = 10) -> str:
    return str(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


class CheckedImageDataset(Dataset):
    """timm's folder reader with decode errors that name the file, or a counted skip.

    timm's ``ImageDataset`` logs and moves on for up to 10 broken files; a run must instead either
    stop with the path (``on_bad_image="error"``) or skip on purpose and say how many it skipped.
    Skipped *files* are counted, not reads (an epoch and the EMA's BatchNorm pass read a file twice): one
    flag per file in shared memory, which DataLoader worker processes write too.
    """

    def __init__(
        self, split_dir: Path, class_to_idx: dict[str, int], transform: Any, *, on_bad_image: str = "error"
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"data.on_bad_image={on_bad_image!r}: allowed 'error' or 'skip'")
        try:
            self.inner = ImageDataset(str(split_dir), class_map=class_to_idx)
        except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
            raise DataError(
                f"{split_dir} has no images with a known extension in its class folders ({e})"
            ) from e
        counts = Counter(t for _, t in self.inner.reader.samples)
        empty = sorted(c for c, i in class_to_idx.items() if counts[i] == 0)
        if empty:
            raise DataError(_empty_classes(split_dir, empty))
        self.transform = transform
        self.on_bad_image = on_bad_image
        self._bad = multiprocessing.Array("b", len(self.inner))  # 1 byte per file: 1.3 MB for ImageNet

    def __len__(self) -> int:
        return len(self.inner)

    def path(self, index: int) -> str:
        return self.inner.reader.samples[index][0]

    @property
    def skipped(self) -> int:
        """Distinct files skipped so far by every process reading this dataset."""
        return int(self.bad_files().sum())

    def bad_files(self) -> np.ndarray:
        """One bool per file: skipped as unreadable by any process reading this dataset so far."""
        return np.frombuffer(self._bad.get_obj(), dtype=np.int8).astype(bool)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.inner.reader.samples[index]
        with Image.open(path) as im:
            return im.convert("RGB"), target  # convert() decodes every pixel: truncation shows here

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(min(MAX_CONSECUTIVE_BAD, len(self))):
            i = (index + attempt) % len(self)
            try:
                img, target = self._load(i)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                if self.on_bad_image == "error":
                    raise DataError(
                        f"cannot decode image {self.path(i)}: {e}; fix or delete the file, or set "
                        "data.on_bad_image=skip to skip unreadable images"
                    ) from e
                first_time = not self._bad[i]
                self._bad[i] = 1
                if first_time:
                    log.warning("skipped unreadable image %s (%s); %d skipped so far", self.path(i), e,
                                self.skipped)
                continue
            return self.transform(img), target
        raise DataError(
            f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images from {self.path(index)} on; the "
            "folder looks corrupt, check the storage"
        )


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize with the 0-bit case Pillow >= 10 rejects: keeping no bits gives a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _patch_randaugment() -> None:
    """RandAugment "inc1" with ``mstd`` can draw magnitude 10, i.e. ``PosterizeIncreasing`` to 0 bits;
    timm passes that to Pillow, which raises ``ValueError: bits must be between ... 1 and 8`` mid-epoch.
    Older Pillow returned black, which the reference recipe trained with, so restore that."""
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


def build_transforms(data_cfg: Any) -> tuple[Any, Any]:
    """timm's train and eval transforms from the ``data`` settings (by default the ImageNet recipe, spec 4.5),
    ending in uint8 tensors: normalisation and random erasing (``data.reprob``) run in the loader's
    prefetcher (:func:`build_loaders`)."""
    _patch_randaugment()
    train = create_transform(
        input_size=data_cfg.image_size,
        is_training=True,
        scale=tuple(data_cfg.crop_scale),
        ratio=tuple(data_cfg.crop_ratio),
        hflip=data_cfg.hflip,
        vflip=data_cfg.vflip,
        color_jitter=data_cfg.color_jitter or None,
        auto_augment=data_cfg.auto_augment or None,
        interpolation=data_cfg.interpolation,
        use_prefetcher=True,
    )
    val = create_transform(
        input_size=data_cfg.image_size,
        is_training=False,
        interpolation=data_cfg.interpolation,
        crop_pct=data_cfg.crop_pct,
        crop_mode=data_cfg.crop_mode,
        use_prefetcher=True,
    )
    return train, val


# ---------------------------------------------------------------------- public builders
def build_datasets(data_cfg: Any, *, seed: int) -> DataBundle:
    """Both splits of ``data.source``; checks an ImageNet layout before returning.

    Args:
        data_cfg: The ``data`` section (``ExperimentConfig.data``).
        seed: Seeds the generated sources (the same on every worker, so shards are disjoint).

    Raises:
        DataError: the folder layout is unusable (see :func:`check_image_folder`).
        ValueError: ``data.source`` is unknown.
    """
    source = data_cfg.source
    if source in ("shapes", "synthetic"):
        cls = ShapesDataset if source == "shapes" else SyntheticDataset
        train = cls(data_cfg.train_size, data_cfg.image_size, data_cfg.num_classes, seed=seed, split="train")
        val = cls(data_cfg.val_size, data_cfg.image_size, data_cfg.num_classes, seed=seed, split="val")
        return DataBundle(train, val, data_cfg.num_classes, list(train.classes), uint8_images=source == "synthetic")
    if source != "imagenet":
        raise ValueError(f"data.source={source!r}: allowed {list(SOURCES)}")
    if not data_cfg.path:
        raise DataError("data.path=None: data.source='imagenet' needs the folder holding train/ and val/")
    root = Path(data_cfg.path).expanduser()
    classes = check_image_folder(root)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train_tf, val_tf = build_transforms(data_cfg)
    train = CheckedImageDataset(root / "train", class_to_idx, train_tf, on_bad_image=data_cfg.on_bad_image)
    val = CheckedImageDataset(root / "val", class_to_idx, val_tf, on_bad_image=data_cfg.on_bad_image)
    log.info(
        "imagenet layout at %s: %d classes, %d train / %d val images",
        root,
        len(classes),
        len(train),
        len(val),
    )
    return DataBundle(train, val, len(classes), classes, uint8_images=True)


def build_eval_dataset(data_cfg: Any, *, seed: int) -> DataBundle:
    """The validation split alone, with the eval transform: what an evaluation reads. An image folder needs
    only ``val/`` (its class folders, sorted, give the class indices, as in training); a generated source
    gives the same validation split as a training run with ``seed``. ``train`` of the bundle is empty.

    Raises:
        DataError: the ``val/`` layout is unusable (see :func:`check_image_folder`).
    """
    source = data_cfg.source
    if source in ("shapes", "synthetic"):
        cls = ShapesDataset if source == "shapes" else SyntheticDataset
        val = cls(data_cfg.val_size, data_cfg.image_size, data_cfg.num_classes, seed=seed, split="val")
        return DataBundle(torch.utils.data.TensorDataset(torch.zeros(0)), val, data_cfg.num_classes,
                          list(val.classes), uint8_images=source == "synthetic")
    if not data_cfg.path:
        raise DataError("data.path=None: an evaluation on an image folder needs the folder holding val/")
    root = Path(data_cfg.path).expanduser()
    classes = check_image_folder(root, ("val",))
    _, val_tf = build_transforms(data_cfg)
    val = CheckedImageDataset(root / "val", {c: i for i, c in enumerate(classes)}, val_tf,
                              on_bad_image=data_cfg.on_bad_image)
    log.info("evaluation images at %s: %d classes, %d val images", root, len(classes), len(val))
    return DataBundle(torch.utils.data.TensorDataset(torch.zeros(0)), val, len(classes), classes,
                      uint8_images=True)


def build_eval_loader(bundle: DataBundle, cfg: Any, *, rank: int, world_size: int, batch_size: int,
                      device: torch.device | str | None = None) -> DataLoader | PrefetchLoader:
    """This worker's disjoint shard of the validation split (:class:`ShardSampler`, no padding duplicates),
    normalised on ``device`` for uint8 sources.

    Raises:
        ValueError: fewer validation samples than workers (a worker would have nothing to evaluate).
    """
    if len(bundle.val) < world_size:
        raise ValueError(f"the validation split has {len(bundle.val)} sample(s), fewer than the {world_size} "
                         "workers; use fewer workers (run.num_workers)")
    loader = DataLoader(bundle.val, batch_size=batch_size, sampler=ShardSampler(len(bundle.val), rank, world_size),
                        drop_last=False, num_workers=cfg.data.workers, pin_memory=cfg.run.use_gpu is True)
    if not bundle.uint8_images:
        return loader
    return PrefetchLoader(loader, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                          device=torch.device(device or "cpu"))


class EpochIndexSampler(DistributedSampler):
    """``DistributedSampler`` that hands the dataset ``(epoch, index)`` instead of ``index``, so that a
    :class:`PerSampleSeeded` dataset can seed each sample's augmentation from them."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        return ((self.epoch, index) for index in super().__iter__())


class PerSampleSeeded(Dataset):
    """Seeds Python's, NumPy's and torch's RNGs from ``(seed, epoch, index)`` before each sample's random
    transform.

    Why: the augmentation of a sample then depends on nothing else: not on which loader worker reads it,
    how many workers there are, or how long they have lived. Loader workers can stay alive across epochs
    (no start-up each epoch) and a resumed run still sees exactly the images it would have seen. In the
    training process itself (``data.workers=0``) the global RNG states are restored afterwards, so the
    training loop's own streams are untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1, np.uint64)[0])
        if torch.utils.data.get_worker_info() is not None:
            _seed_all(sample_seed)
            return self.dataset[index]
        saved = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        try:
            _seed_all(sample_seed)
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.set_rng_state(saved[2])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed % 2**63)  # CPU only: the CUDA streams are not touched


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` reads indices ``r, r + w, ...`` once: eval without padding duplicates.

    ``DistributedSampler`` pads every shard to equal length by repeating samples, which biases
    top-1 on small validation sets; summing correct counts over ranks only needs disjoint shards.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def build_loaders(
    bundle: DataBundle, cfg: Any, *, rank: int, world_size: int, micro_batch_size: int, seed: int,
    device: torch.device | str | None = None,
) -> tuple[DataLoader | PrefetchLoader, DataLoader | PrefetchLoader]:
    """This worker's train and val loaders.

    Train: ``DistributedSampler`` (shuffled with ``seed``, re-shuffled by ``sampler.set_epoch``,
    tail dropped so no sample repeats) and ``drop_last`` batches. Val: disjoint shards
    (:class:`ShardSampler`), batch 1.5x the micro batch as in the reference. Sources of uint8 images are
    wrapped in timm's ``PrefetchLoader`` for ``device`` (default: the CPU), which yields normalised
    float32 batches already on it, with random erasing (``data.reprob``) on the training side.

    Raises:
        ValueError: the shard gives no full training batch, a worker would get no validation
            sample, or Mixup/CutMix is on with an odd micro batch (timm mixes the batch with its
            reverse).
    """
    d = cfg.data
    if build_mixup(d, bundle.num_classes) is not None and micro_batch_size % 2:
        raise ValueError(
            f"train.micro_batch_size={micro_batch_size}: Mixup/CutMix (data.mixup={d.mixup}, "
            f"data.cutmix={d.cutmix}) needs an even micro batch; use an even size or disable both"
        )
    per_rank = len(bundle.train) // world_size
    if per_rank < micro_batch_size:
        raise ValueError(
            f"data.train_size={len(bundle.train)}: {world_size} workers get {per_rank} samples each, "
            f"fewer than one micro batch ({micro_batch_size}); use more data or a smaller batch"
        )
    if len(bundle.val) < world_size:
        # A rank with no eval batch would skip the buffer broadcast DDP makes in its first eval forward
        # while the other ranks wait in it.
        raise ValueError(
            f"data.val_size={len(bundle.val)}: fewer validation samples than workers ({world_size}); every "
            "worker needs at least one"
        )
    train_set: Dataset = bundle.train
    sampler_cls = DistributedSampler
    if isinstance(bundle.train, CheckedImageDataset):  # random augmentation: seeded per sample and epoch
        train_set, sampler_cls = PerSampleSeeded(bundle.train, seed), EpochIndexSampler
    train_sampler = sampler_cls(
        train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    common: dict[str, Any] = {
        "num_workers": d.workers,
        "persistent_workers": d.workers > 0,  # started once, not at every epoch (samples are seeded)
        "pin_memory": cfg.run.use_gpu is True,  # resolved by the driver; "auto" never reaches a loader
    }
    train = DataLoader(train_set, batch_size=micro_batch_size, sampler=train_sampler, drop_last=True, **common)
    val = DataLoader(
        bundle.val,
        batch_size=max(1, math.floor(1.5 * micro_batch_size)),
        sampler=ShardSampler(len(bundle.val), rank, world_size),
        drop_last=False,
        **common,
    )
    if not bundle.uint8_images:
        return train, val
    device = torch.device(device or "cpu")
    normalise = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "device": device}
    return (PrefetchLoader(train, re_prob=d.reprob, re_mode="pixel", re_count=1, **normalise),
            PrefetchLoader(val, **normalise))


def build_mixup(data_cfg: Any, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` in batch mode with label smoothing inside, or None when both alphas are 0."""
    if (data_cfg.mixup <= 0 and data_cfg.cutmix <= 0) or data_cfg.mixup_prob <= 0:
        return None
    return Mixup(
        mixup_alpha=data_cfg.mixup,
        cutmix_alpha=data_cfg.cutmix,
        prob=data_cfg.mixup_prob,
        switch_prob=data_cfg.mixup_switch_prob,
        mode="batch",
        label_smoothing=data_cfg.smoothing,
        num_classes=num_classes,
    )


def skipped_images(bundle: DataBundle) -> int:
    """Distinct unreadable files skipped so far across both splits (0 for generated sources)."""
    return int(bad_file_flags(bundle).sum())


def bad_file_flags(bundle: DataBundle) -> np.ndarray:
    """One bool per file of both splits (train, then val): skipped as unreadable so far; empty for generated
    sources. Ranks combine theirs with a logical OR, so a file read by two ranks counts once."""
    flags = [ds.bad_files() for ds in (bundle.train, bundle.val) if isinstance(ds, CheckedImageDataset)]
    return np.concatenate(flags) if flags else np.zeros(0, dtype=bool)
