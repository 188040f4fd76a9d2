"""Evaluate a checkpoint (ours or the paper's released weights) on the validation split, on Ray, in MLflow.

    python experiments/evaluate.py --config experiments/configs/paper_slak_tiny_300ep.yaml \\
        --checkpoint SLaK_tiny_checkpoint.pth data.path=/data/imagenet run.num_workers=8 [--address auto]
    python experiments/evaluate.py --checkpoint ray_results/RUN/epoch_0002     # our own: no preset needed

Top-1/top-5 of the weights and, when the file holds them, of its EMA weights, with the eval transform the
checkpoint was trained with (its resolution, crop and interpolation, unless overridden), data-parallel
over ``run.num_workers`` workers. The MLflow run carries the checkpoint's SHA-256 and the paper's number
for its variant and resolution. A checkpoint of another architecture is refused before Ray starts.
Exit status 2: bad config, unreadable file or mismatch; 1: the job failed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator import cli
from orchestrator.config.loading import load_config
from orchestrator.config.validation import ConfigError

#: Sections an evaluation does not read (``sparse.*`` and ``finetune.*`` of a training preset describe how the
#: weights were made, so only the command line's are reported: ``evaluation.unused_overrides``).
_UNUSED_SECTIONS = {
    "tune": "experiments/evaluate.py evaluates one checkpoint; tune.* configure the grid scripts; drop it",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_common_arguments(parser, "YAML preset the checkpoint's model was trained with, e.g. "
                             "experiments/configs/paper_slak_tiny_300ep.yaml (optional for our own checkpoints)")
    parser.add_argument("--checkpoint", required=True, help="our checkpoint folder (RUN/epoch_NNNN), its state.pt, "
                        "or a released .pth file (`model`/`model_ema` keys, `module.` prefixes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from orchestrator import evaluation
    from orchestrator.weights import read_weights

    try:
        contents = read_weights(args.checkpoint)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, cli.overrides_from_args(args),
                          defaults=evaluation.checkpoint_defaults(contents), unused_sections=_UNUSED_SECTIONS)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    overrides = cli.overrides_from_args(args)
    for line in evaluation.transform_differences(cfg, contents) + evaluation.unused_overrides(set(overrides)):
        logging.getLogger("orchestrator.config").warning("%s", line)
    from orchestrator import ray_train  # after validation: a bad config or file never waits for Ray
    from orchestrator.preflight import PreflightError
    from orchestrator.ray_cluster import ResourceError

    try:
        metrics, plan = ray_train.run_evaluation(cfg, contents, address=args.address)
    except (PreflightError, ResourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - Ray's TrainingFailedError and anything after the job started
        print(f"\nerror: the evaluation failed: {ray_train.failure_summary(err)}", file=sys.stderr)
        return 1
    print(f"\nevaluation {plan.run_name!r} of {plan.path} (sha256 {plan.sha256[:12]}, {plan.layout} layout)")
    print("| metric | value |\n|---|---|")
    for key in ("val/top1", "val/top5", "val/loss", "ema/top1", "ema/top5", "ema/loss", "eval/images"):
        if key in metrics:
            print(f"| {key} | {metrics[key]:.4g} |")
    if plan.published is not None:
        print(f"paper: {evaluation.published_label(plan.published)}")
    if cfg.tracking.enabled:
        from orchestrator import tracking

        print(f"\nMLflow experiment {cfg.tracking.experiment!r}: "
              f"{tracking.mlflow_ui_command(cfg.tracking.uri, cfg.tracking.experiment)}")
        print("every evaluation beside the paper: python experiments/collate_tables.py --evaluations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
