"""The moments kernels: count, mean, m2 (and m3, m4), min, max, NaN count per unit.

Plain loops that write into output arrays: no validation, no I/O, nothing
of bnstat imported but the flags. Every input is a C-contiguous 4-D view (P, A, U, B) of a chunk (see ``layout.kernel_view``):
P and U index the statistics units, A and B the reduced values. Work is
split into P * sa * su tasks (a range of A and a range of U each); task
(p, ia, iu) writes its own slot ``out[ia, p, u0:u1]`` of every output, so
threads never accumulate into shared memory (numba#3681); the ``sa``
partial states are merged by the caller (Chan).

Within a task, values are taken in cache-sized blocks. Per block and unit the
kernel sums d = x - shift and d*d in float64, with the shift the block's
first finite value of that unit: then |shift - block mean| <= sqrt(n_b) *
block std, so the cancellation in m2 = S2 - S1^2/n_b costs at most a factor
n_b (about 1e4) on float64's 1e-16. Blocks are merged with Chan's formula.
This shifted one-pass loop measured twice as fast as a two-pass loop with
the same accuracy. NaN values are counted and left out;
an inf makes the mean +-inf (NaN with both signs) and m2 NaN, as numpy.
How the loops are written so that they vectorize (min/max on integer keys,
a fast path for rows without NaN/inf) is explained above ``_row_fast``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from bnstat.kernels._jit import JIT, PARALLEL_JIT, SUMS_JIT, entry
from bnstat.kernels._keys import (
    _key_init,
    _key_of,
    _key_value,
    _lanes_fast,
    _row_fast,
    _row_keyrange_nan,
)

BLOCK_COLS = 16384  # values per unit per block when B > 1 (64 KiB of float32)
BLOCK_ROWS = 65536  # values per block when B == 1 (256 KiB of float32)
PAD = 16  # values of padding around per-task lane arrays (128 bytes: two cache lines)

@njit(**SUMS_JIT)
def _row_sums(row, shift):
    """Sum of d = x - shift and d*d over the non-NaN values of a row, and their count."""
    s1 = 0.0
    s2 = 0.0
    bn = 0
    for b in range(row.shape[0]):
        v = np.float64(row[b])
        ok = v == v
        d = v - shift if ok else 0.0
        s1 += d
        s2 += d * d
        bn += ok
    return s1, s2, bn


@njit(**JIT)
def _block_m2(s1, s2, bn):
    """m2 of a block from its shifted sums; rounding can make it slightly
    negative (clamped to 0), an inf in the data makes it NaN (kept, as numpy)."""
    bq = s2 - s1 * s1 / bn
    return 0.0 if bq < 0.0 else bq


@njit(**JIT)
def _merge(n, mu, q, bn, bmean, bq):
    """Chan et al.: merge (bn, bmean, bq) into (n, mu, q)."""
    if bn == 0:
        return n, mu, q
    if n == 0:
        return bn, bmean, bq
    if not (math.isfinite(mu) and math.isfinite(bmean)):
        # ±inf in a part: the mean is ±inf (NaN with both signs) and m2 NaN, as numpy's
        # sum / n and stats.Moments.merge; Chan's update would make inf - inf of the mean
        return n + bn, mu + bmean, math.nan
    tot = n + bn
    delta = bmean - mu
    mu = mu + delta * (bn / tot)
    q = q + bq + delta * delta * (n * (bn / tot))
    return tot, mu, q


@njit(**JIT)
def _units_task(x, p, a0, a1, u0, u1, cnt, mean, m2, mn, mx, nanc):
    """B > 1: one unit at a time; each row x[p, a, u] is B contiguous values."""
    B = x.shape[3]
    rb = max(1, BLOCK_COLS // B)
    for u in range(u0, u1):
        n = 0
        mu = 0.0
        q = 0.0
        klo, khi = _key_init(x[p, a0, u])
        for ab in range(a0, a1, rb):
            ae = min(ab + rb, a1)
            shift = 0.0  # the block's first finite value (0 if none)
            found = False
            for a in range(ab, ae):
                row = x[p, a, u]
                for b in range(B):
                    v = np.float64(row[b])
                    if v - v == 0.0:
                        shift = v
                        found = True
                        break
                if found:
                    break
            s1 = 0.0
            s2 = 0.0
            bn = 0
            for a in range(ab, ae):
                row = x[p, a, u]
                r1, r2, rlo, rhi = _row_fast(row, shift, klo, khi)
                if math.isfinite(r1) and math.isfinite(r2):
                    s1 += r1
                    s2 += r2
                    bn += B
                    klo = rlo
                    khi = rhi
                else:  # NaN or inf in the row: the exact slow path
                    r1, r2, rn = _row_sums(row, shift)
                    s1 += r1
                    s2 += r2
                    bn += rn
                    klo, khi = _row_keyrange_nan(row, klo, khi)
            if bn == 0:
                continue  # all NaN: nothing to add
            n, mu, q = _merge(n, mu, q, bn, shift + s1 / bn, _block_m2(s1, s2, bn))
        cnt[u] = n
        mean[u] = mu
        m2[u] = q
        if n > 0:
            mn[u] = _key_value(x[p, a0, u], klo)
            mx[u] = _key_value(x[p, a0, u], khi)
        else:
            mn[u] = np.inf
            mx[u] = -np.inf
        nanc[u] = (a1 - a0) * B - n


@njit(**JIT)
def _rows_task(x, p, a0, a1, u0, u1, cnt, mean, m2, mn, mx, nanc):
    """B == 1: rows of U contiguous units (NHWC); the inner loop runs along U.

    Every unit has its own lane in small arrays, so the inner loop is
    element-wise (``_lanes_fast``). A unit whose block sums come out
    non-finite (NaN or inf in its values) has that block recomputed exactly.
    """
    nu = u1 - u0
    P, A, U, _ = x.shape
    x3 = x.reshape((P, A, U))
    rb = max(1, BLOCK_ROWS // nu)
    first = x3[p, a0]
    kmax, kmin = _key_init(first)
    n = np.zeros(nu, np.int64)
    mu = np.zeros(nu)
    q = np.zeros(nu)
    lo = np.full(nu, kmax)
    hi = np.full(nu, kmin)
    # the lanes the inner loop updates on every row, each on cache lines of its own
    # (PAD values either side): tasks on other threads allocate theirs at the same time
    blo = np.full(nu + 2 * PAD, kmax)[PAD:PAD + nu]
    bhi = np.full(nu + 2 * PAD, kmin)[PAD:PAD + nu]
    shift = np.zeros(nu + 2 * PAD)[PAD:PAD + nu]
    s1 = np.zeros(nu + 2 * PAD)[PAD:PAD + nu]
    s2 = np.zeros(nu + 2 * PAD)[PAD:PAD + nu]
    for ab in range(a0, a1, rb):
        ae = min(ab + rb, a1)
        for j in range(nu):
            shift[j] = 0.0
            for a in range(ab, ae):
                v = np.float64(x3[p, a, u0 + j])
                if v - v == 0.0:  # the block's first finite value (0 if none)
                    shift[j] = v
                    break
            s1[j] = 0.0
            s2[j] = 0.0
            blo[j] = kmax
            bhi[j] = kmin
        _lanes_fast(x3[p], ab, ae, u0, shift, s1, s2, blo, bhi)
        for j in range(nu):
            bn = ae - ab
            if not (math.isfinite(s1[j]) and math.isfinite(s2[j])):
                # NaN or inf among this unit's values: the exact slow path
                t1 = 0.0
                t2 = 0.0
                bn = 0
                klo = kmax
                khi = kmin
                for a in range(ab, ae):
                    v = np.float64(x3[p, a, u0 + j])
                    if v == v:
                        d = v - shift[j]
                        t1 += d
                        t2 += d * d
                        bn += 1
                        k = _key_of(x3[p, a], u0 + j)
                        klo = min(klo, k)
                        khi = max(khi, k)
                s1[j] = t1
                s2[j] = t2
                blo[j] = klo
                bhi[j] = khi
            if bn > 0:
                n[j], mu[j], q[j] = _merge(n[j], mu[j], q[j], bn, shift[j] + s1[j] / bn,
                                           _block_m2(s1[j], s2[j], bn))
                lo[j] = min(lo[j], blo[j])
                hi[j] = max(hi[j], bhi[j])
    for j in range(nu):
        cnt[u0 + j] = n[j]
        mean[u0 + j] = mu[j]
        m2[u0 + j] = q[j]
        if n[j] > 0:
            mn[u0 + j] = _key_value(first, lo[j])
            mx[u0 + j] = _key_value(first, hi[j])
        else:
            mn[u0 + j] = np.inf
            mx[u0 + j] = -np.inf
        nanc[u0 + j] = (a1 - a0) - n[j]


@njit(**JIT)
def _task_bounds(t, A, U, sa, su):
    """Task t of P * sa * su: its p, its range ia of A [a0, a1) and its range of U [u0, u1)."""
    per_p = sa * su
    p = t // per_p
    r = t - p * per_p
    ia = r // su
    iu = r - ia * su
    return p, ia, (A * ia) // sa, (A * (ia + 1)) // sa, (U * iu) // su, (U * (iu + 1)) // su


# B == 1 (NHWC, NC: a unit's values are strided) and B > 1 (NCHW: runs of B contiguous
# values) are two kernels, not one branching on B: a run compiles only the one its layout
# needs (each task function is about 40 % of the compile time, bench/README.md).

@njit(**PARALLEL_JIT)
def _moments4_rows(x, sa, su, cnt, mean, m2, mn, mx, nanc):
    """Count, mean, m2, min, max, NaN count of a (P, A, U, 1) view.

    Outputs have shape (sa, P, U); slot ia holds the moments of the ia-th
    of sa ranges of A (a task with an empty range leaves its slot as given:
    count 0, min +inf, max -inf when the caller initialised it so).
    """
    P, A, U, B = x.shape
    for t in prange(P * sa * su):
        p, ia, a0, a1, u0, u1 = _task_bounds(t, A, U, sa, su)
        if a1 <= a0 or u1 <= u0:
            continue
        _rows_task(x, p, a0, a1, u0, u1, cnt[ia, p], mean[ia, p], m2[ia, p], mn[ia, p],
                   mx[ia, p], nanc[ia, p])


@njit(**PARALLEL_JIT)
def _moments4_units(x, sa, su, cnt, mean, m2, mn, mx, nanc):
    """As ``_moments4_rows``, for a (P, A, U, B) view with B > 1."""
    P, A, U, B = x.shape
    for t in prange(P * sa * su):
        p, ia, a0, a1, u0, u1 = _task_bounds(t, A, U, sa, su)
        if a1 <= a0 or u1 <= u0:
            continue
        _units_task(x, p, a0, a1, u0, u1, cnt[ia, p], mean[ia, p], m2[ia, p], mn[ia, p],
                    mx[ia, p], nanc[ia, p])


# ---- higher moments (skewness, kurtosis) ------------------------------------

@njit(**JIT)
def _pebay(n, mu, q2, q3, q4, bn, bmu, b2, b3, b4):
    """Pébay: merge central moment sums (n, mu, M2, M3, M4) of two parts."""
    if bn == 0:
        return n, mu, q2, q3, q4
    if n == 0:
        return bn, bmu, b2, b3, b4
    if not (math.isfinite(mu) and math.isfinite(bmu)):  # ±inf in a part, as in _merge
        return n + bn, mu + bmu, math.nan, math.nan, math.nan
    na = float(n)
    nb = float(bn)
    tot = na + nb
    d = bmu - mu
    d2 = d * d
    nab = na * nb / tot
    r4 = q4 + b4 + d2 * d2 * nab * (na * na - na * nb + nb * nb) / (tot * tot) \
        + 6.0 * d2 * (na * na * b2 + nb * nb * q2) / (tot * tot) + 4.0 * d * (na * b3 - nb * q3) / tot
    r3 = q3 + b3 + d2 * d * nab * (na - nb) / tot + 3.0 * d * (na * b2 - nb * q2) / tot
    r2 = q2 + b2 + d2 * nab
    return n + bn, mu + d * (nb / tot), r2, r3, r4


@njit(**JIT)
def _higher_task(x, p, a0, a1, u0, u1, cnt, mean, m2, m3, m4, mn, mx, nanc):
    """Two passes per block and unit: the block mean, then central power sums."""
    B = x.shape[3]
    rb = max(1, BLOCK_COLS // B)
    for u in range(u0, u1):
        n = 0
        mu = 0.0
        q2 = 0.0
        q3 = 0.0
        q4 = 0.0
        lo = np.inf
        hi = -np.inf
        for ab in range(a0, a1, rb):
            ae = min(ab + rb, a1)
            s = 0.0
            bn = 0
            for a in range(ab, ae):
                for b in range(B):
                    v = np.float64(x[p, a, u, b])
                    if v == v:
                        s += v
                        bn += 1
                        lo = v if v < lo else lo
                        hi = v if v > hi else hi
            if bn == 0:
                continue
            bmu = s / bn
            c1 = 0.0
            c2 = 0.0
            c3 = 0.0
            c4 = 0.0
            for a in range(ab, ae):
                for b in range(B):
                    v = np.float64(x[p, a, u, b])
                    if v == v:
                        d = v - bmu
                        dd = d * d
                        c1 += d
                        c2 += dd
                        c3 += dd * d
                        c4 += dd * dd
            # refine the block mean by the mean residual (exact in exact arithmetic); an
            # infinite mean (±inf in the block) stays as it is, its power sums are NaN
            if math.isfinite(bmu):
                corr = c1 / bn
                bmu += corr
                c4 = c4 - 4.0 * corr * c3 + 6.0 * corr * corr * c2 - 3.0 * bn * corr ** 4
                c3 = c3 - 3.0 * corr * c2 + 2.0 * bn * corr ** 3
                c2 = c2 - bn * corr * corr
            n, mu, q2, q3, q4 = _pebay(n, mu, q2, q3, q4, bn, bmu, max(c2, 0.0), c3, max(c4, 0.0))
        cnt[u] = n
        mean[u] = mu
        m2[u] = q2
        m3[u] = q3
        m4[u] = q4
        mn[u] = lo
        mx[u] = hi
        nanc[u] = (a1 - a0) * B - n


@njit(**PARALLEL_JIT)
def _moments4_higher(x, sa, su, cnt, mean, m2, m3, m4, mn, mx, nanc):
    """As ``moments4``, plus the third and fourth central moment sums."""
    P, A, U, B = x.shape
    for t in prange(P * sa * su):
        p, ia, a0, a1, u0, u1 = _task_bounds(t, A, U, sa, su)
        _higher_task(x, p, a0, a1, u0, u1, cnt[ia, p], mean[ia, p], m2[ia, p], m3[ia, p],
                     m4[ia, p], mn[ia, p], mx[ia, p], nanc[ia, p])


moments4_rows = entry(_moments4_rows)
moments4_units = entry(_moments4_units)
moments4_higher = entry(_moments4_higher)


def moments4(x, sa, su, cnt, mean, m2, mn, mx, nanc):
    """Count, mean, m2, min, max, NaN count of a (P, A, U, B) view (``_moments4_rows``)."""
    kernel = moments4_rows if x.shape[3] == 1 else moments4_units
    kernel(x, sa, su, cnt, mean, m2, mn, mx, nanc)
