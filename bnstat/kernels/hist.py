"""Numba kernels of ``bnstat hist``: fixed-edge counts (the quantiles' passes: kernels.select).

Plain loops writing into output arrays, nothing of bnstat imported but the
numba flags (one place, ``kernels._jit``). Inputs are the (P, A, U, B) kernel
views of ``layout.kernel_view``; units are (p, u). A task is a range of A
and a range of U of one p, walked row by row (a, then u, then b) so that
memory is read in order for every layout; task (ia, p, u-range) writes its
own slot ``out[ia, p, u]``, so threads never share a counter.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from bnstat.kernels._jit import JIT, PARALLEL_JIT, entry
from bnstat.kernels.moments import PAD, _task_bounds

@njit(inline="always", **JIT)
def _exact_bin(v, lo_, hi_, iv, e, nb):
    """The bin of a finite lo_ <= v <= hi_: numpy's guess corrected by one bin against the
    edges, as np.histogram."""
    if iv == 0.0:  # the reciprocal overflowed (subnormal width): numpy's guess
        w = hi_ - lo_  # 0 for c +- 0.5 past 2**53: every guess 0 (numpy's is NaN)
        f = (v - lo_) / w * nb if w > 0.0 else 0.0
        i = nb - 1 if f >= nb else (np.int64(f) if f >= 0.0 else 0)
    else:
        i = min(max(np.int64((v - lo_) * iv), 0), nb - 1)
    if v < e[i]:
        i -= 1
    elif i != nb - 1 and v >= e[i + 1]:
        i += 1
    return i


@njit(**JIT)
def _hist_guess(row, absval, lo_, iv, mg, buf, nb, zskip):
    """The bin of every value of a row whose guess g = (v - lo_) * iv is sure, else nb
    (nb + 1 + b % 4 for zeros with ``zskip``: the caller adds them to their bin at once, and
    a row of many zeros makes four short chains of increments, not one long); returns
    (zeros, values left to the exact path of ``_hist_row``).

    g is monotonic in v, so g(e[k]) < g(v) < g(e[k + 1]) implies e[k] < v < e[k + 1];
    ``mg`` bounds |g(e[k]) - k| over all edges (with room to spare), so a fractional part
    of g in (mg, 1 - mg) makes floor(g) the bin np.histogram's correction ends on.
    Branch-free, so it vectorizes; the edge table is read only for the rest.
    """
    nbf = np.float64(nb)
    m1 = 1.0 - mg
    zeros = 0
    rest = 0
    for b in range(row.shape[0]):
        v = np.float64(row[b])
        if absval:
            v = abs(v)
        g = (v - lo_) * iv
        ok = (g >= 0.0) & (g < nbf)  # False for NaN and +-inf
        gg = g if ok else 0.5
        i = np.int32(gg)
        fr = gg - np.float64(i)  # exact: gg >= 0
        ok = ok & (fr > mg) & (fr < m1)
        z = v == 0.0
        zs = z & zskip
        buf[b] = np.uint32(nb + 1 + (b & 3)) if zs else (np.uint32(i) if ok else np.uint32(nb))
        zeros += z
        rest += not (ok | zs)
    return zeros, rest


@njit(**JIT)
def _hist_guess32(row, absval, lo_, iv, mg, m1, buf, nb, zskip):
    """``_hist_guess`` in float32 for a float32 row, without the counts (the caller's
    scatter finds the zeros in their slots and the values left on its way).

    The guess G(v) = (v - lo_) * iv in float32 (lo_, iv float32) is monotonic in v as
    well (each rounding is), so ``margin32``'s bound of |G(e[k]) - k| over the edges, done
    with the same operations, makes it as sure: a fractional part in (mg, m1) gives the
    bin. Sixteen values a vector instead of eight; the margin is about 1e-4 instead of 1e-9,
    so about one value in a thousand takes the exact path.
    """
    nbf = np.float32(nb)
    for b in range(row.shape[0]):
        v = row[b]
        if absval:
            v = abs(v)
        g = (v - lo_) * iv
        ok = (g >= np.float32(0.0)) & (g < nbf)  # False for NaN and +-inf
        gg = g if ok else np.float32(0.5)
        i = np.int32(gg)
        fr = gg - np.float32(i)  # exact: 0 <= gg < 2**24
        ok = ok & (fr > mg) & (fr < m1)
        zs = (v == np.float32(0.0)) & zskip
        buf[b] = np.uint32(nb + 1 + (b & 3)) if zs else (np.uint32(i) if ok else np.uint32(nb))


def _is_float32(x):  # pragma: no cover - numba uses the overload
    raise NotImplementedError


@overload(_is_float32, jit_options=JIT)
def _is_float32_ol(x):
    f32 = x.dtype == types.float32
    return lambda x: f32


GUESS32_MAX = 1.0 / 64  # the float32 guess only where its margin sends under 1/32 of the values on


@njit(**JIT)
def margin32(e, lo_, iv):
    """(lo32, iv32, mg, m1) of ``_hist_guess32`` for a unit's float64 edges ``e``: mg > 2 max_k
    |G(e[k]) - k| + 2**-30 and m1 < 1 - mg, both float32; mg = 1 (no guess is sure) where
    that margin is not under GUESS32_MAX (a range narrow for float32, an overflow)."""
    lo32 = np.float32(lo_)
    iv32 = np.float32(iv)
    d = 0.0
    for k in range(e.shape[0]):
        g = (np.float32(e[k]) - lo32) * iv32
        t = abs(np.float64(g) - k)
        if not t <= d:  # NaN too
            d = t
    m = 2.0 * d + 2.0**-30
    if not (iv32 > np.float32(0.0) and m < GUESS32_MAX):  # also NaN, inf
        return lo32, iv32, np.float32(1.0), np.float32(0.0)
    # rounded outwards: mg >= m and m1 <= 1 - m whatever float32's rounding does
    return lo32, iv32, np.float32(m * (1.0 + 2.0**-20)), np.float32((1.0 - m) * (1.0 - 2.0**-20))


LANE_BLOCK = 262144  # B == 1: values per block of rows, walked unit by unit (1 MiB of float32)


@njit(inline="always", **JIT)
def _value(row, b, absval):
    """row[b] in float64 (exact for every input dtype), |row[b]| with ``absval``."""
    v = np.float64(row[b])
    return abs(v) if absval else v


@njit(**JIT)
def _one_bin(row, absval, lo_, hi_):
    """(zeros, values in lo_ <= v <= hi_) of a row (|v| with ``absval``): one branch-free loop
    of float64 compares, for a histogram of one bin."""
    zeros = 0
    inside = 0
    for b in range(row.shape[0]):
        v = _value(row, b, absval)
        inside += (v >= lo_) & (v <= hi_)
        zeros += v == 0.0
    return zeros, inside


@njit(**JIT)
def _hist_row(row, absval, lo_, hi_, iv, mg, g32, e, c, buf, nb, small):
    """Count one unit's contiguous values ``row`` into its task counters ``c`` (nb + 5):
    the sure bins first (``_hist_guess``, or ``_hist_guess32`` with ``g32`` = (lo32, iv32,
    mg, m1) whose mg < 1), then a scatter that takes the few values left exactly on its way;
    NaN, inf, under, over and zeros added to ``small``."""
    B = row.shape[0]
    last = np.uint32(nb)
    zskip = lo_ <= 0.0 <= hi_  # then every +-0.0 is in bin zb
    zb = _exact_bin(0.0, lo_, hi_, iv, e, nb) if zskip else 0
    if nb == 1:  # the one bin is lo_ <= v <= hi_: counted without a guess; the rest exactly
        zeros, inside = _one_bin(row, absval, lo_, hi_)
        small[4] += zeros
        c[0] += np.uint32(inside)
        if inside < B:
            for b in range(B):
                v = _value(row, b, absval)
                if not (v >= lo_) & (v <= hi_):
                    _hist_exact(row[b], absval, lo_, hi_, iv, e, c, nb, small, False)
        return
    if g32[2] < np.float32(1.0):
        _hist_guess32(row, absval, g32[0], g32[1], g32[2], g32[3], buf, nb, zskip)
    else:
        _hist_guess(row, absval, lo_, iv, mg, buf, nb, zskip)
    # the zeros' slots (nb + 1..nb + 4) count the zeros in range; a zero outside the range
    # takes the exact path (its guess is never sure there), which counts it
    for b in range(B):
        k = buf[b]
        if k == last:  # NaN, inf, out of range, or too near an edge for the guess: rare
            _hist_exact(row[b], absval, lo_, hi_, iv, e, c, nb, small, True)
        else:
            c[k] += 1
    zeros = np.int64(c[nb + 1]) + np.int64(c[nb + 2]) + np.int64(c[nb + 3]) + np.int64(c[nb + 4])
    c[nb + 1:nb + 5] = 0
    small[4] += zeros
    if zskip:
        c[zb] += zeros


@njit(inline="always", **JIT)
def _hist_exact(x, absval, lo_, hi_, iv, e, c, nb, small, count_zero):
    """One value left by the guess: NaN, inf, under, over, else its exact bin."""
    v = np.float64(x)
    if absval:
        v = abs(v)
    if count_zero and v == 0.0:
        small[4] += 1
    if v != v:
        small[0] += 1
    elif v - v != 0.0:
        small[1] += 1
    elif v < lo_:
        small[2] += 1
    elif v > hi_:
        small[3] += 1
    else:
        c[_exact_bin(v, lo_, hi_, iv, e, nb)] += 1


@njit(**JIT)
def _task_state(x, p, u0, u1, nb, lo, inv, edges):
    """A task's counters for units u0:u1 of view p: ``tc`` (nu, nb + 5) in 32 bits, five more
    per unit for the zeros' slots (2048 bins: 8 KiB a unit, which stays in the L1 cache),
    added to ``counts`` before 2**32 - 1 values (``_flush``), with ``seen`` (values counted
    since the last flush); ``small`` (nan, inf, under, over, zeros, on cache lines of their
    own); ``g32`` the float32 guess's constants per unit (``margin32``; g32[:, 2] = 1: the
    float64 guess)."""
    nu = u1 - u0
    tc = np.zeros((nu, nb + 5), np.uint32)
    seen = np.zeros(nu, np.int64)
    small = np.zeros((nu, 5 + 2 * PAD), np.int64)
    g32 = np.zeros((nu, 4), np.float32)
    for j in range(nu):
        g32[j, 2] = 1.0
        if _is_float32(x) and nb > 1:
            g32[j, 0], g32[j, 1], g32[j, 2], g32[j, 3] = margin32(edges[p, u0 + j], lo[p, u0 + j],
                                                                  inv[p, u0 + j])
    return tc, seen, small, g32


@njit(**JIT)
def _task_done(p, ia, u0, u1, tc, seen, small, counts, under, over, nanc, infc, zeroc):
    """A task's counters added to the kernel's outputs (slot ia)."""
    for j in range(u1 - u0):
        u = u0 + j
        _flush(tc[j], seen, j, -1, counts[ia, p, u])
        nanc[ia, p, u] += small[j, 0]
        infc[ia, p, u] += small[j, 1]
        under[ia, p, u] += small[j, 2]
        over[ia, p, u] += small[j, 3]
        zeroc[ia, p, u] += small[j, 4]


@njit(**JIT)
def _hist_task_units(x, p, ia, a0, a1, u0, u1, absval, lo, hi, inv, margin, edges, counts, under, over,
                     nanc, infc, zeroc):
    """B > 1: rows a0:a1 of units u0:u1 of view p into slot ia, row by row (B contiguous
    values of one unit: its bounds, edges and counts looked up once per row, ``_hist_row``).
    Float32 data takes the float32 guess in the units where it is sure enough (``margin32``,
    once per unit and task)."""
    B = x.shape[3]
    nb = counts.shape[3]
    tc, seen, small, g32 = _task_state(x, p, u0, u1, nb, lo, inv, edges)
    buf = np.empty(min(B, SEGMENT), np.uint32)
    for a in range(a0, a1):
        for u in range(u0, u1):
            j = u - u0
            for b0 in range(0, B, SEGMENT):  # one segment for any B below 2**30
                b1 = min(B, b0 + SEGMENT)
                _flush(tc[j], seen, j, b1 - b0, counts[ia, p, u])
                _hist_row(x[p, a, u, b0:b1], absval, lo[p, u], hi[p, u], inv[p, u], margin[p, u],
                          g32[j], edges[p, u], tc[j], buf, nb, small[j])
    _task_done(p, ia, u0, u1, tc, seen, small, counts, under, over, nanc, infc, zeroc)


@njit(**JIT)
def _hist_task_rows(x, p, ia, a0, a1, u0, u1, absval, lo, hi, inv, margin, edges, counts, under, over,
                    nanc, infc, zeroc):
    """B == 1 (NHWC, NC: a row holds one value of every unit): blocks of rows are transposed
    first (in cache), then counted unit by unit as ``_hist_task_units`` counts a row."""
    P, A, U, _ = x.shape
    nb = counts.shape[3]
    nu = u1 - u0
    tc, seen, small, g32 = _task_state(x, p, u0, u1, nb, lo, inv, edges)
    x3 = x.reshape((P, A, U))
    rb = max(16, LANE_BLOCK // U)
    tb = np.empty((nu, rb + 16), x.dtype)  # rows not a power of two apart (cache sets)
    buf = np.empty(rb, np.uint32)
    for ab in range(a0, a1, rb):
        ae = min(ab + rb, a1)
        for a in range(ab, ae):
            for j in range(nu):
                tb[j, a - ab] = x3[p, a, u0 + j]
        for j in range(nu):
            u = u0 + j
            _flush(tc[j], seen, j, ae - ab, counts[ia, p, u])
            _hist_row(tb[j, :ae - ab], absval, lo[p, u], hi[p, u], inv[p, u], margin[p, u], g32[j],
                      edges[p, u], tc[j], buf, nb, small[j])
    _task_done(p, ia, u0, u1, tc, seen, small, counts, under, over, nanc, infc, zeroc)


SEGMENT = 1 << 30  # values of a row counted at a time (a 32-bit counter holds many)


@njit(**JIT)
def _flush(t, seen, j, n, c):
    """Before counting n more values into the task counters ``t``: add them to ``c`` (int64)
    and clear them if ``seen[j] + n`` could exceed 2**32 - 1 (always for n < 0, the end)."""
    if n >= 0 and seen[j] + n <= 4294967295:
        seen[j] += n
        return
    for i in range(c.shape[0]):
        c[i] += t[i]
    t[:] = 0
    seen[j] = max(n, 0)


@njit(**PARALLEL_JIT)
def _hist4_units(x, sa, su, absval, lo, hi, inv, margin, edges, counts, under, over, nanc, infc, zeroc):
    """Counts of every unit of a (P, A, U, B) view in fixed bins, as np.histogram.

    ``lo``/``hi``/``inv``/``margin`` (P, U): the outer edges, bins / (hi - lo) (0 where it
    overflows) and the guess margin of ``_hist_guess`` (1 where no guess is sure);
    ``edges`` (P, U, bins + 1) float64; ``counts`` (sa, P, U, bins) and
    ``under``/``over``/``nanc``/``infc``/``zeroc`` (sa, P, U) int64, added to.
    A value v (float64; |v| when ``absval``) that is NaN or +-inf is counted
    apart, below lo or above hi in under/over, else in bin i with
    edges[i] <= v < edges[i+1], the last bin closed. The bin is numpy's guess
    (v - lo) * bins / (hi - lo) (here with the reciprocal) where it is sure to be
    right, else that guess corrected by one bin against the edges exactly as
    np.histogram does, so the counts are those of np.histogram with the same edges.

    Two kernels, as the moments' (kernels.moments): ``_hist4_rows`` for B == 1 and
    ``_hist4_units`` for B > 1, so that a run compiles only its layout's (hist4 took
    9-10 s to compile with both, bench/README.md).
    """
    P, A, U, B = x.shape
    for t in prange(P * sa * su):
        p, ia, a0, a1, u0, u1 = _task_bounds(t, A, U, sa, su)
        if a1 > a0 and u1 > u0:
            _hist_task_units(x, p, ia, a0, a1, u0, u1, absval, lo, hi, inv, margin, edges, counts,
                             under, over, nanc, infc, zeroc)


@njit(**PARALLEL_JIT)
def _hist4_rows(x, sa, su, absval, lo, hi, inv, margin, edges, counts, under, over, nanc, infc, zeroc):
    """``_hist4_units`` for B == 1 (a row holds one value of every unit)."""
    P, A, U, B = x.shape
    for t in prange(P * sa * su):
        p, ia, a0, a1, u0, u1 = _task_bounds(t, A, U, sa, su)
        if a1 > a0 and u1 > u0:
            _hist_task_rows(x, p, ia, a0, a1, u0, u1, absval, lo, hi, inv, margin, edges, counts,
                            under, over, nanc, infc, zeroc)


# the entry points (kernels.loader names the counting kernel of a view: hist_kernel)
hist4_rows = entry(_hist4_rows)
hist4_units = entry(_hist4_units)
