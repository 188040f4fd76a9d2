"""The injected collective through which ranks agree on masks.

The engine never calls ``torch.distributed`` directly: it talks to a small protocol, so it can be
tested without a process group (a fake that disagrees on purpose) and used with any launcher.
``TorchDistributedCollective`` is the adapter for an initialised ``torch.distributed`` group
(gloo or NCCL); ``LocalCollective`` is the single-process default.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

__all__ = ["Collective", "LocalCollective", "TorchDistributedCollective"]


@runtime_checkable
class Collective(Protocol):
    """What the engine needs from a process group."""

    @property
    def rank(self) -> int:
        """This process's rank."""
        ...

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        ...

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Overwrite ``tensor`` in place with rank ``src``'s copy."""
        ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Return rank ``src``'s ``obj`` on every rank (picklable objects)."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Return every rank's ``obj``, indexed by rank."""
        ...


class LocalCollective:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Nothing to receive."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """The object itself."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """A list holding the object."""
        return [obj]


class TorchDistributedCollective:
    """Adapter over an initialised ``torch.distributed`` process group.

    Args:
        group: The process group (None = the default group). Under NCCL, tensors must be on the
            current CUDA device and ``torch.cuda.set_device`` must have been called.
    """

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "TorchDistributedCollective needs an initialised process group: call "
                "torch.distributed.init_process_group(...) first, or pass collective=None for one process"
            )
        self.group = group

    @property
    def rank(self) -> int:
        """Rank in the group."""
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        """Size of the group."""
        return dist.get_world_size(self.group)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        """``dist.broadcast`` in place (``src`` is a rank of the group)."""
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``dist.broadcast_object_list`` of one object."""
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, src) if self.group else src,
                                   group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``dist.all_gather_object``."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out
