"""What the driver finds before Ray starts: data layout, class sets, unreadable samples, model geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.config.loading import load_config
from orchestrator.preflight import PreflightError, check_before_start


def _folder(root: Path, classes=("ant", "bee"), val_classes=None, n: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, names in (("train", classes), ("val", val_classes or classes)):
        for c in names:
            for i in range(n):
                path = root / split / c / f"{c}{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    return root


def _cfg(path: Path | None, **extra):
    base = {"data.source": "imagenet", "data.path": str(path) if path else None, "data.num_classes": 2,
            "run.num_workers": 1}
    return load_config(None, {**base, **extra})


def test_a_good_folder_passes(tmp_path: Path) -> None:
    check_before_start(_cfg(_folder(tmp_path / "d")))


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: (root / "d" / "train").mkdir(parents=True) or (root / "d" / "val").mkdir() or root / "d",
         "is empty"),
        (lambda root: _folder(root / "d", val_classes=("ant", "cow")), "only in train ['bee'], only in val ['cow']"),
    ],
    ids=["missing", "empty-train", "class-sets-differ"],
)
def test_layout_problems_are_found_before_ray(tmp_path: Path, make, expect: str) -> None:
    with pytest.raises(PreflightError, match="data: .*" + expect.replace("[", r"\[").replace("]", r"\]")):
        check_before_start(_cfg(make(tmp_path)))


def test_a_class_folder_without_images_is_found(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d")
    for f in (root / "val" / "bee").iterdir():
        f.unlink()
    with pytest.raises(PreflightError, match=r"class folders without images: \['bee'\]"):
        check_before_start(_cfg(root))


def test_an_unreadable_sample_fails_or_warns_per_policy(tmp_path: Path, caplog) -> None:
    root = _folder(tmp_path / "d", n=1)
    bad = root / "train" / "ant" / "ant0.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(PreflightError, match="cannot decode image .*ant0.jpg.*data.on_bad_image=skip"):
        check_before_start(_cfg(root))
    check_before_start(_cfg(root, **{"data.on_bad_image": "skip"}))
    assert "will be skipped" in caplog.text


def test_model_and_data_problems_are_reported_together(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "missing", **{"model.kernel_size": [13, 11, 9, 7, 15]})  # short edge 15 > 7
    with pytest.raises(PreflightError) as err:
        check_before_start(cfg)
    text = str(err.value)
    assert "2 problems" in text and "model (slak_test)" in text and "data:" in text
