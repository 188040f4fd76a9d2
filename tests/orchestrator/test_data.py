"""orchestrator.data: folder checks, broken images, shards, Mixup, and the procedural datasets."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from orchestrator import data
from orchestrator.config.loading import load_config
from orchestrator.config.schema import ExperimentConfig
from orchestrator.datasets_procedural import ShapesDataset, SyntheticDataset


def _cfg(**overrides) -> ExperimentConfig:
    base = {"data.image_size": 32, "data.num_classes": 4, "train.global_batch_size": 8, "run.num_workers": 1}
    return load_config(None, {**base, **overrides})


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path, quality=90)


def _tree(root: Path, classes=("cat", "dog", "eel"), per_class=(4, 2)) -> Path:
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c in classes:
            for i in range(n):
                _jpeg(root / split / c / f"{c}_{i}.jpg", seed=hash((split, c, i)) % 2**32)
    return root


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _imagenet_cfg(root: Path, **overrides) -> ExperimentConfig:
    return _cfg(**{"data.source": "imagenet", "data.path": str(root), **overrides})


# ---------------------------------------------------------------------- folder layout
def test_imagenet_layout_loads_with_recipe_transforms(tmp_path: Path) -> None:
    cfg = _imagenet_cfg(_tree(tmp_path))
    bundle = data.build_datasets(cfg.data, seed=0)
    assert bundle.class_names == ["cat", "dog", "eel"] and bundle.num_classes == 3
    assert len(bundle.train) == 12 and len(bundle.val) == 6
    x, y = bundle.train[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y == 1  # normalised in the loader
    names = [type(t).__name__ for t in bundle.train.transform.transforms]
    assert names[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert any("RandAugment" in n for n in names) and "Normalize" not in names
    val_names = [type(t).__name__ for t in bundle.val.transform.transforms]
    assert val_names[:2] == ["Resize", "CenterCrop"]
    assert bundle.val.transform.transforms[0].size == int(32 / 0.875)
    train, val = data.build_loaders(bundle, cfg, rank=0, world_size=1, micro_batch_size=4, seed=0)
    assert train.random_erasing is not None and val.random_erasing is None  # data.reprob, training only
    xb, _ = next(iter(train))
    assert xb.shape == (4, 3, 32, 32) and xb.dtype == torch.float32 and len(train) == 3
    assert sum(len(b[1]) for b in val) == 6
    vb, _ = next(iter(val))  # the eval batch: exactly timm's Normalize of the uint8 crop
    crops = torch.stack([bundle.val[i][0] for i in range(6)])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (data.IMAGENET_DEFAULT_MEAN, data.IMAGENET_DEFAULT_STD))
    expected = (crops[: len(vb)].float() / 255 - mean) / std
    assert torch.allclose(vb, expected, atol=1e-5)


@pytest.mark.parametrize(
    "case", ["missing_root", "missing_val", "empty_train", "loose_images", "empty_class"]
)
def test_bad_layouts_name_the_path(tmp_path: Path, case: str) -> None:
    root = tmp_path / "imnet"
    if case != "missing_root":
        _tree(root)
    expect = str(root)
    if case == "missing_val":
        for p in sorted((root / "val").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / "val").rmdir()
        expect = str(root / "val")
    elif case == "empty_train":
        for p in sorted((root / "train").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        expect = str(root / "train")
    elif case == "loose_images":
        for p in sorted((root / "val").iterdir()):
            for f in p.iterdir():
                f.rename(root / "val" / f"{p.name}_{f.name}")
            p.rmdir()
        expect = "no class subfolders"
    elif case == "empty_class":
        for f in (root / "val" / "dog").iterdir():
            f.unlink()
        expect = "dog"
    with pytest.raises(data.DataError) as info:
        data.build_datasets(_imagenet_cfg(root).data, seed=0)
    assert expect in str(info.value)


def test_class_sets_that_differ_are_listed(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "val" / "eel").rename(root / "val" / "emu")
    with pytest.raises(data.DataError) as info:
        data.build_datasets(_imagenet_cfg(root).data, seed=0)
    assert "only in train ['eel']" in str(info.value) and "only in val ['emu']" in str(info.value)


# ---------------------------------------------------------------------- broken images
@pytest.mark.parametrize("workers", [0, 1], ids=["in_process", "loader_worker"])
def test_truncated_image_error_names_the_file(tmp_path: Path, workers: int) -> None:
    root = _tree(tmp_path)
    bad = root / "train" / "dog" / "dog_1.jpg"
    _truncate(bad)
    cfg = _imagenet_cfg(root, **{"data.workers": workers})
    bundle = data.build_datasets(cfg.data, seed=0)
    train, _ = data.build_loaders(bundle, cfg, rank=0, world_size=1, micro_batch_size=4, seed=0)
    with pytest.raises(data.DataError) as info:
        for _ in train:
            pass
    assert str(bad) in str(info.value) and "on_bad_image=skip" in str(info.value)


def test_skip_substitutes_counts_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _tree(tmp_path)
    _truncate(root / "train" / "cat" / "cat_2.jpg")
    (root / "train" / "eel" / "eel_0.jpg").write_bytes(b"not a jpeg at all")
    cfg = _imagenet_cfg(root, **{"data.on_bad_image": "skip"})
    bundle = data.build_datasets(cfg.data, seed=0)
    with caplog.at_level(logging.WARNING, logger="orchestrator.data"):
        samples = [bundle.train[i] for i in range(len(bundle.train))]
    assert len(samples) == 12 and all(x.shape == (3, 32, 32) for x, _ in samples)
    assert samples[2][1] == 0 and samples[8][1] == 2  # substitutes come from the next index
    assert data.skipped_images(bundle) == 2
    assert "cat_2.jpg" in caplog.text and "2 skipped so far" in caplog.text


def test_skip_gives_up_when_everything_is_broken(tmp_path: Path) -> None:
    root = _tree(tmp_path, classes=("a", "b"), per_class=(2, 1))
    for f in (root / "train").rglob("*.jpg"):
        _truncate(f)
    bundle = data.build_datasets(_imagenet_cfg(root, **{"data.on_bad_image": "skip"}).data, seed=0)
    with pytest.raises(data.DataError, match="consecutive unreadable images"):
        bundle.train[0]


# ---------------------------------------------------------------------- shards and mixup
def test_train_shards_are_disjoint_and_reshuffle_per_epoch() -> None:
    cfg = _cfg(**{"data.train_size": 50, "data.val_size": 11})
    bundle = data.build_datasets(cfg.data, seed=0)

    def order(rank: int, epoch: int) -> list[int]:
        train, _ = data.build_loaders(bundle, cfg, rank=rank, world_size=2, micro_batch_size=4, seed=3)
        train.sampler.set_epoch(epoch)
        return list(train.sampler)

    r0, r1 = order(0, 0), order(1, 0)
    assert len(r0) == len(r1) == 25 and not set(r0) & set(r1)
    assert order(0, 0) == r0 and order(0, 1) != r0
    train, val = data.build_loaders(bundle, cfg, rank=1, world_size=2, micro_batch_size=4, seed=3)
    assert len(train) == 6  # 25 samples, drop_last
    seen = [
        list(data.build_loaders(bundle, cfg, rank=r, world_size=2, micro_batch_size=4, seed=3)[1].sampler)
        for r in (0, 1)
    ]
    assert sorted(seen[0] + seen[1]) == list(range(11)) and val.batch_size == 6


def test_mixup_is_batch_mode_with_smoothing_and_needs_even_batches() -> None:
    cfg = _cfg()
    mix = data.build_mixup(cfg.data, 4)
    assert mix.mode == "batch" and mix.label_smoothing == 0.1 and mix.mixup_alpha == 0.8
    torch.manual_seed(0)
    _, y = mix(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert y.shape == (6, 4) and torch.allclose(y.sum(1), torch.ones(6))
    assert data.build_mixup(_cfg(**{"data.mixup": 0.0, "data.cutmix": 0.0}).data, 4) is None
    bundle = data.build_datasets(cfg.data, seed=0)
    with pytest.raises(ValueError, match="micro_batch_size=5"):
        data.build_loaders(bundle, cfg, rank=0, world_size=1, micro_batch_size=5, seed=0)


def test_too_little_data_for_one_batch_is_an_error() -> None:
    cfg = _cfg(**{"data.train_size": 6})
    bundle = data.build_datasets(cfg.data, seed=0)
    with pytest.raises(ValueError, match="data.train_size=6"):
        data.build_loaders(bundle, cfg, rank=0, world_size=2, micro_batch_size=4, seed=0)
    bundle = data.build_datasets(_cfg(**{"data.val_size": 1}).data, seed=0)
    with pytest.raises(ValueError, match="data.val_size=1"):
        data.build_loaders(bundle, cfg, rank=0, world_size=2, micro_batch_size=4, seed=0)


# ---------------------------------------------------------------------- generated sources
@pytest.mark.parametrize("cls", [ShapesDataset, SyntheticDataset], ids=["shapes", "synthetic"])
def test_generated_samples_are_pure_functions_of_seed_split_index(cls) -> None:
    a, b = cls(20, 48, 5, seed=7), cls(20, 48, 5, seed=7)
    assert torch.equal(a[13][0], b[13][0]) and a[13][1] == 13 % 5
    assert a[13][0].shape == (3, 48, 48)
    assert not torch.equal(a[13][0], cls(20, 48, 5, seed=8)[13][0])
    assert not torch.equal(a[3][0], cls(20, 48, 5, seed=7, split="val")[3][0])
    with pytest.raises(IndexError):
        a[20]


def test_shapes_marks_are_far_apart_in_the_labelled_direction() -> None:
    ds = ShapesDataset(64, 64, 4, seed=1)
    for i in range(len(ds)):
        img = ds.render(i)
        red = np.argwhere((img[..., 0] > 0.7) & (img[..., 1] < 0.3)).mean(0)
        green = np.argwhere((img[..., 1] > 0.7) & (img[..., 0] < 0.3)).mean(0)
        dy, dx = green - red
        assert np.hypot(dx, dy) > 0.25 * 64
        sector = int((np.degrees(np.arctan2(-dy, dx)) % 360) // 90)
        assert sector == ds.target(i), i


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # two tiny convnets train faster without oversubscribing a 2-core box
    yield
    torch.set_num_threads(old)


def _train_tiny_cnn(kernel: int, train: ShapesDataset, val: ShapesDataset, epochs: int) -> float:
    torch.manual_seed(0)
    x = torch.stack([train[i][0] for i in range(len(train))])
    y = torch.tensor([train.target(i) for i in range(len(train))])
    xv = torch.stack([val[i][0] for i in range(len(val))])
    yv = torch.tensor([val.target(i) for i in range(len(val))])

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, kernel, 2, kernel // 2), nn.BatchNorm2d(cout), nn.ReLU())

    model = nn.Sequential(
        block(3, 16),
        block(16, 32),
        block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, train.num_classes),
    )
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(xv).argmax(1) == yv).float().mean().item()


def test_shapes_is_learnable_and_larger_kernels_help(one_thread) -> None:
    """The label lives in long-range structure: 7x7 kernels generalise, 3x3 ones only memorise."""
    train, val = ShapesDataset(1024, 32, 4, seed=0), ShapesDataset(256, 32, 4, seed=0, split="val")
    large = _train_tiny_cnn(7, train, val, epochs=10)
    small = _train_tiny_cnn(3, train, val, epochs=10)
    assert large > 0.25 + 0.4, (large, small)
    assert large > small + 0.3, (large, small)


def test_randaugment_posterize_to_zero_bits_gives_black_not_an_error() -> None:
    """Pillow >= 10 rejects 0 bits, which RandAugment "inc1" with mstd reaches at magnitude 10."""
    train_tf, _ = data.build_transforms(_cfg().data)
    randaug = next(t for t in train_tf.transforms if "RandAugment" in type(t).__name__)
    op = next(o for o in randaug.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    out = np.asarray(op(Image.fromarray(np.full((8, 8, 3), 200, np.uint8))))
    assert out.shape == (8, 8, 3) and out.max() == 0


def test_throughput_script_smoke(tmp_path: Path) -> None:
    """experiments/throughput.py end to end on CPU: model rows, skipped backends, the JPEG pipeline row."""
    import json
    import subprocess
    import sys

    out = tmp_path / "tp.json"
    script = Path(__file__).resolve().parents[2] / "experiments" / "throughput.py"
    args = [
        "--device",
        "cpu",
        "--variant",
        "slak_test",
        "--batch",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--baseline",
        "test_convnext",
        "--backends",
        "torch,cuda",
        "--modes",
        "train,infer,deploy",
        "--jpegs",
        "8",
        "--json",
    ] + [str(out)]
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    timed = [r for r in rows if r["mode"] in ("train", "infer", "deploy") and "img_s_median" in r]
    assert {(r["model"], r["mode"]) for r in timed} == {
        ("slak_test", "train"),
        ("slak_test", "infer"),
        ("slak_test", "deploy"),
        ("test_convnext", "train"),
        ("test_convnext", "infer"),
    }
    assert all(r["img_s_median"] > 0 and r["step_ms_median"] > 0 for r in timed)
    # an explicitly named backend that cannot run on the device is listed with the reason, not run
    assert any(r.get("backend") == "cuda" and r["note"].startswith("skipped") for r in rows)
    pipe = next(r for r in rows if r["mode"] == "pipeline")
    assert pipe["images"] == 8 and pipe["img_s_per_worker"] > 0
    assert "| slak_test | torch | fp32 | train | 4 |" in proc.stdout


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path: Path) -> None:
    """Loader workers live across epochs, so each sample's random transform is seeded from (seed, epoch,
    index): the same epoch gives the same batches with 0 or 2 workers and on a second pass (what a resumed
    run replays), a new epoch gives new crops, and the training process's own RNG is left as it was."""
    root = _tree(tmp_path)

    def epoch_batches(workers: int, epoch: int) -> list[torch.Tensor]:
        cfg = _imagenet_cfg(root, **{"data.workers": workers, "data.reprob": 0.0})
        bundle = data.build_datasets(cfg.data, seed=0)
        train, _ = data.build_loaders(bundle, cfg, rank=0, world_size=1, micro_batch_size=4, seed=0)
        assert train.loader.persistent_workers == (workers > 0)
        train.sampler.set_epoch(epoch)
        return [x for x, _ in train]

    in_process = epoch_batches(0, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(in_process, epoch_batches(2, epoch=1)))
    assert all(torch.equal(a, b) for a, b in zip(in_process, epoch_batches(0, epoch=1)))
    assert not all(torch.equal(a, b) for a, b in zip(in_process, epoch_batches(0, epoch=2)))

    seeded = data.PerSampleSeeded(data.build_datasets(_imagenet_cfg(root).data, seed=0).train, seed=0)
    random.seed(1)
    torch.manual_seed(1)
    python_state, torch_state = random.getstate(), torch.random.get_rng_state()
    assert torch.equal(seeded[(1, 3)][0], seeded[(1, 3)][0])
    assert random.getstate() == python_state and torch.equal(torch.random.get_rng_state(), torch_state)
