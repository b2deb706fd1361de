"""The normalization kernel: y = (x - mean) * scale + shift per unit, in float64."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from bnstat.kernels._jit import PARALLEL_JIT, entry

@njit(**PARALLEL_JIT)
def _normalize4(x, mean, scale, shift, out):
    """out = (x - mean) * scale + shift per unit, on (P, A, U, B) views.

    ``mean``, ``scale``, ``shift`` are (P, U) float64. One read and one write
    per element; the arithmetic is float64 and the store casts to ``out``'s
    dtype.
    """
    P, A, U, B = x.shape
    for t in prange(P * A):
        p = t // A
        a = t - p * A
        for u in range(U):
            m = mean[p, u]
            s = scale[p, u]
            c = shift[p, u]
            for b in range(B):
                out[p, a, u, b] = (np.float64(x[p, a, u, b]) - m) * s + c


normalize4 = entry(_normalize4)
