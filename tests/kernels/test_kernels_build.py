"""The JIT loader: a failed build is remembered and reported once, with the compiler's message, never raised."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kernels import _build


@pytest.fixture(autouse=True)
def _reset():
    _build._reset_for_tests()
    yield
    _build._reset_for_tests()


def test_cache_dir_honours_env_and_is_keyed_on_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path))
    first = _build.cache_dir()
    assert first.parent == tmp_path and first.name.startswith("dwconv-")
    monkeypatch.setenv(_build.ARCH_ENV, "9.0")
    assert _build.cache_dir() != first  # another arch list never reuses a binary


def test_default_arch_is_sm80_and_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_build.ARCH_ENV, raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert _build.arch_list() == "8.0;9.0"


def test_sources_exist() -> None:
    assert all(p.is_file() for p in _build.sources())


def test_failed_build_is_remembered_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from torch.utils import cpp_extension

    calls = []

    def failing_load(**kwargs):  # noqa: ANN003, ANN202
        calls.append(kwargs)
        raise RuntimeError("Error building extension 'slak_dwconv': nvcc fatal : Unsupported gpu architecture")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="kernels._build"):
        assert _build.load() is None
        assert _build.load() is None
    assert len(calls) == 1
    assert len([r for r in caplog.records if "build failed" in r.getMessage()]) == 1
    ok, reason = _build.status()
    assert ok is False and "Unsupported gpu architecture" in reason
    assert calls[0]["build_directory"].startswith(str(tmp_path))


def test_status_before_any_build_says_when_it_builds() -> None:
    ok, reason = _build.status()
    assert ok is None and "first CUDA call" in reason
