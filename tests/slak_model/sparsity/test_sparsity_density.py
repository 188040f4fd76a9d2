"""Init densities: ERK closed form, uniform, and SNIP equal to the reference function bit-for-bit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from slak_model.sparsity import erk_densities, select_targets, snip_densities, uniform_densities
from tests.numerics import rel_tol

SHAPES = {
    "stem.0.weight": (8, 3, 2, 2),
    "stages.0.blocks.0.large_kernel.tall.conv.weight": (8, 1, 31, 5),
    "stages.0.blocks.0.mlp.fc1.weight": (32, 8),
    "stages.0.blocks.0.mlp.fc2.weight": (8, 32),
    "head.weight": (10, 8),
}


@pytest.mark.parametrize("density", [0.6, 0.3, 0.05], ids=lambda d: f"d{d}")
def test_erk_closed_form(density: float) -> None:
    out = erk_densities(SHAPES, density)
    numel = {n: math.prod(s) for n, s in SHAPES.items()}
    # the overall budget is met exactly by the continuous densities
    # float64 throughout: a sum over the layers after a chain of about 3 products and quotients per density
    tol = rel_tol(torch.float64, len(SHAPES), layers=3)
    assert sum(out[n] * numel[n] for n in SHAPES) == pytest.approx(density * sum(numel.values()), rel=tol)
    non_dense = [n for n in SHAPES if out[n] < 1.0]
    # every non-dense layer has density proportional to sum(shape)/prod(shape) with one eps
    eps = {n: out[n] / (sum(SHAPES[n]) / numel[n]) for n in non_dense}
    assert max(eps.values()) == pytest.approx(min(eps.values()), rel=tol)
    assert all(0.0 < d <= 1.0 for d in out.values())


def test_erk_makes_small_layers_dense() -> None:
    out = erk_densities(SHAPES, 0.6)
    assert out["stem.0.weight"] == 1.0  # 96 weights, large raw score
    assert out["stages.0.blocks.0.large_kernel.tall.conv.weight"] < 0.6


def test_uniform() -> None:
    assert set(uniform_densities(SHAPES, 0.4).values()) == {0.4}


def _reference_snip_sparsities(model: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor,
                               density: float) -> dict[str, float]:
    """The reference's computation (spec 3.3): sorted global top-k, threshold, sparsity = 1 - mean(score > tau)."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    grads_abs = [torch.abs(params[n] * params[n].grad) for n in names]
    all_scores = torch.cat([g.flatten() for g in grads_abs])
    k = int(len(all_scores) * density)
    threshold, _ = torch.topk(all_scores, k, sorted=True)
    tau = threshold[-1]
    return {n: 1 - ((g > tau).float().mean().item()) for n, g in zip(names, grads_abs)}


def test_snip_matches_reference_function(make_toy, toy_batch) -> None:
    model = make_toy(3)
    model.eval()  # deterministic forward for both computations
    names = list(select_targets(model, "all"))
    ours = snip_densities(model, names, toy_batch, nn.functional.cross_entropy, 0.6)
    ref = _reference_snip_sparsities(make_toy(3).eval(), names, *toy_batch, 0.6)
    for n in names:
        # the reference's sparsities are fp32 means of 0/1 masks (exact sums, one rounding of a value <= 1)
        assert 1.0 - ours[n] == pytest.approx(ref[n], abs=rel_tol(torch.float32)), n
    # the real model was left untouched: no gradients
    assert all(p.grad is None for p in model.parameters())


def test_snip_leaves_bn_statistics_alone(make_toy, toy_batch) -> None:
    model = make_toy(0)
    before = model.stem[1].running_mean.clone()
    snip_densities(model, list(select_targets(model, "all")), toy_batch, nn.functional.cross_entropy, 0.6)
    assert torch.equal(before, model.stem[1].running_mean)
