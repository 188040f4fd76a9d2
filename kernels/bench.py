"""``python -m kernels.bench``: per-layer timings of the depthwise conv on SLaK-T's shapes, against floors.

For every SLaK-T depthwise shape (and the dense 51x51 / 31x31 / 7x7 baselines) it times forward,
input gradient and weight gradient of each backend plus PyTorch's native kernel in NCHW and
channels_last, in fp32 and bf16, and prints medians, the % of the floor (max of bytes over the measured
copy bandwidth and dense FLOPs over the measured FFMA rate) and the sum over one SLaK-T training step
(54 convs). Needs a CUDA device. By default each op is timed as GPU time: replays of a CUDA graph of
(L2 flush, op) minus the flushes alone, so the host's dispatch time, which exceeds the GPU time of the
small stage-3/4 convs, is not counted. ``--timer eager`` times eager calls with ``triton.testing.do_bench``
(L2 flushed between repetitions; CUDA events without Triton), host dispatch included.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cuda_ext, environment, numba_dwconv

__all__ = ["Shape", "slak_tiny_shapes", "measure_ceilings", "main"]

log = logging.getLogger(__name__)

OPS = ("fwd", "dgrad", "wgrad")


@dataclass(frozen=True)
class Shape:
    """One depthwise conv layer: batch, channels, map size, kernel, and how often one SLaK-T step runs it."""

    stage: str
    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    count: int  # occurrences in one SLaK-T step (0 for baselines)

    @property
    def label(self) -> str:
        return f"B{self.n} {self.stage} C{self.c} {self.h}x{self.w} k{self.kh}x{self.kw}"


def slak_tiny_shapes(batch: int) -> list[Shape]:
    """SLaK-T at width 1.3: C = 124/249/499/998 at 56/28/14/7 px, K = 51/49/47/13, depths 3/3/9/3."""
    shapes = []
    for stage, (c, hw, k, depth) in enumerate(
        [(124, 56, 51, 3), (249, 28, 49, 3), (499, 14, 47, 9), (998, 7, 13, 3)], start=1
    ):
        for kh, kw in ((k, 5), (5, k), (5, 5)):
            shapes.append(Shape(f"s{stage}", batch, c, hw, hw, kh, kw, depth))
    return shapes


def baseline_shapes(batch: int) -> list[Shape]:
    """Dense square kernels at stage 1 (RepLKNet/ConvNeXt-style baselines)."""
    return [Shape("s1", batch, 124, 56, 56, k, k, 0) for k in (51, 31, 7)]


def _graph_timer(flush_bytes: int = 256 << 20) -> Callable[[Callable[[], object]], float]:
    """GPU time of ``fn`` without the host's dispatch time: CUDA-graph replays of n x (L2 flush, fn) minus n x flush.

    ``do_bench`` times from an event recorded before the call to one after it, so when the host needs longer
    to issue a call (Python custom-op dispatch, ~30-100 us) than the GPU needs to run it, the host's time is
    what gets measured; that is the case for every stage-3/4 shape. Replaying a captured graph issues the
    same kernels (auxiliary ones included) with no host in between, so this measures the GPU's work alone,
    still from DRAM (the flush runs before every call). Falls back to ``do_bench`` when ``fn`` cannot be
    captured.
    """
    eager = _timer()
    flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device="cuda")

    def replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def capture(body: Callable[[], object], n: int) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                flush.zero_()
                body()
        return graph

    def timed(fn: Callable[[], object]) -> float:
        estimate = eager(fn)
        n = int(min(20, max(3, 4.0 / max(estimate, 1e-3))))
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()  # warm the allocator on the capture stream
            torch.cuda.current_stream().wait_stream(side)
            with_fn, flush_only = capture(fn, n), capture(lambda: None, n)
        except RuntimeError as exc:  # capture refused (e.g. a host sync inside fn)
            log.warning("CUDA graph capture failed (%s); timing eagerly", exc)
            return estimate
        for graph in (with_fn, flush_only):  # first replays upload the graphs; keep them out of the medians
            replay_ms(graph, 2)
        reps = 15
        return max(0.0, (replay_ms(with_fn, reps) - replay_ms(flush_only, reps)) / n)

    return timed


def _timer() -> Callable[[Callable[[], object]], float]:
    try:
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=10, rep=30, return_mode="median"))
    except Exception:  # noqa: BLE001 - Triton is optional; fall back to events

        def events(fn: Callable[[], object]) -> float:
            for _ in range(3):
                fn()
            times = []
            for _ in range(15):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

        return events


def measure_ceilings(time_fn: Callable[[Callable[[], object]], float]) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per s) and the fp32 FFMA rate (FLOP/s), measured here."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * 4 / (ms * 1e-3)
    del src, dst
    flops = float("nan")
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def fma_chain(x_ptr, out_ptr, n_iter: tl.constexpr, block: tl.constexpr):
            offs = tl.program_id(0) * block + tl.arange(0, block)
            a = tl.load(x_ptr + offs)
            b, c, d = a + 1.0, a + 2.0, a + 3.0
            for _ in range(n_iter):
                a = a * 0.9999 + 0.0001
                b = b * 0.9999 + 0.0001
                c = c * 0.9999 + 0.0001
                d = d * 0.9999 + 0.0001
            tl.store(out_ptr + offs, a + b + c + d)

        n, n_iter, block = 1 << 22, 1024, 256
        x = torch.rand(n, device="cuda")
        out = torch.empty_like(x)
        ms = time_fn(lambda: fma_chain[(n // block,)](x, out, n_iter=n_iter, block=block))
        flops = 2 * 4 * n_iter * n / (ms * 1e-3)
    except Exception:  # noqa: BLE001 - without Triton the arithmetic ceiling stays unmeasured
        pass
    return {"bandwidth": bandwidth, "ffma": flops}


def _floor_ms(shape: Shape, op: str, dtype: torch.dtype, ceil: dict[str, float]) -> float:
    size = torch.tensor([], dtype=dtype).element_size()
    plane = shape.n * shape.c * shape.h * shape.w
    bytes_ = (2 * plane + shape.c * shape.kh * shape.kw) * size
    flops = 2.0 * plane * shape.kh * shape.kw
    return max(bytes_ / ceil["bandwidth"], flops / ceil["ffma"] if ceil["ffma"] == ceil["ffma"] else 0.0) * 1e3


def _impls(shape: Shape, dtype: torch.dtype, with_numba: bool) -> dict[str, dict[str, Callable[[], object]]]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, c, h, w, kh, kw = shape.n, shape.c, shape.h, shape.w, shape.kh, shape.kw
    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype, generator=gen)
    dy = torch.randn(n, c, h, w, device="cuda", dtype=dtype, generator=gen)
    wt = torch.randn(c, 1, kh, kw, device="cuda", dtype=dtype, generator=gen) * 0.05
    pad = (kh // 2, kw // 2)

    def native(xx: torch.Tensor, dd: torch.Tensor, ww: torch.Tensor) -> dict[str, Callable[[], object]]:
        def bwd(mask: list[bool]) -> Callable[[], object]:
            return lambda: torch.ops.aten.convolution_backward(
                dd, xx, ww, None, [1, 1], list(pad), [1, 1], False, [0, 0], c, mask
            )

        return {
            "fwd": lambda: F.conv2d(xx, ww, None, 1, pad, 1, c),
            "dgrad": bwd([True, False, False]),
            "wgrad": bwd([False, True, False]),
        }

    cl = torch.channels_last
    impls = {
        "torch_nchw": native(x, dy, wt),
        "torch_cl": native(x.to(memory_format=cl), dy.to(memory_format=cl), wt.to(memory_format=cl)),
    }
    if cuda_ext.available()[0]:
        impls["cuda"] = {
            "fwd": lambda: cuda_ext._forward(x, wt, None),
            "dgrad": lambda: cuda_ext._grad_input(dy, wt),
            "wgrad": lambda: cuda_ext._grad_weight(x, dy, kh, kw),
        }
    if with_numba and numba_dwconv.available(x.device)[0]:
        impls["numba"] = {
            "fwd": lambda: numba_dwconv._fwd(x, wt[:, 0], None),
            "dgrad": lambda: numba_dwconv._fwd(dy, wt[:, 0].flip((-2, -1)), None),
            "wgrad": lambda: numba_dwconv._wgrad(x, dy, kh, kw),
        }
    return impls


def run(
    shapes: list[Shape],
    dtypes: list[torch.dtype],
    with_numba: bool,
    only: list[str] | None = None,
    timer: str = "graph",
) -> tuple[list[dict], dict[str, float]]:
    """Time every (shape, dtype, implementation, op); returns rows and the measured ceilings.

    ``timer="graph"`` measures GPU time (CUDA-graph replay, see :func:`_graph_timer`); ``"eager"`` is
    ``do_bench`` on the eager call, which includes the host's dispatch time when that is the longer one.
    """
    torch.backends.cudnn.benchmark = True
    ceil = measure_ceilings(_timer())
    time_fn = _graph_timer() if timer == "graph" else _timer()
    log.info("ceilings: copy %.2f TB/s, FFMA %.1f TFLOP/s", ceil["bandwidth"] / 1e12, ceil["ffma"] / 1e12)
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for impl, fns in _impls(shape, dtype, with_numba).items():
                if only and impl not in only:
                    continue
                row = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "impl": impl}
                for op in OPS:
                    fns[op]()  # first call: cuDNN autotuning / JIT, kept out of the timing
                    row[op] = time_fn(fns[op])
                row["floor"] = sum(_floor_ms(shape, op, dtype, ceil) for op in OPS)
                rows.append(row)
                log.info("%s %s %s: fwd %.4g dgrad %.4g wgrad %.4g ms", shape.label, row["dtype"], impl,
                         row["fwd"], row["dgrad"], row["wgrad"])
            torch.cuda.empty_cache()
    return rows, ceil


def format_tables(rows: list[dict], ceil: dict[str, float]) -> str:
    """Markdown: one row per (shape, dtype, impl), then the per-step sums."""
    out = [
        f"Ceilings measured here: copy {ceil['bandwidth'] / 1e12:.2f} TB/s (read+write), "
        f"fp32 FFMA {ceil['ffma'] / 1e12:.1f} TFLOP/s.",
        "",
        "| shape | dtype | impl | fwd ms | dgrad ms | wgrad ms | total ms | floor ms | % of floor | vs torch_nchw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    native = {(r["shape"], r["dtype"]): r for r in rows if r["impl"] == "torch_nchw"}
    for r in rows:
        total = r["fwd"] + r["dgrad"] + r["wgrad"]
        ref = native.get((r["shape"], r["dtype"]))
        speedup = (ref["fwd"] + ref["dgrad"] + ref["wgrad"]) / total if ref else float("nan")
        out.append(
            f"| {r['shape'].label} | {r['dtype']} | {r['impl']} | {r['fwd']:.4g} | {r['dgrad']:.4g} | "
            f"{r['wgrad']:.4g} | {total:.4g} | {r['floor']:.3g} | {100 * r['floor'] / total:.0f}% | {speedup:.1f}x |"
        )
    out += ["", "Sum over the 54 depthwise convs of one SLaK-T step:", "",
            "| batch | dtype | impl | fwd ms | fwd+dgrad+wgrad ms |", "|---|---|---|---|---|"]
    sums: dict[tuple[int, str, str], list[float]] = {}
    for r in rows:
        if r["shape"].count == 0:
            continue
        key = (r["shape"].n, r["dtype"], r["impl"])
        acc = sums.setdefault(key, [0.0, 0.0, 0])
        acc[0] += r["shape"].count * r["fwd"]
        acc[1] += r["shape"].count * (r["fwd"] + r["dgrad"] + r["wgrad"])
        acc[2] += r["shape"].count
    for (batch, dtype, impl), (fwd, total, count) in sorted(sums.items()):
        if count == 54:
            out.append(f"| {batch} | {dtype} | {impl} | {fwd:.2f} | {total:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128], help="batch sizes (default 64 128)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], help="dtypes to time")
    parser.add_argument("--no-baselines", action="store_true", help="skip the dense 51x51/31x31/7x7 shapes")
    parser.add_argument("--numba", action="store_true", help="also time the (slow) numba backend")
    parser.add_argument("--out", default=None, help="also write the markdown to this file")
    parser.add_argument("--impl", nargs="+", default=None, help="only these implementations (e.g. cuda torch_nchw)")
    parser.add_argument(
        "--timer",
        choices=("graph", "eager"),
        default="graph",
        help="graph: GPU time from CUDA-graph replays (default); eager: do_bench on eager calls, host dispatch included",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    shapes: list[Shape] = []
    for batch in args.batch:
        shapes += slak_tiny_shapes(batch)
        if batch == args.batch[0] and not args.no_baselines:
            shapes += baseline_shapes(batch)
    dtypes = [getattr(torch, name) for name in args.dtype]
    rows, ceil = run(shapes, dtypes, args.numba, args.impl, args.timer)
    header = f"{environment.summary_line(environment.describe('cuda'))} | timer: {args.timer}"
    text = header + "\n\n" + format_tables(rows, ceil)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
