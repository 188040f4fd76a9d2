"""The benchmark's SLaK-T tensor set and its functions on a small model (the full run is for a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from slak_model.sparsity import bench


def test_the_benchmarked_slak_t_has_the_reference_eligible_set() -> None:
    model = bench.slak_t("meta")
    eligible = {n: p.shape for n, p in model.named_parameters() if p.dim() in (2, 4)}
    assert (len(eligible), sum(math.prod(s) for s in eligible.values())) == bench.SLAK_T_ELIGIBLE
    assert tuple(eligible["stages.2.blocks.8.large_kernel.tall.conv.weight"]) == (499, 1, 47, 5)


def test_update_and_apply_benchmarks_run(make_toy) -> None:
    model = make_toy(0)
    r = bench.bench_update(model, torch.device("cpu"), "momentum", repeats=2)
    assert r["masked_tensors"] == 18 and r["moved_per_update"] > 0 and r["median_ms"] > 0
    assert all(p.grad is None for p in model.parameters())
    assert bench.bench_apply(model, torch.device("cpu"), repeats=2)["median_ms"] > 0


def test_step_benchmark_runs(make_toy) -> None:
    s = bench.bench_step(make_toy(0), torch.device("cpu"), batch=2, image=16, repeats=3, classes=10)
    assert s["unmasked_ms"] > 0 and s["masked_ms"] > 0


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="key=value"):
        bench.main(["devices=cpu"])


def test_profile_table_names_the_selection_ops(make_toy) -> None:
    table = bench.profile_update(make_toy(0), torch.device("cpu"), "random")
    assert "topk" in table
