"""Collapsed layers are reported, and ``min_density`` keeps every layer above a floor at the exact budget.

A layer "collapses" when the init gives it (next to) no active weights: the reference's SNIP does that
on small models and at high sparsity, and since every update keeps each layer's count, such a layer
stays empty for the whole run. These tests build that case on purpose (a layer whose weights are 0
scores 0 in SNIP's |w * grad| ranking) and check the warning, the metric and the floor.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from slak_model.sparsity import DynamicSparsity, SparsityConfig, allocate_counts, erk_densities
from tests.numerics import rel_tol

T = 100  # total optimizer steps of the toy runs
#: Two layers of the toy model that the SNIP ranking can only leave empty: their weights are 0.
SILENT = ("stages.1.blocks.0.large_kernel.tall.conv.weight", "stages.1.blocks.0.large_kernel.wide.conv.weight")
ENGINE_LOG = "slak_model.sparsity.engine"


def train(model: nn.Module, engine: DynamicSparsity, opt: torch.optim.Optimizer, steps: range) -> list[bool]:
    """A minimal loop; whether each step updated the topology."""
    updated = []
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)
        x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        updated.append(engine.on_optimizer_step(opt))
        opt.zero_grad(set_to_none=True)
    return updated


def _silenced(make_toy) -> nn.Module:
    model = make_toy(0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in SILENT:
            params[name].zero_()
    return model


def _engine(model: nn.Module, toy_batch, **cfg) -> DynamicSparsity:
    config = SparsityConfig(**{"init": "snip", "sparsity": 0.6, "update_frequency": 2, "prune_rate": 0.5,
                               "seed": 3, **cfg})
    engine = DynamicSparsity(model, config, total_steps=T)
    engine.initialize(batch=toy_batch, loss_fn=nn.functional.cross_entropy)
    return engine


def _collapse_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == ENGINE_LOG and r.levelno == logging.WARNING
            and "collapsed" in r.getMessage()]


def test_a_collapsed_layer_is_named_once_and_counted(make_toy, toy_batch, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=ENGINE_LOG)
    model = _silenced(make_toy)
    engine = _engine(model, toy_batch)
    assert engine.collapsed_layers() == list(SILENT)
    (message,) = _collapse_warnings(caplog)
    assert all(name in message for name in SILENT) and "after initialisation" in message
    assert "min_density" in message  # the fix is named
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert any(train(model, engine, opt, range(6)))  # topology updates happened ...
    assert len(_collapse_warnings(caplog)) == 1  # ... and the same layers are not reported again
    stats = engine.stats()
    assert stats["sparsity/collapsed_layers"] == 2.0
    assert stats["sparsity/min_layer_density"] == 0.0


def test_no_collapse_reports_zero(make_toy, toy_batch, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=ENGINE_LOG)
    engine = _engine(make_toy(0), toy_batch)
    assert engine.collapsed_layers() == [] and engine.stats()["sparsity/collapsed_layers"] == 0.0
    assert _collapse_warnings(caplog) == []


def test_collapse_threshold_counts_nearly_empty_layers(make_toy, toy_batch) -> None:
    # uniform init at 60 % sparsity: every masked layer holds 40 % of its weights
    engine = _engine(make_toy(0), toy_batch, init="uniform", collapse_threshold=0.5)
    assert engine.collapsed_layers() == list(engine.masks)
    engine = _engine(make_toy(0), toy_batch, init="uniform", collapse_threshold=0.3)
    assert engine.collapsed_layers() == []


def test_a_collapse_in_a_loaded_state_is_reported(make_toy, toy_batch, caplog) -> None:
    state = _engine(_silenced(make_toy), toy_batch).state_dict()
    caplog.set_level(logging.WARNING, logger=ENGINE_LOG)
    caplog.clear()
    fresh = DynamicSparsity(make_toy(0), SparsityConfig(**state["config"]), total_steps=T)
    fresh.load_state_dict(state)
    (message,) = _collapse_warnings(caplog)
    assert "loading the saved state" in message and fresh.collapsed_layers() == list(SILENT)


@pytest.mark.parametrize("init", ["snip", "erk", "uniform"])
@pytest.mark.parametrize("sparsity,min_density", [(0.6, 0.1), (0.9, 0.05), (0.9, 0.08), (0.95, 0.04)])
def test_min_density_keeps_every_layer_above_its_floor_at_the_exact_budget(
    make_toy, toy_batch, init: str, sparsity: float, min_density: float
) -> None:
    model = _silenced(make_toy)
    engine = _engine(model, toy_batch, init=init, sparsity=sparsity, min_density=min_density)
    params = dict(model.named_parameters())
    targeted = {n: p.numel() for n, p in params.items() if p.dim() in (2, 4)}
    counts = {n: int(m.sum()) for n, m in engine.masks.items()}
    counts.update({n: targeted[n] for n in engine.dense_layers})
    for name, count in counts.items():
        assert count >= math.ceil(min_density * targeted[name]), name
    assert sum(counts.values()) == int(sum(targeted.values()) * (1.0 - sparsity))
    assert engine.collapsed_layers() == []
    # every update keeps each layer's count, so the floor holds for the whole run
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert any(train(model, engine, opt, range(6)))
    assert {n: int(m.sum()) for n, m in engine.masks.items()} == {n: counts[n] for n in engine.masks}


def test_min_density_gives_snip_the_rest_of_the_budget_by_rank(make_toy, toy_batch) -> None:
    """Layers well above the floor keep (about) what the plain ranking gave them; the floors come out of the
    lowest-ranked weights, not out of every layer alike."""
    plain = _engine(_silenced(make_toy), toy_batch).layer_densities()
    floored = _engine(_silenced(make_toy), toy_batch, min_density=0.05).layer_densities()
    for name in SILENT:
        assert plain[name] == 0.0 and floored[name] >= 0.05
    moved = sum(abs(plain[n] - floored[n]) for n in plain if n not in SILENT)
    assert 0 < moved < sum(floored[n] for n in SILENT)


def test_min_density_zero_is_the_reference_allocation(make_toy, toy_batch) -> None:
    engine = _engine(_silenced(make_toy), toy_batch)
    floored = _engine(_silenced(make_toy), toy_batch, min_density=0.0)
    assert engine.layer_densities() == floored.layer_densities()


def test_floors_over_the_budget_are_refused() -> None:
    with pytest.raises(ValueError, match=r"min_density=0\.5: must lie in \[0, 1 - sparsity = 0\.4\]"):
        SparsityConfig(sparsity=0.6, min_density=0.5)
    with pytest.raises(ValueError, match=r"collapse_threshold=1\.0: must lie in \[0, 1\)"):
        SparsityConfig(collapse_threshold=1.0)
    # a floor that rounds up in every layer can still exceed a budget that min_density <= density allows
    with pytest.raises(ValueError, match="min_density=0.5 needs 4 active weights, more than the budget of 2"):
        allocate_counts({"a": 0.5, "b": 0.5, "c": 0.5}, {"a": 3, "b": 1, "c": 1}, 2, 0.5)


@pytest.mark.parametrize("budget", [17, 40, 63])
def test_allocate_counts_is_exact_and_respects_floors_and_sizes(budget: int) -> None:
    numels = {"a": 10, "b": 7, "c": 50, "d": 3}
    densities = {"a": 1.0, "b": 0.33, "c": budget / 80, "d": 0.01}
    counts = allocate_counts(densities, numels, budget, 0.2)
    assert sum(counts.values()) == budget
    assert all(math.ceil(0.2 * numels[n]) <= counts[n] <= numels[n] for n in numels)


def test_erk_with_a_floor_meets_the_budget_and_the_floor() -> None:
    shapes = {"stem": (8, 3, 2, 2), "big": (64, 64), "bigger": (128, 256), "head": (10, 8)}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    plain = erk_densities(shapes, 0.1)
    assert plain["bigger"] < 0.09 and plain["head"] == 1.0  # the largest layer is below the floor without one
    out = erk_densities(shapes, 0.1, min_density=0.09)
    tol = rel_tol(torch.float64, len(shapes), layers=3)
    assert sum(out[n] * numel[n] for n in shapes) == pytest.approx(0.1 * sum(numel.values()), rel=tol)
    assert all(0.09 <= d <= 1.0 for d in out.values()) and out["bigger"] == 0.09
    # the layers between floor and cap keep ERK's proportions
    free = [n for n in shapes if 0.09 < out[n] < 1.0]
    ratios = [out[n] / (sum(shapes[n]) / numel[n]) for n in free]
    assert free and max(ratios) == pytest.approx(min(ratios), rel=tol)
