"""Numba kernels of ``bnstat hist``'s exact quantiles: a pass's selection over ordered keys.

A quantile pass (bnstat.quantiles.Selector) gives each unit a few slots of keys; a pass
counts the keys of each slot in buckets, or collects them, and (a probe pass) counts the
values below each of its value intervals. Inputs are the (P, A, U, B) kernel views of
``layout.kernel_view``; a task holds whole units (never a range of A), so the positions
in ``keys`` are never shared. Nothing of bnstat imported but the numba flags and the
counting kernels' lane block (kernels.hist).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import overload

from bnstat.kernels._jit import JIT, PARALLEL_JIT, entry
from bnstat.kernels.hist import LANE_BLOCK
from bnstat.kernels.moments import _task_bounds

SIGN = np.uint64(1 << 63)


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
    """The order-preserving unsigned key of row[b], from ``kv = _kview(row)`` (the keys of
    ``quantiles.to_keys``). Floats: the bits read as a signed integer, negative values with
    their magnitude bits flipped (the moments kernels' key, kernels._keys), then the sign bit
    flipped, so unsigned order is the float order (-inf < -0.0 < +0.0 < +inf). Signed
    integers: the value with the sign bit flipped; unsigned integers: the value."""
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
    ``_kat``) is in lo..lo + span, else ``dummy``; one loop with the key inline (it vectorizes)."""
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


select4 = entry(_select4)
