"""Run in a fresh process with NUMBA_ENABLE_CUDASIM=1 and SLAK_KERNEL_BACKEND=numba; prints one JSON line.

The simulator must be switched on before numba is first imported, hence a separate process. Inputs are drawn
from ``SLAK_TEST_SEED`` (the test session's numeric seed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kernels  # noqa: E402
from tests.kernels.oracle import dwconv2d_errors, dwconv2d_oracle, dwconv2d_term_norms  # noqa: E402

CASES = [  # (N, C, H, W, kh, kw, bias, dtype)
    (1, 1, 1, 1, 1, 1, False, "float32"),
    (2, 3, 5, 4, 3, 3, True, "float32"),
    (1, 2, 4, 5, 5, 9, False, "float32"),
    (1, 2, 5, 4, 9, 5, True, "float32"),
    (1, 1, 3, 3, 13, 5, False, "bfloat16"),
]


def main() -> None:
    seed = int(os.environ["SLAK_TEST_SEED"])
    results = []
    for n, c, h, w, kh, kw, with_bias, dtype_name in CASES:
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(seed + n + c + h + w + kh + kw)
        x = torch.randn(n, c, h, w, generator=gen).to(dtype).requires_grad_()
        wt = torch.randn(c, 1, kh, kw, generator=gen).to(dtype).requires_grad_()
        b = torch.randn(c, generator=gen).to(dtype).requires_grad_() if with_bias else None
        dy = torch.randn(n, c, h, w, generator=gen).to(dtype)
        out = kernels.dwconv2d(x, wt, b)
        out.backward(dy)
        x64 = x.detach().double().requires_grad_()
        w64 = wt.detach().double().requires_grad_()
        b64 = b.detach().double().requires_grad_() if b is not None else None
        ref = dwconv2d_oracle(x64, w64, b64)
        ref.backward(dy.double())
        computed = {"fwd": out, "dgrad": x.grad, "wgrad": wt.grad}
        exact = {"fwd": ref, "dgrad": x64.grad, "wgrad": w64.grad}
        if b is not None:
            computed["bias"], exact["bias"] = b.grad, b64.grad
        errors = dwconv2d_errors(dtype, x.shape, wt.shape, computed, exact,
                                 dwconv2d_term_norms(dwconv2d_oracle, x, wt, b, dy))
        results.append({"case": f"N{n}C{c}-{h}x{w}-k{kh}x{kw}-{dtype_name}", "dtype": dtype_name,
                        "errors": errors, "out_dtype": str(out.dtype).replace("torch.", "")})
    print(json.dumps({"backend": kernels.active_backend("cpu"), "results": results}))


if __name__ == "__main__":
    main()
