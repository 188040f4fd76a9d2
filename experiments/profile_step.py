"""Where a training step's time goes, and what ``torch.compile`` and the optimizer choice change.

For each model and each execution mode (eager, ``torch.compile`` default, ``reduce-overhead`` with CUDA
graphs, ``max-autotune-no-cudagraphs``) and optimizer implementation (``foreach``, ``fused`` AdamW) this
times the same synthetic training step as ``throughput.py`` (CUDA events; median/min/max over the timed
steps), reports compile time (the warm-up steps' wall time) and peak memory, and for every row runs
the PyTorch profiler over a few steps and splits the GPU time into categories (our depthwise kernels,
cuDNN/other convs, GEMMs, BatchNorm, LayerNorm, element-wise, optimizer, reductions, copies) together
with the GPU's idle share of the step (time the GPU waits on the host) and kernel launches per step.

    python experiments/profile_step.py --device cpu --variant slak_test --batch 4 --image-size 64 --steps 2
    python experiments/profile_step.py --variant slak_tiny --batch 64 --json out.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import kernels
from kernels import environment
from orchestrator import data  # noqa: F401 - torchvision guard before timm, registers the SLaK variants

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_MODES = ("eager", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
_OPTIMIZERS = ("foreach", "fused")

# Kernel-name patterns, first match wins; names are CUDA kernel symbols (or CPU op names on CPU).
_CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("ours: depthwise", re.compile(r"slak_dw|slak::", re.IGNORECASE)),  # our kernels live in namespace slak_dw
    ("Inductor-fused reductions (norm statistics, sums)", re.compile(r"^triton_(red|per)_", re.IGNORECASE)),
    ("Inductor-fused point-wise", re.compile(r"^triton_", re.IGNORECASE)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.IGNORECASE)),
    ("batchnorm", re.compile(r"batch_norm|batchnorm|bn_fw|bn_bw|\bbn_", re.IGNORECASE)),  # before conv: cuDNN BN kernels
    ("layernorm", re.compile(r"layer_norm|layernorm", re.IGNORECASE)),
    ("conv (cuDNN)", re.compile(r"conv|cudnn|implicit_gemm|winograd|fprop|dgrad|wgrad", re.IGNORECASE)),
    ("gemm (MLP, head)", re.compile(r"gemm|matmul|addmm|\bmm\b|cutlass|xmma|nvjet|linear", re.IGNORECASE)),
    ("reduction", re.compile(r"reduce|softmax|nll|cross_entropy|sum_", re.IGNORECASE)),
    ("copy / layout", re.compile(r"copy|transpose|permute|contiguous|cat|fill|memset|memcpy", re.IGNORECASE)),
    ("element-wise (GELU, add, mul, ...)", re.compile(r"elementwise|vectorized|unrolled|gelu|add|mul", re.IGNORECASE)),
]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="slak_tiny", help="SLaK variant (timm name)")
    p.add_argument("--baseline", default="convnext_tiny", help="timm model profiled beside it; 'none' to skip")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None, help="default: the variant's input size")
    p.add_argument("--precision", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--modes", default=",".join(_MODES), help=f"comma list of {', '.join(_MODES)}")
    p.add_argument("--optimizers", default="foreach,fused", help="comma list of foreach, fused (AdamW)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 GPU, 1 CPU); "
                   "compiled rows also compile here")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler per row (0 = none)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--gemm-alignment", action="store_true",
                   help="also time each stage's MLP (Linear C->4C->C, fwd + bwd) at the model's width and at the "
                   "width rounded up to a multiple of 8 (tensor-core alignment)")
    p.add_argument("--json", default=None, help="also write rows and environment here")
    return p.parse_args(argv)


def _problems(args: argparse.Namespace, timm: Any) -> list[str]:
    out = []
    for flag, name in (("--variant", args.variant), ("--baseline", args.baseline)):
        if not (flag == "--baseline" and name == "none") and not timm.is_model(name):
            out.append(f"{flag}={name!r}: not a timm model")
    for flag, values, allowed in (("--modes", args.modes, _MODES), ("--optimizers", args.optimizers, _OPTIMIZERS)):
        bad = sorted(set(values.split(",")) - set(allowed) - {""})
        if bad:
            out.append(f"{flag}: {', '.join(bad)} not in {', '.join(allowed)}")
    for flag, value, low in (("--batch", args.batch, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                             ("--profile-steps", args.profile_steps, 0), ("--image-size", args.image_size, 8)):
        if value is not None and value < low:
            out.append(f"{flag}={value}: must be at least {low}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        out.append(f"--device={args.device}: CUDA is not available here; use --device cpu or auto")
    if "fused" in args.optimizers.split(",") and args.device == "cpu" and torch.__version__ < "2.4":
        out.append("--optimizers fused: fused AdamW needs CUDA or torch >= 2.4 on CPU")
    return out


def _step_fn(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             dtype: torch.dtype | None, device: torch.device):
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def step() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _time(step, steps: int, device: torch.device) -> list[float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        out.append(1e3 * (time.perf_counter() - t))
    return out


def categorise(name: str) -> str:
    """The category of one kernel (or, on CPU, one aten op) by its name."""
    for label, pattern in _CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def _breakdown(step, steps: int, device: torch.device) -> dict[str, Any]:
    """GPU time per category per step, idle share and launches, from the profiler's kernel events."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    per_cat: dict[str, float] = defaultdict(float)
    launches = 0
    busy_us = 0.0
    for evt in prof.events():
        if cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            dur = evt.device_time
        else:
            if evt.cpu_parent is not None:  # top-level CPU ops only, so children are not counted twice
                continue
            dur = evt.cpu_time
        per_cat[categorise(evt.name)] += dur / 1e3 / steps
        launches += 1
        busy_us += dur
    gpu_ms = busy_us / 1e3 / steps
    top = sorted(
        ((k.key, k.device_time_total / 1e3 / steps if cuda else k.cpu_time_total / 1e3 / steps, k.count // steps)
         for k in prof.key_averages()),
        key=lambda r: -r[1],
    )[:15]
    return {
        "wall_ms_per_step": wall_ms,
        "busy_ms_per_step": gpu_ms,
        "idle_share": max(0.0, 1 - gpu_ms / wall_ms) if cuda else None,
        "launches_per_step": launches / steps,
        "categories_ms": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
        "top_ops": [{"name": n[:90], "ms_per_step": t, "calls_per_step": c} for n, t, c in top],
    }


def bench(name: str, mode: str, optimizer: str, args: argparse.Namespace, device: torch.device,
          size: int, warmup: int) -> dict[str, Any]:
    """One row: build, (compile,) warm up, time, profile; compiled rows also count graphs and graph breaks."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(device).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if optimizer == "fused" else
                                                             {"foreach": True}))
    if mode != "eager":
        from torch._dynamo.utils import counters

        counters.clear()  # graph and graph-break counts of this row only
    forward = model if mode == "eager" else torch.compile(model, mode=None if mode == "default" else mode)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=gen).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, model.num_classes, (args.batch,), generator=gen).to(device)
    step = _step_fn(forward, opt, x, y, _DTYPES[args.precision], device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    _time(step, max(warmup, 1 if mode == "eager" else 3), device)
    warm_s = time.perf_counter() - t0
    times = _time(step, args.steps, device)
    median = statistics.median(times)
    row: dict[str, Any] = {
        "model": name, "mode": mode, "optimizer": optimizer, "precision": args.precision, "batch": args.batch,
        "image_size": size, "img_s_median": args.batch / (median / 1e3), "step_ms_median": median,
        "step_ms_min": min(times), "step_ms_max": max(times), "warmup_s": warm_s,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if mode != "eager":
        row["graphs"] = int(counters["stats"]["unique_graphs"])
        row["graph_breaks"] = int(sum(counters["graph_break"].values()))
        row["note"] = f"{row['graphs']} graph(s), {row['graph_breaks']} graph break(s)"
    if args.profile_steps:
        row["profile"] = _breakdown(step, args.profile_steps, device)
    return row


def _stage_widths(model: torch.nn.Module) -> list[int]:
    """In-features of each stage's first MLP layer (the stage width), in order, without repeats."""
    out: list[int] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith("mlp.fc1") and module.in_features not in out:
            out.append(module.in_features)
    return out


def gemm_alignment_rows(model_name: str, args: argparse.Namespace, device: torch.device, size: int) -> list[dict]:
    """Time one block's MLP per stage (tokens x C -> 4C -> C, forward and backward under the row's autocast)
    at the stage's own width C and at C rounded up to a multiple of 8.

    SLaK-T's widths (124, 249, 499, 998) give Linear layers of 249/996/499/1996 features; cuBLAS's tensor-core
    GEMMs want 16-byte aligned rows. The gap between the two columns is what padding inside the computation
    could win (the checkpoint's widths cannot change).
    """
    import timm

    with torch.device("meta"):
        widths = _stage_widths(timm.create_model(model_name, pretrained=False))
    dtype = _DTYPES[args.precision]
    rows = []
    for stage, width in enumerate(widths):
        side = size // (4 * 2**stage)
        tokens = args.batch * side * side
        timings = {}
        for label, c in (("own", width), ("aligned", -(-width // 8) * 8)):
            mlp = torch.nn.Sequential(torch.nn.Linear(c, 4 * c), torch.nn.GELU(), torch.nn.Linear(4 * c, c)).to(device)
            x = torch.randn(tokens, c, device=device, requires_grad=True)

            def step(mlp: torch.nn.Module = mlp, x: torch.Tensor = x) -> None:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    y = mlp(x)
                y.float().sum().backward()

            _time(step, 3, device)
            timings[label] = (c, statistics.median(_time(step, max(args.steps, 5), device)))
        (c0, t0), (c1, t1) = timings["own"], timings["aligned"]
        rows.append({"model": model_name, "stage": stage, "tokens": tokens, "width": c0, "aligned_width": c1,
                     "ms_own": t0, "ms_aligned": t1})
    return rows


def render_gemm(rows: list[dict]) -> str:
    out = ["| model | stage | tokens | width -> aligned | MLP fwd+bwd ms (own width) | ms (aligned) | own / aligned |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['stage']} | {r['tokens']} | {r['width']} -> {r['aligned_width']} | "
            f"{r['ms_own']:.2f} | {r['ms_aligned']:.2f} | {r['ms_own'] / max(r['ms_aligned'], 1e-9):.2f}x |"
            for r in rows]
    return "\n".join(out)


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render(rows: list[dict[str, Any]]) -> str:
    """The timing table, then one breakdown table per profiled row."""
    out = [("| model | mode | optimizer | img/s (median) | step ms median / min / max | warm-up (incl. compile) s "
           "| peak GiB | note |"), "|" + "---|" * 8]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['mode']} | {r['optimizer']} | {_fmt(r.get('img_s_median'), 0)} | "
            f"{_fmt(r.get('step_ms_median'))} / {_fmt(r.get('step_ms_min'))} / {_fmt(r.get('step_ms_max'))} | "
            f"{_fmt(r.get('warmup_s'))} | {_fmt(r.get('peak_gib'), 2)} | {r.get('note', '')} |"
        )
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        out += ["", (f"**{r['model']}, {r['mode']}, {r['optimizer']} AdamW**: {prof['wall_ms_per_step']:.1f} ms "
                f"per profiled step, kernels {prof['busy_ms_per_step']:.1f} ms, GPU idle "
                f"{_fmt(None if prof['idle_share'] is None else 100 * prof['idle_share'])} %, "
                f"{prof['launches_per_step']:.0f} kernels per step"), "",
                "| category | ms per step | share of kernel time |", "|---|---|---|"]
        for cat, ms in prof["categories_ms"].items():
            out.append(f"| {cat} | {ms:.2f} | {100 * ms / max(prof['busy_ms_per_step'], 1e-9):.1f} % |")
        out += ["", "| top op / kernel | ms per step | calls per step |", "|---|---|---|"]
        out += [f"| `{t['name']}` | {t['ms_per_step']:.2f} | {t['calls_per_step']} |" for t in prof["top_ops"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import timm

    args = _parse(argv)
    problems = _problems(args, timm)
    if problems:
        print("error: " + "\n  - ".join(["invalid arguments:", *problems]), file=sys.stderr)
        return 2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        kernels.active_backend(device)  # build/load the extension before anything is timed
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    size = args.image_size or timm.create_model(args.variant, pretrained=False).pretrained_cfg["input_size"][-1]
    names = [args.variant] + ([] if args.baseline == "none" else [args.baseline])
    rows = []
    for name in names:
        for mode in args.modes.split(","):
            for optimizer in args.optimizers.split(","):
                try:
                    row = bench(name, mode, optimizer, args, device, size, warmup)
                except Exception as e:  # noqa: BLE001 - a failing mode is a row, the others still run
                    row = {"model": name, "mode": mode, "optimizer": optimizer,
                           "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
                finally:
                    torch._dynamo.reset()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                # Each row whole (timing and breakdown) as soon as it is measured, and the JSON so far: a run
                # stopped by a time limit keeps every finished row.
                print(render([row]), "\n", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    env = {**environment.describe(device), "timm": timm.__version__, "kernel_backend": kernels.active_backend(device)}
    print(f"\n{environment.summary_line(env)} | timm {env['timm']} | depthwise backend {env['kernel_backend']} | "
          f"{args.precision}, batch {args.batch}, {size} px, channels_last={args.channels_last}\n")
    print(render(rows))
    gemm = gemm_alignment_rows(args.variant, args, device, size) if args.gemm_alignment else []
    if gemm:
        print("\n" + render_gemm(gemm))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows,
                                               "gemm_alignment": gemm}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
