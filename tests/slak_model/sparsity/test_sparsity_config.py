"""SparsityConfig validation: bad names list the valid ones, bad ranges name the field."""

from __future__ import annotations

import pytest

from slak_model.sparsity import SparsityConfig


def test_defaults_are_reference_like() -> None:
    cfg = SparsityConfig()
    assert cfg.prune_rate_min == 0.005 and cfg.dense_threshold == 0.99 and cfg.stop_fraction == 1.0
    assert cfg.density == pytest.approx(0.6)


def test_erk_spelling_is_normalised() -> None:
    assert SparsityConfig(init="ERK").init == "erk"


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("init", "dense", "['snip', 'erk', 'uniform']"),
        ("init", "snp", "did you mean 'snip'"),
        ("growth", "gradients", "['random', 'gradient', 'momentum']"),
        ("prune", "SET", "['magnitude']"),
        ("targets", "only_L", "['all', 'large_kernels']"),
    ],
    ids=["init-dense", "init-typo", "growth-typo", "prune-SET", "targets-only_L"],
)
def test_unknown_names_list_valid_ones(field: str, value: str, expected: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SparsityConfig(**{field: value})
    assert expected in str(info.value)


@pytest.mark.parametrize(
    "field,value",
    [
        ("sparsity", 1.0),
        ("sparsity", -0.1),
        ("sparsity", float("nan")),
        ("prune_rate", 0.0),
        ("prune_rate", 1.5),
        ("update_frequency", 0),
        ("update_frequency", -5),
        ("update_frequency", 2.5),
        ("stop_fraction", 0.0),
        ("dense_threshold", 1.2),
        ("prune_rate_min", 0.9),
    ],
    ids=lambda v: str(v),
)
def test_out_of_range_values_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{field}={value!r}"):
        SparsityConfig(**{field: value})


def test_every_problem_is_reported_together() -> None:
    with pytest.raises(ValueError) as info:
        SparsityConfig(sparsity=2.0, init="bogus", update_frequency=0)
    msg = str(info.value)
    assert "sparsity=2.0" in msg and "init='bogus'" in msg and "update_frequency=0" in msg


def test_zero_sparsity_is_allowed() -> None:
    assert SparsityConfig(sparsity=0.0).density == 1.0
