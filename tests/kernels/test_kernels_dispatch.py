"""Backend choice: SLAK_KERNEL_BACKEND, explicit requests that cannot run, the report and kernels.info."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import _build, dispatch, info


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLAK_KERNEL_BACKEND", raising=False)
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def test_auto_on_cpu_is_torch() -> None:
    assert kernels.requested_backend() == "auto"
    assert kernels.active_backend("cpu") == "torch"


@pytest.mark.parametrize("value", ["torch", "TORCH", " torch "], ids=["lower", "upper", "spaces"])
def test_env_var_selects_torch(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SLAK_KERNEL_BACKEND", value)
    assert kernels.active_backend("cpu") == "torch"


def test_unknown_env_value_lists_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLAK_KERNEL_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"SLAK_KERNEL_BACKEND='triton'.*auto, cuda, numba, torch"):
        kernels.active_backend("cpu")


def test_set_backend_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="set_backend"):
        kernels.set_backend("cudnn")


def test_requested_cuda_on_cpu_tensor_says_why_and_how(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLAK_KERNEL_BACKEND", "cuda")
    with pytest.raises(kernels.BackendUnavailableError, match=r"cannot run on cpu.*Fix: .*SLAK_KERNEL_BACKEND=auto"):
        kernels.dwconv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3))


def test_requested_numba_without_simulator_mentions_cudasim() -> None:
    with kernels.use_backend("numba"), pytest.raises(kernels.BackendUnavailableError, match="NUMBA_ENABLE_CUDASIM"):
        kernels.dwconv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3))


def test_use_backend_restores_previous_choice() -> None:
    with kernels.use_backend("torch"):
        assert kernels.requested_backend() == "torch"
        with kernels.use_backend("cuda"):
            assert kernels.requested_backend() == "cuda"
        assert kernels.requested_backend() == "torch"
    assert kernels.requested_backend() == "auto"


def test_choice_is_made_once_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = dispatch._availability

    def counting(name, device, build=True):  # noqa: ANN001, ANN202
        calls.append(name)
        return real(name, device, build)

    monkeypatch.setattr(dispatch, "_availability", counting)
    with kernels.use_backend("torch"):
        for _ in range(3):
            kernels.dwconv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1))
    assert calls == ["torch"]


def test_report_lists_every_backend_with_a_reason() -> None:
    rows = kernels.backend_report("cpu")
    assert [r["backend"] for r in rows] == ["cuda", "numba", "torch"]
    assert all(isinstance(r["reason"], str) and r["reason"] for r in rows)
    by_name = {r["backend"]: r for r in rows}
    assert by_name["torch"]["available"] is True and by_name["torch"]["active"] is True
    assert by_name["cuda"]["available"] is False


def test_report_does_not_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(build: bool = True):  # noqa: ANN202
        raise AssertionError("backend_report(build=False) must not start a build")

    monkeypatch.setattr(_build, "load", boom)
    kernels.backend_report("cpu", build=False)


def test_info_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert info.main(["--device", "cpu", "--no-build"]) == 0
    out = capsys.readouterr().out
    assert "SLAK_KERNEL_BACKEND=auto" in out
    for name in ("cuda", "numba", "torch"):
        assert f"\n{name} " in out


def test_import_kernels_does_not_import_numba_or_build() -> None:
    import subprocess
    import sys

    code = "import sys, kernels; assert 'numba' not in sys.modules; from kernels import _build; assert _build.status()[0] is None"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "dtype,k,reason",
    [(torch.float64, (3, 3), "dtype torch.float64"), (torch.float32, (153, 1), "sides up to 151")],
    ids=["float64", "kernel-153"],
)
def test_kernel_backends_declare_what_they_take(dtype: torch.dtype, k: tuple[int, int], reason: str) -> None:
    x = torch.zeros(1, 1, 4, 4, dtype=dtype)
    w = torch.zeros(1, 1, *k, dtype=dtype)
    assert reason in dispatch._unsupported("cuda", x, w)
    assert reason in dispatch._unsupported("numba", x, w)
    assert dispatch._unsupported("torch", x, w) == ""
    assert dispatch._unsupported("cuda", x.float(), torch.zeros(1, 1, 3, 3)) == ""


def test_auto_falls_back_to_torch_for_unsupported_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "active_backend", lambda device=None: "cuda")
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    out = kernels.dwconv2d(x, torch.randn(2, 1, 3, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
    with kernels.use_backend("cuda"), pytest.raises(kernels.BackendUnavailableError, match="float64"):
        kernels.dwconv2d(x, torch.randn(2, 1, 3, 3, dtype=torch.float64))


def _channels_last_fp32() -> torch.Tensor:
    return torch.randn(2, 6, 9, 11).contiguous(memory_format=torch.channels_last)


def test_shared_input_is_the_input_itself_when_nothing_needs_converting() -> None:
    x = _channels_last_fp32()
    assert kernels.shared_input(x) is x  # torch backend reads any layout; no autocast: no cast


def test_shared_input_casts_once_to_the_autocast_dtype_keeping_the_layout_torch_reads() -> None:
    x = _channels_last_fp32()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.shared_input(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, x.to(torch.bfloat16))


def test_shared_input_is_nchw_contiguous_for_a_backend_that_reads_nchw(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "active_backend", lambda device=None: "cuda")
    x = _channels_last_fp32()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = dispatch.shared_input(x)
    assert y.dtype == torch.bfloat16 and y.is_contiguous()
    assert torch.equal(y, x.to(torch.bfloat16))
