"""Pure-PyTorch depthwise convolution: the CPU path and the oracle every other backend is tested against.

SLaK's kernels are rectangular (51x5, 5x51) and its reference CUDA op pads ``kh//2`` rows and ``kw//2``
columns implicitly. Passing one scalar padding to ``F.conv2d`` changes the output size, so the padding
is always given per dimension here.

On CPU, half-precision inputs (bf16/fp16) are convolved in float32 and rounded once to the input dtype.
PyTorch's CPU convolution picks its bf16 algorithm by the host's instruction set: without AVX512-BF16/AMX
(e.g. an AVX2-only EPYC, or ``ONEDNN_MAX_CPU_ISA=AVX2``) the input gradient accumulates in bf16 and its
error grows with the kernel's length (about 1e-2 relative for 51 taps, 6x the storage rounding), while
hosts with bf16 instructions accumulate in fp32. Computing in fp32 makes every host give the same,
storage-limited accuracy; CUDA keeps the native call (cuDNN accumulates half types in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dwconv2d_reference", "check_dwconv_args"]


def check_dwconv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ``ValueError`` naming the argument when the inputs are not a valid depthwise conv."""
    if x.dim() != 4:
        raise ValueError(f"dwconv2d: x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f"dwconv2d: weight must have shape (C, 1, kh, kw), got {tuple(weight.shape)}")
    if weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"dwconv2d: weight has {weight.shape[0]} channels but x has {x.shape[1]}; "
            "a depthwise conv needs one filter per input channel"
        )
    kh, kw = weight.shape[2], weight.shape[3]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"dwconv2d: kernel size must be odd in both dims for 'same' output, got {kh}x{kw}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"dwconv2d: weight is {weight.dtype} on {weight.device} but x is {x.dtype} on {x.device}; "
            "cast/move the weight to match (autocast does this for you)"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != x.shape[1]):
        raise ValueError(f"dwconv2d: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}")


_HALF_TYPES = (torch.bfloat16, torch.float16)


def dwconv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise conv, stride 1, zero padding (kh//2, kw//2): output has the input's H and W.

    Half-precision CPU inputs are computed in float32 (forward and, through autograd, both gradients) and
    rounded once, so the result does not depend on which CPU instructions the host has.
    """
    kh, kw = weight.shape[-2], weight.shape[-1]
    padding = (kh // 2, kw // 2)
    if x.device.type == "cpu" and x.dtype in _HALF_TYPES:
        with torch.autocast("cpu", enabled=False):  # autocast would cast the fp32 copies straight back
            wide_bias = None if bias is None else bias.float()
            out = F.conv2d(x.float(), weight.float(), wide_bias, stride=1, padding=padding, groups=x.shape[1])
        return out.to(x.dtype)
    return F.conv2d(x, weight, bias, stride=1, padding=padding, groups=x.shape[1])
