"""The large-kernel building blocks: ``DepthwiseConv``, ``ConvBN``, ``LargeKernelConv`` and ``SLaKBlock``.

Branch names say what each kernel is, not what the reference called it:

========  ==============  ===================  ============================================
ours      shape (C,1,.,.)  reference name       used in kernel mode
========  ==============  ===================  ============================================
tall      M x N            ``LoRA1``            decomposed
wide      N x M            ``LoRA2``            decomposed
small     s x s            ``small_conv``       replknet, decomposed (only when s < M)
square    M x M            ``lkb_origin``       naive, replknet
========  ==============  ===================  ============================================

``tall`` runs its M taps along the height axis (weight dim 2 is height), exactly as the reference
``LoRA1`` with weight (C, 1, M, N). Every depthwise conv goes through :func:`kernels.dwconv2d`
(stride 1, zero padding ``kh//2`` x ``kw//2``), so the branch outputs keep the input's H x W.

After :meth:`LargeKernelConv.merge_for_inference` the training branches are gone and the module holds
deploy convs with bias: ``deploy_tall`` (M x N: tall + small, every folded BN shift summed into its
bias) and ``deploy_wide`` (N x M, no bias) in decomposed mode, or ``deploy_square`` (M x M with bias)
otherwise. A small kernel wider than N cannot sit inside the M x N strip; it then stays as
``deploy_small``. The reference cannot merge decomposed kernels at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

import kernels

__all__ = ["ConvBN", "DepthwiseConv", "LargeKernelConv", "SLaKBlock", "fold_batchnorm"]

_BRANCHES = ("tall", "wide", "small", "square")
_DEPLOY = ("deploy_tall", "deploy_wide", "deploy_small", "deploy_square")


class DepthwiseConv(nn.Module):
    """Depthwise ``kh x kw`` conv through :func:`kernels.dwconv2d` (the backend chooses CUDA/numba/torch).

    Args:
        channels: Input = output channels (one filter per channel).
        kernel_size: ``(kh, kw)``; both odd.
        bias: Whether to hold a per-channel bias (only deploy convs do).
    """

    def __init__(self, channels: int, kernel_size: tuple[int, int], bias: bool = False) -> None:
        super().__init__()
        kh, kw = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kh, kw))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        if not self.weight.is_meta:  # meta tensors hold no values; skipping keeps counting builds fast
            trunc_normal_(self.weight, std=0.02)

    @property
    def kernel_size(self) -> tuple[int, int]:
        """``(kh, kw)`` of the weight."""
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.dwconv2d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return f"{self.weight.shape[0]}, kernel_size=({kh}, {kw}), bias={self.bias is not None}"


def fold_batchnorm(weight: torch.Tensor, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of ``bn(conv(x))`` as one conv (eval-mode BN: running statistics).

    Returns:
        ``(weight', bias')`` with ``weight' = weight * g / sqrt(var + eps)`` and
        ``bias' = beta - mean * g / sqrt(var + eps)``; without BN the bias is zero.
    """
    if bn is None:
        return weight, torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    return weight * scale.reshape(-1, 1, 1, 1), beta - bn.running_mean * scale


class ConvBN(nn.Module):
    """One depthwise branch: ``conv`` (bias-free) followed by ``bn`` (``None`` when ``use_bn`` is off)."""

    def __init__(self, channels: int, kernel_size: tuple[int, int], use_bn: bool = True) -> None:
        super().__init__()
        self.conv = DepthwiseConv(channels, kernel_size, bias=False)
        self.bn = nn.BatchNorm2d(channels) if use_bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kernel, bias)`` of this branch with its BN folded in (eval-mode equivalent)."""
        return fold_batchnorm(self.conv.weight, self.bn)


def _pad_to(kernel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad a centred ``(C, 1, kh, kw)`` kernel to ``height x width`` (both differences even)."""
    dh, dw = height - kernel.shape[2], width - kernel.shape[3]
    assert dh >= 0 and dw >= 0 and dh % 2 == 0 and dw % 2 == 0, (kernel.shape, height, width)
    return F.pad(kernel, (dw // 2, dw // 2, dh // 2, dh // 2))


def _deploy_conv(kernel: torch.Tensor, bias: torch.Tensor | None) -> DepthwiseConv:
    conv = DepthwiseConv(kernel.shape[0], (kernel.shape[2], kernel.shape[3]), bias=bias is not None)
    conv.to(device=kernel.device, dtype=kernel.dtype)
    conv.weight.data.copy_(kernel)
    if bias is not None:
        conv.bias.data.copy_(bias)
    return conv


class LargeKernelConv(nn.Module):
    """SLaK's large-kernel token mixer: the sum of parallel depthwise branches (see module docstring).

    Args:
        channels: Width of the stage.
        kernel_size: Long edge M (odd).
        short_edge: N, short edge of the strips (decomposed mode only).
        small_kernel: Side of the small square branch, or ``None``; built only when smaller than M.
        kernel_mode: ``naive``, ``replknet`` or ``decomposed``.
        use_bn: BatchNorm after each branch.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        short_edge: int,
        small_kernel: int | None,
        kernel_mode: str = "decomposed",
        use_bn: bool = True,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.short_edge = short_edge
        self.kernel_mode = kernel_mode
        self.merged = False
        m, n = kernel_size, short_edge
        decomposed = kernel_mode == "decomposed"
        self.tall = ConvBN(channels, (m, n), use_bn) if decomposed else None
        self.wide = ConvBN(channels, (n, m), use_bn) if decomposed else None
        self.square = None if decomposed else ConvBN(channels, (m, m), use_bn)
        has_small = kernel_mode != "naive" and small_kernel is not None and small_kernel < m
        self.small = ConvBN(channels, (small_kernel, small_kernel), use_bn) if has_small else None
        for name in _DEPLOY:
            setattr(self, name, None)

    def _active(self) -> list[nn.Module]:
        names = _DEPLOY if self.merged else _BRANCHES
        return [m for m in (getattr(self, n) for n in names) if m is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = self._active()
        if len(branches) > 1:
            x = kernels.shared_input(x)  # cast and lay out once for all branches, not once per branch
        out = branches[0](x)
        for branch in branches[1:]:
            out = out + branch(x)
        return out

    def rectangular_parameters(self) -> list[nn.Parameter]:
        """Weights of the M x N and N x M strips (``tall``, ``wide``); empty unless decomposed.

        The sparsity engine's ``targets='large_kernels'`` (the reference's ``--only-L``) masks these.
        After merging, the deploy strips are returned instead.
        """
        pair = ("deploy_tall", "deploy_wide") if self.merged else ("tall", "wide")
        out = []
        for name in pair:
            module = getattr(self, name)
            if module is not None:
                out.append(module.weight if self.merged else module.conv.weight)
        return out

    @torch.no_grad()
    def merge_for_inference(self) -> None:
        """Fold every BN into its conv and the small kernel into a larger one (idempotent).

        Equivalent to the unmerged module in eval mode (BN uses running statistics); do not train a
        merged module. Decomposed: ``deploy_tall`` = tall + small (when small fits in M x N) carrying
        the summed bias, ``deploy_wide`` = wide. Otherwise ``deploy_square`` = square + small.
        """
        if self.merged:
            return
        small = self.small.folded() if self.small is not None else None
        if self.kernel_mode == "decomposed":
            k_tall, b_tall = self.tall.folded()
            k_wide, b_wide = self.wide.folded()
            bias = b_tall + b_wide
            m, n = k_tall.shape[2], k_tall.shape[3]
            if small is not None and small[0].shape[3] <= n:
                k_tall = k_tall + _pad_to(small[0], m, n)
                bias = bias + small[1]
            elif small is not None:
                self.deploy_small = _deploy_conv(small[0], None)
                bias = bias + small[1]
            self.deploy_tall = _deploy_conv(k_tall, bias)
            self.deploy_wide = _deploy_conv(k_wide, None)
        else:
            k_sq, bias = self.square.folded()
            if small is not None:
                m = k_sq.shape[2]
                k_sq = k_sq + _pad_to(small[0], m, m)
                bias = bias + small[1]
            self.deploy_square = _deploy_conv(k_sq, bias)
        for name in _BRANCHES:
            setattr(self, name, None)
        self.merged = True

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, short_edge={self.short_edge}, "
            f"kernel_mode={self.kernel_mode!r}, merged={self.merged}"
        )


class SLaKBlock(nn.Module):
    """ConvNeXt block with the large-kernel mixer: ``x + drop_path(gamma * mlp(norm(large_kernel(x))))``.

    The norm and the MLP run channels-last (``nn.LayerNorm`` eps 1e-6, ``Linear`` 4x expansion, exact
    GELU), as the reference. ``gamma`` is absent (no state-dict entry) when ``layer_scale_init <= 0``.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        short_edge: int,
        small_kernel: int | None,
        kernel_mode: str = "decomposed",
        use_bn: bool = True,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        self.large_kernel = LargeKernelConv(dim, kernel_size, short_edge, small_kernel, kernel_mode, use_bn)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, act_layer=nn.GELU)
        if layer_scale_init > 0:
            self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        else:
            self.register_parameter("gamma", None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.large_kernel(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = x * self.gamma
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))
