"""Where the training loop's time goes beside the model's own step: one process, one device, no Ray.

The *bare step* is forward, backward and AdamW on one batch already on the device (what
``throughput.py`` times). The loop rows run :class:`orchestrator.loop.Trainer` one epoch at a time on the
loaders the Ray workers build (``orchestrator.data``), with the config's mixup, EMA, sparsity engine and
precision; the attribution rows switch one thing off each. Every row is wall-clock img/s over whole
epochs after a warm-up epoch, the median of ``--repeats`` epochs, and its ratio to the bare step.

    python experiments/loop_overhead.py --config experiments/configs/paper_slak_tiny_120ep.yaml \\
        data.source=synthetic train.precision=bf16                      # SLaK-T, H100
    python experiments/loop_overhead.py data.source=synthetic --steps 4 --repeats 1   # CPU smoke

``train.py`` on the same config reports ``perf/img_per_s`` measured the same way (the loop's steps,
loading and per-step hooks included) through Ray Train; compare it with the rows here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kernels import environment
from orchestrator import data  # data first: installs the torchvision guard before timm
from orchestrator.config.loading import load_config, parse_overrides, replace
from orchestrator.config.schema import ExperimentConfig
from orchestrator.loop import Trainer, build_model, param_groups

#: The attribution rows: ``--rows`` name, row label, config change, ``loop_rate`` keywords.
_ATTRIBUTION: dict[str, tuple[str, dict[str, Any], dict[str, bool]]] = {
    "pipeline": ("  without the input pipeline (batches kept on the device)", {}, {"device_batches": True}),
    "ema": ("  without the EMA", {"train.ema": False}, {}),
    "sparsity": ("  without dynamic sparsity", {"sparse.enabled": False}, {}),
    "mixup": ("  without mixup/cutmix", {"data.mixup": 0.0, "data.cutmix": 0.0}, {}),
    "hooks": ("  without the per-step hooks", {}, {"with_hooks": False}),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML preset (default: the library defaults)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per timed epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per row (median)")
    p.add_argument("--rows", default="all", help="'all', or the attribution rows to run after the bare step and the "
                   f"configured loop, comma-separated, from: {', '.join(_ATTRIBUTION)}")
    p.add_argument("--json", default=None, help="also write the rows and the environment here")
    p.add_argument("overrides", nargs="*", help="dotted key=value settings")
    return p.parse_intermixed_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(cfg: ExperimentConfig, device: torch.device, steps: int, repeats: int) -> float:
    """img/s of forward + backward + AdamW on one device-resident batch, timed like the loop rows."""
    model = build_model(cfg).to(device)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    batch = cfg.micro_batch_size
    x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    y = torch.randint(0, cfg.data.num_classes, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")

    def epoch() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            for _ in range(cfg.accumulation_steps):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                scaler.scale(loss / cfg.accumulation_steps).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return steps * cfg.accumulation_steps * batch / (time.perf_counter() - t0)

    epoch()
    return statistics.median(epoch() for _ in range(repeats))


class _DeviceBatches:
    """The loader's first batches, kept on the device and replayed (the 'no input pipeline' row)."""

    def __init__(self, loader: Any, device: torch.device, n: int) -> None:
        it = iter(loader)
        self.batches = [tuple(t.to(device) for t in next(it)) for _ in range(n)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return iter(self.batches)


def loop_rate(cfg: ExperimentConfig, device: torch.device, steps: int, repeats: int, *,
              device_batches: bool = False, with_hooks: bool = True) -> float:
    """img/s of ``Trainer.train_one_epoch`` over the workers' loaders (one worker), median of ``repeats``."""
    bundle = data.build_datasets(cfg.data, seed=cfg.train.seed)
    train_loader, _ = data.build_loaders(bundle, cfg, rank=0, world_size=1, micro_batch_size=cfg.micro_batch_size,
                                         seed=cfg.train.seed, device=device)
    available = len(train_loader) // cfg.accumulation_steps
    if available < steps:
        raise SystemExit(f"data.train_size={cfg.data.train_size} gives {available} optimizer steps per epoch, "
                         f"fewer than --steps {steps}; raise data.train_size")
    trainer = Trainer(cfg, steps_per_epoch=steps, num_classes=bundle.num_classes, device=device,
                      mixup=data.build_mixup(cfg.data, bundle.num_classes))
    trainer.initialize_sparsity(next(iter(train_loader)))
    loader = _DeviceBatches(train_loader, device, steps * cfg.accumulation_steps) if device_batches else train_loader
    log_every = cfg.tracking.log_every_steps

    def hook(t: Trainer, metrics: dict[str, float]) -> None:  # the worker's per-step logging work
        if t.step % log_every == 0:
            json.dumps({"train/loss": metrics["train/loss"], "train/lr": metrics["train/lr"]})

    rates = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        trainer.train_one_epoch(loader, hook if with_hooks else None)
        _sync(device)
        rate = steps * cfg.accumulation_steps * cfg.micro_batch_size / (time.perf_counter() - t0)
        trainer.end_epoch()
        if i:  # the first epoch warms up the loader workers, cuDNN and the allocator
            rates.append(rate)
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    chosen = list(_ATTRIBUTION) if args.rows == "all" else [r for r in args.rows.split(",") if r]
    unknown = sorted(set(chosen) - set(_ATTRIBUTION))
    if unknown:
        print(f"error: --rows {', '.join(unknown)}: not one of all, {', '.join(_ATTRIBUTION)}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    overrides = {"run.num_workers": 1, "run.use_gpu": device.type == "cuda", "train.epochs": 1000,
                 **parse_overrides(args.overrides)}
    cfg = load_config(args.config, overrides)
    rows: list[tuple[str, float]] = [("bare step (batch on the device, fwd + bwd + AdamW)",
                                      bare_step(cfg, device, args.steps, args.repeats))]
    variants: list[tuple[str, ExperimentConfig, dict[str, bool]]] = [
        ("loop as configured (loaders, mixup, EMA, sparsity, hooks)", cfg, {}),
        *((label, replace(cfg, change) if change else cfg, kw) for name, (label, change, kw) in _ATTRIBUTION.items()
          if name in chosen),
    ]
    for name, variant, kw in variants:
        rows.append((name, loop_rate(variant, device, args.steps, args.repeats, **kw)))
    bare = rows[0][1]
    env = environment.describe(device)
    print(f"{cfg.model.variant}, micro batch {cfg.micro_batch_size} x {cfg.accumulation_steps}, "
          f"{cfg.data.image_size} px, {cfg.train.precision}, data.source={cfg.data.source}, "
          f"data.workers={cfg.data.workers}, {args.steps} steps x {args.repeats} epochs (median)")
    print(environment.summary_line(env))
    print("\n| row | img/s | of the bare step |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {100 * rate / bare:.1f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [{"row": n, "img_s": r} for n, r in rows],
                                               "config": cfg.to_flat(), "environment": env}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
