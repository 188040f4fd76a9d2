"""The data.* augmentation settings reach timm's transforms, and bad or idle ones are named."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from orchestrator import data, evaluation
from orchestrator.config.loading import load_config
from orchestrator.config.validation import ConfigError

PRESETS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def _folder_cfg(**overrides):
    return load_config(None, {"data.source": "imagenet", "data.path": "/unused", **overrides})


def _steps(transform) -> dict[str, object]:
    return {type(t).__name__: t for t in transform.transforms}


def test_defaults_are_the_imagenet_recipe() -> None:
    train, _ = data.build_transforms(_folder_cfg().data)
    steps = _steps(train)
    crop = steps["RandomResizedCropAndInterpolation"]
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((0.75, 4 / 3))
    assert steps["RandomHorizontalFlip"].p == 0.5 and "RandomVerticalFlip" not in steps
    assert "RandAugment" in steps and "ColorJitter" not in steps  # timm drops the jitter under RandAugment


def test_small_image_settings_reach_timm() -> None:
    cfg = _folder_cfg(**{"data.crop_scale": [0.6, 1.0], "data.crop_ratio": [0.8, 1.25], "data.hflip": 0.0,
                         "data.vflip": 0.3, "data.auto_augment": None, "data.color_jitter": 0.2,
                         "data.crop_pct": 1.0, "data.crop_mode": "squash", "data.image_size": 48})
    train, val = data.build_transforms(cfg.data)
    steps = _steps(train)
    crop = steps["RandomResizedCropAndInterpolation"]
    assert crop.scale == (0.6, 1.0) and crop.ratio == (0.8, 1.25) and crop.size == (48, 48)
    assert "RandomHorizontalFlip" not in steps and steps["RandomVerticalFlip"].p == 0.3
    assert "RandAugment" not in steps and steps["ColorJitter"].brightness == pytest.approx((0.8, 1.2))
    resize = _steps(val)["Resize"]
    assert tuple(resize.size) == (48, 48)  # squash: the whole image resized to the square, nothing cropped


def test_milder_randaugment_string_is_used() -> None:
    train, _ = data.build_transforms(_folder_cfg(**{"data.auto_augment": "rand-m5-mstd0.5"}).data)
    assert _steps(train)["RandAugment"].ops[0].magnitude == 5


@pytest.mark.parametrize("off", ["", None, "null"])
def test_randaugment_off_spellings(off) -> None:
    train, _ = data.build_transforms(_folder_cfg(**{"data.auto_augment": off}).data)
    assert "RandAugment" not in _steps(train)


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"data.crop_scale": [0.5]}, "data.crop_scale=[0.5]: must be [min, max] fractions of the image area"),
    ({"data.crop_scale": [0.9, 0.5]}, "data.crop_scale=[0.9, 0.5]: must be [min, max]"),
    ({"data.crop_scale": [0.0, 1.0]}, "data.crop_scale=[0.0, 1.0]: must be [min, max]"),
    ({"data.crop_scale": [0.5, 1.5]}, "data.crop_scale=[0.5, 1.5]: must be [min, max]"),
    ({"data.crop_ratio": [-1, 2]}, "data.crop_ratio=[-1.0, 2.0]: must be [min, max] aspect ratios"),
    ({"data.hflip": 1.5}, "data.hflip=1.5: must lie in [0, 1]"),
    ({"data.vflip": -0.1}, "data.vflip=-0.1: must lie in [0, 1]"),
    ({"data.color_jitter": -1}, "data.color_jitter=-1.0: must lie in [0, inf]"),
    ({"data.auto_augment": "randaug-m9"}, "data.auto_augment='randaug-m9': must be a timm augmentation spec"),
    ({"data.crop_mode": "centre"}, "data.crop_mode='centre': must be one of ['center', 'squash', 'border']; "
                                   "did you mean 'center'?"),
])
def test_bad_values_give_one_line_each(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        _folder_cfg(**overrides)
    assert len(err.value.problems) == 1 and needle in err.value.problems[0], err.value.problems


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"data.source": "shapes", "data.path": None, "data.hflip": 0.0},
     "data.hflip=0.0 has no effect: data.source='shapes' generates its images and applies no transforms"),
    ({"data.color_jitter": 0.2}, "data.color_jitter=0.2 has no effect: timm applies colour jitter only without "
                                 "RandAugment"),
])
def test_idle_settings_are_warned(overrides: dict, needle: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator.config"):
        _folder_cfg(**overrides)
    assert needle in caplog.text


def test_colour_jitter_without_randaugment_is_no_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator.config"):
        _folder_cfg(**{"data.color_jitter": 0.2, "data.auto_augment": ""})
    assert "color_jitter" not in caplog.text


def test_evaluation_names_the_training_only_overrides() -> None:
    lines = evaluation.unused_overrides({"data.hflip", "train.lr", "data.crop_pct", "train.precision", "run.name"})
    assert [line.split(" ")[0] for line in lines] == ["data.hflip", "train.lr"]
    assert "sparse.sparsity has no effect: the checkpoint" in evaluation.unused_overrides({"sparse.sparsity"})[0]


def test_small_images_preset_is_the_documented_recipe() -> None:
    cfg = load_config(PRESETS / "small_images.yaml")
    d = cfg.data
    assert (d.hflip, d.vflip, d.crop_scale, d.mixup, d.cutmix, d.reprob, d.crop_pct) == (
        0.0, 0.0, [0.6, 1.0], 0.0, 0.0, 0.0, 1.0)
