"""Targets, flat mask buffer, exact-count draws, fingerprints and the bit-packed file format."""

from __future__ import annotations

import math

import pytest
import torch

from slak_model.sparsity import (
    FlatMasks,
    draw_exact_masks,
    load_masks,
    mask_summary,
    save_masks,
    select_targets,
)


def test_all_targets_are_the_2d_and_4d_weights(toy_model) -> None:
    names = list(select_targets(toy_model, "all"))
    assert len(names) == 18
    assert names[0] == "stem.0.weight" and names[-1] == "head.weight"
    assert not any(n.endswith("bias") or ".bn." in n or ".norm." in n for n in names)


def test_large_kernel_targets_are_the_rectangular_branches() -> None:
    import slak_model

    names = list(select_targets(slak_model.create_model("slak_test"), "large_kernels"))
    assert len(names) == 2 * 5  # tall and wide of each of slak_test's 5 blocks
    assert all(n.endswith((".tall.conv.weight", ".wide.conv.weight")) for n in names)


def test_large_kernel_targets_without_branches_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="targets='large_kernels'.*targets='all'"):
        select_targets(torch.nn.Linear(3, 3), "large_kernels")


@pytest.mark.parametrize("counts", [[0, 5, 35], [15, 1, 34], [7, 0, 0]], ids=lambda c: "-".join(map(str, c)))
def test_exact_count_draws(counts: list[int]) -> None:
    fm = FlatMasks({"a": (3, 5), "b": (5,), "c": (5, 1, 7)})
    draw_exact_masks(fm, counts, torch.Generator().manual_seed(0))
    assert fm.counts() == counts
    assert fm.views["a"].shape == (3, 5) and fm.views["c"].data_ptr() == fm.flat[20:].data_ptr()


def test_draw_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="'b'"):
        draw_exact_masks(FlatMasks({"a": (3,), "b": (2,)}), [1, 3], torch.Generator())


def test_hashes_detect_any_moved_entry() -> None:
    fm = FlatMasks({"a": (64,), "b": (8, 8)})
    draw_exact_masks(fm, [20, 30], torch.Generator().manual_seed(0))
    base = fm.hashes()
    assert base == fm.hashes()
    on = torch.nonzero(fm.views["b"].flatten()).flatten()[0]
    off = torch.nonzero(~fm.views["b"].flatten()).flatten()[0]
    fm.views["b"].view(-1)[on] = False
    fm.views["b"].view(-1)[off] = True  # same count, different pattern
    moved = fm.hashes()
    assert moved[0] == base[0] and moved[1] != base[1] and moved[1][0] == base[1][0]


def test_save_load_round_trip_is_bit_packed(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    masks = {
        "stages.0.blocks.0.large_kernel.tall.conv.weight": torch.rand(31, 1, 13, 5, generator=g) < 0.6,
        "stages.0.blocks.0.mlp.fc1.weight": torch.rand(64, 17, generator=g) < 0.3,
        "head.weight": torch.ones(3, 3, dtype=torch.bool),
    }
    path = tmp_path / "masks.npz"
    save_masks(masks, path)
    back = load_masks(path)
    assert list(back) == list(masks)
    for n in masks:
        assert back[n].dtype == torch.bool and torch.equal(back[n], masks[n])
    bits = sum(math.ceil(m.numel() / 8) for m in masks.values())
    assert path.stat().st_size < bits + 3000  # packed bits + zip/json overhead, far below 1 byte/weight
    summary = mask_summary(path)
    assert summary[2] == {"name": "head.weight", "shape": [3, 3], "nnz": 9, "density": 1.0}
    assert summary[1]["density"] == pytest.approx(masks["stages.0.blocks.0.mlp.fc1.weight"].float().mean().item())


def test_load_rejects_foreign_files(tmp_path) -> None:
    import numpy as np

    path = tmp_path / "x.npz"
    with open(path, "wb") as fh:
        np.savez(fh, a=np.zeros(3))
    with pytest.raises(ValueError, match="not a mask file"):
        load_masks(path)
