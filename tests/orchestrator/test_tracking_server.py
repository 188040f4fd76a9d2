"""An MLflow server that does not answer is named once, before Ray starts, in bounded time; the job then
runs on with the offline journal (the tracker's design), and the warning says where and how to sync."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from orchestrator import tracking
from orchestrator.config.loading import load_config
from tests.orchestrator import ports
from tests.orchestrator.ports import closed_port

SMOKE = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "smoke.yaml"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts connections, never answers."""
    with ports.silent_port() as port:
        yield port


def _cfg(tmp_path: Path, uri: str):
    return load_config(SMOKE, {"tracking.uri": uri, "tracking.offline_dir": str(tmp_path / "offline"),
                               "run.storage_path": str(tmp_path / "ray")})


def test_a_refused_server_is_named_once_with_the_offline_folder_and_the_fix(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    cfg = _cfg(tmp_path, uri)
    with caplog.at_level(logging.WARNING):
        assert tracking.check_server(cfg.tracking) is False
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    text = record.getMessage()
    assert uri in text and "connection refused" in text and "The job runs anyway" in text
    assert str(tmp_path / "offline") in text and "python -m orchestrator.tracking sync" in text
    assert "--tracking-uri" in text and "tracking.enabled=false" in text


def test_a_silent_server_is_given_up_on_in_bounded_time(silent_port: int) -> None:
    t0 = time.monotonic()
    assert "no answer within 1 s" in tracking.server_problem(f"http://127.0.0.1:{silent_port}", timeout_s=1)
    assert time.monotonic() - t0 < 5


def test_a_local_store_or_tracking_off_is_not_probed(tmp_path: Path) -> None:
    assert tracking.check_server(_cfg(tmp_path, f"sqlite:///{tmp_path / 'm.db'}").tracking)
    off = load_config(SMOKE, {"tracking.enabled": False, "tracking.uri": "http://127.0.0.1:9"})
    assert tracking.check_server(off.tracking)


@pytest.mark.parametrize("driver", ["train", "grid"])
def test_the_drivers_check_the_server_before_ray_starts(driver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("ray")
    from orchestrator import ray_cluster, ray_train, search_space, tune_runner

    class RayStarted(Exception):
        pass

    def start_ray(**kwargs: object) -> None:
        raise RayStarted

    monkeypatch.setattr(ray_cluster, "init_ray", start_ray)
    monkeypatch.setattr(ray_cluster, "check_local_machine", lambda *a, **k: None)
    cfg = _cfg(tmp_path, f"http://127.0.0.1:{closed_port()}")
    with caplog.at_level(logging.WARNING), pytest.raises(RayStarted):
        if driver == "train":
            ray_train.run_training(cfg)
        else:
            tune_runner.run_experiment(cfg, search_space.sparsity_width_grid(cfg)[:1], table="t")
    assert [r for r in caplog.records if "does not answer" in r.getMessage()], "no warning before Ray started"
