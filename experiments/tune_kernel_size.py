"""Kernel-size tables of SLaK as Ray Tune grids: Table 1, Table 2 or Table 9 (``--table``).

Table 1: naive enlarging vs RepLKNet-style at 7/31/51/61. Table 2: decomposed, sparse groups, sparse
groups + 1.3x width at 7/31/51/61. Table 9: the short edge N in {3, 5, 7}. On images smaller than
224 px the kernels are scaled with the feature maps (see orchestrator/search_space.py).
"""

from __future__ import annotations

import sys

from orchestrator import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.grid_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--table",
        choices=("table1", "table2", "table9"),
        default="table2",
        help="which table to run (default: table2)",
    )
    parser.add_argument("--short-edges", type=int, nargs="+", default=[3, 5, 7], help="Table 9's N values")
    args = parser.parse_args(argv)
    kwargs = {"short_edges": args.short_edges} if args.table == "table9" else {}
    try:
        cfg, outcome = cli.run_grid(args, args.table, "kernel_size_grid", table=args.table, **kwargs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(cli.summary_text(cfg, outcome))
    return 1 if outcome.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
