"""Compile-only check of the CUDA kernels with the machine's nvcc (sm_90), so a syntax error cannot land unseen."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kernels import _build

NVCC = shutil.which("nvcc") or next(
    (str(p) for p in (Path("/usr/local/cuda/bin/nvcc"),) if p.is_file()), None
)


@pytest.mark.slow  # ~65 s of CPU on a 2-core box, 3/4 of it in cicc: every template instance is compiled
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", [p for p in _build.sources() if p.suffix == ".cu"], ids=lambda p: p.name)
def test_cuda_sources_compile_for_sm90(source: Path, tmp_path: Path) -> None:
    cmd = [NVCC, "-arch=sm_90", "-O1", "-std=c++17", "-c", str(source), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]
