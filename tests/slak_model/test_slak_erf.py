"""The ERF measurement (slak_model.erf) on networks whose receptive field is known exactly, and its rules:
positive part of the gradient, ReLU of the centre, streamed mean, skipped non-finite images, the ratios."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from slak_model import create_model, erf, published


class ConvStack(nn.Module):
    """Single-channel convolutions with all-one weights, no bias, stride 1: the receptive field of an output
    pixel is the square of side 1 + sum(k - 1), and the input gradient of the centre counts the paths."""

    def __init__(self, kernels: list[int], in_chans: int = 1, weight: float = 1.0) -> None:
        super().__init__()
        layers = []
        for i, k in enumerate(kernels):
            conv = nn.Conv2d(in_chans if i == 0 else 1, 1, k, padding=k // 2, bias=False)
            nn.init.constant_(conv.weight, weight)
            layers.append(conv)
        self.body = nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _ratios(model: nn.Module, size: int, images: int = 2, **kw) -> list[erf.AreaRatio]:
    x = torch.rand(images, 1, size, size, generator=torch.Generator().manual_seed(0))
    return erf.area_ratios(erf.measure_erf(model, [x], images=images, **kw).mean_map)


def test_two_3x3_convs_give_the_hand_computed_map_and_ratios() -> None:
    # Two 3x3 all-one convs on a 9x9 input: the gradient of the centre is the outer product of (1, 2, 3, 2, 1)
    # with itself (paths through the middle layer), zero outside the 5x5 receptive field.
    maps = erf.contribution_maps(ConvStack([3, 3]).eval(), torch.rand(1, 1, 9, 9))
    p = torch.tensor([0, 0, 1, 2, 3, 2, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(maps[0], torch.outer(p, p))
    # log10(1 + v) with v in {1, 2, 3, 4, 6, 9}; the maximum log10(10) = 1 leaves the scale as it is.
    lg = {v: math.log10(1 + v) for v in (1, 2, 3, 4, 6, 9)}
    total = 4 * lg[1] + 8 * lg[2] + 4 * lg[3] + 4 * lg[4] + 4 * lg[6] + lg[9]  # the whole 5x5 square
    inner = lg[9] + 4 * lg[6] + 4 * lg[4]  # the centred 3x3 square
    assert 0.49 < inner / total < 0.50  # 0.491: passes 20 % and 30 %, not 50 %
    ratios = erf.area_ratios(maps[0].numpy())
    assert [(r.threshold, r.side) for r in ratios] == [(0.2, 3), (0.3, 3), (0.5, 5), (0.99, 5)]
    assert [r.ratio for r in ratios] == pytest.approx([9 / 81, 9 / 81, 25 / 81, 25 / 81])
    sides, shares = erf.square_shares(maps[0].numpy())
    assert list(sides) == [3, 5, 7]
    assert shares == pytest.approx([inner / total, 1.0, 1.0])


@pytest.mark.parametrize("kernels", [[3], [3, 3, 3], [5, 3], [7, 7], [9, 5, 3]])
def test_contribution_is_nonzero_exactly_on_the_theoretical_receptive_field(kernels: list[int]) -> None:
    size = 31
    maps = erf.contribution_maps(ConvStack(kernels).eval(), torch.rand(1, 1, size, size))
    side = 1 + sum(k - 1 for k in kernels)
    lo = size // 2 - side // 2
    expected = torch.zeros(size, size, dtype=torch.bool)
    expected[lo:lo + side, lo:lo + side] = True
    assert torch.equal(maps[0] > 0, expected)
    # the 99 % square is the receptive field itself: its outer ring still holds more than 1 %
    assert erf.area_ratios(maps[0].numpy(), [0.99])[0].side == side


def test_larger_kernels_give_larger_ratios_with_the_same_weights() -> None:
    by_kernel = {k: _ratios(ConvStack([k, k]), 33) for k in (3, 5, 7, 9)}
    for small, large in ((3, 5), (5, 7), (7, 9)):
        pairs = list(zip(by_kernel[small], by_kernel[large], strict=True))
        assert all(a.ratio <= b.ratio for a, b in pairs), (small, large)
        assert pairs[-1][0].ratio < pairs[-1][1].ratio  # strictly larger at t = 99 %


def test_the_gradient_counts_only_its_positive_part_summed_over_channels() -> None:
    model = ConvStack([3], in_chans=3).eval()
    with torch.no_grad():
        model.body[0].weight[:, 1] = -1.0  # the second input channel pulls the centre down
        model.body[0].weight[:, 2, :, 0] = 2.0  # the third pulls it up twice as hard on its left column
    maps = erf.contribution_maps(model, torch.ones(1, 3, 5, 5))
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = 1.0 + 0.0 + 1.0  # channel 0: +1, channel 1: ReLU(-1) = 0, channel 2: +1
    expected[1:4, 1] = 1.0 + 0.0 + 2.0
    assert torch.equal(maps[0], expected)


def test_an_image_whose_centre_is_not_positive_contributes_nothing() -> None:
    model = ConvStack([3]).eval()
    maps = erf.contribution_maps(model, torch.stack([torch.ones(1, 5, 5), -torch.ones(1, 5, 5)]))
    assert maps[0].sum() == 9 and maps[1].sum() == 0


def test_batches_give_the_same_mean_as_one_image_at_a_time() -> None:
    torch.manual_seed(0)
    model = create_model("slak_test", layer_scale_init=1.0)  # every block contributes, not only the patchify path
    x = torch.randn(5, 3, 64, 64)
    one = erf.measure_erf(model, list(x.split(1)), images=5)
    batched = erf.measure_erf(model, list(x.split(3)), images=5)
    assert one.images == batched.images == 5
    np.testing.assert_allclose(batched.mean_map, one.mean_map, rtol=1e-4, atol=1e-7)
    assert batched.batch_size == 3 and one.batch_size == 1


def test_the_mean_is_streamed_and_stops_at_the_images_asked_for() -> None:
    model = ConvStack([3, 3]).eval()
    x = torch.rand(7, 1, 11, 11)
    consumed = []

    def batches():
        for b in x.split(2):
            consumed.append(len(b))
            yield b

    result = erf.measure_erf(model, batches(), images=5)
    assert result.images == 5 and consumed == [2, 2, 2]  # the fourth batch is never drawn
    expected = erf.contribution_maps(model, x[:5]).double().mean(dim=0).numpy()
    np.testing.assert_allclose(result.mean_map, expected)


def test_an_image_with_a_non_finite_map_is_replaced_by_the_next() -> None:
    class Sqrt(ConvStack):  # d sqrt(x) / dx is infinite at 0: an image with a zero pixel gets a non-finite map
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward_features(x.sqrt())

    model = Sqrt([3]).eval()
    x = torch.rand(3, 1, 7, 7) + 0.1
    bad = x.clone()
    bad[1, 0, 3, 3] = 0.0
    result = erf.measure_erf(model, [bad], images=2)
    assert (result.images, result.skipped) == (2, 1)
    expected = erf.contribution_maps(model, x[[0, 2]]).double().mean(dim=0).numpy()
    np.testing.assert_allclose(result.mean_map, expected)


def test_too_few_usable_images_is_an_error() -> None:
    with pytest.raises(ValueError, match="only 3 usable image"):
        erf.measure_erf(ConvStack([3]), [torch.rand(3, 1, 7, 7)], images=4)


def test_out_of_memory_splits_the_batch_and_keeps_the_result() -> None:
    class Picky(ConvStack):
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("simulated: batches above 2 do not fit")
            return super().forward_features(x)

    x = torch.rand(6, 1, 9, 9)
    result = erf.measure_erf(Picky([3, 3]), [x[:4], x[4:]], images=6)
    assert (result.images, result.batch_size) == (6, 2)
    np.testing.assert_allclose(result.mean_map, erf.measure_erf(ConvStack([3, 3]), [x], images=6).mean_map)


def test_measuring_freezes_the_weights_and_restores_the_model() -> None:
    model = create_model("slak_test")
    model.train()
    model.stem[0].weight.requires_grad_(False)
    seen = {}

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            seen["training"] = self.inner.training
            seen["grad"] = any(p.requires_grad for p in self.inner.parameters())
            return self.inner.forward_features(x)

    erf.measure_erf(Spy(), [torch.randn(1, 3, 64, 64)], images=1)
    assert seen == {"training": False, "grad": False}
    assert model.training
    assert not model.stem[0].weight.requires_grad and model.head.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_bf16_runs_and_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = create_model("slak_test", layer_scale_init=1.0)
    x = torch.randn(2, 3, 64, 64)
    fp32 = erf.measure_erf(model, [x], images=2, precision="fp32").mean_map
    bf16 = erf.measure_erf(model, [x], images=2, precision="bf16").mean_map
    assert np.abs(erf.log_scaled(fp32) - erf.log_scaled(bf16)).max() < 0.1
    with pytest.raises(ValueError, match="precision='fp16'"):
        erf.measure_erf(model, [x], images=2, precision="fp16")


def test_feature_map_needs_the_spatial_map_not_pooled_features() -> None:
    class Pooled(nn.Module):  # what the SLaK reference's forward_features returns: pooled and normed
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    with pytest.raises(ValueError, match=r"returned \(2, 3\).*before pooling"):
        erf.feature_map(Pooled(), torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="no forward_features"):
        erf.feature_map(nn.Identity(), torch.rand(2, 3, 8, 8))


def test_feature_map_turns_a_channels_last_map_around() -> None:
    class ChannelsLast(nn.Module):
        feature_info = ({"num_chs": 3, "reduction": 1, "module": "x"},)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 3, 1)

    x = torch.rand(1, 3, 5, 7)
    assert torch.equal(erf.feature_map(ChannelsLast(), x), x)


def test_our_slak_gives_its_last_stage_map() -> None:
    model = create_model("slak_test").eval()
    out = erf.feature_map(model, torch.randn(1, 3, 64, 64))
    assert out.shape == (1, model.cfg.widths[-1], 2, 2)


def test_ratio_edge_cases() -> None:
    flat = np.ones((9, 9))
    # a flat map: the 7x7 square, the largest scanned, holds 49/81 < 99 %
    r = erf.area_ratios(flat, [0.5, 0.99])
    assert (r[0].side, r[1].side, r[1].ratio) == (7, None, None)
    with pytest.raises(ValueError, match="zero everywhere"):
        erf.area_ratios(np.zeros((9, 9)))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        erf.area_ratios(flat, [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        erf.log_scaled(-flat)


def test_published_table10() -> None:
    rows = {r.model: r for r in published.TABLE10}
    assert list(rows) == ["ResNet-101", "ResNet-152", "ConvNeXt-T", "ConvNeXt-T (RepLKNet)", "SLaK-T"]
    assert erf.THRESHOLDS == published.ERF_THRESHOLDS == (0.2, 0.3, 0.5, 0.99)
    assert rows["SLaK-T"].ratio_pct(0.2) == 6.9 and rows["ResNet-101"].ratio_pct(0.99) == 22.4
    assert (rows["SLaK-T"].kernel, rows["SLaK-T"].image_size, rows["SLaK-T"].images) == ("51-49-47-13", 1024, 50)
    for row in published.TABLE10:
        assert list(row.ratios_pct) == sorted(row.ratios_pct)
