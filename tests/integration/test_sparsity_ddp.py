"""Two real processes (gloo, CPU) train a DDP model with the sparsity engine; ranks must agree bit-for-bit.

Each rank uses a different SNIP batch and different training data, so without the engine's
rank-0 decisions the per-rank densities, dense-layer sets and random regrowth would diverge.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_ranks import exit_without_teardown, publish_and_wait
from servers import free_port
from torch import nn

WORLD = 2
STEPS = 8


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.large_kernel = nn.Module()
        self.large_kernel.tall = nn.Module()
        self.large_kernel.tall.conv = nn.Conv2d(c, c, (7, 3), padding=(3, 1), groups=c, bias=False)
        self.large_kernel.wide = nn.Module()
        self.large_kernel.wide.conv = nn.Conv2d(c, c, (3, 7), padding=(1, 3), groups=c, bias=False)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(c, 4 * c)
        self.mlp.fc2 = nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.large_kernel.tall.conv(x) + self.large_kernel.wide.conv(x)
        y = self.mlp.fc2(torch.relu(self.mlp.fc1(y.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return x + y


class _Net(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 2, 2))
        self.stages = nn.ModuleList([nn.Module()])
        self.stages[0].blocks = nn.Sequential(_Block(c), _Block(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages[0].blocks(self.stem(x)).mean(dim=(2, 3)))


def _worker(rank: int, port: int, out_dir: str) -> None:
    import slak_model  # noqa: F401  (timm guard before the sparsity package imports timm)
    from slak_model.sparsity import DynamicSparsity, SparsityConfig, TorchDistributedCollective

    torch.set_num_threads(1)
    # a finite timeout turns any collective mismatch into an error instead of a hung CI job
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # identical initial weights on every rank
        model = nn.parallel.DistributedDataParallel(_Net())
        cfg = SparsityConfig(sparsity=0.5, init="snip", growth="random", update_frequency=2, prune_rate=0.5, seed=3)
        engine = DynamicSparsity(model, cfg, total_steps=20, collective=TorchDistributedCollective())
        data = torch.Generator().manual_seed(100 + rank)  # rank-specific data, as a DistributedSampler gives
        snip_batch = (torch.randn(4, 3, 16, 16, generator=data), torch.randint(0, 10, (4,), generator=data))
        engine.initialize(batch=snip_batch, loss_fn=nn.functional.cross_entropy)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        updates = 0
        for _ in range(STEPS):
            x, y = torch.randn(4, 3, 16, 16, generator=data), torch.randint(0, 10, (4,), generator=data)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            updates += engine.on_optimizer_step(opt)  # verifies the per-layer hashes after each update
            opt.zero_grad()
        result = {
            "masks": {n: m.clone() for n, m in engine.masks.items()},
            "dense": engine.dense_layers,
            "weights": {n: p.detach().clone() for n, p in model.module.named_parameters()},
            "updates": updates,
            "stats": engine.stats(),
        }
        # now desynchronise one layer on rank 1 and check that verification catches it on both ranks
        name = list(engine.masks)[1]
        if rank == 1:
            flat = engine.masks[name].view(-1)
            on, off = torch.nonzero(flat)[0], torch.nonzero(~flat)[0]
            flat[on], flat[off] = False, True
        try:
            engine.verify_consistency("tampering")
            result["error"] = None
        except RuntimeError as err:
            result["error"] = str(err)
        result["tampered"] = name
        publish_and_wait(out_dir, rank, WORLD, result)
    finally:
        dist.destroy_process_group()
    exit_without_teardown()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_gloo_ranks_hold_identical_masks(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["updates"] == r1["updates"] == STEPS // 2
    assert r0["dense"] == r1["dense"]
    assert list(r0["masks"]) == list(r1["masks"]) and len(r0["masks"]) > 0
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n], r1["masks"][n]), n
    for n in r0["weights"]:
        assert torch.equal(r0["weights"][n], r1["weights"][n]), n
    assert r0["stats"] == r1["stats"]
    # a sanity bound (the model has 1872 weights in 10 target layers); exact counts are test_sparsity_engine's job
    assert abs(r0["stats"]["sparsity/density"] - 0.5) < 1e-3
    for r in (r0, r1):
        assert r["error"] is not None and f"first differing layer {r['tampered']!r}" in r["error"]
