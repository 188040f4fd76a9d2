"""The pure-PyTorch training loop: schedule, param groups, a 2-epoch sparse run, bitwise resume."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from orchestrator import data
from orchestrator.config.loading import load_config
from orchestrator.loop import Trainer, cosine_schedule
from tests.numerics import rel_error, rel_tol

MICRO = 8


def _cfg(**extra):
    base = {"run.num_workers": 1, "train.global_batch_size": 16, "train.micro_batch_size": MICRO,
            "train.epochs": 2, "train.warmup_epochs": 0.5, "sparse.update_frequency": 2,
            "train.ema_decay": 0.9, "train.bn_recalibration_batches": 2, "data.image_size": 32}
    return load_config(None, {**base, **extra})


def _loader(n: int = 96, seed: int = 0) -> DataLoader:
    """The procedural shapes dataset (4 classes, 32 px), one worker, micro batch 8."""
    cfg = _cfg(**{"data.source": "shapes", "data.num_classes": 4, "data.train_size": n, "data.val_size": 32})
    bundle = data.build_datasets(cfg.data, seed=seed)
    train, _ = data.build_loaders(bundle, cfg, rank=0, world_size=1, micro_batch_size=MICRO, seed=seed)
    return train


def _trainer(cfg, loader, mixup=True) -> Trainer:
    mix = data.build_mixup(cfg.data, 4) if mixup else None
    tr = Trainer(cfg, steps_per_epoch=len(loader) // cfg.accumulation_steps, num_classes=4, mixup=mix)
    return tr


def _epoch(tr: Trainer, loader, on_step=None) -> dict[str, float]:
    loader.sampler.set_epoch(tr.epoch)
    m = tr.train_one_epoch(loader, on_step)
    m.update(tr.evaluate_all(loader, loader))
    m.update(tr.sparsity_metrics())
    tr.end_epoch()
    return {k: v for k, v in m.items() if not k.startswith("perf/")}


def _run(tr: Trainer, loader) -> list[dict[str, float]]:
    """Train to the end; per-epoch metrics without timings."""
    history = []
    while not tr.done:
        history.append(_epoch(tr, loader))
    return history


def test_cosine_schedule_matches_reference_shape() -> None:
    lr = cosine_schedule(4e-3, 1e-6, epochs=3, steps_per_epoch=10, warmup_steps=5)
    assert len(lr) == 30
    assert lr[0] == 0.0 and lr[4] == pytest.approx(4e-3)
    assert lr[5] == pytest.approx(4e-3) and lr[-1] == pytest.approx(1e-6, abs=2e-5)
    assert np.all(np.diff(lr[5:]) <= 0)
    no_warm = cosine_schedule(1.0, 0.0, epochs=1, steps_per_epoch=4, warmup_steps=0)
    np.testing.assert_allclose(no_warm, [1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))])


def test_param_groups_no_decay_on_1d_and_bias() -> None:
    tr = _trainer(_cfg(**{"sparse.enabled": False, "train.ema": False}), _loader())
    decay, no_decay = sorted(tr.optimizer.param_groups, key=lambda g: -g["weight_decay"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    names = {id(p): n for n, p in tr.module.named_parameters()}
    assert any(names[id(p)].endswith(".gamma") for p in no_decay["params"])  # layer scale is not decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(tr.module.parameters()))


def test_accumulation_and_small_data_errors() -> None:
    cfg = _cfg(**{"train.global_batch_size": 32})
    assert cfg.accumulation_steps == 4
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        Trainer(cfg, steps_per_epoch=0, num_classes=4)


@pytest.fixture(scope="module")
def reference() -> tuple[Trainer, list[dict[str, float]]]:
    """One uninterrupted 2-epoch sparse run, shared by the tests below."""
    loader = _loader()
    tr = _trainer(_cfg(), loader)
    tr.initialize_sparsity(next(iter(loader)))
    return tr, _run(tr, loader)


def test_two_epoch_sparse_run_learns_and_keeps_masks(reference) -> None:
    tr, history = reference
    assert len(history) == 2 and tr.step == 2 * tr.steps_per_epoch
    last = history[-1]
    for key in ("train/loss", "train/lr", "val/top1", "val/top5", "ema/top1", "sparsity/density",
                "sparsity/churn", "sparsity/itop_rate"):
        assert key in last and np.isfinite(last[key]), key
    # a sanity bound on the logged metric; exact per-layer counts are the sparsity engine tests' job
    assert last["sparsity/density"] == pytest.approx(0.6, abs=0.02)
    assert last["sparsity/updates"] == tr.step // 2
    assert history[-1]["train/loss"] < history[0]["train/loss"] + 0.5
    params = dict(tr.module.named_parameters())
    ema = dict(tr.ema.module.named_parameters())
    for name, mask in tr.engine.masks.items():
        assert not params[name][~mask].any(), f"{name}: inactive weights must be exactly zero"
        assert not ema[name][~mask].any(), f"{name}: EMA must be zero where the mask is off"


@pytest.mark.parametrize("save_at_step, stop_at_step", [(None, 8), (3, 5)], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_bitwise_identical(reference, save_at_step: int | None, stop_at_step: int) -> None:
    """Save at ``save_at_step`` (None = after epoch 0 ends), die at ``stop_at_step``, resume in a new trainer."""
    loader = _loader()
    cfg = _cfg()
    ref, ref_history = reference
    assert ref.steps_per_epoch == 6

    first = _trainer(cfg, loader)
    first.initialize_sparsity(next(iter(loader)))
    saved: dict = {}

    def save(t: Trainer) -> None:
        buf = io.BytesIO()
        torch.save(t.state_dict(), buf)
        saved["state"] = buf.getvalue()

    def on_step(t: Trainer, m: dict) -> None:
        if t.step == save_at_step:
            save(t)
        if t.step == stop_at_step:
            raise KeyboardInterrupt

    history = []
    with pytest.raises(KeyboardInterrupt):
        while not first.done:
            history.append(_epoch(first, loader, on_step))
            if save_at_step is None and first.epoch == 1:
                save(first)
    # a fresh process: new trainer, perturbed global RNG, state loaded from bytes
    torch.manual_seed(1234)
    second = _trainer(cfg, loader)
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)  # what every checkpoint must allow
    second.load_state_dict(state)
    epochs_before = second.epoch
    history = history[:epochs_before] + _run(second, loader)

    assert history == ref_history
    for (name, a), b in zip(ref.module.state_dict().items(), second.module.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(ref.ema.module.state_dict().items(), second.ema.module.state_dict().values()):
        assert torch.equal(a, b), f"ema {name}"
    for name, mask in ref.engine.masks.items():
        assert torch.equal(mask, second.engine.masks[name]), name


def test_bf16_autocast_runs_and_steps_sparsity() -> None:
    loader = _loader(n=32)
    tr = _trainer(_cfg(**{"train.precision": "bf16", "train.epochs": 1, "train.clip_grad": 1.0}), loader,
                  mixup=False)
    tr.initialize_sparsity(next(iter(loader)))
    m = tr.train_one_epoch(loader)
    assert np.isfinite(m["train/loss"]) and tr.engine.step == tr.step == 2


def test_load_rejects_a_different_run_length() -> None:
    loader = _loader(n=32)
    tr = _trainer(_cfg(**{"sparse.enabled": False, "train.epochs": 1}), loader)
    other = _trainer(_cfg(**{"sparse.enabled": False, "train.epochs": 2}), loader)
    with pytest.raises(ValueError, match="optimizer steps"):
        other.load_state_dict(tr.state_dict())


@pytest.mark.numeric
def test_accumulated_micro_batches_equal_one_large_batch() -> None:
    """accumulation = global / (micro x workers): 2 x 8 must update like 1 x 16 (per-sample norms only)."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.arange(16) % 4
    updates = []
    for micro in (8, 16):
        cfg = _cfg(**{"train.micro_batch_size": micro, "model.use_bn": False, "model.drop_path_rate": 0.0,
                      "sparse.enabled": False, "train.ema": False, "train.warmup_epochs": 0.0,
                      "data.smoothing": 0.0, "train.epochs": 1, "train.opt_eps": 1.0,  # Adam ~ SGD: scale-sensitive
                      "train.weight_decay": 0.0})
        loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=micro)
        tr = Trainer(cfg, steps_per_epoch=1, num_classes=4)
        assert tr.accumulation == 16 // micro
        before = {k: v.clone() for k, v in tr.module.state_dict().items()}
        tr.train_one_epoch(loader)
        updates.append({k: v - before[k] for k, v in tr.module.state_dict().items()})
    # The updates differ only by how fp32 gradient sums were grouped: sums over the batch's pixels (at most
    # 16 x 32 x 32 terms), through the network's 10 stages forward and again backward.
    tol = rel_tol(torch.float32, 16 * 32 * 32, layers=2 * 10)
    moved = [name for name, u in updates[0].items() if u.is_floating_point() and u.abs().max() > 0]
    assert len(moved) > len(updates[0]) // 2, "the step must move most tensors for this comparison to mean anything"
    for name, a in updates[0].items():
        b = updates[1][name]
        assert torch.equal(a, b) or rel_error(a, b) <= tol, f"{name}: update differs by {rel_error(a, b):.3g} > {tol:.3g}"


def test_a_diverged_loss_is_reported_when_read_and_at_the_epoch_end() -> None:
    """The step loss stays on the device until read; a NaN is still caught, naming the step or the epoch."""
    loader = _loader()
    seen: list[float] = []

    def nan_after_first_step(t: Trainer, m) -> None:
        if t.step == 1:
            seen.append(m["train/loss"])  # read: finite
            with torch.no_grad():
                next(t.module.parameters()).fill_(float("nan"))

    tr = _trainer(_cfg(**{"sparse.enabled": False}), loader, mixup=False)
    with pytest.raises(FloatingPointError, match=r"train/loss is nan in epoch 1"):
        tr.train_one_epoch(loader, nan_after_first_step)  # never read again: the epoch sum catches it
    assert np.isfinite(seen[0])

    tr = _trainer(_cfg(**{"sparse.enabled": False}), loader, mixup=False)
    with torch.no_grad():
        next(tr.module.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"train/loss is nan at optimizer step 1"):
        tr.train_one_epoch(loader, lambda t, m: m["train/loss"])


def test_resume_through_the_prefetching_loader_is_bitwise_identical() -> None:
    """uint8 sources go through timm's PrefetchLoader, which draws random erasing one batch ahead; a
    mid-epoch resume must still replay the same batches, erasures and updates."""
    cfg = _cfg(**{"data.source": "synthetic", "data.num_classes": 4, "data.train_size": 48, "data.val_size": 32,
                  "data.reprob": 0.5})
    bundle = data.build_datasets(cfg.data, seed=0)

    def fresh_loader():  # a new sampler (epoch 0) per run, as a new worker process has
        return data.build_loaders(bundle, cfg, rank=0, world_size=1, micro_batch_size=MICRO, seed=0)[0]

    loader = fresh_loader()
    assert loader.random_erasing is not None
    ref = _trainer(cfg, loader)
    ref.initialize_sparsity(next(iter(loader)))
    ref_history = _run(ref, loader)

    loader = fresh_loader()
    first = _trainer(cfg, loader)
    first.initialize_sparsity(next(iter(loader)))
    saved: dict = {}

    assert ref.steps_per_epoch == 3  # 48 images, micro batch 8, 2 micro-batches per step

    def on_step(t: Trainer, m) -> None:  # saved mid-epoch 2, between topology updates; dies at the next step
        if t.step == 5:
            saved["state"] = copy.deepcopy(t.state_dict())
        if t.step == 6:
            raise KeyboardInterrupt

    history = []
    with pytest.raises(KeyboardInterrupt):
        while not first.done:
            history.append(_epoch(first, loader, on_step))
    torch.manual_seed(99)
    loader = fresh_loader()
    second = _trainer(cfg, loader)
    second.load_state_dict(saved["state"])
    history += _run(second, loader)
    assert history == ref_history
    for (name, a), b in zip(ref.module.state_dict().items(), second.module.state_dict().values()):
        assert torch.equal(a, b), name
