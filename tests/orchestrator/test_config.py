"""ExperimentConfig: flat round trip, YAML presets, dotted overrides, all-problems validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.loading import load_config, parse_overrides, replace, to_yaml
from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.validation import ConfigError

PRESETS = sorted((Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.yaml"))

FIXED_NAMES = [
    "model.variant", "model.width_factor", "model.stage_kernels", "model.short_edge", "model.small_kernel",
    "sparse.sparsity", "sparse.prune_rate",
    "sparse.update_frequency", "data.path", "data.image_size", "train.epochs", "train.global_batch_size",
    "train.lr", "run.num_workers", "run.use_gpu", "run.storage_path", "tracking.uri", "tracking.experiment",
]


def test_fixed_dotted_names_exist() -> None:
    flat = ExperimentConfig().to_flat()
    assert [n for n in FIXED_NAMES if n not in flat] == []


def test_the_package_face_names_only_what_building_a_config_takes() -> None:
    """``orchestrator.config`` re-exports four names for code outside the project, each the defining module's."""
    import orchestrator.config as face

    assert sorted(face.__all__) == ["ConfigError", "ExperimentConfig", "load_config", "replace"]
    assert (face.ConfigError, face.ExperimentConfig, face.load_config, face.replace) == (
        ConfigError, ExperimentConfig, load_config, replace)


def test_flat_round_trip_is_exact_and_json_friendly() -> None:
    cfg = load_config(None, ["model.kernel_size=[31,29,27,13,5]", "train.opt_betas=[0.8,0.99]", "train.lr=1e-3"])
    flat = cfg.to_flat()
    assert ExperimentConfig.from_flat(flat) == cfg
    assert flat["model.stage_kernels"] == [31, 29, 27, 13] and flat["train.lr"] == 1e-3
    assert (flat["model.short_edge"], flat["model.small_kernel"]) == (5, 5) and "model.kernel_size" not in flat
    assert all(not isinstance(v, tuple) for v in flat.values())


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load_and_yaml_round_trips(preset: Path, tmp_path: Path) -> None:
    cfg = load_config(preset)
    again = tmp_path / "resolved.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg


def test_paper_recipe_tiny() -> None:
    cfg = load_config(PRESETS[0].parent / "paper_slak_tiny_300ep.yaml")
    assert cfg.model.stage_kernels == [51, 49, 47, 13] and cfg.model.width_factor == 1.3
    assert cfg.model.short_edge == 5 and cfg.model.small_kernel == 5
    assert (cfg.sparse.prune_rate, cfg.sparse.update_frequency, cfg.model.drop_path_rate) == (0.5, 2000, 0.1)
    assert cfg.train.global_batch_size == 4096 and cfg.accumulation_steps == 8  # 4 GPUs x 128 x 8


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.epochs=5"], {"train.epochs": 5}),
        (["run.use_gpu=true", "data.source=imagenet", "data.path=/d"],
         {"run.use_gpu": True, "data.source": "imagenet", "data.path": "/d"}),
        (["model.stage_kernels=[51, 49, 47, 13]"], {"model.stage_kernels": [51, 49, 47, 13]}),
        (["train.clip_grad=null"], {"train.clip_grad": None}),
        ({"sparse.sparsity": 0.2}, {"sparse.sparsity": 0.2}),
    ],
    ids=["int", "bool-and-str", "list", "null", "dict"],
)
def test_overrides_parse(overrides, expected) -> None:
    assert parse_overrides(overrides) == expected
    cfg = load_config(None, overrides)
    flat = cfg.to_flat()
    assert {k: flat[k] for k in expected} == expected


def test_string_numbers_are_coerced_to_field_types() -> None:
    cfg = ExperimentConfig.from_flat({"train.lr": "4e-3", "train.epochs": "3", "train.warmup_epochs": 1})
    assert cfg.train.lr == 4e-3 and cfg.train.epochs == 3 and isinstance(cfg.train.warmup_epochs, float)


def test_all_problems_reported_together_with_suggestions() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lrr=1", "sparse.sparsity=1.5", "model.variant=slak_tny", "train.epochs=abc",
                           "train.sparsity=0.3", "train.global_batch_size=30", "train.micro_batch_size=4"])
    err = info.value
    text = str(err)
    assert len(err.problems) == 6, text
    assert "did you mean 'train.lr'" in text and "did you mean 'sparse.sparsity'" in text
    assert "did you mean 'slak_tiny'" in text and "sparse.sparsity=1.5" in text
    assert "train.epochs='abc'" in text and "must be int" in text
    assert "train.global_batch_size=30" in text and "micro_batch_size" in text
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.kernel_size=[51,49,47,13]"], "model.kernel_size"),
        (["model.kernel_size=[50,49,47,13,5]"], "odd"),
        (["data.source=imagenet"], "data.path"),
        (["train.precision=fp16", "run.use_gpu=false"], "bf16"),
        (["sparse.prune_rate=0.001"], "sparse.prune_rate_min"),
        (["train.min_lr=1"], "train.min_lr"),
        (["sparse.init=ERK"], "did you mean 'erk'"),
        (["run.name=a/b"], "run.name"),
    ],
    ids=["kernel-4-numbers", "kernel-even", "imagenet-no-path", "fp16-on-cpu", "rate-below-floor", "min-lr",
         "init-case", "name-slash"],
)
def test_single_problems_name_the_field(overrides, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_accumulation_follows_workers() -> None:
    cfg = load_config(None, {"train.global_batch_size": 64, "train.micro_batch_size": 8, "run.num_workers": 2})
    assert cfg.accumulation_steps == 4
    assert replace(cfg, {"run.num_workers": 4}).accumulation_steps == 2
    assert load_config(None, {"train.global_batch_size": 64}).accumulation_steps == 1


def test_replace_validates_and_keeps_the_original() -> None:
    cfg = load_config(None, {})
    assert replace(cfg, {"sparse.sparsity": 0.2}).sparse.sparsity == 0.2 and cfg.sparse.sparsity == 0.4
    with pytest.raises(ConfigError):
        replace(cfg, {"sparse.sparsity": 2.0})


def test_sparse_seed_follows_train_seed() -> None:
    assert load_config(None, {"train.seed": 7}).sparse_seed == 7
    assert load_config(None, {"train.seed": 7, "sparse.seed": 3}).sparse_seed == 3


def test_defaults_resolve_absolute_local_paths() -> None:
    cfg = load_config(None, {})
    assert cfg.tracking.uri.startswith("sqlite:///") and Path(cfg.tracking.uri[len("sqlite:///"):]).is_absolute()
    assert Path(cfg.run.storage_path).is_absolute()


def test_missing_preset_and_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
