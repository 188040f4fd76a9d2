"""Adaptation-rate cosine and the update calendar (spec section 3.7 numbers)."""

from __future__ import annotations

import math

import pytest

from slak_model.sparsity import AdaptationSchedule, cosine_prune_rate


@pytest.mark.parametrize(
    "step,expected", [(0, 0.5), (2000, 0.49944), (46000, 0.25914), (92000, 0.00536), (93600, 0.005)],
    ids=lambda v: str(v),
)
def test_reference_values(step: int, expected: float) -> None:
    # the expected values are printed to 5 decimals: half a unit of the last digit
    assert cosine_prune_rate(step, 0.5, 0.005, 93_600) == pytest.approx(expected, abs=5e-6)


def test_closed_form_matches_torch_cosine_annealing() -> None:
    import torch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0.005)
    # torch's recursive form multiplies by (1 + cos(pi t/T)) / (1 + cos(pi (t-1)/T)); the divisor falls to 2e-3
    # near the end, amplifying float64 round-off (u = 1.1e-16) by up to ~1e3 per step: 1e-9 covers 50 steps.
    for t in range(1, 51):
        opt.step()
        sched.step()
        assert cosine_prune_rate(t, 0.3, 0.005, 50) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)


def test_rate_stays_at_floor_after_total_steps() -> None:
    assert cosine_prune_rate(10_000, 0.5, 0.005, 100) == 0.005


def test_updates_at_multiples_of_f() -> None:
    s = AdaptationSchedule(p0=0.5, p_min=0.005, update_frequency=2000, total_steps=93_600)
    updates = [t for t in range(93_601) if s.is_update_step(t)]
    assert updates == list(range(2000, 93_601, 2000))
    assert len(updates) == 46
    assert s.next_update_step(1999) == 2000 and s.next_update_step(2000) == 4000


def test_stop_fraction_stops_updates() -> None:
    s = AdaptationSchedule(p0=0.5, p_min=0.005, update_frequency=10, total_steps=100, stop_fraction=0.5)
    assert [t for t in range(200) if s.is_update_step(t)] == [10, 20, 30, 40, 50]
    assert s.next_update_step(50) is None
    never = AdaptationSchedule(p0=0.5, p_min=0.005, update_frequency=10, total_steps=100)
    assert never.is_update_step(150) and never.last_update_step == math.inf


def test_total_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="total_steps=0"):
        AdaptationSchedule(p0=0.5, p_min=0.005, update_frequency=10, total_steps=0)
