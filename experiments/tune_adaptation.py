"""The adaptation sweeps of SLaK: prune rate p at fixed f, and update frequency f at p = 0.3.

Examples::

    python experiments/tune_adaptation.py --sweep p    # p in 0.1, 0.3, 0.5, 0.7 at f = 100
    python experiments/tune_adaptation.py train.epochs=20 --sweep f --values 50 100 200  # f at p=0.3

(``key=value`` overrides go before ``--values``, which takes every number after it.)
"""

from __future__ import annotations

import sys

from orchestrator import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.grid_parser(__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=("p", "f"), default="p", help="which knob to sweep (default: p)")
    parser.add_argument(
        "--values", type=float, nargs="+", default=None, help="the swept values (default: the paper's figure)"
    )
    args = parser.parse_args(argv)
    table = f"adapt_{args.sweep}"
    try:
        cfg, outcome = cli.run_grid(args, table, "adaptation_grid", sweep=args.sweep, values=args.values)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(cli.summary_text(cfg, outcome))
    return 1 if outcome.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
