"""Effective receptive field of one model: the area ratios r of Table 10 beside the paper's, and a heat-map.

    python experiments/erf.py --model slak_tiny --checkpoint SLaK_tiny.pth --data /data/imagenet/val
    python experiments/erf.py --model resnet101.tv_in1k --pretrained --data /data/imagenet/val
    python experiments/erf.py --model slak_tiny model.kernel_mode=replknet model.stage_kernels=[31,29,27,13] \\
        model.width_factor=1.0 --checkpoint convnext_31.pth --data /data/imagenet/val     # "ConvNeXt-T (RepLKNet)"
    python experiments/erf.py --benchmark --model slak_tiny          # time per image at 1024 px on CUDA

Every model measured into the same ``--out`` folder (default ``erf_results``) joins its ``erf_table.md`` /
``erf_table.csv``; ``--tracking-uri`` also logs the run, the table and the maps to MLflow. See docs/erf.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator import erf
from orchestrator.config import ConfigError
from slak_model import CheckpointMismatchError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="model.* settings of a SLaK variant (e.g. model.stage_kernels=[31,29,27,13]) and "
                        "tracking.experiment / tracking.offline_dir")
    p.add_argument("--model", required=True, help="a SLaK variant (slak_tiny, slak_small, slak_base, slak_test) or a "
                   "timm model (resnet101, resnet152, convnext_tiny, with an optional .tag)")
    weights = p.add_argument_group("weights (one of)")
    weights.add_argument("--checkpoint", default=None, help="weights file (released SLaK checkpoints, timm/torchvision "
                         "state dicts)")
    weights.add_argument("--pretrained", action="store_true", help="timm's own weights for a timm model (downloads)")
    weights.add_argument("--random-init", action="store_true", help="measure the untrained network")
    p.add_argument("--data", default=None, help="folder of images: the ImageNet val/ folder (class subfolders) or a "
                   "flat folder; the first --images in sorted order are used")
    p.add_argument("--images", type=int, default=50, help="images averaged (default 50, as in the paper)")
    p.add_argument("--size", type=int, default=1024, help="input side in px (default 1024, as in the paper)")
    p.add_argument("--batch", type=int, default=8, help="images per pass (default 8; halved on a GPU out of memory)")
    p.add_argument("--precision", default=None, help="fp32 (default) or bf16 (faster, may move r by 0.1 point); "
                   "the benchmark times both unless one is given")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default min(4, CPUs))")
    p.add_argument("--out", default=None, help="output folder (default erf_results)")
    p.add_argument("--name", default=None, help="this model's row and file names (default: the model's name)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI; with it the run, table and maps are logged")
    p.add_argument("--benchmark", action="store_true", help="time the measurement per image and precision instead "
                   "(random images without --data, random weights without --checkpoint); prints only")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if args.benchmark and args.device == "auto" and not erf.cuda_available():
        print("skipped: no CUDA device here; the benchmark times the GPU (pass --device cpu to time the CPU)")
        return 0
    try:
        settings = erf.make_settings(
            args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, random_init=args.random_init,
            data=args.data, images=args.images, size=args.size, batch_size=args.batch, precision=args.precision,
            device=args.device, workers=args.workers, out=args.out, name=args.name, tracking_uri=args.tracking_uri,
            overrides=args.overrides, benchmark=args.benchmark)
        if args.benchmark:
            print(erf.benchmark_text(settings, *erf.run_benchmark(settings)))
            return 0
        result = erf.run_erf(settings)
    except (ConfigError, erf.ErfError, CheckpointMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.markdown)
    print(f"files: {', '.join(str(p) for p in result.files)}")
    if result.run_id:
        from orchestrator import tracking

        print(f"MLflow run {result.run_id} in experiment {settings.tracking.experiment!r}: "
              f"{tracking.mlflow_ui_command(settings.tracking.uri, settings.tracking.experiment)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
