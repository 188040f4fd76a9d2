"""Exact parameter counts and state-dict sizes of every measured reference configuration, and MACs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slak_model import count_complexity, create_model
from slak_model.layers import DepthwiseConv

K51 = [51, 49, 47, 13, 5]

# (variant, overrides, state-dict entries, parameters): every measured row of the reference's table.
REFERENCE_ROWS = [
    ("slak_tiny", {}, 470, 50_703_838),
    ("slak_small", {}, 920, 91_131_820),
    ("slak_base", {}, 920, 157_950_792),
    ("slak_tiny", {"width_factor": 1.0}, 470, 30_816_232),
    ("slak_small", {"width_factor": 1.0}, 920, 55_568_104),
    ("slak_base", {"width_factor": 1.0}, 920, 95_717_352),
    ("slak_tiny", {"kernel_size": [31, 29, 27, 13, 5]}, 470, 49_581_838),
    ("slak_tiny", {"kernel_size": [61, 59, 57, 13, 5]}, 470, 51_264_838),
    ("slak_tiny", {"use_bn": False}, 200, 50_652_214),
    ("slak_tiny", {"kernel_mode": "replknet", "width_factor": 1.0}, 362, 38_605_768),
    (
        "slak_tiny",
        {"kernel_mode": "replknet", "width_factor": 1.0, "kernel_size": [31, 29, 27, 13, 5]},
        362,
        32_120_008,
    ),
    (
        "slak_tiny",
        {"kernel_mode": "replknet", "width_factor": 1.0, "kernel_size": [7, 7, 7, 7, 100]},
        254,
        28_595_752,
    ),
    (
        "slak_tiny",
        {"kernel_mode": "naive", "width_factor": 1.0, "kernel_size": [7, 7, 7, 7, 100]},
        254,
        28_595_752,
    ),
    (
        "slak_tiny",
        {"kernel_mode": "naive", "width_factor": 1.0, "kernel_size": [7, 7, 7, 7, 100], "use_bn": False},
        164,
        28_582_504,
    ),
]
ROW_IDS = [
    "T-1.3",
    "S-1.3",
    "B-1.3",
    "T-1.0",
    "S-1.0",
    "B-1.0",
    "T-31",
    "T-61",
    "T-nobn",
    "T-replknet-51",
    "T-replknet-31",
    "convnext-replknet-7-100",
    "convnext-naive-7",
    "convnext-nobn",
]


def _meta(name: str, **overrides) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **overrides)


@pytest.mark.parametrize("variant,overrides,entries,params", REFERENCE_ROWS, ids=ROW_IDS)
def test_parameter_count_and_state_dict_size(
    variant: str, overrides: dict, entries: int, params: int
) -> None:
    model = _meta(variant, **overrides)
    assert len(model.state_dict()) == entries
    assert sum(p.numel() for p in model.parameters()) == params
    assert count_complexity(model).params == params


def test_slak_t_per_stage_parameters() -> None:
    per = count_complexity(_meta("slak_tiny")).per_stage
    # the reference's groups, with downsample i folded into stage i+1 and norm + head into head
    assert {k: v.params for k, v in per.items()} == {
        "stem": 6_324,
        "stages.0": 573_252,
        "stages.1": 124_001 + 1_883_187,
        "stages.2": 498_001 + 20_213_991,
        "stages.3": 1_994_004 + 24_410_082,
        "head": 1_996 + 999_000,
    }


@pytest.mark.parametrize(
    "variant,overrides,dense,uniform60",
    [
        ("slak_tiny", {}, 8.705, 5.22),
        ("slak_small", {}, 16.604, 9.96),
        ("slak_base", {}, 28.509, 17.10),
        ("slak_tiny", {"kernel_size": [31, 29, 27, 13, 5]}, 8.178, 4.91),
        ("slak_tiny", {"kernel_size": [61, 59, 57, 13, 5]}, 8.968, 5.38),
        (
            "slak_tiny",
            {"kernel_mode": "naive", "width_factor": 1.0, "kernel_size": [7, 7, 7, 7, 100]},
            4.456,
            None,
        ),
    ],
    ids=["T", "S", "B", "T-31", "T-61", "convnext-T"],
)
def test_gmacs_at_224(variant: str, overrides: dict, dense: float, uniform60: float | None) -> None:
    model = _meta(variant, **overrides)
    counts = count_complexity(model, image_size=224)
    assert round(counts.gmacs, 3) == dense
    assert counts.sparse_macs == counts.macs  # meta weights count as dense
    if uniform60 is not None:
        # the expected sparse GMACs are the paper's, printed to 2 decimals (0.005), plus its own rounding of counts
        assert count_complexity(model, sparsity=0.4).sparse_gmacs == pytest.approx(uniform60, abs=0.006)


def test_uniform_sparsity_keeps_1d_params_dense() -> None:
    model = _meta("slak_tiny")
    counts = count_complexity(model, sparsity=0.4)
    eligible = sum(p.numel() for p in model.parameters() if p.dim() in (2, 4))
    assert eligible == 50_576_524
    assert abs(counts.nonzero_params - (0.6 * eligible + (50_703_838 - eligible))) < 100


def _hook_count(model: nn.Module, masks: dict[str, torch.Tensor], size: int) -> int:
    """Independent oracle: run a forward, read each layer's output positions, multiply by the mask's ones."""
    names = {m: n for n, m in model.named_modules()}
    total = 0

    def hook(module: nn.Module, inputs, output) -> None:
        nonlocal total
        out_channels = module.weight.shape[0]
        positions = output.numel() // out_channels  # batch 1: H*W for convs, tokens for linears
        total += int(masks[names[module] + ".weight"].sum()) * positions

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, DepthwiseConv))
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("size", [64, 96], ids=["64px", "96px"])
def test_masked_macs_match_a_hook_based_count(size: int) -> None:
    torch.manual_seed(0)
    model = create_model("slak_test").eval()
    g = torch.Generator().manual_seed(1)
    masks = {
        n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters() if p.dim() in (2, 4)
    }
    counts = count_complexity(model, image_size=size, masks=masks)
    assert counts.sparse_macs == _hook_count(model, masks, size)
    dense = {n: torch.ones_like(m) for n, m in masks.items()}
    assert counts.macs == _hook_count(model, dense, size)
    assert counts.nonzero_params == counts.params - sum(int((~m).sum()) for m in masks.values())
    assert sum(s.sparse_macs for s in counts.per_stage.values()) == counts.sparse_macs


def test_without_masks_the_weights_nonzeros_count() -> None:
    torch.manual_seed(0)
    model = create_model("slak_test")
    with torch.no_grad():
        model.stages[2].blocks[0].mlp.fc1.weight[:, ::2] = 0
    counts = count_complexity(model, image_size=64)
    fc1 = model.stages[2].blocks[0].mlp.fc1.weight
    assert counts.params - counts.nonzero_params == fc1.numel() // 2
    assert counts.macs - counts.sparse_macs == (fc1.numel() // 2) * 4 * 4  # stage 3 is 4x4 at 64 px
    assert counts.to_dict()["per_stage"]["stages.2"]["params"] == counts.per_stage["stages.2"].params


def test_merged_model_counts() -> None:
    model = create_model("slak_test").eval().merge_for_inference()
    counts = count_complexity(model, image_size=64)
    assert counts.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"image_size": 16}, "image_size=16"),
        ({"sparsity": 1.0}, "sparsity=1.0"),
        ({"sparsity": 0.4, "masks": {}}, "not both"),
        ({"masks": {"head.weight": torch.ones(2, 2, dtype=torch.bool)}}, "masks['head.weight']"),
    ],
    ids=["tiny-image", "sparsity-one", "masks-and-sparsity", "mask-shape"],
)
def test_bad_counting_arguments(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        count_complexity(create_model("slak_test"), **kwargs)
    assert needle in str(err.value)
