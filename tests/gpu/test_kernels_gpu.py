"""The cuda and numba depthwise-conv backends on a GPU, against a float64 oracle, with poisoned outputs."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import cuda_ext, numba_dwconv
from kernels.reference import dwconv2d_reference
from tests.kernels.oracle import dwconv2d_errors, dwconv2d_term_norms
from tests.numerics import rel_error, rel_tol

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.numeric,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CHANNELS = (1, 3, 249)
MAPS = ((1, 1), (7, 7), (14, 15), (56, 56))
KERNELS = ((1, 1), (3, 3), (5, 51), (51, 5), (13, 5), (31, 31), (61, 61), (151, 1))
_seed = 0  # the session's numeric seed (tests/conftest.py), set by the fixture below


@pytest.fixture(autouse=True)
def _fresh_inputs(numeric_seed: int) -> None:
    global _seed
    _seed = numeric_seed


def _poison() -> None:
    """Fill the caching allocator's free memory with NaN so an unwritten output element cannot pass."""
    block = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    block.fill_(float("nan"))
    del block


def _check(backend: str, n: int, c: int, hw: tuple[int, int], k: tuple[int, int], dtype: torch.dtype,
           layout: str = "nchw", bias: bool = False) -> None:
    gen = torch.Generator(device="cuda").manual_seed(_seed + 1000 * c + 10 * k[0] + k[1])
    h, w = hw
    x = torch.randn(n, c, h, w, device="cuda", generator=gen).to(dtype)
    wt = torch.randn(c, 1, *k, device="cuda", generator=gen).to(dtype)
    b = torch.randn(c, device="cuda", generator=gen).to(dtype) if bias else None
    dy = torch.randn(n, c, h, w, device="cuda", generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], dim=3)[..., ::2]  # same values, non-contiguous

    x64, w64 = x.double().requires_grad_(), wt.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    ref = dwconv2d_reference(x64, w64, b64)
    ref.backward(dy.double())

    xi, wi = x.detach().requires_grad_(), wt.detach().requires_grad_()
    bi = b.detach().requires_grad_() if b is not None else None
    _poison()
    with kernels.use_backend(backend):
        out = kernels.dwconv2d(xi, wi, bi)
    _poison()
    out.backward(dy)
    results = {"fwd": out, "dgrad": xi.grad, "wgrad": wi.grad}
    exact = {"fwd": ref, "dgrad": x64.grad, "wgrad": w64.grad}
    if b is not None:
        results["bias"], exact["bias"] = bi.grad, b64.grad
    checks = dwconv2d_errors(dtype, x.shape, wt.shape, results, exact,
                             dwconv2d_term_norms(dwconv2d_reference, x, wt, b, dy))
    assert out.dtype == dtype and out.shape == x.shape
    bad = {name: f"{err:.3g} > {tol:.3g}" for name, (err, tol) in checks.items() if not err <= tol}
    assert not bad, f"{backend} {DTYPE_IDS[dtype]} C={c} {h}x{w} k={k}: rel. errors {bad}"


def _need(backend: str) -> None:
    ok, reason = cuda_ext.available() if backend == "cuda" else numba_dwconv.available(torch.device("cuda"))
    if not ok:
        pytest.fail(f"{backend} backend unavailable on this GPU: {reason}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("k", KERNELS, ids=lambda k: f"k{k[0]}x{k[1]}")
@pytest.mark.parametrize("hw", MAPS, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("c", CHANNELS, ids=lambda c: f"C{c}")
def test_cuda_grid(c: int, hw: tuple[int, int], k: tuple[int, int], dtype: torch.dtype) -> None:
    _need("cuda")
    _check("cuda", 2, c, hw, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("backend", ["cuda", "numba"])
def test_layouts_and_bias(backend: str, layout: str, dtype: torch.dtype) -> None:
    _need(backend)
    _check(backend, 3, 5, (14, 15), (13, 5), dtype, layout=layout, bias=True)
    _check(backend, 3, 5, (14, 15), (5, 13), dtype, layout=layout, bias=True)


@pytest.mark.parametrize(
    "n,c,hw,k",
    [(1, 2, (512, 512), (151, 5)), (1, 2, (512, 300), (5, 151)), (2, 3, (200, 512), (61, 61)),
     (1, 1, (256, 256), (151, 151)), (256, 3, (7, 7), (47, 5))],
    ids=["512x512-k151x5", "512x300-k5x151", "200x512-k61x61", "256x256-k151x151", "B256-7x7-k47x5"],
)
def test_cuda_large(n: int, c: int, hw: tuple[int, int], k: tuple[int, int]) -> None:
    _need("cuda")
    _check("cuda", n, c, hw, k, torch.float32)


# fp16/bf16 shapes with a long axis of >= 13 taps on maps <= 128 wide run the tensor-core forward (v7): SLaK's
# stage-2/3 maps, odd widths (scalar loads), 128-wide maps (two column groups per strip), kw = 1/3/7, 6-warp planes,
# and batches > 8 on one-warp planes (a warp loops over up to 4 planes of a 32-plane block).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "n,c,hw,k",
    [(2, 249, (28, 28), (49, 5)), (2, 249, (28, 28), (5, 49)), (2, 8, (14, 14), (47, 5)), (2, 8, (14, 14), (5, 47)),
     (2, 4, (40, 128), (13, 7)), (2, 4, (128, 33), (3, 61)), (3, 5, (20, 70), (1, 15)), (5, 3, (9, 11), (21, 3)),
     (40, 3, (7, 7), (13, 5)), (37, 2, (14, 15), (5, 47))],
    ids=["28x28-k49x5", "28x28-k5x49", "14x14-k47x5", "14x14-k5x47", "40x128-k13x7", "128x33-k3x61",
         "20x70-k1x15", "9x11-k21x3", "B40-7x7-k13x5", "B37-14x15-k5x47"],
)
def test_cuda_tensor_core_forward(n: int, c: int, hw: tuple[int, int], k: tuple[int, int], dtype: torch.dtype) -> None:
    _need("cuda")
    _check("cuda", n, c, hw, k, dtype)
    _check("cuda", n, c, hw, k, dtype, bias=True)


def test_cuda_no_mma_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """SLAK_DWCONV_NO_MMA=1 keeps bf16 on the FFMA kernels; both paths agree to bf16 rounding."""
    _need("cuda")
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(2, 4, 56, 56, device="cuda", generator=gen).to(torch.bfloat16)
    wt = torch.randn(4, 1, 51, 5, device="cuda", generator=gen).to(torch.bfloat16)
    fast = cuda_ext.dwconv2d(x, wt).double()
    monkeypatch.setenv("SLAK_DWCONV_NO_MMA", "1")
    slow = cuda_ext.dwconv2d(x, wt).double()
    # both are bf16 results of the same fp32-accumulated sums: they differ by at most two roundings
    assert float((fast - slow).norm() / slow.norm()) <= rel_tol(torch.bfloat16, 51 * 5, layers=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("k", [(1, 1), (5, 51), (51, 5), (13, 5), (31, 31)], ids=lambda k: f"k{k[0]}x{k[1]}")
@pytest.mark.parametrize("hw", [(1, 1), (7, 7), (14, 15)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("c", [1, 3], ids=lambda c: f"C{c}")
def test_numba_grid(c: int, hw: tuple[int, int], k: tuple[int, int], dtype: torch.dtype) -> None:
    _need("numba")
    _check("numba", 2, c, hw, k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_opcheck(dtype: torch.dtype) -> None:
    _need("cuda")
    x = torch.randn(2, 3, 9, 8, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(3, 1, 7, 3, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(3, device="cuda", dtype=dtype, requires_grad=True)
    torch.library.opcheck(cuda_ext._forward, (x, w, b))
    torch.library.opcheck(cuda_ext._forward, (x.detach().to(memory_format=torch.channels_last), w, None))
    dy = torch.randn(2, 3, 9, 8, device="cuda", dtype=dtype)
    torch.library.opcheck(cuda_ext._grad_input, (dy, w.detach()))
    torch.library.opcheck(cuda_ext._grad_weight, (x.detach(), dy, 7, 3))


def test_compile_fullgraph() -> None:
    _need("cuda")
    x = torch.randn(2, 4, 14, 14, device="cuda", requires_grad=True)
    w = torch.randn(4, 1, 13, 5, device="cuda", requires_grad=True)
    with kernels.use_backend("cuda"):
        compiled = torch.compile(lambda a, b: kernels.dwconv2d(a, b).square().sum(), fullgraph=True)
        loss = compiled(x, w)
        loss.backward()
    ref = dwconv2d_reference(x.double(), w.double()).square().sum()
    # fp32 conv (65 taps), then a sum of squares over its 1568 outputs
    assert abs(float(loss) - float(ref)) <= rel_tol(torch.float32, 2 * 4 * 14 * 14, layers=2) * abs(float(ref))
    assert x.grad is not None and w.grad is not None


def test_auto_picks_cuda_on_gpu() -> None:
    _need("cuda")
    with kernels.use_backend("auto"):
        assert kernels.active_backend("cuda") == "cuda"
        assert kernels.active_backend("cpu") == "torch"
    rows = {r["backend"]: r for r in kernels.backend_report("cuda", build=True)}
    assert rows["cuda"]["available"] is True


def test_autocast_bf16() -> None:
    _need("cuda")
    x = torch.randn(2, 6, 28, 28, device="cuda")
    w = torch.randn(6, 1, 5, 49, device="cuda", requires_grad=True)
    with kernels.use_backend("cuda"), torch.autocast("cuda", dtype=torch.bfloat16):
        out = kernels.dwconv2d(x, w)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    ref = dwconv2d_reference(x.bfloat16().double(), w.bfloat16().double())
    assert rel_error(out, ref) <= rel_tol(torch.bfloat16, 5 * 49)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("k", [(51, 5), (5, 13), (31, 31), (3, 3)], ids=lambda k: f"k{k[0]}x{k[1]}")
def test_binding_reads_weights_as_given(k: tuple[int, int], wdtype: torch.dtype) -> None:
    """The kernels orient, flip and convert the weight themselves: any kernel dtype, flip=True = input gradient."""
    _need("cuda")
    module = cuda_ext._module()
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(3, 5, 14, 15, device="cuda", generator=gen).bfloat16()
    wt = torch.randn(5, 1, *k, device="cuda", generator=gen).to(wdtype)
    w64 = wt.double()
    for flip in (False, True):
        _poison()
        out = module.forward(x, wt, None, flip)
        ref = dwconv2d_reference(x.double(), w64.flip((-2, -1)) if flip else w64)
        assert out.dtype == torch.bfloat16
        # a wider weight is rounded to bf16 inside the kernel: one more bf16 rounding per product
        assert rel_error(out, ref) <= rel_tol(torch.bfloat16, k[0] * k[1], layers=2), (k, wdtype, flip)


@pytest.mark.parametrize(
    "knobs",
    [
        {"SLAK_DWCONV_PLANE_THREADS": "32", "SLAK_DWCONV_WG_THREADS": "32", "SLAK_DWCONV_WG_BPS": "1",
         "SLAK_DWCONV_MMA_WGRAD": "0"},
        {"SLAK_DWCONV_MMA_P": "3", "SLAK_DWCONV_MMA_WARPS": "2", "SLAK_DWCONV_WG_BPS": "64"},
        {"SLAK_DWCONV_MMA_MIN_K": "3", "SLAK_DWCONV_MMA_MIN_HS": "1", "SLAK_DWCONV_NO_PIPE": "1",
         "SLAK_DWCONV_MMA_WGRAD": "1"},
    ],
    ids=["small-blocks", "odd-planes", "mma-everywhere-no-pipe"],
)
@pytest.mark.parametrize("k", [(47, 5), (5, 47), (5, 5), (13, 5)], ids=lambda k: f"k{k[0]}x{k[1]}")
def test_geometry_knobs_keep_results(monkeypatch: pytest.MonkeyPatch, k: tuple[int, int], knobs: dict) -> None:
    """Tuning knobs change the launch geometry only: every op still matches float64."""
    _need("cuda")
    for name, value in knobs.items():
        monkeypatch.setenv(name, value)
    for dtype in (torch.float32, torch.bfloat16):
        _check("cuda", 9, 7, (14, 14), k, dtype)
        _check("cuda", 5, 3, (7, 7), k, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    "shape",
    [(2, 3, (56, 56), (51, 5)), (3, 5, (14, 15), (5, 13)), (9, 7, (7, 7), (13, 5)), (2, 4, (28, 28), (5, 49)),
     (2, 3, (64, 33), (61, 3)), (3, 5, (14, 15), (5, 5)), (2, 3, (9, 20), (7, 7)), (4, 3, (1, 1), (1, 1)),
     (2, 3, (20, 9), (151, 1)), (2, 3, (70, 20), (51, 5))],
    ids=lambda s: f"C{s[1]}-{s[2][0]}x{s[2][1]}-k{s[3][0]}x{s[3][1]}",
)
def test_tensor_core_wgrad_forced(monkeypatch: pytest.MonkeyPatch, shape: tuple, dtype: torch.dtype) -> None:
    """The tensor-core weight gradient, forced on (SLAK_DWCONV_MMA_WGRAD=1), matches float64; shapes it does not
    take (> 64 effective taps, > 64 rows along the long axis) fall back to the FFMA kernels."""
    _need("cuda")
    monkeypatch.setenv("SLAK_DWCONV_MMA_WGRAD", "1")
    n, c, hw, k = shape
    _check("cuda", n, c, hw, k, dtype)
