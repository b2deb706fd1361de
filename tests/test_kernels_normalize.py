"""bnstat.kernels.normalize called directly: out = (x - mean) * scale + shift per unit, against
the same formula in float64 numpy, over the edge cases of tests/kernel_cases.py."""

from __future__ import annotations

import numpy as np
import pytest
from kernel_cases import cases, kernel_dtype

from bnstat.kernels import normalize as kernels

CASES = [c for c in cases(np.random.default_rng(11)) if "ragged" not in c.id]


def params(x4, rng):
    P, _, U, _ = x4.shape
    return (rng.standard_normal((P, U)) * 10, rng.uniform(0.1, 3, (P, U)),
            rng.standard_normal((P, U)))


@pytest.mark.parametrize("out_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_normalize4_matches_float64_numpy(case, out_dtype):
    x4 = kernel_dtype(case.x)
    mean, scale, shift = params(x4, np.random.default_rng(3))
    before = x4.copy()
    out = np.full(x4.shape, 7.0, out_dtype)
    kernels.normalize4(x4, mean, scale, shift, out)
    np.testing.assert_array_equal(x4, before)
    with np.errstate(over="ignore", invalid="ignore"):
        want = ((x4.astype(np.float64) - mean[:, None, :, None]) * scale[:, None, :, None]
                + shift[:, None, :, None]).astype(out_dtype)
    # float64 arithmetic, one rounding at the store: equal to the last bit
    np.testing.assert_array_equal(out, want)


def test_normalize4_keeps_nan_and_inf():
    x = np.array([np.nan, np.inf, -np.inf, 1.0]).reshape(1, 4, 1, 1)
    out = np.empty_like(x)
    kernels.normalize4(x, np.zeros((1, 1)), np.full((1, 1), 2.0), np.ones((1, 1)), out)
    np.testing.assert_array_equal(out.ravel(), [np.nan, np.inf, -np.inf, 3.0])
