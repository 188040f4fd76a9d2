"""The numba kernels under numba's CUDA simulator on CPU, through the public kernels.dwconv2d call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

pytestmark = pytest.mark.numeric


@pytest.fixture(scope="module")
def sim_results(numeric_seed: int) -> dict:
    env = {
        **os.environ,
        "NUMBA_ENABLE_CUDASIM": "1",
        "SLAK_KERNEL_BACKEND": "numba",
        "SLAK_TEST_SEED": str(numeric_seed),
    }
    script = Path(__file__).with_name("numba_sim_check.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_numba_backend_is_active_under_the_simulator(sim_results: dict) -> None:
    assert sim_results["backend"] == "numba"


def test_numba_kernels_match_the_float64_oracle(sim_results: dict) -> None:
    assert len(sim_results["results"]) == 5
    bad = [  # each error with its bound from tests.numerics.sum_error_bound, computed in the child process
        (r["case"], name, err, tol)
        for r in sim_results["results"]
        for name, (err, tol) in r["errors"].items()
        if not err <= tol
    ]
    assert not bad, f"numba (simulated) errors above tolerance: {bad}"
    assert all(r["out_dtype"] == r["dtype"] for r in sim_results["results"])
