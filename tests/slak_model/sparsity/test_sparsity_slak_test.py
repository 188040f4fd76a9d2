"""The engine on the real model family: eligible sets of SLaK-T, and slak_test training with sparsity on."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import slak_model
from slak_model.sparsity import DynamicSparsity, MaskedModelEma, SparsityConfig, select_targets


def test_slak_tiny_eligible_sets_match_the_reference() -> None:
    model = slak_model.create_model("slak_tiny", width_factor=1.3)
    every = select_targets(model, "all")
    assert (len(every), sum(p.numel() for p in every.values())) == (95, 50_576_524)
    lk = select_targets(model, "large_kernels")
    assert len(lk) == 36 and all(n.endswith((".tall.conv.weight", ".wide.conv.weight")) for n in lk)
    never = [n for n, p in model.named_parameters() if n not in every]
    assert never and all(p.dim() == 1 for n, p in model.named_parameters() if n in never)


@pytest.mark.parametrize("mode", ["naive", "replknet"])
def test_large_kernel_targets_need_decomposed_kernels(mode: str) -> None:
    model = slak_model.create_model("slak_test", kernel_mode=mode)
    with pytest.raises(ValueError, match="targets='large_kernels'.*decomposed"):
        DynamicSparsity(model, SparsityConfig(targets="large_kernels"), total_steps=10)


@pytest.mark.parametrize(
    "precision,init,growth,targets",
    [
        ("fp32", "snip", "random", "all"),
        ("bf16", "snip", "gradient", "all"),
        ("fp32", "erk", "momentum", "all"),
        ("bf16", "uniform", "random", "large_kernels"),
    ],
    ids=["fp32-snip-random", "bf16-snip-gradient", "fp32-erk-momentum", "bf16-uniform-onlyL"],
)
def test_slak_test_trains_with_every_invariant_after_every_step(precision: str, init: str, growth: str,
                                                                  targets: str) -> None:
    torch.manual_seed(0)
    model = slak_model.create_model("slak_test")
    model.train()
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)

    cfg = SparsityConfig(sparsity=0.4, init=init, growth=growth, targets=targets, update_frequency=2, prune_rate=0.5)
    engine = DynamicSparsity(model, cfg, total_steps=20)
    ema = MaskedModelEma(model, decay=0.9)
    engine.initialize(batch=batch(), loss_fn=nn.functional.cross_entropy)
    params = dict(model.named_parameters())
    density0 = engine.density()
    total = sum(p.numel() for p in model.parameters() if p.dim() in (2, 4))
    assert abs((1 - density0) - 0.4) <= 0.5 * len(engine.masks) / total  # half a weight per layer (whole counts)
    counts = {n: int(m.sum()) for n, m in engine.masks.items()}
    untouched = {n: p.detach().clone() for n, p in params.items() if n not in engine.masks and p.dim() in (2, 4)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    t0 = time.perf_counter()
    for step in range(6):
        x, y = batch()
        with autocast:
            loss = nn.functional.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        updated = engine.on_optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
        ema.update(model, engine.masks)
        assert updated == (step % 2 == 1)
        ema_params = dict(ema.module.named_parameters())
        for name, mask in engine.masks.items():
            w = params[name].detach()
            assert not torch.any(w[~mask] != 0), f"step {step}: {name} has live masked weights"
            assert int(mask.sum()) == counts[name], f"step {step}: {name} changed its active count"
            assert not torch.any(ema_params[name][~mask] != 0), f"step {step}: EMA of {name} not masked"
        assert engine.density() == density0
        stats = engine.stats()
        assert stats["sparsity/density"] == density0 and stats["sparsity/step"] == step + 1
    assert time.perf_counter() - t0 < 20
    assert engine.stats()["sparsity/updates"] == 3 and engine.stats()["sparsity/churn"] > 0
    if targets == "large_kernels":  # pointwise weights were never masked: they trained densely
        fc1 = "stages.0.blocks.0.mlp.fc1.weight"
        assert fc1 not in engine.masks and bool(torch.all(params[fc1] != 0))
        assert not torch.equal(params[fc1].detach(), untouched[fc1])
    assert {f"sparsity/density/stages.{i}" for i in range(4)} <= set(engine.stats())
