"""Loading reference-named checkpoints strictly, from dicts and files, and the mismatch diagnosis."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch

from slak_model import CheckpointMismatchError, create_model, load_official_checkpoint
from slak_model.checkpoint import (
    checkpoint_filter_fn,
    ours_to_reference,
    reference_to_ours,
    to_reference_state_dict,
)


@pytest.mark.parametrize(
    "ref,ours",
    [
        ("downsample_layers.0.0.weight", "stem.0.weight"),
        ("downsample_layers.2.1.bias", "stages.2.downsample.1.bias"),
        ("stages.2.5.large_kernel.LoRA1.conv.weight", "stages.2.blocks.5.large_kernel.tall.conv.weight"),
        (
            "stages.2.5.large_kernel.LoRA2.bn.running_var",
            "stages.2.blocks.5.large_kernel.wide.bn.running_var",
        ),
        (
            "stages.0.0.large_kernel.small_conv.conv.weight",
            "stages.0.blocks.0.large_kernel.small.conv.weight",
        ),
        ("stages.3.2.large_kernel.lkb_origin.bn.weight", "stages.3.blocks.2.large_kernel.square.bn.weight"),
        ("stages.3.2.large_kernel.lkb_reparam.bias", "stages.3.blocks.2.large_kernel.deploy_square.bias"),
        ("module.stages.1.0.pwconv1.weight", "stages.1.blocks.0.mlp.fc1.weight"),
        ("backbone.stages.1.0.pwconv2.bias", "stages.1.blocks.0.mlp.fc2.bias"),
        ("stages.1.0.gamma", "stages.1.blocks.0.gamma"),
        ("head.weight", "head.weight"),
        ("stages.1.blocks.0.mlp.fc1.weight", "stages.1.blocks.0.mlp.fc1.weight"),
    ],
    ids=[
        "stem",
        "downsample",
        "LoRA1",
        "LoRA2",
        "small_conv",
        "lkb_origin",
        "lkb_reparam",
        "module-prefix",
        "backbone-prefix",
        "gamma",
        "head",
        "already-ours",
    ],
)
def test_key_mapping(ref: str, ours: str) -> None:
    assert reference_to_ours(ref) == ours


def test_slak_t_reference_state_dict_loads_strictly(ref_shapes) -> None:
    shapes = ref_shapes()  # SLaK-T, Decom, 51-49-47-13 / N=5, width 1.3: the reference's key/shape template
    assert len(shapes) == 470
    sd = {k: torch.zeros(s) if s else torch.tensor(0) for k, s in shapes.items()}
    marker = torch.arange(499 * 47 * 5, dtype=torch.float32).reshape(499, 1, 47, 5)
    sd["stages.2.5.large_kernel.LoRA1.conv.weight"] = marker
    torch.manual_seed(0)
    model = create_model("slak_tiny")
    load_official_checkpoint(model, {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 299})
    assert torch.equal(model.stages[2].blocks[5].large_kernel.tall.conv.weight, marker)
    assert model.stages[3].blocks[2].mlp.fc2.weight.abs().sum() == 0


@pytest.mark.parametrize(
    "variant,overrides,ref_kwargs",
    [
        ("slak_small", {}, {"depths": (3, 3, 27, 3)}),
        ("slak_base", {}, {"depths": (3, 3, 27, 3), "widths": (166, 332, 665, 1331)}),
        ("slak_tiny", {"kernel_size": [31, 29, 27, 13, 5]}, {"kernel_size": (31, 29, 27, 13, 5)}),
        ("slak_tiny", {"use_bn": False}, {"bn": False}),
        (
            "slak_tiny",
            {"kernel_mode": "replknet", "width_factor": 1.0},
            {"decom": False, "widths": (96, 192, 384, 768)},
        ),
        (
            "slak_tiny",
            {"kernel_mode": "naive", "kernel_size": [7, 7, 7, 7, 100], "width_factor": 1.0},
            {"decom": False, "widths": (96, 192, 384, 768), "kernel_size": (7, 7, 7, 7, 100)},
        ),
        ("slak_tiny", {"layer_scale_init": 0.0}, {"layer_scale": False}),
    ],
    ids=["S", "B", "T-31", "T-nobn", "T-replknet", "convnext-7-100", "no-layer-scale"],
)
def test_other_reference_layouts_match_key_for_key(variant, overrides, ref_kwargs, ref_shapes) -> None:
    with torch.device("meta"):
        model = create_model(variant, **overrides)
    shapes = ref_shapes(**ref_kwargs)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {reference_to_ours(k): s for k, s in shapes.items()}
    assert mapped == ours


def test_file_with_reference_args_loads_weights_only(tmp_path, reference_state_dict, test_arch) -> None:
    sd = reference_state_dict(seed=3, **test_arch)
    args = argparse.Namespace(model="SLaK_tiny", kernel_size=[13, 11, 9, 7, 3], Decom=True, width_factor=1.0)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": sd, "model_ema": sd, "epoch": "best", "args": args}, path)
    model = load_official_checkpoint(create_model("slak_test"), path)
    assert torch.equal(model.head.weight, sd["head.weight"])
    assert torch.equal(
        model.stages[2].blocks[1].large_kernel.wide.bn.running_var,
        sd["stages.2.1.large_kernel.LoRA2.bn.running_var"],
    )
    ema = load_official_checkpoint(create_model("slak_test"), path, key="model_ema")
    assert torch.equal(ema.stem[0].weight, sd["downsample_layers.0.0.weight"])


def test_file_with_code_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "hook": print}, path)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        load_official_checkpoint(create_model("slak_test"), path)


def test_timm_pretrained_file_goes_through_the_filter(tmp_path, reference_state_dict, test_arch) -> None:
    sd = reference_state_dict(seed=4, **test_arch)
    path = tmp_path / "ref.pth"
    torch.save({"state_dict": sd}, path)
    model = timm.create_model("slak_test", pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    assert torch.equal(model.stages[1].blocks[0].mlp.fc1.weight, sd["stages.1.0.pwconv1.weight"])
    assert checkpoint_filter_fn({"model": sd}, model).keys() == model.state_dict().keys()


def _error(model, sd, **kw) -> str:
    with pytest.raises(CheckpointMismatchError) as err:
        load_official_checkpoint(model, sd, **kw)
    assert isinstance(err.value, ValueError)
    return str(err.value)


def test_wrong_kernel_sizes_name_the_right_ones(reference_state_dict, test_arch) -> None:
    sd = reference_state_dict(**{**test_arch, "kernel_size": (11, 9, 7, 5, 3)})
    text = _error(create_model("slak_test"), sd)
    assert "build with kernel_size=[11, 9, 7, 5, 3]" in text
    assert (
        "mis-shaped: stages.0.blocks.0.large_kernel.tall.conv.weight "
        "checkpoint (8, 1, 11, 3) vs model (8, 1, 13, 3)" in text
    )


def test_decom_mismatch_lists_every_key(reference_state_dict, test_arch) -> None:
    sd = reference_state_dict(**{**test_arch, "decom": False})
    model = create_model("slak_test")
    text = _error(model, sd)
    assert "checkpoint has square kernels" in text and "kernel_mode='replknet'" in text
    missing = [k for k in model.state_dict() if ".tall." in k or ".wide." in k]
    unexpected = [reference_to_ours(k) for k in sd if "lkb_origin" in k]
    assert missing and unexpected
    assert all(f"missing: {k}" in text for k in missing)
    assert all(f"unexpected: {k}" in text for k in unexpected)
    text2 = _error(create_model("slak_test", kernel_mode="replknet"), reference_state_dict(**test_arch))
    assert "checkpoint is decomposed" in text2 and "kernel_mode='decomposed'" in text2


def test_wrong_width_suggests_the_factor(reference_state_dict, test_arch) -> None:
    sd = reference_state_dict(**{**test_arch, "widths": (10, 20, 31, 41)})
    text = _error(create_model("slak_test"), sd)
    assert "stage widths [10, 20, 31, 41]" in text and "width_factor=1.3 reproduces them" in text


@pytest.mark.parametrize(
    "ref_change,needle",
    [
        ({"bn": False}, "use_bn=False"),
        ({"layer_scale": False}, "layer_scale_init=0"),
        ({"depths": (1, 1, 3, 1)}, "depths [1, 1, 3, 1]"),
        ({"num_classes": 1000}, "num_classes=1000"),
        ({"kernel_size": (13, 11, 9, 7, 15)}, "has no small_conv branch"),
    ],
    ids=["bn", "layer-scale", "depths", "classes", "no-small"],
)
def test_other_causes(ref_change: dict, needle: str, reference_state_dict, test_arch) -> None:
    if (
        "kernel_size" in ref_change
    ):  # N > M is not decomposable: compare against a replknet checkpoint instead
        sd = reference_state_dict(**{**test_arch, **ref_change, "decom": False})
        model = create_model("slak_test", kernel_mode="replknet")
    else:
        sd = reference_state_dict(**{**test_arch, **ref_change})
        model = create_model("slak_test")
    text = _error(model, sd)
    assert needle in text


def test_args_in_the_checkpoint_are_quoted(reference_state_dict, test_arch) -> None:
    sd = reference_state_dict(**{**test_arch, "kernel_size": (11, 9, 7, 5, 3)})
    args = argparse.Namespace(kernel_size=[11, 9, 7, 5, 3], Decom=True, lr=4e-3)
    text = _error(create_model("slak_test"), {"model": sd, "args": args})
    assert (
        "'kernel_size': [11, 9, 7, 5, 3]" in text
        and "'Decom': True" in text
        and "lr" not in text.split("training arguments")[1].split("\n")[0]
    )


def test_merged_checkpoint_needs_a_merged_model(reference_state_dict, test_arch) -> None:
    model = create_model("slak_test").eval()
    merged = create_model("slak_test").eval().merge_for_inference()
    text = _error(model, merged.state_dict())
    assert "merge_for_inference()" in text
    load_official_checkpoint(create_model("slak_test").merge_for_inference(), merged.state_dict())


@pytest.mark.parametrize(
    "overrides,ref_change",
    [({}, {}), ({"kernel_mode": "replknet"}, {"decom": False}), ({"use_bn": False}, {"bn": False})],
    ids=["slak", "replknet", "no-bn"],
)
def test_export_round_trips_to_reference_names(overrides, ref_change, ref_shapes, test_arch) -> None:
    model = create_model("slak_test", **overrides)
    exported = to_reference_state_dict(model)
    assert {k: tuple(v.shape) for k, v in exported.items()} == ref_shapes(**{**test_arch, **ref_change})
    fresh = load_official_checkpoint(create_model("slak_test", **overrides), exported)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_merged_decomposed_kernels_cannot_be_exported() -> None:
    assert ours_to_reference("stages.0.blocks.0.large_kernel.deploy_square.weight") == (
        "stages.0.0.large_kernel.lkb_reparam.weight"
    )
    with pytest.raises(ValueError, match="cannot hold merged decomposed kernels"):
        to_reference_state_dict(create_model("slak_test").eval().merge_for_inference())
