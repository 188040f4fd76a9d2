"""Rebuild the paper-style tables of an experiment from its MLflow runs (also while it still runs).

Examples::

    python experiments/collate_tables.py                              # newest experiment in ./mlflow.db
    python experiments/collate_tables.py --table table8 --out results/
    python experiments/collate_tables.py --experiment table8-20261122-190000 --tracking-uri http://HOST:5000
    python experiments/collate_tables.py --distillation tracking.experiment=slak-distill   # students vs L2S
    python experiments/collate_tables.py --evaluations --out results/  # evaluations beside the paper
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from orchestrator import tracking
from orchestrator.collate.evaluations import evaluation_markdown, evaluation_table
from orchestrator.collate.experiment import collate_experiment
from orchestrator.collate.runs import find_experiment
from orchestrator.config.loading import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted config overrides (tracking.*)"
    )
    parser.add_argument("--config", default=None, help="YAML preset the experiment was run with")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite ./mlflow.db)")
    parser.add_argument("--experiment", default=None, help="Tune experiment name (default: the newest)")
    parser.add_argument(
        "--table", default=None, help="restrict the default to the newest experiment of a table"
    )
    parser.add_argument("--out", default="collated", help="output folder (default: ./collated/<experiment>)")
    parser.add_argument(
        "--no-log", action="store_true", help="do not attach the files to the parent MLflow run"
    )
    parser.add_argument(
        "--distillation", action="store_true",
        help="the distillation runs of tracking.experiment beside the published large-to-small numbers",
    )
    parser.add_argument(
        "--evaluations", action="store_true",
        help="the table of checkpoint evaluations (experiments/evaluate.py) beside the paper's numbers",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else [])
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    uri, mlflow_experiment = cfg.tracking.uri, cfg.tracking.experiment
    if args.distillation:
        return _distillation(uri, mlflow_experiment, Path(args.out))
    if args.evaluations:
        table = evaluation_table(tracking.runs_dataframe(uri, mlflow_experiment))
        if table.empty:
            print(f"error: no evaluation run in MLflow experiment {mlflow_experiment!r} at {uri}; run "
                  "experiments/evaluate.py first", file=sys.stderr)
            return 2
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = evaluation_markdown(table)
        (out / "evaluations.md").write_text(text + "\n", encoding="utf-8")
        table.to_csv(out / "evaluations.csv", index=False)
        print(text)
        print(f"{len(table)} evaluation run(s); files in {out}")
        return 0
    name = args.experiment or find_experiment(
        tracking.runs_dataframe(uri, mlflow_experiment), args.table
    )
    if name is None:
        print(
            f"error: no experiment found in MLflow experiment {mlflow_experiment!r} at {uri}; run a "
            "tune_*.py script first or pass --experiment",
            file=sys.stderr,
        )
        return 2
    result = collate_experiment(
        uri, mlflow_experiment, name, Path(args.out) / name, log_to_parent=not args.no_log
    )
    print(result.markdown)
    print(f"{len(result.tidy)} trial run(s); files in {Path(args.out) / name}")
    return 0


def _distillation(uri: str, mlflow_experiment: str, out: Path) -> int:
    from orchestrator.collate import distillation

    table = distillation.distillation_table(tracking.runs_dataframe(uri, mlflow_experiment))
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "l2s.csv", index=False)
    print(distillation.to_markdown(table))
    runs = int((table["status"] != "missing").sum())
    print(f"{runs} run(s) of MLflow experiment {mlflow_experiment!r}; table in {out / 'l2s.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
