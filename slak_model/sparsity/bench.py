"""Benchmark of the sparsity engine on SLaK-T: one topology update, and masking's cost per step.

Usage (``key=value`` arguments, all optional)::

    python -m slak_model.sparsity.bench device=cuda batch=64 image=224 repeats=10 out=bench.json

``growth=random,gradient`` limits the growth modes; ``select=topk,sort`` times each selection
method (see ``select.py``); ``profile=1`` also prints the profiler's top
operations of one update (to see where its time goes).

The model is ``slak_model.create_model("slak_tiny", width_factor=1.3)``: SLaK-T with its 95
mask-eligible tensors (50,576,524 weights).

Measured: (a) one ``on_optimizer_step`` that performs a topology update (prune + regrow + moment
reset + apply), per growth mode, median of ``repeats``; (b) ``apply_masks`` alone; (c) a training
step (forward, backward, AdamW; bf16 autocast on CUDA) with and without the engine, interleaved.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kernels import environment

from .config import SparsityConfig
from .engine import DynamicSparsity
from .select import get_select_method, set_select_method

__all__ = ["SLAK_T_ELIGIBLE", "bench_apply", "bench_step", "bench_update", "main", "profile_update", "slak_t"]

SLAK_T_ELIGIBLE = (95, 50_576_524)  # tensors, weights of SLaK-T's mask-eligible set (reference measurement)


def slak_t(device: torch.device | str = "cpu") -> nn.Module:
    """SLaK-T as the paper trains it (``slak_tiny``, width factor 1.3)."""
    from slak_model.variants import create_model  # the model package; the engine itself never needs it

    return create_model("slak_tiny", width_factor=1.3).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def bench_update(model: nn.Module, device: torch.device, growth: str, repeats: int) -> dict[str, float]:
    """Median/min milliseconds of one topology-update step (rate about 0.5, density 0.6).

    Uniform init keeps every eligible tensor masked (ERK would leave the small depthwise kernels
    dense), so this is the worst case: all 95 SLaK-T tensors, 50.6M weights.
    """
    f = 100
    engine = DynamicSparsity(
        model, SparsityConfig(sparsity=0.4, init="uniform", growth=growth, prune_rate=0.5, update_frequency=f),
        total_steps=f * (repeats + 10) * 100,
    )
    engine.initialize()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4)
    opt.step()  # creates the Adam moments used by momentum growth and reset at changed positions
    times = []
    for r in range(repeats + 2):  # two warm-ups
        engine.step = f * (r + 1) - 1
        ms = _timed(lambda: engine.on_optimizer_step(opt), device)
        if r >= 2:
            times.append(ms)
    masked = sum(m.numel() for m in engine.masks.values())
    out = {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "masked_tensors": float(len(engine.masks)),
        "masked_weights": float(masked),
        "moved_per_update": engine.stats()["sparsity/pruned"],
    }
    for p in params:
        p.grad = None
    return out


def profile_update(model: nn.Module, device: torch.device, growth: str, rows: int = 15) -> str:
    """``torch.profiler`` table (top ops by device time, or CPU time on CPU) of one topology update."""
    from torch.profiler import ProfilerActivity, profile

    f = 100
    engine = DynamicSparsity(model, SparsityConfig(sparsity=0.4, init="uniform", growth=growth, prune_rate=0.5,
                                                   update_frequency=f), total_steps=f * 1000)
    engine.initialize()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-4)
    opt.step()
    engine.step = f - 1
    engine.on_optimizer_step(opt)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    engine.step = 2 * f - 1
    with profile(activities=activities) as prof:
        engine.on_optimizer_step(opt)
        _sync(device)
    for p in params:
        p.grad = None
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def bench_apply(model: nn.Module, device: torch.device, repeats: int) -> dict[str, float]:
    """Milliseconds of ``apply_masks`` alone (the per-step cost of masking)."""
    engine = DynamicSparsity(model, SparsityConfig(sparsity=0.4, init="uniform"), total_steps=10)
    engine.initialize()
    times = [_timed(engine.apply_masks, device) for _ in range(repeats * 5 + 5)][5:]
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def bench_step(model: nn.Module, device: torch.device, batch: int, image: int, repeats: int,
               classes: int = 1000) -> dict[str, float]:
    """Training-step milliseconds with masking off and on (no topology update), alternating steps."""
    model.train()
    engine = DynamicSparsity(model, SparsityConfig(sparsity=0.4, init="uniform", update_frequency=10**9),
                             total_steps=10**9)
    engine.initialize()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    amp = device.type == "cuda"

    def step(masked: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if masked:
            engine.on_optimizer_step(opt)
        opt.zero_grad(set_to_none=True)

    for i in range(6):
        step(i % 2 == 0)
    off: list[float] = []
    on: list[float] = []
    for _ in range(repeats):  # alternate step by step so drift (clocks, allocator) hits both alike
        off.append(_timed(lambda: step(False), device))
        on.append(_timed(lambda: step(True), device))
    off_ms, on_ms = statistics.median(off), statistics.median(on)
    return {"unmasked_ms": off_ms, "masked_ms": on_ms, "overhead_pct": 100.0 * (on_ms - off_ms) / off_ms}


def _parse(argv: Sequence[str]) -> dict[str, str]:
    allowed = {"device", "batch", "image", "repeats", "out", "growth", "profile", "select"}
    opts: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"argument {arg!r}: expected key=value with key in {sorted(allowed)}")
        opts[key] = value
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table (and write JSON when ``out=`` is given)."""
    opts = _parse(sys.argv[1:] if argv is None else argv)
    device = torch.device(opts.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    repeats = int(opts.get("repeats", "10"))
    growths = opts.get("growth", "random,gradient,momentum").split(",")
    model = slak_t(device)
    n_eligible = sum(p.numel() for p in model.parameters() if p.dim() in (2, 4))
    info = {
        **environment.describe(device),
        "model": "slak_tiny(width_factor=1.3)",
        "eligible_tensors": sum(1 for p in model.parameters() if p.dim() in (2, 4)),
        "eligible_weights": n_eligible,
    }
    rows: list[tuple[str, str, str]] = []
    results: dict[str, Any] = {"info": info}
    default_select = get_select_method()
    for method in opts.get("select", default_select).split(","):
        set_select_method(method)
        for growth in growths:
            r = bench_update(model, device, growth, repeats)
            results[f"update_{growth}_{method}"] = r
            rows.append((f"topology update, growth={growth}, select={method} ({int(r['masked_tensors'])} tensors, "
                         f"{r['masked_weights'] / 1e6:.1f}M masked, {r['moved_per_update'] / 1e6:.2f}M moved)",
                         f"{r['median_ms']:.2f} ms", f"min {r['min_ms']:.2f} ms"))
    set_select_method(default_select)
    a = bench_apply(model, device, repeats)
    results["apply"] = a
    rows.append(("apply_masks (per optimizer step)", f"{a['median_ms']:.3f} ms", f"min {a['min_ms']:.3f} ms"))
    batch, image = int(opts.get("batch", "64")), int(opts.get("image", "224"))
    s = bench_step(model, device, batch, image, repeats)
    results["step"] = s
    rows.append((f"train step, batch {batch} @ {image}px, masking off", f"{s['unmasked_ms']:.1f} ms", ""))
    rows.append((f"train step, batch {batch} @ {image}px, masking on", f"{s['masked_ms']:.1f} ms",
                 f"{s['overhead_pct']:+.2f} %"))
    rows.append(("apply_masks / unmasked step", f"{100 * a['median_ms'] / s['unmasked_ms']:.2f} %", ""))
    print(" | ".join(f"{k}: {v}" for k, v in info.items()))
    print("| measurement | median | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if opts.get("profile", "0") not in ("0", ""):
        print(profile_update(model, device, growths[0]))
    if "out" in opts:
        with open(opts["out"], "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
