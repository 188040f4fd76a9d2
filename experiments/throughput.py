"""Training and inference throughput of a SLaK variant per kernel backend and precision (Tables 11/12).

Synthetic tensors already on the device, so the numbers measure the model, not the input pipeline;
timm's ``convnext_tiny`` runs in the same process as the baseline. Each row: median step time over
the timed steps (CUDA events on GPU), img/s from that median and from the wall clock, and peak
allocated memory. A separate row times the real input pipeline: the timm train transform decoding
JPEGs (256-500 px) through a DataLoader, reported per CPU worker.

    python experiments/throughput.py --variant slak_test --batch 8 --steps 3          # CPU smoke
    python experiments/throughput.py --device cuda --variant slak_tiny --json out.json  # H100: SLaK-T
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import kernels
from kernels import environment
from orchestrator import data  # installs the torchvision guard before timm, registers the SLaK variants
from orchestrator.config.schema import DataConfig

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="slak_tiny", help="SLaK variant (timm name)")
    p.add_argument("--baseline", default="convnext_tiny", help="timm model run beside it; 'none' to skip")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=64, help="training batch (the reference uses 64)")
    p.add_argument("--infer-batch", type=int, default=None, help="inference batch (default 2x --batch)")
    p.add_argument("--image-size", type=int, default=None, help="default: the variant's input size")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 5 on GPU, 1 on CPU)"
    )
    p.add_argument("--backends", default="available", help="comma list of cuda,numba,torch or 'available'")
    p.add_argument(
        "--precisions", default=None, help="comma list of fp32,bf16,fp16 (default: GPU fp32,bf16; CPU fp32)"
    )
    p.add_argument(
        "--modes",
        default="train,infer,deploy",
        help="comma list of train, infer (eval forward) and deploy (eval forward after "
        "merge_for_inference: BNs and the small kernel folded, two depthwise convs per block)",
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--jpegs", type=int, default=256, help="JPEGs for the input-pipeline row (0 = skip)")
    p.add_argument("--jpeg-workers", type=int, default=1, help="DataLoader workers for the pipeline row")
    p.add_argument("--json", default=None, help="also write rows and environment here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- timing
class _Timer:
    """Per-step wall time; CUDA events on GPU so asynchronous launches are counted where they run."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], None], steps: int) -> tuple[list[float], float]:
        if self.cuda:
            torch.cuda.synchronize()
            events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(steps)
            ]
            t0 = time.perf_counter()
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in events], time.perf_counter() - t0
        out, t0 = [], time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t))
        return out, time.perf_counter() - t0


def _bench_model(
    name: str,
    model: torch.nn.Module,
    *,
    mode: str,
    precision: str,
    batch: int,
    size: int,
    device: torch.device,
    steps: int,
    warmup: int,
    channels_last: bool,
) -> dict[str, Any]:
    """One row: ``mode`` is "train" (fwd + bwd + AdamW step), else an inference_mode forward."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = _DTYPES[precision]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

        def step() -> None:
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                model(x)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    timer = _Timer(device)
    timer.time(step, warmup)
    times, wall = timer.time(step, steps)
    median = statistics.median(times)
    return {
        "model": name,
        "mode": mode,
        "precision": precision,
        "batch": batch,
        "image_size": size,
        "img_s_median": batch / (median / 1e3),
        "img_s_wall": batch * steps / wall,
        "step_ms_median": median,
        "step_ms_min": min(times),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


# ---------------------------------------------------------------------- input pipeline
def _write_jpegs(root: Path, n: int, classes: int = 8, seed: int = 0) -> None:
    """Photo-like JPEGs: smooth colour fields plus grain, 256-500 px per side, quality 90."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(v) for v in rng.integers(256, 501, size=2))
        coarse = rng.integers(0, 256, (rng.integers(4, 12), rng.integers(4, 12), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        for split in ("train", "val"):
            if split == "val" and i >= classes:
                continue
            d = root / split / f"c{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=90)


def bench_pipeline(n: int, workers: int, image_size: int = 224, batch: int = 32) -> dict[str, Any]:
    """Decoded + augmented img/s of the timm train transform (RandAugment; uint8 out, as the training loaders
    get it: normalisation and erasing run in their prefetcher on the device) per loader worker."""
    with tempfile.TemporaryDirectory(prefix="slak-jpegs-") as tmp:
        _write_jpegs(Path(tmp), n)
        cfg = DataConfig(source="imagenet", path=tmp, image_size=image_size)
        bundle = data.build_datasets(cfg, seed=0)
        loader = DataLoader(
            bundle.train,
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=False,
        )
        for _ in loader:  # warm-up pass: worker start, lazy imports, page cache
            pass
        t0 = time.perf_counter()
        seen = sum(len(b[1]) for b in loader)
        wall = time.perf_counter() - t0
    rate = seen / wall
    return {
        "model": "timm train transform (JPEG decode + RandAugment, uint8 out)",
        "mode": "pipeline",
        "precision": "-",
        "batch": batch,
        "image_size": image_size,
        "img_s_wall": rate,
        "img_s_per_worker": rate / max(workers, 1),
        "workers": workers,
        "images": seen,
    }


# ---------------------------------------------------------------------- driver
def _environment(device: torch.device) -> dict[str, Any]:
    import timm

    return {**environment.describe(device), "timm": timm.__version__}


def _backends(spec: str, device: torch.device) -> list[tuple[str, str]]:
    """(backend, reason-if-unavailable) for each requested backend."""
    report = {r["backend"]: r for r in kernels.backend_report(device, build=True) if r["backend"] != "error"}
    names = list(report) if spec == "available" else [s.strip() for s in spec.split(",") if s.strip()]
    out = []
    for name in names:
        row = report.get(name)
        if row is None:
            raise SystemExit(f"--backends: {name!r} is not a backend; choose from {', '.join(report)}")
        if row["available"] or spec != "available":
            out.append((name, "" if row["available"] else str(row["reason"])))
    return out


def _fmt(v: Any, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _rate(v: float | None) -> str:
    """Whole img/s on a GPU, one decimal for the slow CPU rows."""
    return _fmt(v, 0 if v is None or v >= 100 else 1)


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table printed at the end (and pasted into experiments/RESULTS.md)."""
    head = (
        "| model | backend | precision | mode | batch | img/s (median) | img/s (wall) | step ms | peak GiB "
        "| note |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r.get('backend', '-')} | {r['precision']} | {r['mode']} | {r['batch']} | "
            f"{_rate(r.get('img_s_median'))} | {_rate(r.get('img_s_wall'))} | "
            f"{_fmt(r.get('step_ms_median'), 1)} | {_fmt(r.get('peak_gib'), 2)} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def _problems(args: argparse.Namespace, timm: Any) -> list[str]:
    """Every bad argument at once, before any model is built or timed."""
    out = []
    for flag, name in (("--variant", args.variant), ("--baseline", args.baseline)):
        if not (flag == "--baseline" and name == "none") and not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
            out.append(f"{flag}={name!r}: not a timm model" + (f" (similar: {', '.join(close)})" if close else ""))
    for flag, values, allowed in (("--precisions", args.precisions, _DTYPES),
                                  ("--modes", args.modes, ("train", "infer", "deploy"))):
        bad = sorted(set((values or "").split(",")) - set(allowed) - {""})
        if bad:
            out.append(f"{flag}: {', '.join(bad)} not in {', '.join(allowed)}")
    for flag, value in (("--batch", args.batch), ("--steps", args.steps), ("--infer-batch", args.infer_batch),
                        ("--warmup", args.warmup), ("--image-size", args.image_size)):
        if value is not None and value < (0 if flag == "--warmup" else 1):
            out.append(f"{flag}={value}: must be at least {0 if flag == '--warmup' else 1}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        out.append(f"--device={args.device}: CUDA is not available here; use --device cpu or auto")
    elif args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        out.append(f"--device={args.device!r}: use auto, cpu, cuda or cuda:N")
    return out


def main(argv: list[str] | None = None) -> int:
    import timm  # after ``orchestrator`` (torchvision guard) and ``slak_model`` (variant registry)

    args = _parse(argv)
    problems = _problems(args, timm)
    if problems:
        print("error: " + "\n  - ".join(["invalid arguments:", *problems]), file=sys.stderr)
        return 2
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    precisions = (args.precisions or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    modes = args.modes.split(",")
    size = (
        args.image_size or timm.create_model(args.variant, pretrained=False).pretrained_cfg["input_size"][-1]
    )
    infer_batch = args.infer_batch or 2 * args.batch
    batches = {"train": args.batch, "infer": infer_batch, "deploy": infer_batch}
    models: list[tuple[str, str, str]] = [
        (args.variant, b, why) for b, why in _backends(args.backends, device)
    ]
    if args.baseline != "none":
        models.append((args.baseline, "-", ""))
    rows: list[dict[str, Any]] = []
    for name, backend, why in models:
        for precision in precisions:
            for mode in modes:
                base = {
                    "model": name,
                    "backend": backend,
                    "precision": precision,
                    "mode": mode,
                    "batch": batches[mode],
                }
                if why:
                    rows.append({**base, "note": f"skipped: {why}"})
                    continue
                try:
                    with kernels.use_backend(None if backend == "-" else backend):
                        model = timm.create_model(name, pretrained=False).to(device)
                        if mode == "deploy":
                            if not hasattr(model, "merge_for_inference"):
                                continue  # baselines have nothing to fold: their infer row is theirs
                            model.merge_for_inference()
                        if args.channels_last:
                            model = model.to(memory_format=torch.channels_last)
                        row = _bench_model(
                            name,
                            model,
                            mode=mode,
                            precision=precision,
                            batch=batches[mode],
                            size=size,
                            device=device,
                            steps=args.steps,
                            warmup=warmup,
                            channels_last=args.channels_last,
                        )
                        row["backend"] = backend
                        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
                except (torch.cuda.OutOfMemoryError, kernels.BackendUnavailableError, RuntimeError) as e:
                    row = {**base, "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"}
                finally:
                    model = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(markdown([row]).splitlines()[-1], flush=True)
    if args.jpegs > 0:
        rows.append(bench_pipeline(args.jpegs, args.jpeg_workers))
    env = _environment(device)
    print(
        f"\n{env['date_utc']}  {env['device']}  torch {env['torch']}  timm {env['timm']}  "
        f"commit {env['git_commit']}  channels_last={args.channels_last}\n"
    )
    print(markdown(rows))
    pipe = [r for r in rows if r["mode"] == "pipeline"]
    for r in pipe:
        print(
            f"\ninput pipeline: {r['img_s_per_worker']:.1f} decoded+augmented img/s per CPU worker "
            f"({r['workers']} worker(s), {r['images']} JPEGs 256-500 px -> {r['image_size']} px)"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
