"""The benchmark scripts check every argument before building or timing anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_reports_every_bad_argument_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    rc = _script("throughput").main(["--variant", "slak_tny", "--modes", "train,foo", "--batch", "0",
                                     "--precisions", "fp33"])
    err = capsys.readouterr().err
    assert rc == 2
    for fragment in ("--variant='slak_tny': not a timm model (similar: ", "slak_tiny", "--precisions: fp33",
                     "--modes: foo", "--batch=0"):
        assert fragment in err, err


def test_loop_overhead_smoke_prints_its_attribution_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc = _script("loop_overhead").main(["data.source=synthetic", "data.train_size=64", "train.global_batch_size=16",
                                        "--steps", "2", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| bare step (batch on the device, fwd + bwd + AdamW) |" in out
    assert out.count("%") >= 7  # every row with its share of the bare step
