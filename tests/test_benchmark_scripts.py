"""The benchmark scripts check every argument before building or timing anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_reports_every_bad_argument_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    rc = _script("throughput").main(["--variant", "slak_tny", "--modes", "train,foo", "--batch", "0",
                                     "--precisions", "fp33"])
    err = capsys.readouterr().err
    assert rc == 2
    for fragment in ("--variant='slak_tny': not a timm model (similar: ", "slak_tiny", "--precisions: fp33",
                     "--modes: foo", "--batch=0"):
        assert fragment in err, err


def test_loop_overhead_smoke_prints_its_attribution_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc = _script("loop_overhead").main(["data.source=synthetic", "data.train_size=64", "train.global_batch_size=16",
                                        "--steps", "2", "--repeats", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| bare step (batch on the device, fwd + bwd + AdamW) |" in out
    assert out.count("%") >= 7  # every row with its share of the bare step


def test_profile_step_reports_every_bad_argument_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    rc = _script("profile_step").main(["--variant", "slak_tny", "--modes", "eager,fast", "--optimizers", "sgd",
                                       "--batch", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    for fragment in ("--variant='slak_tny': not a timm model", "--modes: fast", "--optimizers: sgd", "--batch=0"):
        assert fragment in err, err


@pytest.mark.parametrize(
    "kernel,category",
    [
        ("void slak_dw::(anonymous namespace)::wgrad_kernel<__nv_bfloat16, 5>(...)", "ours: depthwise"),
        ("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv (cuDNN)"),
        ("void cudnn::bn_fw_tr_1C11_singleread_spec<__nv_bfloat16, 512, true, 1, 2, 0>(...)", "batchnorm"),
        ("void at::native::batch_norm_collect_statistics_kernel<...>", "batchnorm"),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<...>", "layernorm"),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "gemm (MLP, head)"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...AdamW...>", "optimizer"),
        ("triton_per_fused__native_batch_norm_legit_functional_add_0", "Inductor-fused reductions (norm statistics, sums)"),
        ("triton_poi_fused_add_gelu_mul_3", "Inductor-fused point-wise"),
        ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl...>", "element-wise (GELU, add, mul, ...)"),
    ],
)
def test_profile_step_puts_each_kernel_in_its_category(kernel: str, category: str) -> None:
    assert _script("profile_step").categorise(kernel) == category


def test_profile_step_finds_slak_tiny_stage_widths_the_gemm_check_pads() -> None:
    import timm
    import torch

    with torch.device("meta"):
        widths = _script("profile_step")._stage_widths(timm.create_model("slak_tiny"))
    assert widths == [124, 249, 499, 998]  # int(1.3 x (96, 192, 384, 768)): 249 and 499 are odd


def test_profile_step_gemm_alignment_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    rc = _script("profile_step").main(["--device", "cpu", "--variant", "slak_test", "--baseline", "none", "--batch",
                                       "1", "--image-size", "32", "--steps", "1", "--modes", "eager", "--optimizers",
                                       "foreach", "--profile-steps", "0", "--gemm-alignment"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| slak_test | 3 | 1 | 32 -> 32 |" in out
