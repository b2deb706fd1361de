"""Numba kernels: plain loops that write into output arrays.

No validation, no I/O, nothing of bnstat imported. Every input is a
C-contiguous 4-D view (P, A, U, B) of a chunk (see ``layout.kernel_view``):
P and U index the statistics units, A and B the reduced values. Work is
split into P * sa * su tasks (a range of A and a range of U each); task
(p, ia, iu) writes its own slot ``out[ia, p, u0:u1]`` of every output, so
threads never accumulate into shared memory (numba#3681); the ``sa``
partial states are merged by the caller (Chan).

Within a task, values are taken in cache-sized blocks. Per block and unit the
kernel sums d = x - shift and d*d in float64, with the shift the block's
first non-NaN value of that unit: then |shift - block mean| <= sqrt(n_b) *
block std, so the cancellation in m2 = S2 - S1^2/n_b costs at most a factor
n_b (about 1e4) on float64's 1e-16. Blocks are merged with Chan's formula.
PERF-NOTES measured this shifted one-pass loop at twice the speed of a
two-pass loop with the same accuracy.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# one place for the numba flags (STYLE 8): cached, no GIL, no fastmath (it
# would delete the NaN tests)
_JIT = dict(cache=True, nogil=True)

BLOCK_COLS = 16384  # values per unit per block when B > 1 (64 KiB of float32)
BLOCK_ROWS = 65536  # values per block when B == 1 (256 KiB of float32; PERF-NOTES)


@njit(**_JIT)
def _merge(n, mu, q, bn, bmean, bq):
    """Chan et al.: merge (bn, bmean, bq) into (n, mu, q)."""
    if bn == 0:
        return n, mu, q
    if n == 0:
        return bn, bmean, bq
    tot = n + bn
    delta = bmean - mu
    mu = mu + delta * (bn / tot)
    q = q + bq + delta * delta * (n * (bn / tot))
    return tot, mu, q


@njit(**_JIT)
def _units_task(x, p, a0, a1, u0, u1, cnt, mean, m2, mn, mx, nanc):
    """B > 1: one unit at a time, values of a row of B contiguous."""
    B = x.shape[3]
    rb = max(1, BLOCK_COLS // B)
    for u in range(u0, u1):
        n = 0
        mu = 0.0
        q = 0.0
        lo = np.inf
        hi = -np.inf
        for ab in range(a0, a1, rb):
            ae = min(ab + rb, a1)
            shift = 0.0
            found = False
            for a in range(ab, ae):
                for b in range(B):
                    v = np.float64(x[p, a, u, b])
                    if v == v:
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
                for b in range(B):
                    v = np.float64(row[b])
                    ok = v == v
                    d = v - shift if ok else 0.0
                    s1 += d
                    s2 += d * d
                    bn += ok
                    lo = v if v < lo else lo
                    hi = v if v > hi else hi
            if bn > 0:
                bq = s2 - s1 * s1 / bn
                n, mu, q = _merge(n, mu, q, bn, shift + s1 / bn, bq if bq > 0.0 else 0.0)
        cnt[u] = n
        mean[u] = mu
        m2[u] = q
        mn[u] = lo
        mx[u] = hi
        nanc[u] = (a1 - a0) * B - n


@njit(**_JIT)
def _rows_task(x, p, a0, a1, u0, u1, cnt, mean, m2, mn, mx, nanc):
    """B == 1: rows of U contiguous units (NHWC); the inner loop runs along U."""
    nu = u1 - u0
    if nu <= 0:
        return
    rb = max(1, BLOCK_ROWS // nu)
    n = np.zeros(nu, np.int64)
    mu = np.zeros(nu)
    q = np.zeros(nu)
    lo = np.full(nu, np.inf)
    hi = np.full(nu, -np.inf)
    shift = np.zeros(nu)
    s1 = np.zeros(nu)
    s2 = np.zeros(nu)
    bn = np.zeros(nu, np.int64)
    for ab in range(a0, a1, rb):
        ae = min(ab + rb, a1)
        for j in range(nu):
            shift[j] = 0.0
            for a in range(ab, ae):
                v = np.float64(x[p, a, u0 + j, 0])
                if v == v:
                    shift[j] = v
                    break
            s1[j] = 0.0
            s2[j] = 0.0
            bn[j] = 0
        for a in range(ab, ae):
            row = x[p, a, :, 0]
            for j in range(nu):
                v = np.float64(row[u0 + j])
                ok = v == v
                d = v - shift[j] if ok else 0.0
                s1[j] += d
                s2[j] += d * d
                bn[j] += ok
                lo[j] = v if v < lo[j] else lo[j]
                hi[j] = v if v > hi[j] else hi[j]
        for j in range(nu):
            if bn[j] > 0:
                bq = s2[j] - s1[j] * s1[j] / bn[j]
                n[j], mu[j], q[j] = _merge(n[j], mu[j], q[j], bn[j], shift[j] + s1[j] / bn[j],
                                           bq if bq > 0.0 else 0.0)
    for j in range(nu):
        cnt[u0 + j] = n[j]
        mean[u0 + j] = mu[j]
        m2[u0 + j] = q[j]
        mn[u0 + j] = lo[j]
        mx[u0 + j] = hi[j]
        nanc[u0 + j] = (a1 - a0) - n[j]


@njit(parallel=True, **_JIT)
def moments4(x, sa, su, cnt, mean, m2, mn, mx, nanc):
    """Count, mean, m2, min, max, NaN count of a (P, A, U, B) view.

    Outputs have shape (sa, P, U); slot ia holds the moments of the ia-th
    of sa ranges of A.
    """
    P, A, U, B = x.shape
    per_p = sa * su
    for t in prange(P * per_p):
        p = t // per_p
        r = t - p * per_p
        ia = r // su
        iu = r - ia * su
        a0 = (A * ia) // sa
        a1 = (A * (ia + 1)) // sa
        u0 = (U * iu) // su
        u1 = (U * (iu + 1)) // su
        if B == 1:
            _rows_task(x, p, a0, a1, u0, u1, cnt[ia, p], mean[ia, p], m2[ia, p], mn[ia, p],
                       mx[ia, p], nanc[ia, p])
        else:
            _units_task(x, p, a0, a1, u0, u1, cnt[ia, p], mean[ia, p], m2[ia, p], mn[ia, p],
                        mx[ia, p], nanc[ia, p])


# ---- higher moments (skewness, kurtosis) ------------------------------------

@njit(**_JIT)
def _pebay(n, mu, q2, q3, q4, bn, bmu, b2, b3, b4):
    """Pébay: merge central moment sums (n, mu, M2, M3, M4) of two parts."""
    if bn == 0:
        return n, mu, q2, q3, q4
    if n == 0:
        return bn, bmu, b2, b3, b4
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


@njit(**_JIT)
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
            # refine the block mean by the mean residual (exact in exact arithmetic)
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


@njit(parallel=True, **_JIT)
def moments4_higher(x, sa, su, cnt, mean, m2, m3, m4, mn, mx, nanc):
    """As ``moments4``, plus the third and fourth central moment sums."""
    P, A, U, B = x.shape
    per_p = sa * su
    for t in prange(P * per_p):
        p = t // per_p
        r = t - p * per_p
        ia = r // su
        iu = r - ia * su
        a0 = (A * ia) // sa
        a1 = (A * (ia + 1)) // sa
        u0 = (U * iu) // su
        u1 = (U * (iu + 1)) // su
        _higher_task(x, p, a0, a1, u0, u1, cnt[ia, p], mean[ia, p], m2[ia, p], m3[ia, p],
                     m4[ia, p], mn[ia, p], mx[ia, p], nanc[ia, p])


# ---- normalization -------------------------------------------------------------

@njit(parallel=True, **_JIT)
def normalize4(x, mean, scale, shift, out):
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
