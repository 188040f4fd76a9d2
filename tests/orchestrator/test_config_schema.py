"""The library's typed settings are the config's schema: no ``sparse.*`` or ``model.*`` setting can drift.

Every field of :class:`slak_model.sparsity.SparsityConfig` and every ``model.*`` field (each a
:class:`slak_model.SLaKConfig` field) is set to a non-default value through each way in (a YAML preset,
the scripts' ``key=value`` overrides, a Tune grid point) and must arrive in the object the library
consumes: the ``SparsityConfig`` handed to ``DynamicSparsity``, and the ``SLaKConfig`` of the built model.
Fields are enumerated with :func:`dataclasses.fields`, so a new field is covered without editing this file;
its test value is derived from its default (see :func:`_non_default`).
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

import slak_model.config as slak_config
import slak_model.sparsity.config as sparsity_config
from orchestrator import cli, loop
from orchestrator.config.loading import load_config, replace
from orchestrator.config.schema import ExperimentConfig, ModelConfig
from orchestrator.config.validation import ConfigError
from slak_model import SLaKConfig
from slak_model.sparsity import SparsityConfig
from slak_model.variants import variant_config

VARIANT = "slak_test"
SPARSE_FIELDS = [f.name for f in dataclasses.fields(SparsityConfig)]
MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "variant"]
#: SLaKConfig fields a variant fixes and the experiment config deliberately does not expose.
VARIANT_ONLY = {"depths", "dims", "in_chans"}


def _str_choices(module: types.ModuleType, default: str) -> tuple[str, ...]:
    """The module's tuple of allowed names that holds ``default`` (e.g. ``INIT_MODES`` for ``"snip"``)."""
    for value in vars(module).values():
        if isinstance(value, tuple) and default in value and all(isinstance(v, str) for v in value):
            return value
    return ()


def _candidates(default: Any, module: types.ModuleType) -> list[Any]:
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        return [default + 2, default + 1]  # +2 keeps kernel sizes odd
    if isinstance(default, float):
        return [default * 0.5, default + 0.1, default * 0.9]
    if isinstance(default, str):
        return [c for c in _str_choices(module, default) if c != default]
    if isinstance(default, tuple):
        return [tuple(k - 2 for k in default), tuple(k + 2 for k in default)]
    return []


def _non_default(default: Any, module: types.ModuleType, accepts) -> Any:
    """A valid value other than ``default``, or ``default`` when the field allows one value only."""
    for candidate in _candidates(default, module):
        if candidate != default and accepts(candidate):
            return list(candidate) if isinstance(candidate, tuple) else candidate
    if isinstance(default, str) and _str_choices(module, default) == (default,):
        return default
    pytest.fail(f"no valid non-default test value for a field with default {default!r}; extend _candidates")


def _accepted(build) -> Any:
    def accepts(value: Any) -> bool:
        try:
            build(value)
        except (ValueError, TypeError):
            return False
        return True

    return accepts


def _sparse_value(name: str) -> Any:
    default = getattr(SparsityConfig(), name)
    return _non_default(default, sparsity_config, _accepted(lambda v: SparsityConfig(**{name: v})))


def _model_value(name: str) -> Any:
    default = getattr(variant_config(VARIANT), name)
    return _non_default(default, slak_config, _accepted(
        lambda v: loop.build_meta_model(load_config(None, {"model.variant": VARIANT, f"model.{name}": v}))))


def _through_every_way_in(key: str, value: Any, tmp_path: Path) -> ExperimentConfig:
    """The config with ``key=value`` from YAML, the scripts' CLI and a Tune trial; all three must agree."""
    from orchestrator.search_space import GridPoint, param_space
    from orchestrator.tune_trial import experiment_config_for_trial

    section, leaf = key.split(".")
    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"model": {"variant": VARIANT}, section: {leaf: value}}))
    from_yaml = load_config(preset)

    args = cli.grid_parser("test").parse_args([f"model.variant={VARIANT}", f"{key}={json.dumps(value)}"])
    from_cli = load_config(args.config, cli.overrides_from_args(args))

    base = load_config(None, {"model.variant": VARIANT})
    space = param_space([GridPoint("test", "row", "setting", {key: value})], seeds=1, constants={})
    trial = {"point": space["point"]["grid_search"][0], "seed_index": space["seed_index"]["grid_search"][0]}
    from_tune = experiment_config_for_trial(base, trial)

    assert from_yaml == from_cli == from_tune
    assert from_yaml.to_flat()[key] == value  # the MLflow param and run-identity key
    return from_yaml


def test_the_sparse_section_is_the_librarys_config() -> None:
    assert issubclass(type(ExperimentConfig().sparse), SparsityConfig)
    flat = ExperimentConfig().to_flat()
    assert {f"sparse.{name}" for name in SPARSE_FIELDS} <= set(flat)
    defaults = ExperimentConfig().sparse
    assert all(getattr(defaults, n) == getattr(SparsityConfig(), n) for n in SPARSE_FIELDS if n != "seed")


def test_every_model_field_is_a_slak_config_field() -> None:
    slak_fields = {f.name for f in dataclasses.fields(SLaKConfig)}
    assert set(MODEL_FIELDS) <= slak_fields
    assert slak_fields - set(MODEL_FIELDS) == VARIANT_ONLY, "expose the new SLaKConfig field as model.<field>"


@pytest.mark.parametrize("name", SPARSE_FIELDS)
def test_sparse_field_reaches_the_engine(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    value = _sparse_value(name)
    cfg = _through_every_way_in(f"sparse.{name}", value, tmp_path)
    cfg = replace(cfg, {"run.num_workers": 1, "train.global_batch_size": 8, "sparse.enabled": True})
    handed: list[SparsityConfig] = []

    class Engine:
        def __init__(self, module: Any, config: SparsityConfig, **kwargs: Any) -> None:
            handed.append(config)

    monkeypatch.setattr(loop, "DynamicSparsity", Engine)
    loop.Trainer(cfg, steps_per_epoch=1, num_classes=4)
    (engine_cfg,) = handed
    assert type(engine_cfg) is SparsityConfig
    assert getattr(engine_cfg, name) == value


@pytest.mark.parametrize("name", MODEL_FIELDS)
def test_model_field_reaches_the_built_model(name: str, tmp_path: Path) -> None:
    value = _model_value(name)
    cfg = _through_every_way_in(f"model.{name}", value, tmp_path)
    built = getattr(loop.build_meta_model(cfg).cfg, name)
    assert (list(built) if isinstance(built, tuple) else built) == value


def test_sparse_seed_none_follows_train_seed_into_the_engine() -> None:
    cfg = load_config(None, {"train.seed": 11})
    assert cfg.sparse.seed is None and cfg.sparse.engine_config(cfg.sparse_seed).seed == 11


def test_sparse_problems_come_from_the_library_under_dotted_names() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sparse.sparsity=1.0", "sparse.growth=gradients", "sparse.seed=1.5", "train.lr=-1"])
    assert len(err.value.problems) == 4, err.value
    library = SparsityConfig(sparsity=0.4).problems()
    assert library == []
    text = str(err.value)
    assert "sparse.sparsity=1.0: must lie in [0, 1)" in text
    assert "sparse.growth='gradients': must be one of ['random', 'gradient', 'momentum']" in text
    assert "sparse.seed=1.5" in text and "train.lr=-1" in text


# ---------------------------------------------------------------------- the reference's kernel_size shorthand
def _kernels(cfg: ExperimentConfig) -> tuple[Any, Any, Any]:
    return cfg.model.stage_kernels, cfg.model.short_edge, cfg.model.small_kernel


def test_kernel_size_shorthand_sets_the_three_fields(tmp_path: Path) -> None:
    from_cli = load_config(None, ["model.kernel_size=[51,49,47,13,5]"])
    assert _kernels(from_cli) == ([51, 49, 47, 13], 5, 5)
    preset = tmp_path / "reference.yaml"
    preset.write_text("model:\n  kernel_size: [31, 29, 27, 13, 3]\n")
    assert _kernels(load_config(preset)) == ([31, 29, 27, 13], 3, 3)
    assert _kernels(load_config(None, {"model.kernel_size": None})) == (None, None, None)
    flat = from_cli.to_flat()
    assert "model.kernel_size" not in flat and ExperimentConfig.from_flat(flat) == from_cli


def test_kernel_size_shorthand_with_one_of_its_fields_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.kernel_size=[51,49,47,13,5]", "model.short_edge=3", "train.lr=-1"])
    assert len(err.value.problems) == 2
    text = str(err.value)
    assert "model.kernel_size=[51, 49, 47, 13, 5] and model.short_edge=3 are both given" in text
    assert "give either the shorthand or the fields" in text
    preset = tmp_path / "both.yaml"
    preset.write_text("model:\n  kernel_size: [51, 49, 47, 13, 5]\n  stage_kernels: [31, 29, 27, 13]\n")
    with pytest.raises(ConfigError, match="model.stage_kernels=.* are both given"):
        load_config(preset)


def test_a_later_layer_overrides_the_shorthand_field_by_field(tmp_path: Path) -> None:
    preset = tmp_path / "reference.yaml"
    preset.write_text("model:\n  kernel_size: [51, 49, 47, 13, 5]\n")
    assert _kernels(load_config(preset, ["model.short_edge=3"])) == ([51, 49, 47, 13], 3, 5)
    typed = load_config(None, {"model.stage_kernels": [9, 9, 7, 5], "model.short_edge": 3})
    assert _kernels(replace(typed, {"model.kernel_size": [15, 15, 13, 5, 5]})) == ([15, 15, 13, 5], 5, 5)


@pytest.mark.parametrize(
    "value, needle",
    [([51, 49, 47, 13], "exactly 5 numbers"), ("abc", "exactly 5 numbers"), ([50, 49, 47, 13, 5], "4 odd")],
    ids=["four-numbers", "not-a-list", "even"],
)
def test_bad_kernel_size_shorthand_names_the_fix(value: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, {"model.kernel_size": value})


def test_typo_of_the_shorthand_is_suggested() -> None:
    with pytest.raises(ConfigError, match="did you mean 'model.kernel_size'"):
        load_config(None, ["model.kernel_sizes=[51,49,47,13,5]"])
