"""A run's identity includes its config: the same run folder never continues under other settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config.loading import load_config, to_yaml
from orchestrator.run_identity import IDENTITY_FILE, RunConfigMismatchError, check_or_record, identity

SMOKE = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "smoke.yaml"


def _record(storage: Path, overrides: dict) -> list[str]:
    cfg = load_config(str(SMOKE), overrides)
    return check_or_record(str(storage), "run-a", identity(cfg.to_flat()), yaml_text=to_yaml(cfg))


def test_first_start_records_and_the_same_settings_continue(tmp_path: Path) -> None:
    assert _record(tmp_path, {}) == []
    assert (tmp_path / "run-a" / IDENTITY_FILE).is_file()
    assert _record(tmp_path, {"run.num_workers": 1, "tracking.enabled": False}) == []  # run-only sections


def test_a_setting_that_shapes_the_result_is_refused_with_every_difference(tmp_path: Path) -> None:
    _record(tmp_path, {})
    with pytest.raises(RunConfigMismatchError) as err:
        _record(tmp_path, {"sparse.sparsity": 0.7, "train.epochs": 3, "train.log_every_steps": 5})
    text = str(err.value)
    assert "sparse.sparsity: 0.4 when it started, 0.7 now" in text
    assert "train.epochs: 2 when it started, 3 now" in text
    assert "train.log_every_steps" not in text  # changeable: not a reason to refuse
    assert "another run.name" in text and "--config" in text


def test_changeable_settings_continue_and_are_recorded(tmp_path: Path) -> None:
    _record(tmp_path, {})
    assert _record(tmp_path, {"train.log_every_steps": 5, "data.workers": 2}) == ["data.workers",
                                                                                 "train.log_every_steps"]
    assert _record(tmp_path, {"train.log_every_steps": 5, "data.workers": 2}) == []


def test_the_stored_config_continues_the_run_deliberately(tmp_path: Path) -> None:
    _record(tmp_path, {"sparse.sparsity": 0.6})
    stored = load_config(str(tmp_path / "run-a" / "config.yaml"), {})
    assert check_or_record(str(tmp_path), "run-a", identity(stored.to_flat()), yaml_text="") == []


def test_smoke_runs_with_different_settings_get_different_names() -> None:
    pytest.importorskip("ray")
    from orchestrator.ray_train import run_name_for

    base = load_config(str(SMOKE), {})
    assert not base.run.name, "a preset must not fix run.name: unrelated runs would collide"
    assert run_name_for(base) != run_name_for(load_config(str(SMOKE), {"sparse.sparsity": 0.7}))
    assert run_name_for(base) == run_name_for(load_config(str(SMOKE), {"run.num_workers": 1}))
    # settings that may change on a continuation do not rename the run either (it would restart from scratch)
    assert run_name_for(base) == run_name_for(load_config(str(SMOKE), {"data.workers": 4}))


def _record_legacy(storage: Path, settings: dict) -> None:
    """An identity as recorded before ``model.kernel_size`` was split into its three typed fields."""
    legacy = {k: v for k, v in settings.items()
              if k not in ("model.stage_kernels", "model.short_edge", "model.small_kernel")}
    folder = storage / "run-a"
    folder.mkdir(parents=True)
    (folder / IDENTITY_FILE).write_text(json.dumps(legacy | {"model.kernel_size": [13, 11, 9, 7, 3]}))


def test_a_run_recorded_with_the_kernel_size_shorthand_continues(tmp_path: Path) -> None:
    kernels = {"model.stage_kernels": [13, 11, 9, 7], "model.short_edge": 3, "model.small_kernel": 3}
    cfg = load_config(str(SMOKE), kernels)
    _record_legacy(tmp_path, identity(cfg.to_flat()))
    assert check_or_record(str(tmp_path), "run-a", identity(cfg.to_flat()), yaml_text="") == []
    other = load_config(str(SMOKE), {**kernels, "model.short_edge": 5, "model.small_kernel": 5})
    with pytest.raises(RunConfigMismatchError) as err:
        check_or_record(str(tmp_path), "run-a", identity(other.to_flat()), yaml_text="")
    text = str(err.value)
    assert "model.short_edge: 3 when it started, 5 now" in text and "model.kernel_size" not in text


def test_an_experiment_grid_recorded_with_the_shorthand_continues(tmp_path: Path) -> None:
    point = {"row": "N=3", "setting": "slak"}
    legacy = {"train.seed": 0, "grid": [{**point, "model.kernel_size": [15, 15, 13, 5, 3]}]}
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / IDENTITY_FILE).write_text(json.dumps(legacy))
    current = {"train.seed": 0, "grid": [{**point, "model.stage_kernels": [15, 15, 13, 5], "model.short_edge": 3,
                                          "model.small_kernel": 3}]}
    assert check_or_record(str(tmp_path), "exp", current, yaml_text="", what="experiment") == []


def test_a_run_recorded_before_a_setting_existed_continues_at_its_default(tmp_path: Path) -> None:
    """A setting added to the project later was at its default (the old behaviour) in every older run."""
    cfg = load_config(None, {"run.storage_path": str(tmp_path)})
    recorded = {k: v for k, v in identity(cfg.to_flat()).items() if k != "sparse.min_density"}
    folder = tmp_path / "older"
    folder.mkdir()
    (folder / IDENTITY_FILE).write_text(json.dumps(recorded))
    assert check_or_record(str(tmp_path), "older", identity(cfg.to_flat()), yaml_text=to_yaml(cfg)) == []
    (folder / IDENTITY_FILE).write_text(json.dumps(recorded))
    changed = load_config(None, {"run.storage_path": str(tmp_path), "sparse.min_density": 0.05})
    with pytest.raises(RunConfigMismatchError, match=r"sparse\.min_density: 0\.0 when it started, 0\.05 now"):
        check_or_record(str(tmp_path), "older", identity(changed.to_flat()), yaml_text=to_yaml(changed))
