"""Numba kernels of the calibration ranges (``bnstat hist --amax``, bnstat.amax).

Plain loops, nothing of bnstat imported but the numba flags (``kernels._jit``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from bnstat.kernels._jit import JIT, PARALLEL_JIT, entry

# ---- calibration (amax) -----------------------------------------------------------
#
# Transcriptions of pytorch-quantization's HistogramCalibrator in float64 (README
# "Calibration ranges"). Sums are numpy's pairwise summation (``_pairwise``) so
# that the criterion of every candidate is what numpy computes on the same arrays.

@njit(**JIT)
def _leaf(a, n0, n):
    """numpy's pairwise_sum for n <= 128: 8 accumulators, then the rest in order."""
    if n < 8:
        res = 0.0
        for i in range(n0, n0 + n):
            res += a[i]
        return res
    r = np.empty(8)
    for k in range(8):
        r[k] = a[n0 + k]
    i = 8
    while i < n - (n % 8):
        for k in range(8):
            r[k] += a[n0 + i + k]
        i += 8
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while i < n:
        res += a[n0 + i]
        i += 1
    return res


@njit(**JIT)
def _pairwise(a, n0, n):
    """np.add.reduce of a[n0:n0 + n]: numpy's pairwise_sum (blocks of 128 split in halves
    rounded to 8), walked with an explicit stack (a recursive function does not load from
    numba's cache)."""
    if n <= 128:
        return _leaf(a, n0, n)
    fn0 = np.empty(70, np.int64)
    fn = np.empty(70, np.int64)
    ph = np.zeros(70, np.int64)
    left = np.zeros(70)
    sp = 0
    fn0[0] = n0
    fn[0] = n
    result = 0.0
    while sp >= 0:
        m0 = fn0[sp]
        m = fn[sp]
        done = False
        v = 0.0
        if m <= 128:
            v = _leaf(a, m0, m)
            done = True
        else:
            n2 = m // 2
            n2 -= n2 % 8
            if ph[sp] == 0:
                ph[sp] = 1
                sp += 1
                fn0[sp], fn[sp], ph[sp] = m0, n2, 0
            elif ph[sp] == 1:
                ph[sp] = 2
                sp += 1
                fn0[sp], fn[sp], ph[sp] = m0 + n2, m - n2, 0
            else:
                v = left[sp] + left[sp + 1]
                done = True
        if done:
            sp -= 1
            if sp < 0:
                result = v
            elif ph[sp] == 1:
                left[sp] = v
            else:
                left[sp + 1] = v
    return result


@njit(**JIT)
def entropy_divergences(counts, start, stride, nbins, digit, digit_off, out):
    """KL divergence of every candidate clip i (start..len, step stride) of one |x| histogram.

    ``digit[digit_off[k]:digit_off[k] + i]`` is np.digitize(range(i), linspace(0, i, nbins + 1)) - 1
    for the k-th candidate (the same for every unit).
    """
    bins = counts.astype(np.float64)
    ibins = counts.copy()
    ibins[0] = ibins[1]
    bins[0] = bins[1]
    n = bins.shape[0]
    ndc = np.zeros(nbins)
    nval = np.zeros(nbins)
    newd = np.zeros(n)
    pk = np.zeros(n)
    vec = np.zeros(n)
    k = 0
    for i in range(start, n + 1, stride):
        ndc[:] = 0.0
        nval[:] = 0.0
        d0 = digit_off[k]
        for j in range(i):
            if ibins[j] != 0:
                ndc[digit[d0 + j]] += bins[j]
                nval[digit[d0 + j]] += 1.0
        for b in range(nbins):
            if nval[b] > 0:
                ndc[b] = ndc[b] / nval[b]
        for j in range(i):
            newd[j] = ndc[digit[d0 + j]] if ibins[j] != 0 else 0.0
        tail = 0
        for j in range(i, n):
            tail += ibins[j]
        ref_total = 0
        for j in range(i):
            ref_total += ibins[j]
        ref_total += tail
        qsum = _pairwise(newd, 0, i)
        for j in range(i):
            r = ibins[j] + (tail if j == i - 1 else 0)
            p = 1.0 * r / ref_total
            q = newd[j] / qsum
            if p > 0 and q > 0:
                vec[j] = p * math.log(p / q)
            elif p == 0 and q >= 0:
                vec[j] = 0.0
            else:
                vec[j] = np.inf
        out[k] = _pairwise(vec, 0, i)
        k += 1


@njit(**JIT)
def mse_errors(counts, centers, start, stride, max_bound, min_bound, out):
    """Mean of (fake-quantized center - center)^2 * count for every candidate amax = centers[i]."""
    n = centers.shape[0]
    err = np.zeros(n)
    k = 0
    for i in range(start, n, stride):
        amax = centers[i]
        scale = max_bound / amax
        tiny = amax <= 1.0 / (1 << 24)
        if tiny:
            scale = 0.0
        for j in range(n):
            qv = min(max(np.rint(centers[j] * scale), min_bound), max_bound)
            qv = qv / (1.0 if tiny else scale)
            d = qv - centers[j]
            err[j] = d * d * counts[j]
        out[k] = _pairwise(err, 0, n) / n
        k += 1


@njit(**PARALLEL_JIT)
def _entropy_all(counts, start, stride, nbins, digit, digit_off, out):
    """``entropy_divergences`` of every row of ``counts`` (units, bins) into ``out`` (units, k)."""
    for u in prange(counts.shape[0]):
        entropy_divergences(counts[u], start, stride, nbins, digit, digit_off, out[u])


@njit(**PARALLEL_JIT)
def _mse_all(counts, centers, start, stride, max_bound, min_bound, out):
    """``mse_errors`` of every row of ``counts``/``centers`` (units, bins) into ``out`` (units, k)."""
    for u in prange(counts.shape[0]):
        mse_errors(counts[u], centers[u], start, stride, max_bound, min_bound, out[u])


entropy_all = entry(_entropy_all)
mse_all = entry(_mse_all)
