"""The ERF measurement on CUDA: the same maps as on the CPU at a small size, and the time per image of SLaK-T at
1024 x 1024 in fp32 and bf16 (random weights, random images), printed for the notes (run with ``-s``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_gives_the_cpus_ratios() -> None:
    from slak_model import create_model, erf

    torch.manual_seed(0)
    model = create_model("slak_test", layer_scale_init=1.0)  # every block contributes
    x = torch.randn(4, 3, 128, 128)
    cpu = erf.measure_erf(model, [x], images=4, device="cpu").mean_map
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        cuda = erf.measure_erf(model.cuda(), [x], images=4, device="cuda").mean_map
    finally:
        torch.backends.cudnn.allow_tf32 = before
    np.testing.assert_allclose(erf.log_scaled(cuda), erf.log_scaled(cpu), atol=1e-4)
    assert [r.side for r in erf.area_ratios(cuda)] == [r.side for r in erf.area_ratios(cpu)]


def test_slak_tiny_at_1024_time_per_image() -> None:
    from orchestrator import erf

    settings = erf.make_settings("slak_tiny", benchmark=True, images=16, batch_size=8, size=1024)
    rows, extra = erf.run_benchmark(settings)
    print("\n" + erf.benchmark_text(settings, rows, extra))
    assert [r.precision for r in rows] == ["fp32", "bf16"]
    assert all(r.seconds_per_image > 0 and r.images == 16 and r.peak_memory_gib > 0 for r in rows)
    assert extra["max_share_diff"] < 1e-2
