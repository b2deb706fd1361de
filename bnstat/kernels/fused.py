"""The moments and a quantile pass's selection in one walk over a (P, A, U, B) view, B > 1.

A ``bnstat hist --quantiles`` pass that selects in the moments pass (bnstat.histrun: a
first pass that carries the probe, or one that counts the keys' top bits) runs both the
moments kernel and the selection (kernels.select._select4) over every chunk. Apart, each
reads the chunk from memory; here each block of rows of a unit (the moments' block, at
most 64 KiB: kernels.moments.BLOCK_COLS) is selected from while it is still in the cache
(bench/README.md, "Eighth session").

The results are those of the two kernels apart, bit for bit: the moments kernel's
task function computes each block exactly as it does inside one call over all rows,
and its blocks are merged here in the same order with the same function; the
selection takes a unit's rows in order, so its keys are stored in the same order.
Tasks hold whole units (the selection's positions are never shared), as the moments
kernel's tasks do whenever ``stream.split_tasks`` cuts no range of A (the only case
the caller uses this kernel for, and only for float data: histrun._moments_select).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from bnstat.kernels._jit import JIT, PARALLEL_JIT, entry
from bnstat.kernels.select import _collecting, _select_rows
from bnstat.kernels.moments import BLOCK_COLS, _merge, _task_bounds, _units_task


@njit(inline="always", **JIT)
def _before(a, b):
    """a < b in the order of the moments' keys (-0.0 before +0.0); never NaN here."""
    return a < b or (a == b and math.copysign(1.0, a) < math.copysign(1.0, b))


@njit(**JIT)
def _unit(x, x3, p, u, bc, bm, bq, bmn, bmx, bnan, cnt, mean, m2, mn, mx, nanc, nslot, slo, shi,
          sshift, sbase, scollect, pos, pend, nint, ilo, ihi, below, count_below, counts, keys, ibuf,
          hbuf, allcoll, c0):
    """Unit (p, u): block by block, its moments (``_units_task`` over one block, into the
    scratch ``bc``.. at u) merged as that function merges them, then the block's selection."""
    A, B = x.shape[1], x.shape[3]
    rb = max(1, BLOCK_COLS // B)
    n = 0
    mu = 0.0
    q = 0.0
    lo = np.inf
    hi = -np.inf
    for ab in range(0, A, rb):
        ae = min(ab + rb, A)
        _units_task(x, p, ab, ae, u, u + 1, bc, bm, bq, bmn, bmx, bnan)
        n, mu, q = _merge(n, mu, q, bc[u], bm[u], bq[u])
        if bc[u] > 0:
            if _before(bmn[u], lo):
                lo = bmn[u]
            if _before(hi, bmx[u]):
                hi = bmx[u]
        _select_rows(x3, B, p, ab, ae, u, u + 1, nslot, slo, shi, sshift, sbase, scollect, pos, pend,
                     nint, ilo, ihi, below, count_below, counts, keys, ibuf, hbuf, allcoll, c0)
    cnt[u] = n
    mean[u] = mu
    m2[u] = q
    mn[u] = lo
    mx[u] = hi
    nanc[u] = A * B - n


@njit(**PARALLEL_JIT)
def _moments_select4(x, sa, su, cnt, mean, m2, mn, mx, nanc, nslot, slo, shi, sshift, sbase, scollect,
                     pos, pend, nint, ilo, ihi, below, count_below, counts, keys):
    """``moments4_units(x, 1, su, cnt, ..)`` and ``select4(x, su, nslot, ..)`` of a view with
    B > 1 in one walk (``sa`` must be 1: the outputs (1, P, U) of the moments as that
    kernel's, the selection's arguments as ``select4``'s)."""
    P, A, U, B = x.shape
    x3 = x.reshape((P, A, U * B))
    for t in prange(P * su):
        p, _, _, _, u0, u1 = _task_bounds(t, A, U, 1, su)
        if u1 <= u0 or A == 0:
            continue
        ibuf = np.empty(B, np.int64)
        hbuf = np.zeros((B + 7) // 8 * 8, np.uint8)
        allcoll = _collecting(nslot, scollect, p, u0, u1)
        bc = np.zeros(U, np.int64)  # one block's moments, at its unit (_units_task's outputs)
        bm = np.zeros(U)
        bq = np.zeros(U)
        bmn = np.zeros(U)
        bmx = np.zeros(U)
        bnan = np.zeros(U, np.int64)
        for u in range(u0, u1):
            _unit(x, x3, p, u, bc, bm, bq, bmn, bmx, bnan, cnt[0, p], mean[0, p], m2[0, p], mn[0, p],
                  mx[0, p], nanc[0, p], nslot, slo, shi, sshift, sbase, scollect, pos, pend, nint, ilo,
                  ihi, below, count_below, counts, keys, ibuf, hbuf, allcoll, u0)


moments_select4 = entry(_moments_select4)
