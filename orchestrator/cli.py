"""The command line every entry script shares: the same flags, the laptop default of the grid scripts, and
what a grid script prints at the end. No Ray here: a bad config is reported before Ray is imported."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from orchestrator.config.loading import load_config, parse_overrides
from orchestrator.config.schema import ExperimentConfig

if TYPE_CHECKING:
    from orchestrator.tune_runner import ExperimentOutcome

__all__ = ["LAPTOP_DEFAULTS", "add_common_arguments", "grid_parser", "overrides_from_args", "run_grid",
           "summary_text"]

#: The embedded laptop default (no ``--config``): the paper's recipe, shrunk to learn something on
#: 1,024 procedural 32 px images in ~10 epochs on 2 cores. Heavy regularisation (RandAugment, mixup,
#: cutmix, random erasing) and a 0.9999 EMA would keep a run this short at chance level, and topology
#: updates every 100 steps would never fire in 320 steps. One worker per trial: the trial trains in its
#: reused Tune actor (no Ray Train job to start, ~35 s of each trial on 2 cores), and a 2-core machine
#: runs two trials at once. Its models are tiny (a few MB on a GPU), so on a GPU machine up to 16 trials
#: share each GPU, as many as the CPUs and the GPU's memory hold (one GiB per trial process): on a
#: 16-core H100 box all 15 trials run at once; on CPUs that setting is unused. Three seeds per row give
#: each row a 95 % interval. ``--config`` presets replace all of this; ``key=value`` overrides still win.
LAPTOP_DEFAULTS: dict[str, Any] = {
    "train.epochs": 10,
    "data.train_size": 1024,
    "data.val_size": 256,
    "data.auto_augment": "",
    "data.reprob": 0.0,
    "data.mixup": 0.0,
    "data.cutmix": 0.0,
    "train.warmup_epochs": 1.0,
    "train.ema_decay": 0.99,
    "sparse.update_frequency": 8,
    "sparse.min_density": 0.05,  # SNIP alone empties slak_test's block layers at 70 % and 82 % sparsity
    "run.gpus_per_worker": 0.0625,
    "run.num_workers": 1,
    "tune.seeds": 3,
}


def add_common_arguments(parser: argparse.ArgumentParser, config_help: str) -> argparse.ArgumentParser:
    """``--config``, ``--address``, ``--tracking-uri`` and the dotted ``key=value`` overrides."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted config overrides, e.g. train.epochs=120 data.path=/data/imagenet",
    )
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("--address", default=None, help="Ray cluster address ('auto' joins a running cluster); "
                        "default: a local Ray bound to 127.0.0.1")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI, e.g. http://HOST:5000 (= tracking.uri; "
                        "default: sqlite ./mlflow.db)")
    return parser


def overrides_from_args(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``defaults`` <- the ``key=value`` overrides <- ``--tracking-uri``."""
    overrides = dict(defaults or {})
    overrides.update(parse_overrides(args.overrides))
    if args.tracking_uri:
        overrides["tracking.uri"] = args.tracking_uri
    return overrides


def grid_parser(description: str) -> argparse.ArgumentParser:
    """Flags every grid script takes; everything else is a dotted ``key=value`` override."""
    parser = add_common_arguments(
        argparse.ArgumentParser(description=description),
        "YAML preset, e.g. experiments/configs/paper_slak_tiny_120ep.yaml (without it: the laptop default, a "
        "short slak_test run on procedural shapes)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest (or run.name=...) experiment of this grid; finished trials stay",
    )
    return parser


def run_grid(
    args: argparse.Namespace, table: str, grid: str, /, **grid_kwargs: Any
) -> tuple[ExperimentConfig, ExperimentOutcome]:
    """Config -> grid -> ``tune_runner.run_experiment`` for a grid script (which prints :func:`summary_text`).

    Args:
        args: The parsed :func:`grid_parser` flags.
        table: The grid's name (experiment names, tables).
        grid: The ``orchestrator.search_space`` function that builds the points from the config
            (``sparsity_width_grid``, ``kernel_size_grid``, ``adaptation_grid``), called with ``grid_kwargs``
            (positional-only parameters, so that a grid's own ``table=`` keyword reaches the grid).

    Raises:
        ConfigError, GridError, ValueError: a bad config, grid or resume request; nothing was started.
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    cfg = load_config(args.config, overrides_from_args(args), defaults=None if args.config else LAPTOP_DEFAULTS)
    # torch, Ray and MLflow are imported only once the config is known to be valid
    from orchestrator import search_space
    from orchestrator.tune_runner import run_experiment

    points = getattr(search_space, grid)(cfg, **grid_kwargs)
    for line in search_space.settings_the_grid_ignores(cfg, points, parse_overrides(args.overrides)):
        logging.getLogger("orchestrator.config").warning("%s", line)
    outcome = run_experiment(cfg, points, table=table, address=args.address, resume=args.resume)
    return cfg, outcome


def summary_text(cfg: ExperimentConfig, outcome: ExperimentOutcome) -> str:
    """What a grid script prints at the end: the tables, where the files are, how to open MLflow."""
    lines = []
    if outcome.collated is not None:
        lines += [
            "",
            outcome.collated.markdown,
            f"tables, plots and per-trial parquet: {outcome.path / 'tables'}",
        ]
    state = "INTERRUPTED (continue with --resume)" if outcome.interrupted else "complete"
    lines.append(
        f"experiment {outcome.name}: {outcome.trials} trial(s), {outcome.errors} failed, {state}, "
        f"{outcome.seconds:.0f} s"
    )
    if cfg.tracking.enabled:
        from orchestrator import tracking  # MLflow is imported only once a job has run

        lines.append(f"MLflow runs: {tracking.mlflow_ui_command(cfg.tracking.uri, cfg.tracking.experiment)}")
    return "\n".join(lines)
