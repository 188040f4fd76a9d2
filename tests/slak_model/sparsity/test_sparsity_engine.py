"""DynamicSparsity on a SLaK-shaped toy model: init, invariants after every step, updates, stats, resume."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

from slak_model.sparsity import DynamicSparsity, SparsityConfig
from tests.numerics import rel_tol

T = 100  # total optimizer steps of the toy runs


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)


def assert_invariants(engine: DynamicSparsity, counts: dict[str, int]) -> None:
    """Every masked weight is exactly 0 and every layer keeps its active count."""
    params = dict(engine.model.named_parameters())
    for name, mask in engine.masks.items():
        w = params[name].detach()
        assert not torch.any(w[~mask] != 0), f"{name}: masked weights are not zero"
        assert int(mask.sum()) == counts[name], f"{name}: active count changed"


def train(model: nn.Module, engine: DynamicSparsity, opt: torch.optim.Optimizer, steps: range,
          counts: dict[str, int] | None = None, autocast: torch.dtype | None = None,
          scaler: Any = None, poison: set[int] = frozenset()) -> list[bool]:
    """A minimal loop; checks the invariants after every step when ``counts`` is given."""
    updated = []
    for step in steps:
        x, y = _batch(step)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            if step in poison:
                next(p for p in model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        updated.append(engine.on_optimizer_step(opt))
        opt.zero_grad(set_to_none=True)
        if counts is not None:
            assert_invariants(engine, counts)
    return updated


def _setup(make_toy, toy_batch, seed: int = 0, **cfg: Any):
    model = make_toy(seed)
    cfg = {"init": "uniform", "update_frequency": 2, "prune_rate": 0.5, "seed": 7, **cfg}
    engine = DynamicSparsity(model, SparsityConfig(**cfg), total_steps=T)
    engine.initialize(batch=toy_batch, loss_fn=nn.functional.cross_entropy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return model, engine, opt


def _counts(engine: DynamicSparsity) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in engine.masks.items()}


@pytest.mark.parametrize("init", ["uniform", "erk", "snip"])
@pytest.mark.parametrize("sparsity", [0.4, 0.8])
def test_init_hits_target_sparsity(make_toy, toy_batch, init: str, sparsity: float) -> None:
    _, engine, _ = _setup(make_toy, toy_batch, init=init, sparsity=sparsity)
    counted = sum(int(m.sum()) for m in engine.masks.values())
    dense = sum(p.numel() for n, p in engine.model.named_parameters() if n in engine.dense_layers)
    total = sum(p.numel() for n, p in engine.model.named_parameters() if p.dim() in (2, 4))
    # each layer's count is its continuous target rounded to a whole weight: at most half a weight off per layer
    assert abs((1.0 - engine.density()) - sparsity) <= 0.5 * len(engine.masks) / total
    assert (counted + dense) / total == pytest.approx(engine.density(), rel=rel_tol(torch.float64, len(engine.masks)))


def test_init_zeroes_masked_weights(make_toy, toy_batch) -> None:
    _, engine, _ = _setup(make_toy, toy_batch)
    assert_invariants(engine, _counts(engine))


def test_layers_at_dense_threshold_leave_the_mask_set(make_toy, toy_batch) -> None:
    _, engine, _ = _setup(make_toy, toy_batch, init="erk", sparsity=0.4)
    small = "stages.0.blocks.0.large_kernel.small.conv.weight"  # ERK gives the 3x3 depthwise density 1
    assert small in engine.dense_layers and small not in engine.masks
    assert engine.layer_densities()[small] == 1.0
    assert len(engine.dense_layers) == 2
    model, engine, opt = _setup(make_toy, toy_batch, init="uniform", sparsity=0.3, dense_threshold=0.5)
    assert len(engine.masks) == 0 and len(engine.dense_layers) == 18
    train(model, engine, opt, range(4))  # a no-op engine still steps
    assert engine.stats()["sparsity/density"] == 1.0


@pytest.mark.parametrize("growth", ["random", "gradient", "momentum"])
def test_counts_invariant_and_masked_weights_zero_every_step(make_toy, toy_batch, growth: str) -> None:
    model, engine, opt = _setup(make_toy, toy_batch, growth=growth)
    counts = _counts(engine)
    updated = train(model, engine, opt, range(10), counts=counts)
    assert updated == [False, True] * 5
    assert engine.stats()["sparsity/churn"] > 0


def test_update_happens_at_multiples_of_f_with_scheduled_rate(make_toy, toy_batch) -> None:
    model, engine, opt = _setup(make_toy, toy_batch, update_frequency=3)
    pruned = []
    for step in range(9):
        train(model, engine, opt, range(step, step + 1))
        pruned.append(engine.stats()["sparsity/pruned"])
    assert engine.stats()["sparsity/updates"] == 3
    assert engine.stats()["sparsity/prune_rate"] == pytest.approx(engine.schedule.rate(9))
    import math

    expected = sum(math.ceil(engine.schedule.rate(9) * n) for n in _counts(engine).values())
    assert pruned[-1] == expected
    assert engine.next_update_step() == 12


def test_grown_weights_and_their_adam_moments_start_at_zero(make_toy, toy_batch) -> None:
    model, engine, opt = _setup(make_toy, toy_batch, growth="gradient")
    train(model, engine, opt, range(1))
    before = {n: m.clone() for n, m in engine.masks.items()}
    # make the moments visibly non-zero everywhere before the update step
    assert train(model, engine, opt, range(1, 2)) == [True]
    params = dict(model.named_parameters())
    n_born = 0
    for name, mask in engine.masks.items():
        born = mask & ~before[name]
        changed = mask ^ before[name]
        n_born += int(born.sum())
        assert torch.all(params[name].detach()[born] == 0), name
        state = opt.state[params[name]]
        assert torch.all(state["exp_avg"][changed] == 0) and torch.all(state["exp_avg_sq"][changed] == 0), name
        assert torch.any(state["exp_avg"][mask & before[name]] != 0), name  # kept positions keep history
    assert n_born > 0


def test_masked_weights_zero_under_bf16_autocast(make_toy, toy_batch) -> None:
    model, engine, opt = _setup(make_toy, toy_batch)
    train(model, engine, opt, range(6), counts=_counts(engine), autocast=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_masked_weights_zero_with_grad_scaler_including_skipped_steps(make_toy, toy_batch, dtype) -> None:
    model, engine, opt = _setup(make_toy, toy_batch, growth="gradient")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    counts = _counts(engine)
    scales = []
    for step in range(6):
        train(model, engine, opt, range(step, step + 1), counts=counts, autocast=dtype, scaler=scaler, poison={1, 4})
        scales.append(scaler.get_scale())
    assert scales[1] < scales[0] and scales[4] < scales[3], "the poisoned steps were not skipped"
    assert engine.stats()["sparsity/updates"] == 3


def test_weights_in_bf16_stay_masked(make_toy, toy_batch) -> None:
    model = make_toy(0).to(torch.bfloat16)
    engine = DynamicSparsity(model, SparsityConfig(init="erk", update_frequency=2), total_steps=T)
    engine.initialize()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    counts = _counts(engine)
    for step in range(4):
        x, y = _batch(step)
        nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
        opt.step()
        engine.on_optimizer_step(opt)
        opt.zero_grad()
        assert_invariants(engine, counts)


def test_usage_errors(make_toy, toy_batch) -> None:
    model = make_toy(0)
    with pytest.raises(ValueError, match="init='snip' needs one training batch"):
        DynamicSparsity(model, SparsityConfig(init="snip"), total_steps=T).initialize()
    with pytest.raises(RuntimeError, match="initialize"):
        DynamicSparsity(model, SparsityConfig(), total_steps=T).on_optimizer_step()
    with pytest.raises(ValueError, match="total_steps"):
        DynamicSparsity(model, SparsityConfig(), total_steps=0)
    engine = DynamicSparsity(model, SparsityConfig(init="erk", growth="momentum", update_frequency=1), total_steps=T)
    engine.initialize()
    with pytest.raises(ValueError, match="momentum"):
        engine.on_optimizer_step()


def test_stats_are_flat_slash_scoped_metrics(make_toy, toy_batch) -> None:
    model, engine, opt = _setup(make_toy, toy_batch, init="erk", dense_threshold=0.85)
    s0 = engine.stats()
    assert s0["sparsity/itop_rate"] == pytest.approx(
        sum(int(m.sum()) for m in engine.masks.values()) / sum(m.numel() for m in engine.masks.values()))
    train(model, engine, opt, range(4))
    s = engine.stats()
    assert all(isinstance(k, str) and k.startswith("sparsity/") and isinstance(v, float) for k, v in s.items())
    for key in ("sparsity/density", "sparsity/density/stem", "sparsity/density/stages.0", "sparsity/density/stages.1",
                "sparsity/density/head", "sparsity/prune_rate", "sparsity/pruned", "sparsity/grown",
                "sparsity/churn", "sparsity/itop_rate"):
        assert key in s, key
    assert s["sparsity/density/stem"] == 1.0
    assert s["sparsity/pruned"] == s["sparsity/grown"] > 0
    assert 0.0 < s["sparsity/churn"] <= engine.schedule.rate(4)
    assert s0["sparsity/itop_rate"] < s["sparsity/itop_rate"] <= 1.0
    assert set(engine.layer_densities()) == {n for n, p in model.named_parameters() if p.dim() in (2, 4)}


def _snapshot(model: nn.Module, engine: DynamicSparsity) -> dict[str, Any]:
    return {
        "masks": {n: m.clone() for n, m in engine.masks.items()},
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "step": engine.step,
        "rate": engine.stats()["sparsity/prune_rate"],
        "next": engine.next_update_step(),
        "itop": engine.stats()["sparsity/itop_rate"],
    }


@pytest.mark.parametrize("growth", ["random", "momentum"])
@pytest.mark.parametrize("stop_at", [3, 4], ids=["mid-period", "on-update"])
def test_resume_is_bitwise_identical(make_toy, toy_batch, growth: str, stop_at: int) -> None:
    model, engine, opt = _setup(make_toy, toy_batch, growth=growth, update_frequency=4)
    train(model, engine, opt, range(10))
    expected = _snapshot(model, engine)

    model, engine, opt = _setup(make_toy, toy_batch, growth=growth, update_frequency=4)
    train(model, engine, opt, range(stop_at))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sparsity": engine.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2 = make_toy(123)  # different init: everything must come from the checkpoint
    engine2 = DynamicSparsity(model2, SparsityConfig(init="uniform", update_frequency=4, prune_rate=0.5, seed=7,
                                                     growth=growth), total_steps=T)
    model2.load_state_dict(ckpt["model"])
    engine2.load_state_dict(ckpt["sparsity"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.05)
    opt2.load_state_dict(ckpt["opt"])
    assert engine2.next_update_step() == (8 if stop_at == 4 else 4)
    train(model2, engine2, opt2, range(stop_at, 10))
    got = _snapshot(model2, engine2)
    assert got["step"] == expected["step"] and got["rate"] == expected["rate"] and got["next"] == expected["next"]
    assert got["itop"] == expected["itop"]
    for n in expected["masks"]:
        assert torch.equal(got["masks"][n], expected["masks"][n]), n
    for n in expected["weights"]:
        assert torch.equal(got["weights"][n], expected["weights"][n]), n


def test_load_state_rejects_other_models(make_toy, toy_batch) -> None:
    _, engine, _ = _setup(make_toy, toy_batch)
    state = engine.state_dict()
    other = DynamicSparsity(make_toy(0, dims=(8, 24)), SparsityConfig(init="uniform"), total_steps=T)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a DynamicSparsity state"):
        other.load_state_dict({"masks": {}})
