"""The sparsity engine on CUDA: masks on the device, fp16 + GradScaler and bf16 keep masked weights at 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


class _Net(nn.Module):
    """A few SLaK-named weights: stem conv, depthwise tall/wide kernels, MLP, head."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 4, 4))
        self.tall = nn.Conv2d(c, c, (13, 3), padding=(6, 1), groups=c, bias=False)
        self.wide = nn.Conv2d(c, c, (3, 13), padding=(1, 6), groups=c, bias=False)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.tall(x) + self.wide(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(dim=(1, 2)))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16-scaler"])
@pytest.mark.parametrize("growth", ["random", "gradient", "momentum"])
def test_invariants_on_cuda(precision: str, growth: str) -> None:
    from slak_model.sparsity import DynamicSparsity, SparsityConfig

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = _Net().to(dev)
    engine = DynamicSparsity(model, SparsityConfig(sparsity=0.5, init="snip", growth=growth, update_frequency=2,
                                                   prune_rate=0.5), total_steps=40)
    x0, y0 = torch.randn(8, 3, 32, 32, device=dev), torch.randint(0, 10, (8,), device=dev)
    engine.initialize(batch=(x0, y0), loss_fn=nn.functional.cross_entropy)
    assert all(m.device.type == "cuda" for m in engine.masks.values())
    assert abs(engine.density() - 0.5) < 1e-3  # a sanity bound; exact counts are checked on CPU
    counts = {n: int(m.sum()) for n, m in engine.masks.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16-scaler" else None
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16-scaler": torch.float16}[precision]
    params = dict(model.named_parameters())
    for step in range(8):
        x, y = torch.randn(8, 3, 32, 32, device=dev), torch.randint(0, 10, (8,), device=dev)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            if step == 3:
                params["fc1.weight"].grad.view(-1)[0] = float("inf")  # this step is skipped
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        engine.on_optimizer_step(opt)
        opt.zero_grad(set_to_none=True)
        for name, mask in engine.masks.items():
            assert not torch.any(params[name].detach()[~mask] != 0), (step, name)
            assert int(mask.sum()) == counts[name], (step, name)
    assert engine.stats()["sparsity/updates"] == 4


def test_same_seed_same_masks_on_cuda() -> None:
    from slak_model.sparsity import DynamicSparsity, SparsityConfig

    masks = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _Net().cuda()
        engine = DynamicSparsity(model, SparsityConfig(init="erk", growth="random", update_frequency=1), total_steps=9)
        engine.initialize()
        for _ in range(3):
            engine.on_optimizer_step()
        masks.append({n: m.clone() for n, m in engine.masks.items()})
    for n in masks[0]:
        assert torch.equal(masks[0][n], masks[1][n]), n
