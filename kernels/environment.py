"""What machine and software produced a number: one description for every benchmark and every MLflow run.

It lives in the lowest layer so that the kernel benchmark, the sparsity benchmark, the throughput script and
the tracker (which tags runs with it) all describe their environment the same way.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

__all__ = ["cpu_name", "describe", "device_name", "git_commit", "summary_line"]

_REPO = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    """The CPU model and core count (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name for a CUDA device (all GPUs for ``None`` when CUDA is available), else the CPU's."""
    if device is None:
        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return cpu_name()
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def git_commit() -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the checkout this code runs from; in an image without ``.git``, the commit
    baked into ``SLAK_GIT_COMMIT`` (dirty unknown: None)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        baked = os.environ.get("SLAK_GIT_COMMIT", "")
        if baked and baked != "unknown":
            return baked, None
        return "unknown (not a git checkout; set SLAK_GIT_COMMIT)", None


def describe(device: torch.device | str | None = None) -> dict[str, str]:
    """Date, host, device, commit and the versions that change numbers (torch, CUDA, cuDNN, TF32 switches)."""
    commit, dirty = git_commit()
    cuda = torch.cuda.is_available()
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "device": device_name(device),
        "cpu_threads": str(torch.get_num_threads()),
        "git_commit": commit + ("" if dirty is None else " (dirty)" if dirty else ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda) if cuda else "none",
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "none",
        "cudnn_tf32": str(torch.backends.cudnn.allow_tf32),
        "matmul_tf32": str(torch.backends.cuda.matmul.allow_tf32),
    }


def summary_line(info: dict[str, str]) -> str:
    """One header line for a benchmark table."""
    return (f"Device: {info['device']} | torch {info['torch']} (CUDA {info['cuda']}, cuDNN {info['cudnn']}) | "
            f"python {info['python']} | commit {info['git_commit'][:12]} | {info['date_utc']}")
