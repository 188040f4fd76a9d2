"""The one place a numeric test's tolerance comes from: an error model in the dtype's unit round-off.

A result computed from inputs that are exact in their dtype, by sums of ``K`` products accumulated in
``accumulate`` precision, passed through ``layers`` such stages and rounded to ``dtype``, is compared with
the same math in float64. Its error is bounded, normwise, by::

    ||actual - exact|| <= C * layers * (u(dtype) * ||exact|| + u(accumulate) * sqrt(K) * ||tau||)

where ``tau`` holds, per output element, the root sum of squares of its ``K`` terms (``sum_error_bound``).

- ``u(dtype) * ||exact||``: rounding the result to its storage dtype. Each element moves by at most ``u`` of
  itself (round to nearest).
- ``u(accumulate) * sqrt(K) * ||tau||``: summing ``K`` terms. For zero-mean random inputs, as every test here
  uses, the partial sums grow like a random walk of step ``tau / sqrt(K)`` and their rounding errors behave
  like independent random variables, so the error grows like ``sqrt(K)``, not ``K`` (Higham & Mary, "A new
  approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019). It is measured against the
  terms, not the result: a sum that cancels to almost nothing still carries its terms' rounding errors.
- For random-sign terms ``||exact|| ~ ||tau||``, so over many outputs the relative form is
  ``C * layers * (u(dtype) + u(accumulate) * sqrt(K))`` (``rel_tol``); use ``sum_error_bound`` where a result
  has only a few elements (a bias gradient, a 1x1 kernel's weight gradient), whose norm may cancel.
- ``layers``: chained stages (a network's depth); first-order errors of successive stages add.
- ``C = 2``: twice these expected magnitudes, so that a correct result never fails on a fresh seed, while the
  bound stays tight enough to catch what it is for. A bf16 result accumulated in bf16 instead of fp32
  (``u(bfloat16) * sqrt(K)``) fails it for reductions longer than about 50 terms: the 51-tap input
  gradients of an AVX2-only host measured 1.1e-2 against a bound of 7.8e-3. TF32 in place of fp32 (``u`` =
  2^-11) fails every fp32 bound.

``unit_roundoff`` is ``2**-p`` for a ``p``-bit significand: fp64 2^-53, fp32 2^-24, fp16 2^-11, bf16 2^-8.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SAFETY", "assert_rel_close", "max_rel_error", "rel_error", "rel_tol", "sum_error_bound", "unit_roundoff"]

SAFETY = 2.0

_SIGNIFICAND_BITS = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
_HALF = (torch.float16, torch.bfloat16)


def unit_roundoff(dtype: torch.dtype) -> float:
    """``2**-p`` for the dtype's ``p``-bit significand (half the distance from 1 to the next number)."""
    return 2.0 ** -_SIGNIFICAND_BITS[dtype]


def rel_tol(
    dtype: torch.dtype,
    reduction: int = 1,
    *,
    accumulate: torch.dtype | None = None,
    layers: int = 1,
) -> float:
    """Relative tolerance for a result of ``dtype`` made of ``reduction``-term sums (see the module docstring).

    Args:
        dtype: The result's dtype (its final rounding).
        reduction: Terms per output element of the longest sum (taps for a conv, N*H*W for its weight gradient).
        accumulate: Precision of the sums; fp32 for half types (every backend here accumulates them in fp32),
            the result's own dtype otherwise.
        layers: Chained stages between input and result (1 for one op).
    """
    if reduction < 1 or layers < 1:
        raise ValueError(f"reduction and layers must be >= 1, got {reduction}, {layers}")
    acc = accumulate or (torch.float32 if dtype in _HALF else dtype)
    return SAFETY * layers * (unit_roundoff(dtype) + unit_roundoff(acc) * math.sqrt(reduction))


def sum_error_bound(
    dtype: torch.dtype,
    reduction: int,
    exact: torch.Tensor,
    term_norms: torch.Tensor,
    *,
    accumulate: torch.dtype | None = None,
    layers: int = 1,
) -> float:
    """Bound on ``||actual - exact||_2`` for sums of ``reduction`` terms (see the module docstring).

    Args:
        dtype: The result's dtype.
        reduction: Terms per output element.
        exact: The float64 result.
        term_norms: Per output element, ``sqrt(sum of its terms squared)``, in float64.
        accumulate: Precision of the sums (as in :func:`rel_tol`).
        layers: Chained stages.
    """
    if reduction < 1 or layers < 1:
        raise ValueError(f"reduction and layers must be >= 1, got {reduction}, {layers}")
    acc = accumulate or (torch.float32 if dtype in _HALF else dtype)
    rounding = unit_roundoff(dtype) * float(exact.detach().double().norm())
    summing = unit_roundoff(acc) * math.sqrt(reduction) * float(term_norms.detach().double().norm())
    return SAFETY * layers * (rounding + summing)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error ``||actual - expected||_2 / ||expected||_2``, computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), "result holds NaN/inf"
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|``: the worst element against the result's scale."""
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), "result holds NaN/inf"
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Assert ``max_rel_error <= tol``; the message names the worst element and both values."""
    err = max_rel_error(actual, expected)
    if err <= tol:
        return
    diff = (actual.detach().double() - expected.detach().double()).abs().flatten()
    worst = int(diff.argmax())
    raise AssertionError(
        f"{what + ': ' if what else ''}max relative error {err:.3g} > {tol:.3g}; worst at flat index {worst}: "
        f"{float(actual.flatten()[worst]):.6g} vs {float(expected.flatten()[worst]):.6g}"
    )
