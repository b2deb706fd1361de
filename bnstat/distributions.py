"""The passes of ``bnstat hist``: moments, exact ranges, fixed-edge counts, quantiles, amax.

Pass 1 is the moments pass of ``stream.compute_stats`` (with ``LO:HI`` it also
counts; with quantiles it also counts the top bits of every key). ``auto``
and ``abs`` count in a second pass over the exact per-unit range. Quantiles
take the counting passes of ``bnstat.quantiles`` (README "Exact quantiles").
Per-unit arrays here are flat over the array's ``unit_shape`` (C order); a
source's chunk covers units ``lo:hi`` in its own scan order, mapped to the
array's units by ``unit_index``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from bnstat.errors import UsageProblem
from bnstat.histogram import DEFAULT_BINS, Histogram, check_bins, make_edges, outer_edges
from bnstat.stats import Moments, Stats

TASKS_PER_THREAD = 4


def group_units(sources, plans) -> tuple[tuple[int, ...], int | None]:
    """The unit shape of an array made of ``sources`` (split along N), and where N is in it."""
    shape = list(plans[0].unit_shape(sources[0].shape))
    axes = plans[0].unit_axes
    n_axis = axes.index("N") if "N" in axes else None
    if n_axis is not None:
        shape[n_axis] = sum(p.unit_shape(s.shape)[n_axis] for s, p in zip(sources, plans))
    return tuple(shape), n_axis


def unit_index(sources, plans, i: int) -> np.ndarray:
    """For source i of an array: its scan-order units -> flat units of the array's units."""
    unit_shape, n_axis = group_units(sources, plans)
    src, plan = sources[i], plans[i]
    splan = plan.transposed() if src.fortran else plan
    sshape = splan.unit_shape(src.read_shape)
    final = np.arange(math.prod(sshape)).reshape(sshape)
    if src.fortran:
        final = final.transpose()
    whole = np.arange(math.prod(unit_shape)).reshape(unit_shape)
    if n_axis is not None:  # N kept: the sources follow each other along N
        start = sum(p.unit_shape(s.shape)[n_axis] for s, p in zip(sources[:i], plans[:i]))
        whole = whole.take(range(start, start + final.shape[n_axis]), axis=n_axis)
    gidx = np.empty(final.size, np.int64)
    gidx[final.ravel()] = whole.ravel()
    return gidx


def _split(P: int, A: int, U: int, threads: int, split_a: bool) -> tuple[int, int]:
    target = TASKS_PER_THREAD * threads if threads > 1 else 1
    su = max(1, min(U, -(-target // P)))
    sa = max(1, min(A, -(-target // (P * su)))) if split_a else 1
    return sa, su


def guess_margin(edges: np.ndarray, lo: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """Per unit, the margin of the counting kernel's sure guesses (kernels.hist._hist_guess).

    The guess of a value v is g(v) = (v - lo) * inv in float64, the kernel's own
    operations; g is monotonic, so where every edge has |g(edges[k]) - k| <= d, a guess
    whose fractional part lies in (d, 1 - d) is the value's bin. Twice d plus 2**-30
    leaves room for the rounding of 1 - margin; 1 (no guess is sure) where the reciprocal
    overflowed or the edges are too far from a uniform grid.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        g = (edges - lo[:, None]) * inv[:, None]
        d = np.abs(g - np.arange(edges.shape[-1], dtype=np.float64)).max(axis=-1, initial=0.0)
        m = 2.0 * d + 2.0**-30
    return np.where((inv > 0.0) & np.isfinite(m) & (m < 0.25), m, 1.0)


@dataclass
class UnitState:
    """The per-unit accumulators of one array (flat over its units)."""

    n_units: int
    bins: int
    absval: bool = False
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    edges: np.ndarray | None = None
    counts: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # underflow, overflow, zero_count
    uniform_units: dict = field(default_factory=dict, repr=False)  # of ``_uniform``, by unit

    def set_edges(self, lo, hi) -> None:
        self.lo, self.hi = lo.ravel().astype(np.float64), hi.ravel().astype(np.float64)
        self.edges = np.ascontiguousarray(make_edges(self.lo, self.hi, self.bins))  # a unit's edges together
        with np.errstate(divide="ignore", over="ignore"):
            inv = self.bins / (self.hi - self.lo)
        self.inv = np.where(np.isfinite(inv), inv, 0.0)
        self.margin = guess_margin(self.edges, self.lo, self.inv)
        self.counts = np.zeros((self.n_units, self.bins), np.int64)
        self.extra = {k: np.zeros(self.n_units, np.int64) for k in ("underflow", "overflow", "zero_count")}
        self.uniform_units = {}

    def count(self, x: np.ndarray, g: np.ndarray, threads: int, engine: str = "numba") -> None:
        """Add the counts of a chunk's view ``x`` whose units are the flat units ``g``.

        ``engine``: "numba" (the counting kernel), "numpy" (``numpy_count``: np.histogram per
        unit, the same integers), or "auto" (numba once its kernel is loaded)."""
        from bnstat.kernels.loader import hist_kernel
        from bnstat.stream import kernel_engine, read_only

        x = read_only(x)  # one compiled variant per dtype (stream.read_only)
        kernel = hist_kernel(x)
        if kernel_engine(kernel, x, engine, threads) == "numpy":
            return self._count_numpy(x, g)
        from bnstat.kernels import hist as kernels_hist

        P, A, U, B = x.shape
        sa, su = _split(P, A, U, threads, split_a=True)
        if B == 1 and threads > 1:  # rows of every unit (NHWC): tasks take rows, not units
            sa, su = min(A, TASKS_PER_THREAD * threads), 1
        nb = self.bins
        contiguous = g.size and g[0] + g.size - 1 == g[-1] and np.array_equal(g, np.arange(g[0], g[0] + g.size))
        if contiguous:
            sl = slice(int(g[0]), int(g[0]) + g.size)
            lo, hi, inv, margin, edges = (self.lo[sl].reshape(P, U), self.hi[sl].reshape(P, U),
                                          self.inv[sl].reshape(P, U), self.margin[sl].reshape(P, U),
                                          self.edges[sl].reshape(P, U, nb + 1))
        else:
            lo, hi, inv, margin = (self.lo[g].reshape(P, U), self.hi[g].reshape(P, U),
                                   self.inv[g].reshape(P, U), self.margin[g].reshape(P, U))
            edges = self.edges[g].reshape(P, U, nb + 1)
        direct = contiguous and sa == 1
        counts = self.counts[sl].reshape(1, P, U, nb) if direct else np.zeros((sa, P, U, nb), np.int64)
        small = {k: np.zeros((sa, P, U), np.int64) for k in ("under", "over", "nan", "inf", "zero")}
        getattr(kernels_hist, kernel)(x, sa, su, self.absval, lo, hi, inv, margin, edges, counts, small["under"], small["over"],
                           small["nan"], small["inf"], small["zero"])
        if not direct:
            np.add.at(self.counts, g, counts.sum(axis=0).reshape(-1, nb))
        for key, name in (("under", "underflow"), ("over", "overflow"), ("zero", "zero_count")):
            np.add.at(self.extra[name], g, small[key].sum(axis=0).ravel())


    def _count_numpy(self, x: np.ndarray, g: np.ndarray) -> None:
        """``count`` with numpy: per unit np.histogram over its edges of the values in range,
        NaN and +-inf apart, the same rules as the kernels (kernels.hist._hist4_units)."""
        P, A, U, B = x.shape
        units = np.asarray(g).reshape(P, U)
        for p in range(P):
            for u in range(U):
                k = int(units[p, u])
                v = x[p, :, u, :].astype(np.float64).ravel()
                if self.absval:
                    v = np.abs(v)
                self.extra["zero_count"][k] += np.count_nonzero(v == 0.0)
                lo, hi = self.lo[k], self.hi[k]
                under, over = np.count_nonzero(v < lo), np.count_nonzero(v > hi)  # NaN in neither
                if np.isinf(v).any():  # -inf and +inf are counted apart, not under or over
                    under -= np.count_nonzero(v == -np.inf)
                    over -= np.count_nonzero(v == np.inf)
                self.extra["underflow"][k] += under
                self.extra["overflow"][k] += over
                if self._uniform(k):  # numpy's path for equal bins: no sort, the same counts; it
                    # keeps lo <= v <= hi itself (NaN and +-inf out)
                    self.counts[k] += np.histogram(v, bins=self.bins, range=(lo, hi))[0]
                else:
                    self.counts[k] += np.histogram(v[(v >= lo) & (v <= hi)], bins=self.edges[k])[0]

    def _uniform(self, k: int) -> bool:
        """Whether unit k's edges are np.histogram's own for ``bins`` over (lo, hi) (they are
        made so, ``make_edges``; checked once per unit)."""
        known = self.uniform_units
        if k not in known:
            lo, hi = self.lo[k], self.hi[k]
            known[k] = bool(lo < hi and np.array_equal(np.linspace(lo, hi, self.bins + 1), self.edges[k]))
        return known[k]


def finite_range(stats: Stats, sources, plans, gidx, chunk_size: int, threads: int):
    """Per-unit finite min and max (flat): the moments' own, except in units holding
    +-inf, whose finite range takes one more pass over those units alone."""
    from bnstat.stream import source_moments

    bad = stats.moments.inf_count.ravel() > 0
    if not bad.any():
        return stats.moments.min.ravel().astype(np.float64), stats.moments.max.ravel().astype(np.float64)
    mn, mx = np.full(bad.size, np.inf), np.full(bad.size, -np.inf)
    for i, (src, plan) in enumerate(zip(sources, plans)):
        source_moments(src, plan, chunk_size=chunk_size, threads=threads,
                       visit=finite_visitor(bad, mn, mx, gidx[i]), moments=False)
    return with_finite(stats, bad, mn, mx)


def with_finite(stats: Stats, bad: np.ndarray, mn: np.ndarray, mx: np.ndarray):
    """The moments' min and max (flat float64), those of the ``bad`` units replaced by
    ``mn``/``mx`` (their finite range)."""
    return (np.where(bad, mn, stats.moments.min.ravel().astype(np.float64)),
            np.where(bad, mx, stats.moments.max.ravel().astype(np.float64)))


def finite_visitor(bad: np.ndarray, mn: np.ndarray, mx: np.ndarray, g: np.ndarray):
    """The chunk visitor of ``finite_range``: the finite min and max of the ``bad`` units
    (flat over the array's units) into ``mn``/``mx``; ``g`` maps the chunks' units to them."""
    def visit(x, lo, hi):
        units = g[lo:hi]
        U = x.shape[2]
        for j in np.flatnonzero(bad[units]):
            p, u = divmod(int(j), U)
            v = x[p, :, u, :].astype(np.float64)
            v = v[np.isfinite(v)]
            if v.size:
                k = units[j]
                mn[k] = min(mn[k], v.min())
                mx[k] = max(mx[k], v.max())
    return visit


def per_tensor_view(x: np.ndarray) -> np.ndarray:
    """The whole chunk as the values of one unit."""
    return x.reshape(1, x.size, 1, 1)


def tensor_stats(stats: Stats) -> Stats:
    """The moments of all units of ``stats`` as one unit (``--per-tensor``)."""
    m = stats.moments.map(lambda a: a.reshape(-1))
    total = m.map(lambda a: a[:1])
    for i in range(1, m.count.size):
        total = total.merge(m.map(lambda a, i=i: a[i:i + 1]))
    return replace(stats, moments=total, unit_axes=["tensor"],
                   reduce=stats.layout if stats.groups is None else stats.reduce)


def check_passes(sources, rng, quantiles) -> None:
    """Refuse several passes over a stream that can be read once (stdin). Raises UsageProblem."""
    once = [s for s in sources if not getattr(s, "repeatable", True)]
    if once and (not isinstance(rng, tuple) or quantiles):
        raise UsageProblem(f"{once[0].where}: standard input can be read once, but --range auto/abs "
                           "and --quantiles read the data more than once",
                           "Save it to a file first, or give --range LO:HI without --quantiles.")


def default_bins(bins) -> int:
    return check_bins(DEFAULT_BINS if bins is None else bins)


def build(stats: Stats, state: UnitState, rng, per_tensor: bool, num_bits: int, unsigned: bool) -> Histogram:
    shape = stats.unit_shape
    nb = state.bins
    return Histogram(stats, state.edges.reshape(shape + (nb + 1,)), state.counts.reshape(shape + (nb,)),
                     *(state.extra[k].reshape(shape) for k in ("underflow", "overflow", "zero_count")),
                     range=rng, num_bits=num_bits, unsigned=unsigned, per_tensor=per_tensor)


__all__ = ["UnitState", "unit_index", "finite_range", "finite_visitor", "with_finite", "tensor_stats", "build", "Moments"]
