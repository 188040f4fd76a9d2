"""A new user's console shows our progress lines and the final table, not Ray's noise: the switches are Ray's
own settings (token authentication chosen explicitly, Tune's verbosity and its logger switch), applied by the
functions that start Ray and Tune. Ray itself never starts here: its entry points are replaced by fakes."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

pytest.importorskip("ray")

import ray
from ray import tune
from ray._private.authentication import authentication_token_setup
from ray._raylet import AuthenticationMode, Config, get_authentication_mode
from ray.air._internal.usage import AirEntrypoint
from ray.tune.experimental.output import AirVerbosity, get_air_verbosity
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.utils.callback import _create_default_callbacks

from orchestrator import ray_cluster, search_space, tune_runner
from orchestrator.config.loading import load_config


def _fake_local_ray(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append({**kw, "auth": os.environ.get("RAY_AUTH_MODE")}))
    monkeypatch.setattr(ray_cluster, "_bind_loopback_only", lambda: None)
    return calls


@pytest.fixture
def _ray_auth_config_restored() -> Iterator[None]:
    """Ray caches its auth mode per process; read it again from the (restored) environment afterwards."""
    yield
    Config.initialize("")


@pytest.mark.usefixtures("_ray_auth_config_restored")
def test_a_local_ray_chooses_token_auth_explicitly(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Ray reads RAY_AUTH_MODE at import: the driver must be in token mode too, or the servers refuse it."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    calls = _fake_local_ray(monkeypatch)
    ray_cluster.init_ray(address=None)
    assert calls[0]["auth"] == "token"
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    with caplog.at_level(logging.WARNING, logger=authentication_token_setup.__name__):
        assert authentication_token_setup.enable_token_auth_by_default()  # what ray.init does next
    assert caplog.records == []


def test_an_exported_auth_mode_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    calls = _fake_local_ray(monkeypatch)
    ray_cluster.init_ray(address=None)
    assert calls[0]["auth"] == "disabled"


def test_joining_a_cluster_leaves_auth_to_the_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    calls = _fake_local_ray(monkeypatch)
    monkeypatch.setattr(ray_cluster, "check_address", lambda *a, **k: None)  # no cluster answers in this test
    ray_cluster.init_ray(address="auto")
    assert calls[0]["auth"] is None


def test_quiet_tune_console_sets_and_restores_only_what_was_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    with tune_runner.quiet_tune_console():
        assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")  # the user wants TensorBoard files
    with tune_runner.quiet_tune_console():
        assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "0"


def test_tune_keeps_its_result_files_but_not_tensorboard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    verbosity = get_air_verbosity(tune_runner.TUNE_VERBOSITY)
    assert verbosity == AirVerbosity.SILENT
    with tune_runner.quiet_tune_console():
        made = _create_default_callbacks(tune_runner.result_loggers(), air_verbosity=verbosity,
                                         entrypoint=AirEntrypoint.TUNER)
    kinds = [type(c) for c in made]
    assert kinds.count(CSVLoggerCallback) == 1 and kinds.count(JsonLoggerCallback) == 1
    assert TBXLoggerCallback not in kinds


def test_a_silent_reporter_prints_no_trial_config(capsys: pytest.CaptureFixture[str]) -> None:
    (reporter,) = [c for c in _create_default_callbacks(
        [], air_verbosity=get_air_verbosity(tune_runner.TUNE_VERBOSITY), entrypoint=AirEntrypoint.TUNER)
        if hasattr(c, "on_trial_start")][:1]
    reporter.setup(start_time=0.0, total_samples=1)
    trial = SimpleNamespace(config={"point": {"row": "r"}}, trial_id="t1")
    reporter.on_trial_start(0, [trial], trial)
    assert capsys.readouterr().out == ""


class _FakeTuner:
    """Records what ``run_experiment`` gives Tune and the environment ``fit`` runs in."""

    made: ClassVar[list[_FakeTuner]] = []

    def __init__(self, trainable: Any, **kwargs: Any) -> None:
        self.kwargs = kwargs
        _FakeTuner.made.append(self)

    @staticmethod
    def can_restore(path: Any) -> bool:
        return False

    def fit(self) -> Any:
        self.env = dict(os.environ)
        return _Results()


class _Results:
    num_errors, num_terminated = 0, 1

    def __len__(self) -> int:
        return 1


def test_run_experiment_starts_tune_quietly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    monkeypatch.delenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", raising=False)
    cfg = load_config(None, {"tracking.enabled": False, "run.storage_path": str(tmp_path)})
    monkeypatch.setattr(tune_runner, "init_ray", lambda c, address: ray_cluster.fit_resources(
        c, {"CPU": 4.0}, trial_driver_cpus=1, announce=False))
    monkeypatch.setattr(tune_runner.ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(tune_runner, "_live_placement_groups", lambda: None)
    monkeypatch.setattr(tune, "Tuner", _FakeTuner)
    _FakeTuner.made.clear()
    points = search_space.sparsity_width_grid(cfg)[:1]
    tune_runner.run_experiment(cfg, points, table="table8")
    (tuner,) = _FakeTuner.made
    run_config = tuner.kwargs["run_config"]
    assert run_config.verbose == tune_runner.TUNE_VERBOSITY == 0
    assert {CSVLoggerCallback, JsonLoggerCallback} <= {type(c) for c in run_config.callbacks}
    assert tuner.env["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"
    assert tuner.env["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] == "0"  # snapshot warnings
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ
