"""bilevel_step.c's exponential (exp_k, per seed, and vexp, on the 8 lanes of a vector): the softmaxes of the policy
tables and the BT weights take it instead of libm's exp. What it must be:
- the same bits from the per-seed function and the vector one, value by value (the segment's lanes and the per-step
  call must agree bit for bit: tests/test_segments.py holds the whole step to that);
- within 1 ulp of e^x, against e^x to 200 bits (mpmath), on random points over the whole range (subnormal results
  included) and near the edges of the reduction (x = (k + 1/2) ln 2);
- the edges exactly: 0 below -746 and at -inf, inf above 710 and at inf, NaN for NaN, e^x's own underflow to 0 and
  overflow to inf near -745.13 and 709.78, and subnormal results within one subnormal step.
"""
from __future__ import annotations

import ctypes
import math

import mpmath
import numpy as np
import pytest
from ratebench.algorithms.bilevel_kernel import SOURCE
from ratebench.core.kernels import load

LIB = load(SOURCE)
pytestmark = pytest.mark.skipif(LIB is None, reason="no C compiler: the compiled step is not built")
P = ctypes.POINTER(ctypes.c_double)


def kernel_exp(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float64)
    scalar, vector = np.empty_like(x), np.empty_like(x)
    LIB.exp_values(ctypes.c_int64(len(x)), x.ctypes.data_as(P), scalar.ctypes.data_as(P), vector.ctypes.data_as(P))
    return scalar, vector


def points() -> np.ndarray:
    rng = np.random.default_rng(2026)
    k = np.arange(-1070, 1023)
    halfway = (k + 0.5) * math.log(2)  # where the reduction's r is largest
    return np.concatenate([rng.uniform(-745, 709.7, 4000), rng.uniform(-3, 3, 4000), rng.uniform(-40, 0, 2000),
                           halfway[(halfway > -708) & (halfway < 709.7)], np.nextafter(halfway, -np.inf)[::7],
                           [0.0, -0.0, 1e-300, -1e-300, 5e-324, 1.0, -1.0, 0.5, 20.0, -20.0]])


def test_the_per_seed_and_the_vector_exponential_give_the_same_bits():
    x = np.concatenate([points(), np.linspace(-760, 720, 30001), [np.inf, -np.inf, np.nan, -np.nan]])
    scalar, vector = kernel_exp(x)
    assert np.array_equal(scalar.view(np.int64), vector.view(np.int64))


def test_within_one_ulp_of_the_exact_exponential():
    x = points()
    got, _ = kernel_exp(x)
    mpmath.mp.prec = 200
    worst = 0.0
    for xi, gi in zip(x.tolist(), got.tolist()):
        exact = mpmath.exp(mpmath.mpf(xi))
        ulp = math.ulp(float(exact))
        worst = max(worst, float(abs(mpmath.mpf(gi) - exact) / ulp))
    assert worst < 1.0, f"max error {worst:.3f} ulp"


def test_the_edges_of_the_range():
    x = np.array([-np.inf, -1e308, -1e5, -746.5, -746.0, 709.8, 710.0, 710.5, 1e5, np.inf, np.nan,
                  -745.2, -745.1, -740.0, -720.0, 709.78, 709.782712893384])
    got, _ = kernel_exp(x)
    assert np.array_equal(got[:5], np.zeros(5)) and np.isposinf(got[5:10]).all() and np.isnan(got[10])
    mpmath.mp.prec = 200
    for xi, gi in zip(x[11:].tolist(), got[11:].tolist()):  # e^x's own underflow, subnormals, the largest finite values
        exact = mpmath.exp(mpmath.mpf(xi))
        assert abs(mpmath.mpf(gi) - exact) <= max(mpmath.mpf(5e-324), mpmath.mpf(math.ulp(float(exact)))), xi
    assert got[11] == 0.0 and got[12] == 5e-324 and np.isfinite(got[-1])
