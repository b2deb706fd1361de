"""Min/max on ordered keys and the fast (vectorizing) row and lane loops of the moments kernels.

Overloads callable from jitted code only (``bnstat.kernels.moments``);
nothing of bnstat but the flags imported. No overload here allocates or
calls ``ndarray.view``: a float's bits are read with a bitcast (``_bits``,
``_float_of_bits``), so that a kernel loaded from numba's cache links no
helper of numba's array module, whose environments numba would rebuild by
importing ``numba.np.arrayobj`` (bench/README.md, start-up).
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from bnstat.kernels._jit import JIT, SUMS_JIT

# ---- min/max on ordered keys, fast rows ------------------------------------------
#
# LLVM does not vectorize a float min/max written as compares and selects
# without nnan, neither as a reduction nor element-wise (measured
# here: 2.8 GB/s for the row loop with the sums vectorized, 1.4 GB/s for the
# element-wise NHWC lanes). Integer min/max vectorizes (vpminsd/vpmaxsd) with
# no flags at all, so min/max is taken on keys: the bits of a float read as a
# signed integer, negative values with their magnitude bits flipped,
#     key = bits ^ ((bits >> (w - 1)) & MAXPOS),
# which orders keys exactly as the floats (-inf < ... < -0.0 < +0.0 < ... <
# +inf); the map is its own inverse. Integer inputs are their own keys. Keys
# stay keys for a whole task and become values once per unit.
#
# NaN keys fall outside [-inf, +inf], and masking them costs the vector loop
# half its speed, so the fast loops assume no NaN and no inf: sums of
# x - shift and its square, plus the key range, with no test. A NaN or inf in
# the data makes those sums non-finite; the row (or, for NHWC, the unit's block)
# is then computed again by the exact scalar loop that skips NaN. Clean data
# never takes it. Measured in memory, one thread, 64 MiB float32: NCHW rows
# 2.2 -> 7.9 GB/s, NHWC lanes 1.2 -> 7.1 GB/s (bench/README.md).

@intrinsic
def _bits(typingctx, v):
    """The bits of a float32 (float64) as an int32 (int64): a bitcast, no memory."""
    if isinstance(v, types.Float) and v.bitwidth in (32, 64):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], context.get_value_type(sig.return_type))
        return types.int32(v) if v.bitwidth == 32 else types.int64(v), codegen
    return None


@intrinsic
def _float_of_bits(typingctx, k):
    """The float32 (float64) whose bits are the int32 (int64) ``k``: ``_bits`` inverted."""
    if isinstance(k, types.Integer) and k.signed and k.bitwidth in (32, 64):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], context.get_value_type(sig.return_type))
        return types.float32(k) if k.bitwidth == 32 else types.float64(k), codegen
    return None


def _key_init(row):  # pragma: no cover - Python stand-ins; numba uses the overloads
    raise NotImplementedError


def _row_fast(row, shift, lo, hi):  # pragma: no cover
    raise NotImplementedError


def _row_keyrange_nan(row, lo, hi):  # pragma: no cover
    raise NotImplementedError


def _lanes_fast(xp, ab, ae, u0, shift, s1, s2, lo, hi):  # pragma: no cover
    raise NotImplementedError


def _key_of(row, j):  # pragma: no cover
    raise NotImplementedError


def _key_value(row, k):  # pragma: no cover
    raise NotImplementedError


def _float_keys(row):
    """(int type, MAXPOS, sign shift) for float rows, None for integer rows."""
    if row.dtype == types.float32:
        return np.int32, np.int32(0x7FFFFFFF), np.int32(31)
    if row.dtype == types.float64:
        return np.int64, np.int64(0x7FFFFFFFFFFFFFFF), np.int64(63)
    return None


def _key_type(row):
    fk = _float_keys(row)
    return fk[0] if fk is not None else as_dtype(row.dtype).type


@overload(_key_init, jit_options=JIT)
def _key_init_ol(row):
    """(largest key, smallest key): the empty range."""
    it = _key_type(row)
    info = np.iinfo(it)
    kmax, kmin = it(info.max), it(info.min)
    return lambda row: (kmax, kmin)


@overload(_row_fast, jit_options=SUMS_JIT)
def _row_fast_ol(row, shift, lo, hi):
    """Sums of d = x - shift and d*d over a row, and its key range merged into
    (lo, hi), assuming no NaN/inf (the sums say otherwise); vectorizes."""
    fk = _float_keys(row)
    if fk is not None:
        _, maxpos, sh = fk

        def impl(row, shift, lo, hi):
            s1 = 0.0
            s2 = 0.0
            for b in range(row.shape[0]):
                v = row[b]
                d = np.float64(v) - shift
                s1 += d
                s2 += d * d
                i = _bits(v)
                k = i ^ ((i >> sh) & maxpos)
                lo = min(lo, k)
                hi = max(hi, k)
            return s1, s2, lo, hi
        return impl

    def impl_int(row, shift, lo, hi):
        s1 = 0.0
        s2 = 0.0
        for b in range(row.shape[0]):
            k = row[b]
            d = np.float64(k) - shift
            s1 += d
            s2 += d * d
            lo = min(lo, k)
            hi = max(hi, k)
        return s1, s2, lo, hi
    return impl_int


@overload(_lanes_fast, jit_options=JIT)
def _lanes_fast_ol(xp, ab, ae, u0, shift, s1, s2, lo, hi):
    """NHWC: rows ab:ae of a C-contiguous (A, U) array, units u0..., into
    per-unit lanes, assuming no NaN/inf; element-wise (no reduction), so it
    vectorizes without fastmath.

    Rows are looped here, not by the caller: a call per row of 64 units cost
    more than the row. The whole row (u0 == 0) gets a loop with no offset:
    with ``row[u0 + j]`` numba's negative-index wraparound stops LLVM from
    vectorizing (measured 1.1 vs 7.1 GB/s); an unsigned offset keeps half of
    it (3.4 GB/s) for the rare task that holds part of a row.
    """
    fk = _float_keys(xp)
    if fk is not None:
        _, maxpos, sh = fk

        def impl(xp, ab, ae, u0, shift, s1, s2, lo, hi):
            nu = shift.shape[0]
            if u0 == 0 and nu == xp.shape[1]:
                for a in range(ab, ae):
                    row = xp[a]
                    for j in range(nu):
                        v = row[j]
                        d = np.float64(v) - shift[j]
                        s1[j] += d
                        s2[j] += d * d
                        i = _bits(v)
                        k = i ^ ((i >> sh) & maxpos)
                        lo[j] = min(lo[j], k)
                        hi[j] = max(hi[j], k)
            else:
                uo = np.uint64(u0)
                for a in range(ab, ae):
                    row = xp[a]
                    for j in range(nu):
                        v = row[uo + np.uint64(j)]
                        d = np.float64(v) - shift[j]
                        s1[j] += d
                        s2[j] += d * d
                        i = _bits(v)
                        k = i ^ ((i >> sh) & maxpos)
                        lo[j] = min(lo[j], k)
                        hi[j] = max(hi[j], k)
        return impl

    def impl_int(xp, ab, ae, u0, shift, s1, s2, lo, hi):
        nu = shift.shape[0]
        uo = np.uint64(u0)
        for a in range(ab, ae):
            row = xp[a]
            for j in range(nu):
                k = row[uo + np.uint64(j)]
                d = np.float64(k) - shift[j]
                s1[j] += d
                s2[j] += d * d
                lo[j] = min(lo[j], k)
                hi[j] = max(hi[j], k)
    return impl_int


@overload(_row_keyrange_nan, jit_options=JIT)
def _row_keyrange_nan_ol(row, lo, hi):
    """Key range of the non-NaN values of a row (scalar loop; slow path)."""
    fk = _float_keys(row)
    if fk is not None:
        _, maxpos, sh = fk

        def impl(row, lo, hi):
            for b in range(row.shape[0]):
                v = row[b]
                if v == v:
                    i = _bits(v)
                    k = i ^ ((i >> sh) & maxpos)
                    lo = min(lo, k)
                    hi = max(hi, k)
            return lo, hi
        return impl

    def impl_int(row, lo, hi):
        for b in range(row.shape[0]):
            lo = min(lo, row[b])
            hi = max(hi, row[b])
        return lo, hi
    return impl_int


@overload(_key_of, jit_options=JIT)
def _key_of_ol(row, j):
    """The key of row[j] (row C-contiguous)."""
    fk = _float_keys(row)
    if fk is not None:
        _, maxpos, sh = fk

        def impl(row, j):
            i = _bits(row[j])
            return i ^ ((i >> sh) & maxpos)
        return impl
    return lambda row, j: row[j]


@overload(_key_value, jit_options=JIT)
def _key_value_ol(row, k):
    """The value, as float64, of key k of a row's dtype."""
    fk = _float_keys(row)
    if fk is not None:
        it, maxpos, sh = fk

        def impl(row, k):
            return np.float64(_float_of_bits(it(k ^ ((k >> sh) & maxpos))))
        return impl
    return lambda row, k: np.float64(k)
