"""Magnitude prune and the three growth rules on single tensors."""

from __future__ import annotations

import math

import pytest
import torch

from slak_model.sparsity import grow_, growth_scores, magnitude_prune_, momentum_of, prune_count


def _layer(n: int, density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randperm(n, generator=g).float() + 1.0  # distinct magnitudes
    weight *= torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: round(density * n)]] = True
    weight[~mask] = 0.0
    return weight, mask


@pytest.mark.parametrize("n,density,rate", [(31, 0.6, 0.5), (257, 0.3, 0.1), (1000, 0.9, 0.005)],
                         ids=["n31-p0.5", "n257-p0.1", "n1000-p0.005"])
def test_prune_removes_exactly_the_smallest_active(n: int, density: float, rate: float) -> None:
    weight, mask = _layer(n, density, seed=n)
    nnz = int(mask.sum())
    count = prune_count(rate, nnz)
    assert count == math.ceil(rate * nnz)
    before = mask.clone()
    removed = magnitude_prune_(mask, weight, count)
    expected = set(torch.nonzero(before).flatten()[weight[before].abs().argsort()[:count]].tolist())
    assert set(removed.tolist()) == expected
    assert set(torch.nonzero(before & ~mask).flatten().tolist()) == expected
    assert int(mask.sum()) == nnz - count


def test_prune_prefers_active_zeros_but_never_touches_inactive() -> None:
    weight = torch.tensor([0.0, 0.0, 3.0, 0.0, 5.0, 1.0])
    mask = torch.tensor([True, False, True, True, True, False])
    magnitude_prune_(mask, weight, 2)
    assert mask.tolist() == [False, False, True, False, True, False]


def test_gradient_growth_picks_top_grad_among_inactive() -> None:
    mask = torch.tensor([True, False, False, True, False, False])
    grad = torch.tensor([9.0, -4.0, 1.0, 8.0, 0.5, -3.0])
    added = grow_(mask, growth_scores("gradient", 6, device=mask.device, grad=grad), 2)
    assert sorted(added.tolist()) == [1, 5]
    assert mask.tolist() == [True, True, False, True, False, True]


def test_gradient_growth_ignores_non_finite_gradients() -> None:
    mask = torch.tensor([False, False, False])
    grad = torch.tensor([float("inf"), 1.0, float("nan")])
    grow_(mask, growth_scores("gradient", 3, device=mask.device, grad=grad), 1)
    assert mask.tolist() == [False, True, False]


def test_random_growth_exact_count_only_inactive_and_uniform() -> None:
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(20)
    for _ in range(2000):
        mask = torch.zeros(20, dtype=torch.bool)
        mask[:5] = True
        added = grow_(mask, growth_scores("random", 20, device=mask.device, generator=g), 3)
        assert len(set(added.tolist())) == 3 and min(added.tolist()) >= 5
        assert int(mask.sum()) == 8
        hits[added] += 1
    share = hits[5:] / 2000  # each of 15 positions chosen with probability 3/15
    assert torch.all((share - 0.2).abs() < 0.04), share


def test_momentum_of_adam_and_sgd() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    adam = torch.optim.Adam([p])
    adam.step()
    st = adam.state[p]
    assert torch.equal(momentum_of(adam, p), st["exp_avg"] / (st["exp_avg_sq"].sqrt() + 1e-8))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sgd.step()
    assert torch.equal(momentum_of(sgd, p), sgd.state[p]["momentum_buffer"])
    with pytest.raises(ValueError, match="momentum"):
        momentum_of(torch.optim.SGD([p], lr=0.1), p)


def test_growth_needs_its_signal() -> None:
    with pytest.raises(ValueError, match="gradient"):
        growth_scores("gradient", 3, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="not one of"):
        growth_scores("mix", 3, device=torch.device("cpu"))


@pytest.mark.parametrize("method", ["topk", "sort"])
def test_selection_methods_choose_the_same_set(method: str) -> None:
    from slak_model.sparsity import get_select_method, set_select_method, top_k_indices

    scores = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).float()
    old = get_select_method()
    set_select_method(method)
    try:
        assert set(scores[top_k_indices(scores, 37)].tolist()) == {float(v) for v in range(963, 1000)}
        assert set(scores[top_k_indices(scores, 5, largest=False)].tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}
    finally:
        set_select_method(old)
    with pytest.raises(ValueError, match="'heap'"):
        set_select_method("heap")
