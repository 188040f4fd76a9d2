"""SLaK end to end on ``slak_test``: shapes, timm integration, initialisation, stochastic depth, merging."""

from __future__ import annotations

import pytest
import timm
import torch

import slak_model
from slak_model import SLaK, create_model
from slak_model.layers import LargeKernelConv, SLaKBlock
from tests.numerics import assert_rel_close, rel_tol


@pytest.fixture
def model() -> SLaK:
    torch.manual_seed(0)
    return create_model("slak_test").eval()


def test_forward_shapes(model: SLaK) -> None:
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 32, 2, 2)  # the last feature map, not the pooled vector
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    assert model(x).shape == (2, 10)


def test_odd_input_sizes_run(model: SLaK) -> None:
    assert model.forward_features(torch.randn(1, 3, 96, 72)).shape == (1, 32, 3, 2)


def test_module_names_follow_the_contract(model: SLaK) -> None:
    names = dict(model.named_parameters())
    for name in (
        "stem.0.weight",
        "stem.1.weight",
        "stages.1.downsample.0.weight",
        "stages.1.downsample.1.weight",
        "stages.0.blocks.0.large_kernel.tall.conv.weight",
        "stages.0.blocks.0.large_kernel.wide.conv.weight",
        "stages.0.blocks.0.large_kernel.small.conv.weight",
        "stages.0.blocks.0.large_kernel.tall.bn.weight",
        "stages.0.blocks.0.norm.weight",
        "stages.0.blocks.0.mlp.fc1.weight",
        "stages.0.blocks.0.mlp.fc2.weight",
        "stages.0.blocks.0.gamma",
        "norm.weight",
        "head.weight",
    ):
        assert name in names, name
    assert isinstance(model.stages[0].downsample, torch.nn.Identity)
    assert tuple(names["stages.2.blocks.1.large_kernel.tall.conv.weight"].shape) == (24, 1, 9, 3)
    assert tuple(names["stages.2.blocks.1.large_kernel.wide.conv.weight"].shape) == (24, 1, 3, 9)
    assert all(
        isinstance(m.large_kernel, LargeKernelConv) for m in model.modules() if isinstance(m, SLaKBlock)
    )


@pytest.mark.parametrize("name", ["slak_tiny", "slak_small", "slak_base", "slak_test"])
def test_timm_knows_every_variant(name: str) -> None:
    assert name in timm.list_models("slak_*")
    with torch.device("meta"):
        m = timm.create_model(name, num_classes=7)
    assert isinstance(m, SLaK) and m.head.out_features == 7


def test_timm_create_model_passes_config_overrides() -> None:
    m = timm.create_model(
        "slak_test", kernel_size=[7, 7, 5, 5, 3], width_factor=1.5, kernel_mode="decomposed"
    )
    assert m.cfg.widths == (12, 24, 36, 48)
    assert tuple(m.stages[0].blocks[0].large_kernel.tall.conv.weight.shape) == (12, 1, 7, 3)


def test_features_only_gives_the_four_stage_maps() -> None:
    m = timm.create_model("slak_test", features_only=True, out_indices=(0, 1, 2, 3)).eval()
    outs = m(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 8, 16, 16), (1, 16, 8, 8), (1, 24, 4, 4), (1, 32, 2, 2)]
    assert m.feature_info.channels() == [8, 16, 24, 32] and m.feature_info.reduction() == [4, 8, 16, 32]
    two = timm.create_model("slak_test", features_only=True, out_indices=(1, 3))
    assert [o.shape[1] for o in two(torch.randn(1, 3, 64, 64))] == [16, 32]


def test_initialisation_matches_the_reference() -> None:
    # Sampling tolerances, not rounding ones: the std of n draws misses sigma by about sigma/sqrt(2n): 2.8e-5 for
    # fc1's 262k weights, 1.9e-4 for the tall kernels' 5.4k, 1.4e-4 for the head's 2.6k; each bound is >= 7 of those.
    torch.manual_seed(0)
    m = create_model("slak_test", dims=(64, 128, 192, 256), head_init_scale=0.5, layer_scale_init=1e-6)
    fc1 = m.stages[3].blocks[0].mlp.fc1
    assert abs(fc1.weight.std().item() - 0.02) < 1e-3 and fc1.bias.abs().max() == 0
    tall = m.stages[3].blocks[0].large_kernel.tall
    assert abs(tall.conv.weight.std().item() - 0.02) < 2e-3
    assert tall.bn.weight.eq(1).all() and tall.bn.running_var.eq(1).all()
    assert m.stages[1].blocks[0].gamma.eq(1e-6).all()
    assert abs(m.head.weight.std().item() - 0.01) < 1e-3  # 0.02 * head_init_scale
    assert create_model("slak_test", layer_scale_init=0).stages[0].blocks[0].gamma is None
    assert not any(k.endswith("gamma") for k in create_model("slak_test", layer_scale_init=0).state_dict())


def test_drop_path_rates_are_linspace_over_all_blocks() -> None:
    m = create_model("slak_test", drop_path_rate=0.3)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in m.modules() if isinstance(b, SLaKBlock)]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 5).tolist())
    assert isinstance(m.stages[0].blocks[0].drop_path, torch.nn.Identity)


def test_reset_classifier_and_group_matcher(model: SLaK) -> None:
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 32)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))


@pytest.mark.numeric
@pytest.mark.parametrize("mode", ["decomposed", "replknet", "naive"])
def test_merged_model_equals_the_trained_form(mode: str, numeric_seed: int) -> None:
    torch.manual_seed(numeric_seed)
    m = create_model("slak_test", kernel_mode=mode, layer_scale_init=1.0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".bn." in name or name.endswith("gamma"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape))
        for name, b in m.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.5 * torch.randn(b.shape))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape) + 0.5)
    m.eval()
    x = torch.randn(2, 3, 64, 64)
    before = m(x)
    m.merge_for_inference()
    convs = [mod for mod in m.modules() if type(mod).__name__ == "DepthwiseConv"]
    assert len(convs) == (2 if mode == "decomposed" else 1) * 5
    assert not any(".bn." in k for k in m.state_dict())
    # both forms run in fp32 through the whole network (5 blocks, 4 downsamples, head; longest sum 13x13 taps)
    assert_rel_close(m(x), before, rel_tol(torch.float32, 13 * 13, layers=2 * 10), "merged vs trained form")
    assert before.abs().max() > 0.1


def test_package_exports() -> None:
    for name in slak_model.__all__:
        assert hasattr(slak_model, name), name


def test_sparsity_engine_targets_the_rectangular_strips(model: SLaK) -> None:
    from slak_model.sparsity import select_targets

    names = list(select_targets(model, "large_kernels"))
    expected = [
        f"stages.{s}.blocks.{b}.large_kernel.{k}.conv.weight"
        for s, depth in enumerate((1, 1, 2, 1))
        for b in range(depth)
        for k in ("tall", "wide")
    ]
    assert names == expected
    params = dict(model.named_parameters())
    rect = [p for lk in model.large_kernel_modules() for p in lk.rectangular_parameters()]
    assert [id(p) for p in rect] == [id(params[n]) for n in expected]


def test_forward_intermediates_follow_timm(model: SLaK) -> None:
    x = torch.randn(1, 3, 64, 64)
    final, maps = model.forward_intermediates(x)
    assert [m.shape[1] for m in maps] == [8, 16, 24, 32] and torch.equal(final, model.forward_features(x))
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [m.shape[1] for m in last_two] == [24, 32]
    getter = timm.create_model("slak_test", features_only=True, feature_cls="getter", out_indices=(0, 2))
    assert [o.shape[1] for o in getter(x)] == [8, 24]
    assert model.prune_intermediate_layers([1]) == [1] and len(model.stages) == 2


def test_unwrap_model_looks_through_compile_only_wrappers() -> None:
    from slak_model._wrappers import unwrap_model

    inner = create_model("slak_test")
    assert unwrap_model(torch.compile(inner)) is inner  # not compiled until called
    holder = torch.nn.Module()
    holder.module = inner  # a user's attribute named "module" is not a wrapper
    assert unwrap_model(holder) is holder
