"""A float64 depthwise-conv oracle written without F.conv2d: zero-pad, then sum shifted slices."""

from __future__ import annotations

import torch


def dwconv2d_oracle(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out[n,c,y,x] = sum_ij w[c,i,j] * xpad[n,c,y+i,x+j] (+ bias), computed in float64."""
    x64, w64 = x.double(), weight.double()
    _, _, h, w = x64.shape
    kh, kw = w64.shape[-2:]
    xp = torch.nn.functional.pad(x64, (kw // 2, kw // 2, kh // 2, kh // 2))
    out = torch.zeros_like(x64)
    for i in range(kh):
        for j in range(kw):
            out += w64[:, 0, i, j].view(1, -1, 1, 1) * xp[:, :, i : i + h, j : j + w]
    if bias is not None:
        out += bias.double().view(1, -1, 1, 1)
    return out
