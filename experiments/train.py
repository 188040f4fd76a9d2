"""Train one model (a SLaK variant, or a timm student distilled from a teacher) as a Ray Train DDP job, in MLflow.

    python experiments/train.py --config experiments/configs/smoke.yaml
    python experiments/train.py --config experiments/configs/paper_slak_tiny_300ep.yaml --address auto \\
        --tracking-uri http://HOST:5000 data.path=/data/imagenet run.storage_path=/shared/ray_results
    python experiments/train.py --config experiments/configs/distill_slak_tiny_to_convnext_tiny.yaml \
        data.path=/data/imagenet distill.teacher_checkpoint=/checkpoints/SLaK_tiny_checkpoint.pth

Every setting is a dotted ``key=value`` override of the config (``train.epochs=10 sparse.sparsity=0.5``).
Running the same command again continues the same run (``run.name``, default derived from the config)
from its last checkpoint. The config is validated before Ray starts; a bad one exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from orchestrator import cli
from orchestrator.config.loading import load_config
from orchestrator.config.validation import ConfigError

_SHOWN = ("epochs_done", "train/loss", "train/loss_ce", "train/loss_kd", "teacher/top1", "val/top1", "val/top5", "ema/top1", "ema/top5", "sparsity/density",
          "sparsity/itop_rate", "sparsity/collapsed_layers", "perf/img_per_s", "data/skipped_images")

#: Sections a single training run does not read.
_UNUSED_SECTIONS = {"tune": "experiments/train.py runs one training job; tune.* configure the grid scripts "
                            "(experiments/tune_*.py); drop it"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_common_arguments(parser, "YAML preset, e.g. experiments/configs/smoke.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, cli.overrides_from_args(args), unused_sections=_UNUSED_SECTIONS)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from orchestrator import ray_train  # after validation: a bad config never waits for Ray
    from orchestrator.preflight import PreflightError
    from orchestrator.ray_cluster import ClusterError, ResourceError
    from orchestrator.run_identity import RunConfigMismatchError

    name = ray_train.run_name_for(cfg)
    try:
        result = ray_train.run_training(cfg, address=args.address)
    except (PreflightError, ResourceError, ClusterError, RunConfigMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: running the same command again continues run {name!r} from its last "
              "checkpoint", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - Ray's TrainingFailedError and anything after the job started
        print(f"\nerror: training run {name!r} failed for good ({cfg.run.max_failures} retries allowed by "
              f"run.max_failures): {ray_train.failure_summary(err)}", file=sys.stderr)
        print(f"Its checkpoints stay under {cfg.run.storage_path}/{name}: running the same command again resumes "
              "from the last one.", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    print(f"\nrun {name!r} finished; checkpoints under {result.path}")
    print("| metric | value |\n|---|---|")
    for key in _SHOWN:
        if key in metrics:
            print(f"| {key} | {metrics[key]:.4g} |")
    if metrics.get("sparsity/collapsed_layers"):
        print(f"\nwarning: {int(metrics['sparsity/collapsed_layers'])} sparse layer(s) collapsed (density at or below "
              f"sparse.collapse_threshold={cfg.sparse.collapse_threshold:g}); their names are in the run's tag "
              "slak.collapsed_layers and the log. Set sparse.min_density (e.g. 0.05) to keep a floor in every layer")
    if cfg.tracking.enabled:
        from orchestrator import tracking

        uri = cfg.tracking.uri
        print(f"\nMLflow experiment {cfg.tracking.experiment!r}: {tracking.mlflow_ui_command(uri, cfg.tracking.experiment)}")
        pending = tracking.pending_offline(cfg.tracking.offline_dir)
        if pending:
            print(f"{pending} tracking event(s) could not reach {uri} and are kept offline in "
                  f"{cfg.tracking.offline_dir}; send them when the server is up with:\n  "
                  f"{tracking.sync_command(cfg.tracking.offline_dir, uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
