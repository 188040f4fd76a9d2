"""Every setting the user gives either takes effect or is reported: an error where the run would quietly be
another experiment (a data folder the source never reads), a warning naming the setting where an option
of a feature that is off has no effect. Defaults that a mode does not use are never reported."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.config.loading import load_config, replace
from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.validation import ConfigError

PRESETS = sorted((Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.yaml"))
SMOKE = PRESETS[0].parent / "smoke.yaml"


def _config_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "orchestrator.config" and r.levelno >= logging.WARNING]


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="orchestrator.config")


def test_a_data_folder_with_a_generated_source_is_an_error() -> None:
    """The issue's case: the smoke preset sets data.source=shapes, so data.path would train on shapes."""
    with pytest.raises(ConfigError, match=r"data\.path='/some/folder' has no effect: data\.source='shapes'"):
        load_config(SMOKE, ["data.path=/some/folder"])
    with pytest.raises(ConfigError, match=r"data\.source=imagenet"):
        load_config(None, ["data.source=synthetic", "data.path=/some/folder"])


@pytest.mark.parametrize("name", ["data.train_size", "data.val_size"])
def test_sizes_with_an_image_folder_are_an_error(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"{name}=5000 has no effect: data.source='imagenet'"):
        load_config(None, ["data.source=imagenet", "data.path=/data/imagenet", f"{name}=5000"])


def test_errors_join_the_other_problems() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, ["data.path=/x", "train.lr=0"])
    assert len(info.value.problems) == 2


def test_unused_defaults_are_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, ["data.source=imagenet", "data.path=/data/imagenet", "tracking.enabled=false",
                             "sparse.enabled=false", "train.ema=false", "run.use_gpu=false", "data.mixup=0",
                             "data.cutmix=0", "model.kernel_mode=naive"])
    assert _config_warnings(caplog) == []
    assert cfg.user_set == {"data.source", "data.path", "tracking.enabled", "sparse.enabled", "train.ema",
                            "run.use_gpu", "data.mixup", "data.cutmix", "model.kernel_mode"}


def test_a_value_given_equal_to_its_default_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    load_config(None, ["tracking.enabled=false", "tracking.experiment=slak", "data.source=imagenet",
                       "data.path=/d", "data.train_size=512"])
    assert _config_warnings(caplog) == []


def test_the_embedded_laptop_default_counts_as_default(caplog: pytest.LogCaptureFixture) -> None:
    """LAPTOP_DEFAULTS sets sizes and a GPU share; neither is the user's when they pick their data or CPUs."""
    cfg = load_config(None, ["data.source=imagenet", "data.path=/data/imagenet", "run.use_gpu=false"],
                      defaults=cli.LAPTOP_DEFAULTS)
    assert cfg.data.train_size == cli.LAPTOP_DEFAULTS["data.train_size"]
    assert cfg.user_set == {"data.source", "data.path", "run.use_gpu"}
    assert _config_warnings(caplog) == []
    with pytest.raises(ConfigError, match=r"data\.train_size=2048"):
        load_config(None, ["data.source=imagenet", "data.path=/d", "data.train_size=2048"],
                    defaults=cli.LAPTOP_DEFAULTS)


@pytest.mark.parametrize("overrides, ignored", [
    (["data.auto_augment=rand-m15"], "data.auto_augment"),
    (["data.source=synthetic", "data.interpolation=bilinear"], "data.interpolation"),
    (["data.crop_pct=0.9"], "data.crop_pct"),
    (["data.on_bad_image=skip"], "data.on_bad_image"),
    (["data.reprob=0.5"], "data.reprob"),
    (["data.mixup=0", "data.cutmix=0", "data.mixup_prob=0.5"], "data.mixup_prob"),
    (["data.mixup=0", "data.cutmix=0", "data.mixup_switch_prob=0.2"], "data.mixup_switch_prob"),
    (["data.cutmix=0", "data.mixup_switch_prob=0.2"], "data.mixup_switch_prob"),
    (["data.mixup_prob=0", "data.mixup=0.2"], "data.mixup"),
    (["train.ema=false", "train.ema_decay=0.99"], "train.ema_decay"),
    (["train.ema=false", "train.bn_recalibration_batches=4"], "train.bn_recalibration_batches"),
    (["sparse.enabled=false", "sparse.sparsity=0.6"], "sparse.sparsity"),
    (["sparse.enabled=false", "sparse.update_frequency=50"], "sparse.update_frequency"),
    (["sparse.enabled=false", "tracking.masks_every_updates=5"], "tracking.masks_every_updates"),
    (["model.kernel_mode=replknet", "model.short_edge=3"], "model.short_edge"),
    (["model.kernel_mode=naive", "model.small_kernel=3"], "model.small_kernel"),
    (["run.use_gpu=false", "run.gpus_per_worker=0.5"], "run.gpus_per_worker"),
    (["tracking.enabled=false", "tracking.uri=http://host:5000"], "tracking.uri"),
    (["tracking.enabled=false", "tracking.experiment=mine"], "tracking.experiment"),
    (["tracking.enabled=false", "tracking.log_every_steps=5"], "tracking.log_every_steps"),
    (["tracking.enabled=false", "tracking.masks_every_updates=3"], "tracking.masks_every_updates"),
    (["tracking.enabled=false", "tracking.offline_dir=/tmp/off"], "tracking.offline_dir"),
    (["tune.grace_period=3"], "tune.grace_period"),
])
def test_an_option_of_a_feature_that_is_off_is_a_warning(overrides: list[str], ignored: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    load_config(None, overrides)
    warnings = _config_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{ignored}=") and "has no effect" in warnings[0]


def test_options_that_do_take_effect_are_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    load_config(None, ["data.source=synthetic", "data.reprob=0.5", "data.mixup_switch_prob=0.2",
                       "data.smoothing=0.2", "tune.asha=true", "tune.grace_period=3", "model.short_edge=3",
                       "run.gpus_per_worker=0.5"])
    load_config(None, ["model.kernel_mode=replknet", "model.small_kernel=3"])
    load_config(None, ["data.source=imagenet", "data.path=/d", "data.auto_augment=rand-m15",
                       "data.crop_pct=0.9", "data.interpolation=bilinear", "data.on_bad_image=skip"])
    assert _config_warnings(caplog) == []


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_give_no_warning(preset: Path, caplog: pytest.LogCaptureFixture) -> None:
    load_config(preset)
    assert _config_warnings(caplog) == []


def test_the_laptop_default_gives_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    load_config(None, [], defaults=cli.LAPTOP_DEFAULTS)
    assert _config_warnings(caplog) == []


def test_sections_the_caller_never_reads_are_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    load_config(None, ["tune.asha=true", "tune.seeds=3"], unused_sections={"tune": "one training job"})
    assert _config_warnings(caplog) == ["tune.asha=True has no effect: one training job",
                                        "tune.seeds=3 has no effect: one training job"]


def test_replace_keeps_what_the_user_set_and_reports_nothing(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(None, ["sparse.sparsity=0.6"])
    dense = replace(cfg, {"sparse.enabled": False})  # a grid's dense point: the program's choice
    assert dense.user_set == {"sparse.sparsity"} and _config_warnings(caplog) == []


def test_what_the_user_set_is_no_setting() -> None:
    cfg = load_config(None, ["train.epochs=3"])
    assert "user_set" not in str(cfg) and all(not k.startswith("user_set") for k in cfg.to_flat())
    assert ExperimentConfig.from_flat(cfg.to_flat()) == cfg


def test_a_gpu_share_left_unused_by_auto_on_cpus_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("ray")
    from orchestrator.ray_cluster import fit_resources

    cpus = {"CPU": 8.0}
    fit_resources(load_config(None, [], defaults=cli.LAPTOP_DEFAULTS), cpus)  # the laptop default's 0.2
    fit_resources(load_config(None, ["run.gpus_per_worker=0.5"]), cpus, announce=False)  # a pre-check
    fit_resources(load_config(None, ["run.gpus_per_worker=0.5"]), {"CPU": 8.0, "GPU": 1.0})  # used
    assert _config_warnings(caplog) == []
    fit_resources(load_config(None, ["run.gpus_per_worker=0.5"]), cpus)
    (warning,) = _config_warnings(caplog)
    assert warning.startswith("run.gpus_per_worker=0.5 has no effect") and "run.use_gpu=auto" in warning


def test_a_grid_script_names_what_its_grid_overrides(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """``tune_sparsity_width.py sparse.sparsity=0.5``: every Table 8 point sets its own sparsity."""
    pytest.importorskip("ray")
    from orchestrator import tune_runner

    monkeypatch.setattr(tune_runner, "run_experiment", lambda cfg, points, **kw: (cfg, points))
    args = cli.grid_parser("test").parse_args(["sparse.sparsity=0.5", "train.epochs=3", "data.mixup=0.2"])
    cfg, _ = cli.run_grid(args, "table8", "sparsity_width_grid")
    assert cfg.user_set == {"sparse.sparsity", "train.epochs", "data.mixup"}  # the laptop default is not
    (warning,) = _config_warnings(caplog)
    assert warning.startswith("sparse.sparsity=0.5 has no effect: every point of the table8 grid")


def test_preset_sizes_under_a_command_line_source_are_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The smoke preset's sizes were written for shapes; the command line chose imagenet on top of it."""
    cfg = load_config(SMOKE, ["data.source=imagenet", "data.path=/data/imagenet"])
    assert cfg.data.source == "imagenet"
    assert sorted(w.split("=")[0] for w in _config_warnings(caplog)) == ["data.train_size", "data.val_size"]
    with pytest.raises(ConfigError, match=r"data\.train_size=100"):  # given on the command line: an error
        load_config(SMOKE, ["data.source=imagenet", "data.path=/data/imagenet", "data.train_size=100"])
