"""Numba kernels of ``bnstat hist``: fixed-edge counts and counting passes over keys.

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
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import overload

from bnstat.kernels._jit import JIT, PARALLEL_JIT, entry
from bnstat.kernels.moments import PAD, _task_bounds

SIGN = np.uint64(1 << 63)


def _ukey(x, p, a, u, b):  # pragma: no cover - Python stand-in; numba uses the overload
    raise NotImplementedError


@overload(_ukey, jit_options=JIT)
def _ukey_ol(x, p, a, u, b):
    """The order-preserving unsigned key of x[p, a, u, b] (see ``histogram.to_ukeys``).

    Floats: the bits read as a signed integer, negative values with their
    magnitude bits flipped (the moments kernels' key, kernels.py), then the
    sign bit flipped, so unsigned order is the float order (-inf < -0.0 <
    +0.0 < +inf). Signed integers: the value with the sign bit flipped;
    unsigned integers: the value.
    """
    dt = x.dtype
    if dt == types.float32:
        def impl32(x, p, a, u, b):
            i = np.int64(x[p, a, u, b:b + 1].view(np.int32)[0])
            k = i ^ ((i >> 31) & 0x7FFFFFFF)
            return np.uint64(k) ^ SIGN
        return impl32
    if dt == types.float64:
        def impl64(x, p, a, u, b):
            i = x[p, a, u, b:b + 1].view(np.int64)[0]
            k = i ^ ((i >> 63) & 0x7FFFFFFFFFFFFFFF)
            return np.uint64(k) ^ SIGN
        return impl64
    if isinstance(dt, types.Integer) and dt.signed:
        return lambda x, p, a, u, b: np.uint64(np.int64(x[p, a, u, b])) ^ SIGN
    return lambda x, p, a, u, b: np.uint64(x[p, a, u, b])


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


def _kview(row):  # pragma: no cover - numba uses the overloads
    raise NotImplementedError


def _kat(row, kv, b):  # pragma: no cover
    raise NotImplementedError


@overload(_kview, jit_options=JIT)
def _kview_ol(row):
    """What ``_kat`` reads keys from: the bits of a float row, an integer row itself."""
    if row.dtype == types.float32:
        return lambda row: row.view(np.int32)
    if row.dtype == types.float64:
        return lambda row: row.view(np.int64)
    return lambda row: row


@overload(_kat, jit_options=JIT)
def _kat_ol(row, kv, b):
    """The unsigned key (see ``_ukey``) of row[b], from ``kv = _kview(row)``."""
    dt = row.dtype
    if dt == types.float32:
        def impl32(row, kv, b):
            i = np.int64(kv[b])
            return np.uint64(i ^ ((i >> 31) & 0x7FFFFFFF)) ^ SIGN
        return impl32
    if dt == types.float64:
        def impl64(row, kv, b):
            i = kv[b]
            return np.uint64(i ^ ((i >> 63) & 0x7FFFFFFFFFFFFFFF)) ^ SIGN
        return impl64
    if isinstance(dt, types.Integer) and dt.signed:
        return lambda row, kv, b: np.uint64(np.int64(kv[b])) ^ SIGN
    return lambda row, kv, b: np.uint64(kv[b])


def _row_buckets(row, lo, span, sh, base, dummy, ibuf):  # pragma: no cover - numba uses the overload
    raise NotImplementedError


@overload(_row_buckets, jit_options=JIT)
def _row_buckets_ol(row, lo, span, sh, base, dummy, ibuf):
    """ibuf[b] = base + (key - lo) >> sh for the non-NaN values of a row whose key (see
    ``_ukey``) is in lo..lo + span, else ``dummy``; one loop with the key inline (it vectorizes)."""
    dt = row.dtype
    if dt == types.float32 or dt == types.float64:
        it, sh_, mask = ((np.int32, 31, 0x7FFFFFFF) if dt == types.float32
                         else (np.int64, 63, 0x7FFFFFFFFFFFFFFF))

        def impl_float(row, lo, span, sh, base, dummy, ibuf):
            bits = row.view(it)
            for b in range(row.shape[0]):
                i = np.int64(bits[b])
                k = np.uint64(i ^ ((i >> sh_) & mask)) ^ SIGN
                d = k - lo
                ok = (d <= span) & (row[b] == row[b])
                ibuf[b] = base + np.int64(d >> sh) if ok else dummy
        return impl_float
    if isinstance(dt, types.Integer) and dt.signed:
        def impl_signed(row, lo, span, sh, base, dummy, ibuf):
            for b in range(row.shape[0]):
                d = (np.uint64(np.int64(row[b])) ^ SIGN) - lo
                ibuf[b] = base + np.int64(d >> sh) if d <= span else dummy
        return impl_signed

    def impl_unsigned(row, lo, span, sh, base, dummy, ibuf):
        for b in range(row.shape[0]):
            d = np.uint64(row[b]) - lo
            ibuf[b] = base + np.int64(d >> sh) if d <= span else dummy
    return impl_unsigned


@njit(inline="always", **JIT)  # called per value: a call would pass (and count references to) 13 arrays
def _select_slots(v, k, p, u, ns, slo, shi, sshift, sbase, scollect, pos, pend, counts, keys):
    """Key k of a non-NaN value v into the unit's slot holding it (if any). The slots are
    in ascending order, so the one that can hold k is found without a branch (the count
    of slots ending below k). A collecting slot stores keys up to its end ``pend`` and
    counts on past it (a probe slot's keys are not known in number beforehand,
    bnstat.quantiles)."""
    if v != v:
        return
    s = 0
    for t in range(ns - 1):
        s += k > shi[p, u, t]
    if slo[p, u, s] <= k <= shi[p, u, s]:  # else in no slot (a tie of values widened an interval)
        if scollect[p, u, s]:
            at = pos[p, u, s]
            if at < pend[p, u, s]:
                keys[at] = k
            pos[p, u, s] = at + 1
        else:
            # an int64 index: int64 + uint64 is float64 in numba, a float index 3x slower here
            counts[sbase[p, u, s] + np.int64((k - slo[p, u, s]) >> sshift[p, u, s])] += 1


@njit(inline="always", **JIT)
def _flag(hbuf, b, j0, v, l0, h0, l1, h1, l2, h2, l3, h3):
    """hbuf[b] = v lies in one of four intervals (or did for an earlier group, j0 > 0)."""
    h = (((v >= l0) & (v <= h0)) | ((v >= l1) & (v <= h1))
         | ((v >= l2) & (v <= h2)) | ((v >= l3) & (v <= h3)))
    if j0 > 0:
        h = h | (hbuf[b] != 0)
    hbuf[b] = h


def _interval_hits(row, vl, vh, ni, hbuf, below, count_below):  # pragma: no cover - numba uses the overload
    raise NotImplementedError


@overload(_interval_hits, jit_options=JIT)
def _interval_hits_ol(row, vl, vh, ni, hbuf, below, count_below):
    """hbuf[b] = row[b] lies in one of the intervals vl[j] <= v <= vh[j], j < ni; with
    ``count_below``, below[j] += the values v >= vl[j] (NaN never is; the caller takes them
    from the unit's count: it is the same compare as the test's), and below[-1] += the zeros.
    One loop over the row per four intervals (the missing ones empty), so a row is read
    once for up to four quantiles' slots; float32 rows compare in float32 (the ends are
    float32 values there, so exactly), eight values a vector; others in float64, four. The
    sums are as wide as the compares: 32-bit for float32 (a row is counted in segments
    below 2**30; numba adds int32 in 64 bits unless cast back, and 64-bit sums there halved
    the vectors and spilled the ends to the stack, 3x slower: bench/README.md, sixth
    session), 64-bit for float64 (32-bit ones cost it 1.3x)."""
    if row.dtype == types.float32:
        ft, it, lo_pad, hi_pad = np.float32, np.int32, np.float32(np.inf), np.float32(-np.inf)
    else:
        ft, it, lo_pad, hi_pad = np.float64, np.int64, np.inf, -np.inf

    def impl(row, vl, vh, ni, hbuf, below, count_below):
        for j0 in range(0, ni, 4):
            l0, h0 = ft(vl[j0]), ft(vh[j0])
            l1, h1 = (ft(vl[j0 + 1]), ft(vh[j0 + 1])) if j0 + 1 < ni else (lo_pad, hi_pad)
            l2, h2 = (ft(vl[j0 + 2]), ft(vh[j0 + 2])) if j0 + 2 < ni else (lo_pad, hi_pad)
            l3, h3 = (ft(vl[j0 + 3]), ft(vh[j0 + 3])) if j0 + 3 < ni else (lo_pad, hi_pad)
            if count_below:
                c0 = c1 = c2 = c3 = z = it(0)
                for b in range(row.shape[0]):
                    v = ft(row[b])
                    _flag(hbuf, b, j0, v, l0, h0, l1, h1, l2, h2, l3, h3)
                    c0 = it(c0 + it(v >= l0))
                    c1 = it(c1 + it(v >= l1))
                    c2 = it(c2 + it(v >= l2))
                    c3 = it(c3 + it(v >= l3))
                    z = it(z + it(v == ft(0.0)))
                if j0 == 0:
                    below[below.shape[0] - 1] += z
                below[j0] += c0
                below[min(j0 + 1, ni - 1)] += c1 if j0 + 1 < ni else 0
                below[min(j0 + 2, ni - 1)] += c2 if j0 + 2 < ni else 0
                below[min(j0 + 3, ni - 1)] += c3 if j0 + 3 < ni else 0
                continue
            for b in range(row.shape[0]):
                _flag(hbuf, b, j0, ft(row[b]), l0, h0, l1, h1, l2, h2, l3, h3)
    return impl


@njit(**JIT)
def _select_lanes(x3, p, u0, u1, nslot, slo, shi, sshift, sbase, scollect, pos, pend, nint, ilo, ihi,
                  below, count_below, counts, keys, allcoll):
    """B == 1 (NHWC): a row holds one value of every unit u0:u1. Rows are taken in blocks
    (in cache), each block unit by unit (one unit's counters in use at a time)."""
    P, A, U = x3.shape
    xf = x3.reshape(P * A * U)
    kv = _kview(xf)
    rb = max(16, LANE_BLOCK // U)
    for ab in range(0, A, rb):
        ae = min(ab + rb, A)
        for u in range(u0, u1):
            ns = nslot[p, u]
            if ns == 0:
                continue
            at = (p * A + ab) * U + u
            if ns == 1 and not scollect[p, u, 0] and not count_below:
                lo_ = slo[p, u, 0]
                span = shi[p, u, 0] - lo_
                sh = sshift[p, u, 0]
                base = sbase[p, u, 0]
                for a in range(ab, ae):
                    v = xf[at]
                    d = _kat(xf, kv, at) - lo_
                    if (d <= span) & (v == v):
                        counts[base + np.int64(d >> sh)] += 1
                    at += U
                continue
            ni = nint[p, u]
            if ni == 0:
                continue
            vlo = ilo[p, u, 0]
            vhi = ihi[p, u, ni - 1]
            high = 0  # values above every interval
            zeros = 0
            for a in range(ab, ae):
                v = np.float64(xf[at])
                zeros += v == 0.0
                if vlo <= v <= vhi:  # within the unit's outer interval: the exact test
                    if count_below:
                        for i in range(ni):
                            below[p, u, i] += v >= ilo[p, u, i]
                    for i in range(ni):
                        if ilo[p, u, i] <= v <= ihi[p, u, i]:
                            if count_below and allcoll[u - u0]:  # the unit's run (_select_task)
                                r = pos[p, u, 0]
                                if r < pend[p, u, ns - 1]:
                                    keys[r] = _kat(xf, kv, at)
                                pos[p, u, 0] = r + 1
                            else:
                                _select_slots(xf[at], _kat(xf, kv, at), p, u, ns, slo, shi, sshift,
                                              sbase, scollect, pos, pend, counts, keys)
                            break
                elif v > vhi:
                    high += 1
                at += U
            if count_below:
                for i in range(ni):
                    below[p, u, i] += high
                below[p, u, below.shape[2] - 1] += zeros


@njit(**JIT)
def _collecting(nslot, scollect, p, u0, u1):
    """Per unit u0:u1 of view p: whether every slot collects (a probe pass's values then lie
    in its slots: no test of the slot's ends)."""
    allcoll = np.zeros(u1 - u0, np.bool_)
    for u in range(u0, u1):
        allcoll[u - u0] = nslot[p, u] > 0
        for s in range(nslot[p, u]):
            allcoll[u - u0] &= scollect[p, u, s]
    return allcoll


@njit(**JIT)
def _select_task(x3, B, p, u0, u1, nslot, slo, shi, sshift, sbase, scollect, pos, pend, nint, ilo, ihi,
                 below, count_below, counts, keys, ibuf, hbuf):
    allcoll = _collecting(nslot, scollect, p, u0, u1)
    if B == 1:
        _select_lanes(x3, p, u0, u1, nslot, slo, shi, sshift, sbase, scollect, pos, pend, nint, ilo, ihi,
                      below, count_below, counts, keys, allcoll)
        return
    _select_rows(x3, B, p, 0, x3.shape[1], u0, u1, nslot, slo, shi, sshift, sbase, scollect, pos, pend,
                 nint, ilo, ihi, below, count_below, counts, keys, ibuf, hbuf, allcoll, u0)


@njit(**JIT)
def _select_rows(x3, B, p, a0, a1, u0, u1, nslot, slo, shi, sshift, sbase, scollect, pos, pend, nint,
                 ilo, ihi, below, count_below, counts, keys, ibuf, hbuf, allcoll, c0):
    """B > 1: rows a0:a1 of units u0:u1 of view p, row by row (``allcoll[u - c0]``:
    ``_collecting``). A unit's rows taken in order, in one call or in several (the moments'
    blocks, kernels.fused), store its keys in the same order."""
    dummy = counts.shape[0] - 1
    hwords = hbuf.view(np.uint64)
    for a in range(a0, a1):
        for u in range(u0, u1):
            ns = nslot[p, u]
            if ns == 0:
                continue
            row = x3[p, a, u * B:(u + 1) * B]
            if ns == 1 and not scollect[p, u, 0] and not count_below:
                # one counting slot (the first pass): bucket indices (vectorized), then a scatter
                _row_buckets(row, slo[p, u, 0], shi[p, u, 0] - slo[p, u, 0], sshift[p, u, 0],
                             sbase[p, u, 0], dummy, ibuf)
                for b in range(B):
                    counts[ibuf[b]] += 1
                continue
            # several slots: the values within the unit's few value intervals (vectorized
            # compares, one loop per four intervals) go to the slot search, the others nowhere
            _interval_hits(row, ilo[p, u], ihi[p, u], nint[p, u], hbuf, below[p, u], count_below)
            kv = _kview(row)
            if count_below and allcoll[u - c0]:
                # a probe pass's collecting slots: the unit's keys go to one run (its slots'
                # rooms, in order) and are told apart after the pass (quantiles.Selector):
                # no slot search, one position (twice as fast per key as a position a slot)
                at = pos[p, u, 0]
                end = pend[p, u, ns - 1]
                for i in range(hwords.shape[0]):
                    w = hwords[i]
                    while w != 0:
                        b = i * 8 + np.int64(trailing_zeros(w) >> 3)
                        w &= w - np.uint64(1)
                        if at < end:
                            keys[at] = _kat(row, kv, b)
                        at += 1
                pos[p, u, 0] = at
                continue
            for i in range(hwords.shape[0]):  # eight flags (bytes 0 or 1) at a time, most 0
                w = hwords[i]
                while w != 0:
                    b = i * 8 + np.int64(trailing_zeros(w) >> 3)
                    w &= w - np.uint64(1)
                    _select_slots(row[b], _kat(row, kv, b), p, u, ns, slo, shi, sshift, sbase, scollect,
                                  pos, pend, counts, keys)


@njit(**PARALLEL_JIT)
def _select4(x, su, nslot, slo, shi, sshift, sbase, scollect, pos, pend, nint, ilo, ihi, below,
             count_below, counts, keys):
    """One counting pass of the exact quantiles over a (P, A, U, B) view.

    Unit (p, u) has ``nslot[p, u]`` slots s, each a range of keys
    ``slo[p, u, s]..shi[p, u, s]`` (inclusive). A non-NaN value whose key is
    in a counting slot adds 1 to ``counts[sbase + (key - lo) >> sshift]``; in
    a collecting slot (``scollect``) its key is stored at
    ``keys[pos[p, u, s]]`` while that is before ``pend[p, u, s]``, and the
    position advances (so it ends at the start plus the slot's keys); in a probe pass
    (``count_below``) a unit whose slots all collect stores its keys in one run instead,
    at ``keys[pos[p, u, 0]]`` while that is before the last slot's ``pend``, advancing
    ``pos[p, u, 0]`` only (quantiles.Selector tells the slots' keys apart). The last
    element of ``counts`` is scratch (it counts the values of no slot in the one-slot loop).
    ``nint`` (P, U), ``ilo``/``ihi`` (P, U, S): float64 intervals ilo <= v <= ihi, in
    ascending order, that hold the values of every key of the unit's slots (a value
    outside them is in no slot); with ``count_below`` (a probe pass), ``below[p, u, i]``
    (P, U, S + 1) gains the values v >= ilo[p, u, i] (the unit's count less them: those
    below), and ``below[p, u, S]`` the zeros.
    Tasks hold whole units (never a split of A), so positions are never shared.
    """
    P, A, U, B = x.shape
    x3 = x.reshape((P, A, U * B))
    for t in prange(P * su):
        p, ia, a0, a1, u0, u1 = _task_bounds(t, A, U, 1, su)
        if u1 > u0:
            ibuf = np.empty(B, np.int64)
            hbuf = np.zeros((B + 7) // 8 * 8, np.uint8)  # flags of a row, then zeros to a word
            _select_task(x3, B, p, u0, u1, nslot, slo, shi, sshift, sbase, scollect, pos, pend, nint, ilo,
                         ihi, below, count_below, counts, keys, ibuf, hbuf)


# the entry points (kernels.loader names the counting kernel of a view: hist_kernel)
hist4_rows = entry(_hist4_rows)
hist4_units = entry(_hist4_units)
select4 = entry(_select4)
