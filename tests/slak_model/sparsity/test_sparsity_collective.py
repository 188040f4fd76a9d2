"""Rank agreement through an injected collective, simulated in one process.

Rank 0 runs with a recording collective; rank 1 then replays what rank 0 broadcast. The real
two-process gloo run is in tests/integration/test_sparsity_ddp.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from slak_model.sparsity import Collective, DynamicSparsity, LocalCollective, SparsityConfig


class Recording:
    """Rank 0 of a pretend 2-rank group: records broadcasts; all_gather echoes itself."""

    rank = 0
    world_size = 2

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.objects: list[Any] = []
        self.gathers = 0

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        self.tensors.append(tensor.clone())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        self.objects.append(copy.deepcopy(obj))
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        self.gathers += 1
        return [obj, obj]


class Replaying:
    """Rank 1: receives what rank 0 recorded, in order; all_gather shows rank 0's view first."""

    rank = 1
    world_size = 2

    def __init__(self, rank0: Recording, tamper: Any = None) -> None:
        self.tensors = list(rank0.tensors)
        self.objects = list(rank0.objects)
        self.tamper = tamper

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        tensor.copy_(self.tensors.pop(0))

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self.objects.pop(0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        other = self.tamper(obj) if self.tamper else obj
        return [other, obj]


def _engine(model: nn.Module, coll: Collective, seed: int, **cfg: Any) -> DynamicSparsity:
    cfg = {"init": "snip", "update_frequency": 4, "prune_rate": 0.5, "seed": seed, **cfg}
    return DynamicSparsity(model, SparsityConfig(**cfg), total_steps=100, collective=coll)


def _run(model: nn.Module, engine: DynamicSparsity, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        nn.functional.cross_entropy(model(torch.randn(2, 3, 16, 16, generator=g)), torch.tensor([1, 2])).backward()
        opt.step()
        engine.on_optimizer_step(opt)
        opt.zero_grad()


def test_collectives_satisfy_the_protocol() -> None:
    assert isinstance(LocalCollective(), Collective) and isinstance(Recording(), Collective)


def test_rank1_adopts_rank0_topology_and_exchanges_only_on_changes(make_toy, toy_batch) -> None:
    rank0 = Recording()
    m0 = make_toy(0)
    e0 = _engine(m0, rank0, seed=7)
    e0.initialize(batch=toy_batch, loss_fn=nn.functional.cross_entropy)
    _run(m0, e0, 10)
    # one density broadcast at init; one mask broadcast at init and one per update (steps 4 and 8), not per step
    assert len(rank0.objects) == 1 and len(rank0.tensors) == 3 and rank0.gathers == 3

    m1 = make_toy(0)
    e1 = _engine(m1, Replaying(rank0), seed=99)  # a different seed and a different SNIP batch
    other_batch = (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    e1.initialize(batch=other_batch, loss_fn=nn.functional.cross_entropy)
    _run(m1, e1, 10)
    assert e1.dense_layers == e0.dense_layers
    for name, mask in e0.masks.items():
        assert torch.equal(e1.masks[name], mask), name


def _tamper_layer(index: int):
    def tamper(obj: Any) -> Any:
        names, dense, hashes = obj
        hashes = list(hashes)
        hashes[index] = (hashes[index][0], hashes[index][1] + 1, hashes[index][2])
        return names, dense, hashes

    return tamper


def test_disagreeing_ranks_name_the_first_differing_layer(make_toy, toy_batch) -> None:
    rank0 = Recording()
    e0 = _engine(make_toy(0), rank0, seed=7, init="uniform")
    e0.initialize()
    e1 = _engine(make_toy(0), Replaying(rank0, tamper=_tamper_layer(4)), seed=7, init="uniform")
    with pytest.raises(RuntimeError, match=r"rank 0 and rank 1 after initialisation: first differing layer "
                                           r"'stages\.0\.blocks\.0\.mlp\.fc1\.weight'"):
        e1.initialize()


def test_different_layer_sets_are_reported(make_toy) -> None:
    rank0 = Recording()
    e0 = _engine(make_toy(0), rank0, seed=7, init="uniform")
    e0.initialize()

    def drop_one(obj: Any) -> Any:
        names, dense, hashes = obj
        return names[1:], dense, hashes[1:]

    e1 = _engine(make_toy(0), Replaying(rank0, tamper=drop_one), seed=7, init="uniform")
    with pytest.raises(RuntimeError, match="different masked layer sets"):
        e1.initialize()


def test_dense_layer_set_near_the_threshold_follows_rank0(make_toy, toy_batch) -> None:
    """Rank 1's own SNIP batch would pop a different layer set; it must adopt rank 0's."""
    from slak_model.sparsity import select_targets, snip_densities

    other_batch = (torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)), torch.tensor([0, 1, 2, 3]))
    names = list(select_targets(make_toy(0), "all"))
    d0 = snip_densities(make_toy(0), names, toy_batch, nn.functional.cross_entropy, 0.6)
    d1 = snip_densities(make_toy(0), names, other_batch, nn.functional.cross_entropy, 0.6)
    layer = max(names, key=lambda n: d1[n] - d0[n])
    assert d1[layer] > d0[layer]
    threshold = (d0[layer] + d1[layer]) / 2  # rank 1 alone would keep `layer` dense, rank 0 would not

    rank0 = Recording()
    e0 = _engine(make_toy(0), rank0, seed=7, dense_threshold=threshold)
    e0.initialize(batch=toy_batch, loss_fn=nn.functional.cross_entropy)
    e1 = _engine(make_toy(0), Replaying(rank0), seed=7, dense_threshold=threshold)
    e1.initialize(batch=other_batch, loss_fn=nn.functional.cross_entropy)
    assert layer in e0.masks and layer in e1.masks
    assert e1.dense_layers == e0.dense_layers
    for name, mask in e0.masks.items():
        assert torch.equal(e1.masks[name], mask), name
