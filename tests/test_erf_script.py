"""experiments/erf.py end to end on tiny models and a folder of a few PNGs, and its one-line errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("erf_script", REPO_ROOT / "experiments" / "erf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def pngs(tmp_path: Path) -> Path:
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_measures_a_slak_variant_and_a_timm_model_into_one_table(pngs: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    common = ["--data", str(pngs), "--images", "3", "--size", "64", "--batch", "2", "--device", "cpu",
              "--workers", "0", "--out", str(out)]
    assert _script().main(["--model", "slak_test", "--random-init", *common]) == 0
    assert _script().main(["--model", "resnet10t", "--random-init", *common]) == 0
    printed = capsys.readouterr().out
    assert "| slak_test | - | 13-11-9-7 | random initialisation (seed 0) | 3 | 64 |" in printed
    assert "| resnet10t | - | - |" in printed and "| - | SLaK-T | 51-49-47-13 |" in printed
    for name in ("slak_test.png", "resnet10t.png", "slak_test.npy", "erf_table.md", "erf_table.csv"):
        assert (out / name).is_file(), name
    assert (out / "erf_table.md").read_text().count("random initialisation") == 2


def test_a_bad_input_is_one_error_line(pngs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _script().main(["--model", "slak_test", "--random-init", "--data", str(pngs / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid ERF settings (1 problem):") and "no such folder" in err
    assert "Traceback" not in err


def test_a_checkpoint_of_another_variant_is_refused_with_the_loaders_message(
        pngs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from slak_model import create_model

    torch.save({"model": create_model("slak_test", width_factor=2.0).state_dict()}, tmp_path / "wide.pth")
    rc = _script().main(["--model", "slak_test", "--checkpoint", str(tmp_path / "wide.pth"), "--data", str(pngs),
                         "--images", "2", "--size", "64", "--device", "cpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: checkpoint does not match the model") and "width_factor=2" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip message is for machines without CUDA")
def test_benchmark_skips_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script().main(["--benchmark", "--model", "slak_tiny"]) == 0
    assert capsys.readouterr().out.startswith("skipped: no CUDA device")


def test_benchmark_on_the_cpu_prints_both_precisions(capsys: pytest.CaptureFixture[str]) -> None:
    assert _script().main(["--benchmark", "--model", "slak_test", "--device", "cpu", "--size", "64", "--images",
                           "2", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "weights are RANDOM" in out and "| fp32 |" in out and "| bf16 |" in out and "fp32 vs bf16" in out
