"""kernels.bench's shape list and markdown tables, on CPU (timing itself needs a GPU: tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from kernels import bench


def test_slak_tiny_shapes_are_the_54_convs_of_one_step() -> None:
    shapes = bench.slak_tiny_shapes(64)
    assert sum(s.count for s in shapes) == 54
    assert {(s.c, s.h) for s in shapes} == {(124, 56), (249, 28), (499, 14), (998, 7)}
    assert {(s.kh, s.kw) for s in shapes if s.stage == "s3"} == {(47, 5), (5, 47), (5, 5)}


def test_tables_weight_each_shape_by_its_count_and_compare_to_cudnn() -> None:
    ceil = {"bandwidth": 4e12, "ffma": 64e12}
    rows = []
    for shape in bench.slak_tiny_shapes(64) + bench.baseline_shapes(64):
        for impl, ms in (("torch_nchw", 1.0), ("cuda", 0.25)):
            rows.append({"shape": shape, "dtype": "bfloat16", "impl": impl, "fwd": ms, "dgrad": ms, "wgrad": 2 * ms,
                         "floor": 0.1})
    text = bench.format_tables(rows, ceil)
    # 54 convs x (0.25 + 0.25 + 0.5) ms; the dense baselines (count 0) stay out of the sum.
    assert "| 64 | bfloat16 | cuda | 13.50 | 54.00 |" in text
    assert "| 64 | bfloat16 | torch_nchw | 54.00 | 216.00 |" in text
    assert "| B64 s3 C499 14x14 k47x5 | bfloat16 | cuda | 0.25 | 0.25 | 0.5 | 1 | 0.1 | 10% | 4.0x |" in text


def test_floor_is_the_larger_of_bytes_and_flops() -> None:
    shape = bench.Shape("s1", 64, 124, 56, 56, 51, 5, 3)
    ceil = {"bandwidth": 4e12, "ffma": 64e12}
    plane = 64 * 124 * 56 * 56
    flops_ms = 2.0 * plane * 51 * 5 / 64e12 * 1e3
    assert bench._floor_ms(shape, "fwd", torch.float32, ceil) == pytest.approx(flops_ms)
    small = bench.Shape("s4", 64, 998, 7, 7, 5, 5, 3)
    bytes_ms = (2 * 64 * 998 * 49 + 998 * 25) * 2 / 4e12 * 1e3
    assert bench._floor_ms(small, "fwd", torch.bfloat16, ceil) == pytest.approx(bytes_ms)
