"""LargeKernelConv: branch layout per mode, orientation, 'same' output size, and the inference merge."""

from __future__ import annotations

import pytest
import torch

from slak_model.layers import LargeKernelConv
from tests.numerics import assert_rel_close, rel_tol


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """O(1) weights and BN statistics, so a wrong fold or a misplaced kernel shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = 1.0 / (p.shape[2] * p.shape[3]) ** 0.5 if p.dim() == 4 else 1.0  # outputs stay O(1)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)


@pytest.mark.parametrize(
    "mode,branches",
    [("naive", {"square"}), ("replknet", {"square", "small"}), ("decomposed", {"tall", "wide", "small"})],
    ids=["naive", "replknet", "decomposed"],
)
def test_branches_per_kernel_mode(mode: str, branches: set[str]) -> None:
    lk = LargeKernelConv(6, 13, 3, 3, mode, use_bn=True)
    present = {n for n in ("tall", "wide", "small", "square") if getattr(lk, n) is not None}
    assert present == branches
    shapes = {n: tuple(getattr(lk, n).conv.weight.shape) for n in present}
    expected = {"tall": (6, 1, 13, 3), "wide": (6, 1, 3, 13), "small": (6, 1, 3, 3), "square": (6, 1, 13, 13)}
    assert shapes == {n: expected[n] for n in present}
    assert all(isinstance(getattr(lk, n).bn, torch.nn.BatchNorm2d) for n in present)


def test_rectangular_parameters_are_the_strips() -> None:
    lk = LargeKernelConv(4, 9, 3, 3, "decomposed")
    assert [tuple(p.shape) for p in lk.rectangular_parameters()] == [(4, 1, 9, 3), (4, 1, 3, 9)]
    assert lk.rectangular_parameters()[0] is lk.tall.conv.weight
    assert LargeKernelConv(4, 9, 3, 3, "replknet").rectangular_parameters() == []


def test_tall_kernel_runs_its_long_edge_along_height() -> None:
    lk = LargeKernelConv(1, 7, 3, None, "decomposed", use_bn=False).eval()
    with torch.no_grad():
        lk.tall.conv.weight.zero_()
        lk.tall.conv.weight[0, 0, :, 1] = torch.arange(
            1.0, 8.0
        )  # the centre column, values 1..7 top to bottom
        lk.wide.conv.weight.zero_()
    x = torch.zeros(1, 1, 15, 15)
    x[0, 0, 7, 7] = 1.0  # a delta in the middle
    y = lk(x)[0, 0]
    nz = y.nonzero().tolist()
    assert sorted({c for _, c in nz}) == [7] and sorted(r for r, _ in nz) == list(range(4, 11))
    # cross-correlation: output row 7 - r sees tap 3 + r, so the column reads the kernel upside down
    assert y[4:11, 7].tolist() == [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]


@pytest.mark.parametrize("hw", [(15, 15), (9, 20), (31, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["naive", "replknet", "decomposed"])
def test_every_branch_keeps_the_input_size(mode: str, hw: tuple[int, int]) -> None:
    lk = LargeKernelConv(3, 13, 5, 5, mode).eval()
    x = torch.randn(2, 3, *hw)
    for name in ("tall", "wide", "small", "square"):
        branch = getattr(lk, name)
        if branch is not None:
            assert branch(x).shape == x.shape, name
    assert lk(x).shape == x.shape


@pytest.mark.parametrize(
    "mode,small,short_edge,use_bn,deploy",
    [
        ("decomposed", 5, 5, True, {"deploy_tall", "deploy_wide"}),
        ("decomposed", 3, 5, True, {"deploy_tall", "deploy_wide"}),
        ("decomposed", 7, 5, True, {"deploy_tall", "deploy_wide", "deploy_small"}),
        ("decomposed", None, 5, False, {"deploy_tall", "deploy_wide"}),
        ("replknet", 5, 5, True, {"deploy_square"}),
        ("naive", None, 5, True, {"deploy_square"}),
    ],
    ids=["slak", "small-narrower-than-N", "small-wider-than-N", "no-bn-no-small", "replknet", "naive"],
)
@pytest.mark.numeric
def test_merge_matches_the_branches_in_eval_mode(mode, small, short_edge, use_bn, deploy, numeric_seed) -> None:
    lk = LargeKernelConv(5, 13, short_edge, small, mode, use_bn=use_bn)
    _randomise(lk, seed=numeric_seed)
    lk.eval()
    x = torch.randn(2, 5, 17, 19, generator=torch.Generator().manual_seed(numeric_seed + 3))
    before = lk(x)
    lk.merge_for_inference()
    present = {
        n
        for n in (
            "tall",
            "wide",
            "small",
            "square",
            "deploy_tall",
            "deploy_wide",
            "deploy_small",
            "deploy_square",
        )
        if getattr(lk, n) is not None
    }
    assert present == deploy
    # both forms run in fp32: their difference is at most the sum of two 13x13-tap convolutions' errors
    tol = rel_tol(torch.float32, 13 * 13, layers=2)
    assert_rel_close(lk(x), before, tol, "merged vs branches")
    lk.merge_for_inference()  # idempotent
    assert_rel_close(lk(x), before, tol, "merged twice vs branches")
    assert before.abs().max() > 1.0  # the check is not vacuous
    assert lk.deploy_wide is None or lk.deploy_wide.bias is None


def test_branches_share_one_converted_input_with_the_same_result_under_autocast() -> None:
    """The input is cast once for the three branches: forward bitwise as when each branch cast it, input
    gradient equal up to the bf16 sum of the branches' gradients."""
    torch.manual_seed(0)
    lk = LargeKernelConv(8, 13, 3, 5, "decomposed").train()
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, a: seen.append(a[0])) for b in (lk.tall, lk.wide, lk.small)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lk(x)
        for h in hooks:
            h.remove()
        ref = lk.tall(x_ref) + lk.wide(x_ref) + lk.small(x_ref)  # each branch casts x itself
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2] and seen[0].dtype == torch.bfloat16
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=2e-2)
