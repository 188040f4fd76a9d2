"""SLaKConfig: the 5-number alias, width truncation, and ValueErrors raised before any tensor exists."""

from __future__ import annotations

import pytest

import slak_model
from slak_model import SLaKConfig, create_model, variant_config
from slak_model import layers as layers_mod


def test_alias_has_the_reference_meaning() -> None:
    cfg = SLaKConfig(kernel_size=[51, 49, 47, 13, 5])
    assert cfg.stage_kernels == (51, 49, 47, 13)
    assert cfg.short_edge == 5 and cfg.small_kernel == 5
    assert cfg.reference_kernel_size() == [51, 49, 47, 13, 5]
    assert [cfg.stage_small_kernel(i) for i in range(4)] == [5, 5, 5, 5]


def test_n_at_least_m_means_no_small_branch() -> None:
    cfg = SLaKConfig(kernel_mode="replknet", kernel_size=[7, 7, 7, 7, 100])
    assert [cfg.stage_small_kernel(i) for i in range(4)] == [None] * 4
    scaled = SLaKConfig(kernel_size=[15, 15, 13, 5, 5])  # a kernel scaled down to N keeps square strips
    assert [scaled.stage_small_kernel(i) for i in range(4)] == [5, 5, 5, None]


@pytest.mark.parametrize(
    "variant,widths",
    [
        ("slak_tiny", (124, 249, 499, 998)),
        ("slak_small", (124, 249, 499, 998)),
        ("slak_base", (166, 332, 665, 1331)),
    ],
)
def test_widths_truncate_like_the_reference(variant: str, widths: tuple[int, ...]) -> None:
    assert variant_config(variant).widths == widths


def test_replace_accepts_field_names_and_the_alias() -> None:
    cfg = variant_config(
        "slak_tiny",
        width_factor=1.5,
        kernel_size=[31, 29, 27, 13, 3],
        num_classes=10,
        drop_path_rate=0.1,
        use_bn=False,
        kernel_mode="decomposed",
    )
    assert cfg.width_factor == 1.5 and cfg.stage_kernels == (31, 29, 27, 13) and cfg.short_edge == 3
    assert cfg.num_classes == 10 and cfg.use_bn is False and cfg.drop_path_rate == 0.1
    assert cfg.to_dict()["depths"] == [3, 3, 9, 3]


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"kernel_size": [51, 49, 48, 13, 5]}, "stage_kernels[2] (stage 3)=48"),
        ({"kernel_size": [51, 49, 47, 13, 4]}, "short_edge=4"),
        ({"stage_kernels": (51, 0, 47, 13)}, "stage_kernels[1] (stage 2)=0"),
        ({"stage_kernels": (51, -3, 47, 13)}, "stage_kernels[1] (stage 2)=-3"),
        ({"kernel_size": [51, 49, 47, 13]}, "exactly 5 numbers"),
        ({"kernel_size": [51, 49, 47, 13, 5, 3]}, "exactly 5 numbers"),
        ({"width_factor": 0}, "width_factor=0"),
        ({"width_factor": -1.3}, "width_factor=-1.3"),
        ({"drop_path_rate": 1.0}, "drop_path_rate=1.0"),
        ({"drop_path_rate": -0.1}, "drop_path_rate=-0.1"),
        ({"kernel_mode": "decomposed", "kernel_size": [7, 7, 7, 7, 100]}, "short_edge=100 is larger"),
        ({"kernel_mode": "dense"}, "kernel_mode='dense'"),
        ({"num_classes": -1}, "num_classes=-1"),
        ({"depths": (3, 3, 9)}, "lengths 3, 4, 4"),
    ],
    ids=[
        "even-stage-kernel",
        "even-short-edge",
        "zero-kernel",
        "negative-kernel",
        "alias-4-numbers",
        "alias-6-numbers",
        "width-zero",
        "width-negative",
        "drop-path-one",
        "drop-path-negative",
        "decomposed-N-above-M",
        "unknown-mode",
        "negative-classes",
        "stage-count-mismatch",
    ],
)
def test_bad_config_is_a_value_error_before_any_tensor(overrides: dict, needle: str, monkeypatch) -> None:
    def no_tensors(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("a layer was built before the config was validated")

    monkeypatch.setattr(layers_mod.DepthwiseConv, "__init__", no_tensors)
    with pytest.raises(ValueError) as err:
        create_model("slak_tiny", **overrides)
    assert needle in str(err.value)


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(ValueError) as err:
        SLaKConfig(kernel_size=[50, 49, 47, 13, 5], width_factor=0, drop_path_rate=2.0)
    text = str(err.value)
    assert "stage_kernels[0]" in text and "width_factor=0" in text and "drop_path_rate=2.0" in text


def test_naive_mode_ignores_the_even_reference_marker() -> None:
    cfg = SLaKConfig(kernel_mode="naive", kernel_size=[7, 7, 7, 7, 100])  # ConvNeXt baseline spelling
    assert cfg.stage_small_kernel(0) is None


def test_unknown_variant_lists_the_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        create_model("slak_tinny")
    text = str(err.value)
    assert "'slak_tiny'" in text and all(name in text for name in slak_model.VARIANTS)


def test_unknown_override_suggests_the_field() -> None:
    with pytest.raises(ValueError, match="did you mean 'width_factor'"):
        create_model("slak_test", width_factr=1.3)


def test_none_override_keeps_the_variant_value() -> None:
    assert variant_config("slak_tiny", width_factor=None, num_classes=None).widths == (124, 249, 499, 998)
    assert variant_config("slak_tiny", kernel_size=None).stage_kernels == (51, 49, 47, 13)
    assert (
        variant_config("slak_tiny", small_kernel=None).stage_small_kernel(0) is None
    )  # None is a value here
    assert create_model("slak_test", width_factor=None).cfg.widths == (8, 16, 24, 32)


def test_numpy_scalars_become_python_numbers() -> None:
    np = pytest.importorskip("numpy")
    cfg = variant_config(
        "slak_tiny", kernel_size=list(np.array([31, 29, 27, 13, 5])), drop_path_rate=np.float64(0.1)
    )
    assert cfg.stage_kernels == (31, 29, 27, 13) and type(cfg.stage_kernels[0]) is int
    assert type(cfg.short_edge) is int and type(cfg.drop_path_rate) is float
