"""A float64 depthwise-conv oracle written without F.conv2d: zero-pad, then sum shifted slices."""

from __future__ import annotations

import torch

from tests.numerics import sum_error_bound


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


def dwconv2d_term_norms(conv, x, weight, bias, dy):  # noqa: ANN001, ANN201
    """Per output element of the forward, input-, weight- and bias-gradient: ``sqrt(sum of its terms squared)``.

    Each of the four is a sum of products (``x * w``, ``dy * w``, ``x * dy``, ``dy``); running the same linear
    conv ``conv`` (float64) on squared inputs sums the squared terms, which ``tests.numerics.sum_error_bound``
    measures accumulation error against.
    """
    x2 = x.detach().double().square().requires_grad_()
    w2 = weight.detach().double().square().requires_grad_()
    dy2 = dy.detach().double().square()
    out2 = conv(x2, w2)
    if bias is not None:
        out2 = out2 + bias.detach().double().square().view(1, -1, 1, 1)
    out2.backward(dy2)
    return {
        "fwd": out2.detach().sqrt(),
        "dgrad": x2.grad.sqrt(),
        "wgrad": w2.grad.sqrt(),
        "bias": dy2.sum(dim=(0, 2, 3)).sqrt(),
    }


def dwconv2d_errors(dtype, x_shape, w_shape, results, exact, term_norms):  # noqa: ANN001, ANN201
    """``name -> (relative error, relative bound)`` for each of ``fwd``/``dgrad``/``wgrad``/``bias`` in ``results``.

    The bound is ``tests.numerics.sum_error_bound`` for that result's sums (taps for the output and the input
    gradient, one more for a bias; N*H*W positions for the weight and bias gradients), divided like the
    error by the exact result's norm.
    """
    n, _, h, w = x_shape
    taps, positions = w_shape[-2] * w_shape[-1], n * h * w
    reductions = {"fwd": taps + ("bias" in results), "dgrad": taps, "wgrad": positions, "bias": positions}
    report = {}
    for name, actual in results.items():
        actual, ref = actual.detach().double(), exact[name].detach().double()
        assert torch.isfinite(actual).all(), f"{name} holds NaN/inf (an element was never written?)"
        norm = float(ref.norm()) or 1e-300
        bound = sum_error_bound(dtype, reductions[name], ref, term_norms[name])
        report[name] = (float((actual - ref).norm()) / norm, bound / norm)
    return report
