"""Which layers does the SNIP init leave (nearly) empty at each Table 8 point of a preset?

    python experiments/sparsity_collapse.py                       # SLaK-T at 224 px, the paper's recipe
    python experiments/sparsity_collapse.py sparse.min_density=0.05
    python experiments/sparsity_collapse.py --config experiments/configs/paper_slak_small_300ep.yaml
    python experiments/sparsity_collapse.py --embedded sparse.min_density=0  # the laptop default, no floor

For each (sparsity, width) point the preset's model is built on the CPU with its own initialisation,
SNIP scores one batch of random images with random labels (the mechanism does not need real data: the
block branches' layer scale of 1e-6 keeps their |w * grad| far below the stem, downsample and head
layers'), and the engine allocates the per-layer densities exactly as a training run would. Printed: per
point, the density of each stage, how many targeted layers are collapsed (no active weight) or below
``--nearly`` (default 1 %), the emptiest layer, then those layers grouped by their place in a block.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict

from orchestrator import cli
from orchestrator.config.loading import load_config, replace
from orchestrator.config.validation import ConfigError

DEFAULT_CONFIG = "experiments/configs/paper_slak_tiny_120ep.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                      f"YAML preset (default {DEFAULT_CONFIG})")
    parser.add_argument("--embedded", action="store_true", help="measure the embedded laptop default of the grid "
                        "scripts (slak_test at 32 px) instead of a preset")
    parser.add_argument("--batch", type=int, default=2, help="images in the SNIP batch (default 2)")
    parser.add_argument("--nearly", type=float, default=0.01, help="density under which a layer counts as "
                        "nearly empty (default 0.01)")
    parser.add_argument("--rows", default=None, help="comma-separated Table 8 rows to measure, e.g. 0.40/1.3x "
                        "(default all)")
    return parser.parse_args(argv)


def _pattern(name: str) -> str:
    """A layer's place in its stage, block index folded: ``stages.2.blocks.*.large_kernel.tall``."""
    return re.sub(r"blocks\.\d+", "blocks.*", name).removesuffix(".weight").removesuffix(".conv")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.embedded and args.config:
        print("error: --embedded and --config exclude each other: pick the laptop default or a preset", file=sys.stderr)
        return 2
    source = "the embedded default" if args.embedded else f"preset {args.config or DEFAULT_CONFIG}"
    try:
        if args.embedded:
            base = load_config(None, cli.overrides_from_args(args, cli.LAPTOP_DEFAULTS))
        else:
            base = load_config(args.config or DEFAULT_CONFIG, cli.overrides_from_args(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch
    import torch.nn.functional as F

    from orchestrator import loop, search_space
    from slak_model.sparsity import DynamicSparsity

    points = search_space.sparsity_width_grid(base)
    if args.rows:
        wanted = set(args.rows.split(","))
        points = [p for p in points if p.row in wanted]
    size = base.data.image_size
    classes = base.data.num_classes
    print(f"{source}: {base.model.variant} at {size} px, init={base.sparse.init}, "
          f"targets={base.sparse.targets}, min_density={base.sparse.min_density:g}; SNIP on {args.batch} random "
          f"images; nearly empty = density < {args.nearly:g}\n")
    print("| point | density | stem | stages.0 | stages.1 | stages.2 | stages.3 | head | collapsed | nearly empty "
          "| emptiest layer | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    details: dict[str, dict[str, list[int]]] = {}
    for point in points:
        started = time.perf_counter()
        cfg = replace(base, dict(point.overrides))
        loop.seed_everything(cfg.train.seed)
        model = loop.build_model(cfg, classes)
        model.train()
        g = torch.Generator().manual_seed(cfg.train.seed)
        batch = (torch.randn(args.batch, 3, size, size, generator=g),
                 torch.randint(0, classes, (args.batch,), generator=g))
        engine = DynamicSparsity(model, cfg.sparse.engine_config(cfg.sparse_seed), total_steps=1)
        engine.initialize(batch=batch, loss_fn=F.cross_entropy)
        densities = engine.layer_densities()
        stats = engine.stats()
        nearly = [n for n, d in densities.items() if d < args.nearly]
        emptiest = min(densities, key=densities.get)
        groups = [stats.get(f"sparsity/density/{g}") for g in ("stem", "stages.0", "stages.1", "stages.2",
                                                                 "stages.3", "head")]
        cells = " | ".join("-" if v is None else f"{v:.3f}" for v in groups)
        print(f"| {point.row} | {engine.density():.3f} | {cells} | {len(engine.collapsed_layers())} / "
              f"{len(densities)} | {len(nearly)} | {emptiest.removesuffix('.weight')} ({densities[emptiest]:.4f}) | "
              f"{time.perf_counter() - started:.0f} |", flush=True)
        per: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # collapsed, nearly empty, layers
        for name, d in densities.items():
            counts = per[_pattern(name)]
            counts[0] += d == 0.0
            counts[1] += d < args.nearly
            counts[2] += 1
        details[point.row] = {k: v for k, v in per.items() if v[1]}
        del model, engine
    print(f"\nlayers below {args.nearly:g} (collapsed / nearly empty / layers of that kind):")
    for row, per in details.items():
        text = "; ".join(f"{k} {c}/{n}/{t}" for k, (c, n, t) in sorted(per.items())) or "none"
        print(f"- {row}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
