"""One environment description for every benchmark and MLflow run."""

from __future__ import annotations

import torch

from kernels import environment


def test_describe_names_the_machine_and_the_versions_that_change_numbers() -> None:
    info = environment.describe("cpu")
    assert {"date_utc", "hostname", "device", "git_commit", "python", "torch", "cuda", "cudnn", "cudnn_tf32",
            "matmul_tf32"} <= set(info)
    assert info["torch"] == torch.__version__ and "cores" in info["device"]
    line = environment.summary_line(info)
    assert info["device"] in line and torch.__version__ in line


def test_a_checkout_reports_its_commit() -> None:
    commit, dirty = environment.git_commit()
    assert len(commit) == 40 and dirty in (True, False)
