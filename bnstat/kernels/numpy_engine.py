"""The numpy engine: the moments kernels' results computed with numpy.

For inputs under ``stream.SMALL_INPUT`` bytes, where loading numba's kernels
costs more than the work (bench/README.md); also the float64 arithmetic of
normalize's numpy path (``blocks``). Unlike the numba kernels this module
returns ``stats.Moments``; it imports no numba.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bnstat.stats import Moments, concatenate

# elements per block of a chunk: 2 MB of float64 temporaries, which stay in the caches
# between the passes over a block (4x faster than 8 MB blocks here, bench/README.md)
NUMPY_BLOCK = 1 << 18


def blocks(shape4: tuple[int, int, int, int]) -> Iterator[tuple[slice, slice]]:
    """(P, A) slices of a (P, A, U, B) view of about NUMPY_BLOCK elements each, P outer."""
    P, A, U, B = shape4
    rows = max(1, NUMPY_BLOCK // max(1, P * U * B))  # rows of A per block, all of P
    ps = P if rows > 1 or P * U * B <= NUMPY_BLOCK else max(1, NUMPY_BLOCK // max(1, U * B))
    for p0 in range(0, P, ps):
        for a0 in range(0, A, rows):
            yield slice(p0, p0 + ps), slice(a0, a0 + rows)


def numpy_moments(x: np.ndarray, higher: bool = False) -> Moments:
    """The kernels' results computed with numpy: per block a float64 mean, then
    central power sums (two passes), blocks merged with Chan / Pébay.

    Same conventions as the kernels: NaN counted and left out, an empty unit
    has count 0, mean 0, min +inf, max -inf; ±inf gives a ±inf mean and NaN m2.
    """
    P, A, U, B = x.shape
    rows: dict[int, list[Moments]] = {}
    for ps, as_ in blocks(x.shape):
        part = _finite_block(x[ps, as_], higher)
        if part is None:
            part = _block(x[ps, as_], higher)
        key = ps.start
        rows[key] = [part] if key not in rows else rows[key] + [part]
    if not rows:  # no value at all (A or B is 0): empty units, as the kernels leave them
        return Moments.empty((P * U,), higher)
    merged = []
    for key in sorted(rows):
        out = rows[key][0]
        for part in rows[key][1:]:
            out = out.merge(part)
        merged.append(out)
    return merged[0] if len(merged) == 1 else concatenate(merged, axis=0)


def _finite_block(x: np.ndarray, higher: bool) -> Moments | None:
    """One block's moments when every value is finite (else None: ``_block``): the float64
    copy is made once and squared in place, min and max read the input itself."""
    if x.size == 0:
        return None
    d = x.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, overflow: the slow path's
        total = d.sum(axis=(1, 3))
    if not np.isfinite(total).all():  # a NaN or an inf somewhere in the block
        return None
    n = x.shape[1] * x.shape[3]
    mean = total / n
    d -= mean[:, None, :, None]
    m3 = m4 = None
    if higher:
        d2 = np.square(d)
        m3 = np.einsum("pabc,pabc->pb", d2, d).ravel()
        m4 = np.einsum("pabc,pabc->pb", d2, d2).ravel()
        m2 = d2.sum(axis=(1, 3))
    else:
        np.square(d, out=d)
        m2 = d.sum(axis=(1, 3))
    cnt = np.full(mean.size, n, np.int64)
    mn = x.min(axis=(1, 3)).astype(np.float64).ravel()
    mx = x.max(axis=(1, 3)).astype(np.float64).ravel()
    return Moments(cnt, mean.ravel(), m2.ravel(), mn, mx, np.zeros(mean.size, np.int64), m3, m4)


def _block(x: np.ndarray, higher: bool) -> Moments:
    """One block's moments with NaN counted and left out, ±inf as the kernels treat them."""
    B = x.shape[3]
    v = x.astype(np.float64)
    bad = np.isnan(v) if x.dtype.kind == "f" else None
    nanc = np.zeros(v.shape[::2], np.int64) if bad is None else bad.sum(axis=(1, 3))
    cnt = np.full(v.shape[::2], v.shape[1] * B, np.int64) - nanc
    if bad is not None:
        v[bad] = 0.0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # as the kernels
        mean = np.where(cnt > 0, v.sum(axis=(1, 3)) / np.maximum(cnt, 1), 0.0)
        d = v - mean[:, None, :, None]
        if bad is not None:
            d[bad] = 0.0
        d2 = d * d
        m2 = d2.sum(axis=(1, 3))
        m3 = (d2 * d).sum(axis=(1, 3)) if higher else None
        m4 = (d2 * d2).sum(axis=(1, 3)) if higher else None
    if bad is not None:
        v[bad] = np.nan  # fmin/fmax skip NaN
    mn = np.fmin.reduce(v, axis=(1, 3), initial=np.inf)
    mx = np.fmax.reduce(v, axis=(1, 3), initial=-np.inf)
    return Moments(cnt.ravel(), mean.ravel(), m2.ravel(), mn.ravel(), mx.ravel(), nanc.ravel(),
                   None if m3 is None else m3.ravel(), None if m4 is None else m4.ravel())
