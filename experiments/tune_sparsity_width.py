"""Table 8: the paired (sparsity, width) points of SLaK as a Ray Tune grid of Ray Train jobs.

With no arguments it runs the embedded default on a laptop: local Ray, MLflow in ./mlflow.db, a
slak_test-sized model on the procedural shapes data, then prints the collated table and the command
that opens the MLflow UI. On a cluster::

    python experiments/tune_sparsity_width.py --address auto --tracking-uri http://HOST:5000 \\
        --config experiments/configs/paper_slak_tiny_120ep.yaml data.path=/data/imagenet

Extra (sparsity, width) points, on the same recipe as the paper's: ``--point 0.9,3.0`` (repeatable).
"""

from __future__ import annotations

import argparse
import sys

from orchestrator import cli


def _pair(text: str) -> tuple[float, float]:
    try:
        sparsity, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--point {text!r}: write SPARSITY,WIDTH, e.g. --point 0.9,3.0"
        ) from None
    return sparsity, width


def main(argv: list[str] | None = None) -> int:
    parser = cli.grid_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="S,W",
        type=_pair,
        help="extra (sparsity, width) point, e.g. --point 0.9,3.0 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        cfg, outcome = cli.run_grid(args, "table8", "sparsity_width_grid", extra_pairs=args.point)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(cli.summary_text(cfg, outcome))
    return 1 if outcome.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
