"""``SLaK``: the network, laid out like timm's ConvNeXt so timm's tooling (features_only, heads) works.

Module tree (names are a contract: the sparsity engine, checkpoints and the counting rely on them)::

    stem            Sequential: [0] Conv2d 4x4/4, [1] LayerNorm2d
    stages.{i}      SLaKStage: downsample (Identity for i=0, else [0] LayerNorm2d, [1] Conv2d 2x2/2),
                    blocks.{j} (SLaKBlock: large_kernel, norm, mlp.fc1, mlp.fc2, gamma, drop_path)
    norm            LayerNorm over the channels of the pooled vector (eps 1e-6)
    head            Linear (Identity when num_classes == 0)

``forward_features`` returns the last feature map (N, C, H, W) — the reference returns the pooled
vector, which breaks feature-map users such as the ERF analysis — and ``forward_head`` pools, norms and
classifies.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import LayerNorm2d, trunc_normal_
from timm.models._features import feature_take_indices  # not re-exported publicly in timm 1.0.31
from torch import nn

from .config import SLaKConfig
from .layers import DepthwiseConv, LargeKernelConv, SLaKBlock

__all__ = ["SLaK", "SLaKStage"]


def _linspace(end: float, count: int) -> list[float]:
    """``torch.linspace(0, end, count)`` as floats, computed without tensors (works under a meta device)."""
    if count == 1:
        return [float(end)]
    return [float(x) for x in torch.linspace(0, end, count, device="cpu").tolist()]


class SLaKStage(nn.Module):
    """One resolution stage: optional 2x downsample, then ``depth`` blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        kernel_size: int,
        short_edge: int,
        small_kernel: int | None,
        kernel_mode: str,
        use_bn: bool,
        drop_paths: list[float],
        layer_scale_init: float,
        downsample: bool,
    ) -> None:
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2)
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[
                SLaKBlock(
                    dim,
                    kernel_size,
                    short_edge,
                    small_kernel,
                    kernel_mode,
                    use_bn,
                    drop_paths[j],
                    layer_scale_init,
                )
                for j in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SLaK(nn.Module):
    """Sparse Large Kernel Network (and, through ``kernel_mode``, its naive / RepLKNet-style ablations).

    Args:
        cfg: The architecture; ``None`` means the :class:`SLaKConfig` defaults.
        **overrides: Field overrides applied on top of ``cfg`` (the ``kernel_size`` alias included), so
            ``timm.create_model("slak_tiny", width_factor=1.3)`` and Ray Tune points pass straight in.
    """

    def __init__(self, cfg: SLaKConfig | None = None, **overrides: Any) -> None:
        cfg = (cfg or SLaKConfig()).replace(**overrides) if overrides else (cfg or SLaKConfig())
        super().__init__()
        self.cfg = cfg
        widths = cfg.widths
        self.num_classes = cfg.num_classes
        self.num_features = self.head_hidden_size = widths[-1]
        self.drop_rate = 0.0
        self.grad_checkpointing = False
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, widths[0], 4, stride=4), LayerNorm2d(widths[0], eps=1e-6)
        )
        total = sum(cfg.depths)
        rates = _linspace(cfg.drop_path_rate, total)
        stages, start, reduction = [], 0, 4
        self.feature_info: list[dict[str, Any]] = []
        for i, depth in enumerate(cfg.depths):
            if i > 0:
                reduction *= 2
            stages.append(
                SLaKStage(
                    widths[i - 1] if i else widths[0],
                    widths[i],
                    depth,
                    cfg.stage_kernels[i],
                    cfg.short_edge,
                    cfg.stage_small_kernel(i),
                    cfg.kernel_mode,
                    cfg.use_bn,
                    rates[start : start + depth],
                    cfg.layer_scale_init,
                    downsample=i > 0,
                )
            )
            start += depth
            self.feature_info.append({"num_chs": widths[i], "reduction": reduction, "module": f"stages.{i}"})
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(widths[-1], eps=1e-6)
        self.head = nn.Linear(widths[-1], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear) and not self.head.weight.is_meta:
            self.head.weight.data.mul_(cfg.head_init_scale)
            self.head.bias.data.mul_(cfg.head_init_scale)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Reference init: conv/linear weights ~ trunc_normal(std 0.02), biases 0; norms keep defaults."""
        if isinstance(module, (nn.Conv2d, nn.Linear, DepthwiseConv)) and not module.weight.is_meta:
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # timm model protocol ------------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (timm protocol); ``global_pool`` other than average is not supported."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool={global_pool!r}: SLaK pools by spatial mean only; use 'avg'")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise LR decay (stem, then stage/block order)."""
        return {
            "stem": r"^stem",
            "blocks": r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        }

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs for dense-prediction backbones (timm protocol; ``features_only`` uses it).

        Args:
            x: Images (N, C, H, W).
            indices: Last n stages if an int, all if ``None``, else the listed stage indices.
            norm: Accepted for the timm protocol; SLaK has no per-stage norms, so maps are returned raw.
            stop_early: Skip the stages after the last requested one.
            output_fmt: Only ``"NCHW"``.
            intermediates_only: Return only the list of maps.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: SLaK feature maps are 'NCHW' only")
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head / final norm if asked)."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    # forward -----------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage's feature map, (N, C4, H/32, W/32)."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq

            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, LayerNorm, then the classifier (skipped when ``pre_logits``)."""
        x = self.norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # inference ---------------------------------------------------------------------------------------
    def merge_for_inference(self) -> SLaK:
        """Fold BNs and small kernels into the large kernels of every block (two convs per block).

        Only eval-mode outputs are preserved (BN statistics are frozen into the weights). Returns self.
        """
        for module in self.modules():
            if isinstance(module, LargeKernelConv):
                module.merge_for_inference()
        return self.eval()

    def large_kernel_modules(self) -> list[LargeKernelConv]:
        """Every ``LargeKernelConv`` in block order."""
        return [m for m in self.modules() if isinstance(m, LargeKernelConv)]
