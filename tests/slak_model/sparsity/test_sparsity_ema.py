"""Mask-aware EMA: zeros at inactive positions, newborn positions copy the live weight, the rest is timm's EMA."""

from __future__ import annotations

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from slak_model.sparsity import DynamicSparsity, MaskedModelEma, SparsityConfig


def test_ema_follows_masks_through_an_update(make_toy) -> None:
    model = make_toy(0)
    engine = DynamicSparsity(model, SparsityConfig(init="erk", update_frequency=3, prune_rate=0.5, growth="gradient"),
                             total_steps=50)
    ema = MaskedModelEma(model, decay=0.9)  # dense copy made before masks exist, as in the reference
    plain = ModelEmaV3(model, decay=0.9)
    engine.initialize()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    born: dict[str, torch.Tensor] = {}
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16, generator=g)), torch.tensor([1, 2, 3, 4])).backward()
        opt.step()
        before = {n: m.clone() for n, m in engine.masks.items()}
        updated = engine.on_optimizer_step(opt)
        opt.zero_grad()
        ema.update(model, engine.masks)
        plain.update(model)
        live = dict(model.named_parameters())
        ema_p = dict(ema.module.named_parameters())
        for name, mask in engine.masks.items():
            assert torch.all(ema_p[name][~mask] == 0), name
        if updated:
            born = {n: m & ~before[n] for n, m in engine.masks.items()}
        if step == 3:  # one step after the update: grown weights moved, EMA copied them exactly
            for name, b in born.items():
                assert torch.equal(ema_p[name][b], live[name].detach()[b]), name
            assert any(bool(torch.any(live[n].detach()[b] != 0)) for n, b in born.items())
    # parameters that are never masked follow timm's plain EMA exactly
    plain_p = dict(plain.module.named_parameters())
    for name, p in ema.module.named_parameters():
        if name not in engine.masks:
            assert torch.equal(p, plain_p[name]), name
