"""``python -m kernels.info``: which depthwise-conv backends can run here, which is active, and why.

Unlike ``import kernels``, this builds the CUDA extension if it has not been built, so the table says
whether the build works on this machine (and shows the compiler's message when it does not).
"""

from __future__ import annotations

import argparse
import platform

import torch

from . import _build
from .dispatch import ENV_VAR, backend_report, requested_backend

__all__ = ["format_report", "main"]


def format_report(rows: list[dict[str, object]]) -> str:
    """Render :func:`kernels.backend_report` rows as a fixed-width table."""
    lines = [f"{'backend':<8} {'available':<10} {'active':<7} reason", "-" * 78]
    for row in rows:
        available = {True: "yes", False: "no", None: "not tried"}[row["available"]]  # type: ignore[index]
        lines.append(f"{row['backend']!s:<8} {available:<10} {'*' if row['active'] else '':<7} {row['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="device to ask about (default: current CUDA device, else cpu)")
    parser.add_argument("--no-build", action="store_true", help="do not start the CUDA extension build")
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}  capability {torch.cuda.get_device_capability()}")
    print(f"{ENV_VAR}={requested_backend()}  cache: {_build.cache_dir()}  arch: {_build.arch_list()}")
    print(format_report(backend_report(args.device, build=not args.no_build)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
