"""Shared test setup: the torchvision guard must run before anything imports timm or torchvision."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s by default, so each test job waits up to 2 s to see its
# workers finish or fail. Polling every 0.5 s takes about a fifth off the Ray Train tests (measured: the three
# job tests of test_train_job.py 132 s -> 105 s on 2 cores) and changes nothing they check. The Ray processes
# tests start inherit it (the local Ray's raylet is started from this process).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

from slak_model import _compat  # noqa: E402

_compat.install()

import random

import pytest
import torch

# Numeric tests draw fresh random inputs each session from this seed; the header prints it so that a
# failure can be replayed with SLAK_TEST_SEED=<seed>.
NUMERIC_SEED = int(os.environ.get("SLAK_TEST_SEED") or random.SystemRandom().randrange(2**31))

# SLAK_TEST_MKLDNN=0 turns PyTorch's oneDNN CPU kernels off, one of the CPU variants CI runs the numeric tests
# under (with ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA, which torch reads itself).
if os.environ.get("SLAK_TEST_MKLDNN", "1") == "0":
    torch.backends.mkldnn.enabled = False


def pytest_report_header(config: pytest.Config) -> list[str]:
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    mkldnn = "on" if torch.backends.mkldnn.enabled else "off"
    variant = f"ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN max ISA {isa}, mkldnn {mkldnn}"
    return [f"numeric seed: {NUMERIC_SEED} (replay with SLAK_TEST_SEED={NUMERIC_SEED})", f"CPU variant: {variant}"]


@pytest.fixture(scope="session")
def numeric_seed() -> int:
    """This session's seed for the fresh random inputs of numeric tests (see the report header)."""
    return NUMERIC_SEED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Print the seed at the end too: the header is hidden under ``-q``, and a failure must be replayable."""
    terminalreporter.write_line(f"numeric seed: {NUMERIC_SEED} (replay with SLAK_TEST_SEED={NUMERIC_SEED})")
