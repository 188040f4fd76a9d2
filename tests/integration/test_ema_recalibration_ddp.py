"""Two gloo ranks recalibrate the EMA's BatchNorm statistics on different shards: afterwards both hold the
statistics one process computes over both shards' batches (what rank 0 evaluates and checkpoints)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_ranks import exit_without_teardown, publish_and_wait
from servers import free_port

from tests.numerics import rel_error, rel_tol

WORLD = 2
BATCHES = 2  # per rank


def _cfg(batches: int):
    from orchestrator.config.loading import load_config

    return load_config(None, {"run.num_workers": WORLD, "train.global_batch_size": 16, "train.micro_batch_size": 8,
                              "train.epochs": 1, "train.bn_recalibration_batches": batches,
                              "sparse.enabled": False, "data.image_size": 32, "model.drop_path_rate": 0.0})


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)  # rank-specific data, as a DistributedSampler gives
    return [(torch.randn(8, 3, 32, 32, generator=gen) * (1 + rank), torch.zeros(8, dtype=torch.long))
            for _ in range(BATCHES)]


def _bn_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import orchestrator  # noqa: F401  (torchvision guard before timm)
    from orchestrator.loop import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        tr = Trainer(_cfg(BATCHES), steps_per_epoch=1, num_classes=4)
        publish_and_wait(out_dir, rank, WORLD, _bn_state(tr.recalibrated_ema(_batches(rank))))
    finally:
        dist.destroy_process_group()
    exit_without_teardown()


@pytest.mark.numeric
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ranks_share_the_recalibrated_statistics_of_all_shards(tmp_path: Path) -> None:
    from orchestrator.loop import Trainer

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    single = Trainer(_cfg(WORLD * BATCHES), steps_per_epoch=1, num_classes=4)
    want = _bn_state(single.recalibrated_ema(_batches(0) + _batches(1)))
    assert r0.keys() == want.keys() and len(want) > 0
    # The statistics are fp32 means over every pixel of the 4 batches, taken at the end of the network's stages;
    # the ranks sum their shards' moments where the single process sums all batches at once.
    tol = rel_tol(torch.float32, WORLD * BATCHES * 8 * 32 * 32, layers=10)
    for key, value in want.items():
        if value.is_floating_point():
            assert rel_error(r0[key], value) <= tol, f"{key}: {rel_error(r0[key], value):.3g} > {tol:.3g}"
        else:
            assert torch.equal(r0[key], value), key
        assert torch.equal(r0[key], r1[key]), key
    own = _bn_state(Trainer(_cfg(BATCHES), steps_per_epoch=1, num_classes=4).recalibrated_ema(_batches(0)))
    mean_key = next(k for k in want if k.endswith("running_mean"))
    assert not torch.allclose(own[mean_key], want[mean_key]), "shards must differ for this test to mean anything"
