"""Helpers for tests that spawn gloo process groups with ``torch.multiprocessing.spawn``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch


def publish_and_wait(out_dir: str | Path, rank: int, world: int, payload: Any, timeout_s: float = 60.0) -> None:
    """Save this rank's result atomically as ``rank{rank}.pt``, then return only once every rank has.

    A rank that leaves early can reset its sockets while a peer still waits for its last message (seen
    under CPU load), so each rank waits for the others' files before destroying the process group.
    """
    out = Path(out_dir)
    torch.save(payload, out / f"rank{rank}.tmp")
    (out / f"rank{rank}.tmp").rename(out / f"rank{rank}.pt")
    deadline = time.monotonic() + timeout_s
    while not all((out / f"rank{r}.pt").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError("another rank did not finish")
        time.sleep(0.05)


def exit_without_teardown() -> None:
    """End a spawned rank with status 0 without running interpreter teardown.

    Freeing a DDP reducer after its gloo group was destroyed can deadlock: the main thread holds the GIL in
    ``~ProcessGroupGloo`` joining the group's worker thread, which needs the GIL to drop a Python tensor
    (seen with torch 2.13 under load; py-spy showed both stacks). The rank's result is already on disk.
    """
    os._exit(0)
