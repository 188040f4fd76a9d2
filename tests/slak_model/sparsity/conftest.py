"""Small models whose parameter names follow the SLaK layout, for fast CPU tests of the engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class ConvBN(nn.Module):
    """Depthwise conv + BN, named like the model's branches (``.conv.weight``)."""

    def __init__(self, channels: int, kh: int, kw: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, (kh, kw), padding=(kh // 2, kw // 2), groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ToyLargeKernel(nn.Module):
    """Tall + wide + small branches, summed."""

    def __init__(self, channels: int, k: int, n: int) -> None:
        super().__init__()
        self.tall = ConvBN(channels, k, n)
        self.wide = ConvBN(channels, n, k)
        self.small = ConvBN(channels, n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tall(x) + self.wide(x) + self.small(x)


class ToyMlp(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.fc2 = nn.Linear(4 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class ToyBlock(nn.Module):
    def __init__(self, channels: int, k: int) -> None:
        super().__init__()
        self.large_kernel = ToyLargeKernel(channels, k, 3)
        self.norm = nn.LayerNorm(channels)
        self.mlp = ToyMlp(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.large_kernel(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + y


class ToyStage(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, depth: int, first: bool) -> None:
        super().__init__()
        self.downsample = nn.Identity() if first else nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 2, 2))
        self.blocks = nn.Sequential(*[ToyBlock(cout, k) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ToySLaK(nn.Module):
    """Two stages, SLaK-style names: stem.0, stages.i.downsample.1, ...large_kernel.tall.conv, mlp.fc1, head."""

    def __init__(self, dims: tuple[int, ...] = (8, 16), kernels: tuple[int, ...] = (7, 5), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 2, 2), nn.BatchNorm2d(dims[0]))
        stages = []
        for i, (d, k) in enumerate(zip(dims, kernels)):
            stages.append(ToyStage(dims[i - 1] if i else d, d, k, depth=2 if i == 0 else 1, first=i == 0))
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean(dim=(2, 3)))


@pytest.fixture
def toy_model() -> ToySLaK:
    torch.manual_seed(0)
    return ToySLaK()


@pytest.fixture
def toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


@pytest.fixture
def make_toy():
    """Factory: ``make_toy(seed=0, **kwargs)`` builds a fresh ToySLaK with a fixed seed."""

    def build(seed: int = 0, **kwargs) -> ToySLaK:
        torch.manual_seed(seed)
        return ToySLaK(**kwargs)

    return build
