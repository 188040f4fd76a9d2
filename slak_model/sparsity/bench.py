"""Benchmark of the sparsity engine on SLaK-T: one topology update, and masking's cost per step.

Usage (``key=value`` arguments, all optional)::

    python -m slak_model.sparsity.bench device=cuda batch=64 image=224 repeats=10 model=auto out=bench.json

``growth=random,gradient`` limits the growth modes; ``select=topk,sort`` times each selection
method (see ``select.py``); ``profile=1`` also prints the profiler's top
operations of one update (to see where its time goes).

``model=auto`` builds ``slak_model.create_model("slak_tiny", width_factor=1.3)`` when the model
family is available and falls back to ``synthetic`` (the 95 mask-eligible SLaK-T tensors with
their exact shapes, 50,576,524 weights). The training-step comparison needs the real model and
is skipped on the synthetic one.

Measured: (a) one ``on_optimizer_step`` that performs a topology update (prune + regrow + moment
reset + apply), per growth mode, median of ``repeats``; (b) ``apply_masks`` alone; (c) a training
step (forward, backward, AdamW; bf16 autocast on CUDA) with and without the engine, interleaved.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .config import SparsityConfig
from .engine import DynamicSparsity
from .select import get_select_method, set_select_method

__all__ = ["SLAK_T_ELIGIBLE", "bench_apply", "bench_step", "bench_update", "main", "profile_update", "slak_t_shapes"]

SLAK_T_ELIGIBLE = (95, 50_576_524)  # tensors, weights (reference measurement)
_DIMS = (124, 249, 499, 998)  # SLaK-T at width_factor 1.3
_DEPTHS = (3, 3, 9, 3)
_KERNELS = (51, 49, 47, 13)
_SMALL = 5
_CLASSES = 1000


def slak_t_shapes() -> dict[str, tuple[int, ...]]:
    """Names (the model's naming contract) and shapes of SLaK-T's 2-D/4-D weights."""
    shapes: dict[str, tuple[int, ...]] = {"stem.0.weight": (_DIMS[0], 3, 4, 4)}
    for i, (dim, depth, k) in enumerate(zip(_DIMS, _DEPTHS, _KERNELS)):
        if i > 0:
            shapes[f"stages.{i}.downsample.1.weight"] = (dim, _DIMS[i - 1], 2, 2)
        for j in range(depth):
            p = f"stages.{i}.blocks.{j}"
            shapes[f"{p}.large_kernel.tall.conv.weight"] = (dim, 1, k, _SMALL)
            shapes[f"{p}.large_kernel.wide.conv.weight"] = (dim, 1, _SMALL, k)
            shapes[f"{p}.large_kernel.small.conv.weight"] = (dim, 1, _SMALL, _SMALL)
            shapes[f"{p}.mlp.fc1.weight"] = (4 * dim, dim)
            shapes[f"{p}.mlp.fc2.weight"] = (dim, 4 * dim)
    shapes["head.fc.weight"] = (_CLASSES, _DIMS[-1])
    return shapes


def _module_from_shapes(shapes: dict[str, tuple[int, ...]], device: torch.device) -> nn.Module:
    """A parameter-only module tree holding tensors of the given names and shapes (std 0.02)."""
    root = nn.Module()
    g = torch.Generator(device=device).manual_seed(0)
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(torch.randn(shape, generator=g, device=device) * 0.02))
    return root


def _build_model(kind: str, device: torch.device) -> tuple[nn.Module, str]:
    if kind in ("auto", "real"):
        try:
            import slak_model

            model = slak_model.create_model("slak_tiny", width_factor=1.3)
            return model.to(device), "slak_tiny(width_factor=1.3)"
        except (ImportError, AttributeError, RuntimeError) as err:
            if kind == "real":
                raise
            return _module_from_shapes(slak_t_shapes(), device), f"synthetic SLaK-T shapes ({type(err).__name__})"
    if kind == "synthetic":
        return _module_from_shapes(slak_t_shapes(), device), "synthetic SLaK-T shapes"
    raise ValueError(f"model={kind!r} is not one of ['auto', 'real', 'synthetic']")


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
               classes: int = _CLASSES) -> dict[str, float]:
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
    allowed = {"device", "batch", "image", "repeats", "model", "out", "growth", "profile", "select"}
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
    model, source = _build_model(opts.get("model", "auto"), device)
    n_eligible = sum(p.numel() for p in model.parameters() if p.dim() in (2, 4))
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": source,
        "eligible_tensors": sum(1 for p in model.parameters() if p.dim() in (2, 4)),
        "eligible_weights": n_eligible,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
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
    if not source.startswith("synthetic"):
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
