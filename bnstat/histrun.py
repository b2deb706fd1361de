"""``compute_hist``: the histograms, quantiles and amax of every named array.

Pass 1 is ``stream.compute_stats`` (moments), visited by the LO:HI counts and
the first quantile pass; then, for ``auto``/``abs``, the counting pass over
the exact ranges (with the next quantile pass), then the quantile passes
left (bnstat.quantiles). See bnstat.distributions for the per-unit state.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from bnstat.distributions import (UnitState, build, check_passes, default_bins, finite_range,
                                  group_units, per_tensor_view, tensor_stats, unit_index)
from bnstat.errors import UsageProblem
from bnstat.histogram import outer_edges, parse_range


def _kernel_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return np.dtype(np.float32)
    if dtype.kind == "f" and dtype.itemsize > 8:
        return np.dtype(np.float64)
    return dtype


class _Array:
    """Everything ``compute_hist`` tracks for one named array."""

    def __init__(self, sources, plans, bins, rng, quantiles, per_tensor):
        from bnstat.quantiles import Selector

        self.sources, self.plans, self.per_tensor = sources, plans, per_tensor
        unit_shape, _ = group_units(sources, plans)
        self.n_units = 1 if per_tensor else math.prod(unit_shape)
        self.gidx = [np.zeros(1, np.int64) if per_tensor else unit_index(sources, plans, i)
                     for i in range(len(sources))]
        self.dtype = _kernel_dtype(np.result_type(*[s.dtype for s in sources]))
        self.state = UnitState(self.n_units, bins, absval=rng == "abs")
        if isinstance(rng, tuple):
            self.state.set_edges(np.full(self.n_units, rng[0]), np.full(self.n_units, rng[1]))
        self.counting = isinstance(rng, tuple)
        self.selector = Selector(self.n_units, self.dtype, quantiles) if quantiles else None
        self.selecting = self.selector is not None
        self.threads = 1

    def visit(self, i: int):
        """The chunk visitor of source i for the current pass (None: nothing to do)."""
        from bnstat.stream import read_only

        if not (self.counting or self.selecting):
            return None
        g = self.gidx[i]
        tables = self._tables if self.selecting else None

        def visit(x, lo, hi):
            if x.dtype != self.dtype:  # read-only as every kernel input (one compiled variant)
                x = read_only(x.astype(self.dtype))
            if self.per_tensor:
                x, units = per_tensor_view(x), g
            else:
                units = g[lo:hi]
            if self.counting:
                self.state.count(x, units, self.threads)
            if tables is not None:
                _select(x, units, tables, self.threads)
        return visit

    def start_pass(self) -> None:
        if self.selecting:
            self._tables = self.selector.tables()
            self._tables["counts"] = np.zeros(self._tables["n_counts"] + 1, np.int64)  # + scratch
            self._tables["keys"] = np.zeros(max(1, self._tables["n_keys"]), np.uint64)

    def end_pass(self) -> None:
        if self.selecting:
            self.selector.advance(self._tables["counts"], self._tables["keys"])
            self.selecting = not self.selector.done
        self.counting = False


def _select(x, units, t, threads) -> None:
    from bnstat.kernels import hist as kernels_hist
    from bnstat.distributions import _split

    P, A, U, B = x.shape
    S = t["slo"].shape[1]
    _, su = _split(P, A, U, threads, split_a=False)
    if B == 1:  # rows of every unit (NHWC): as few tasks as threads, each reads all the rows
        su = min(U, threads)
    pos = t["pos"][units].reshape(P, U, S)
    kernels_hist.select4(x, su, t["nslot"][units].reshape(P, U), t["slo"][units].reshape(P, U, S),
                         t["shi"][units].reshape(P, U, S), t["sshift"][units].reshape(P, U, S),
                         t["sbase"][units].reshape(P, U, S), t["scollect"][units].reshape(P, U, S),
                         pos, t["nint"][units].reshape(P, U), t["ilo"][units].reshape(P, U, S),
                         t["ihi"][units].reshape(P, U, S), t["counts"], t["keys"])
    t["pos"][units] = pos.reshape(-1, S)


def _plans(sources, per_file, layout, channel_axis, norm, groups, reduce):
    from bnstat.layout import make_plan
    from bnstat.stream import group_sources

    out = {}
    for g in group_sources(sources, per_file=per_file):
        out[g.name] = (g.sources, [make_plan(s.shape, layout=layout, channel_axis=channel_axis, norm=norm,
                                             groups=groups, reduce=reduce, name=s.where) for s in g.sources])
    return out


def compute_hist(sources, *, layout=None, channel_axis=None, norm="batch", groups=None, reduce=None,
                 ddof=0, bins=None, range="auto", quantiles=None, amax=None, per_tensor=False,
                 num_bits=8, unsigned=False, nan_policy="omit", chunk_size=None, threads=None,
                 per_file=False, progress=None, engine=None, rerun=None):
    """``{name: Histogram}`` of every array of ``sources``. Raises BnstatError subclasses.

    ``range``: "auto", "abs", "LO:HI" or (lo, hi); ``quantiles``: q values in [0, 1];
    ``amax``: methods (max, percentile:P, mse, entropy), computed on the |x| histogram
    (so they need ``range="abs"``).
    """
    from bnstat.amax import check_method
    from bnstat.quantiles import check_quantiles
    from bnstat.stream import DEFAULT_CHUNK_SIZE, compute_stats, set_threads, source_moments

    bins = default_bins(bins)
    try:
        rng = parse_range(range) if isinstance(range, str) else parse_range(f"{range[0]!r}:{range[1]!r}")
        qs = check_quantiles(quantiles) if quantiles is not None and len(quantiles) else None
    except ValueError as exc:
        raise UsageProblem(f"--range/--quantiles: {exc}") from None
    methods = [check_method(m) for m in (amax or ())]
    if methods and rng != "abs":
        raise UsageProblem(f"--amax/amax= works on the histogram of |x|, but --range/range= is "
                           f"{range!r}", "Use --range abs (the calibration convention).")
    check_passes(sources, rng, qs)
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    arrays = {name: _Array(srcs, plans, bins, rng, qs, per_tensor)
              for name, (srcs, plans) in _plans(sources, per_file, layout, channel_axis, norm, groups,
                                                reduce).items()}
    n_threads = set_threads(threads)
    for a in arrays.values():
        a.threads = n_threads
        a.start_pass()
    stats = compute_stats(sources, layout=layout, channel_axis=channel_axis, norm=norm, groups=groups,
                          reduce=reduce, ddof=ddof, nan_policy=nan_policy, chunk_size=chunk_size,
                          threads=threads, per_file=per_file, progress=progress, engine=engine,
                          visit=lambda name, i, src, plan: arrays[name].visit(i))
    n_threads = set_threads(threads)
    out = {}
    for name, a in arrays.items():
        s = tensor_stats(stats[name]) if per_tensor else stats[name]
        if a.selector is not None:
            a.selector.set_counts(s.count.ravel())
        a.end_pass()
        if not isinstance(rng, tuple):
            mn, mx = finite_range(stats[name], a.sources, a.plans, a.gidx, chunk_size, n_threads) \
                if not per_tensor else _tensor_range(stats[name], a, chunk_size, n_threads)
            lo, hi = outer_edges(s, rng, mn.reshape(s.unit_shape), mx.reshape(s.unit_shape))
            a.state.set_edges(lo, hi)
            a.counting = True
        while a.counting or a.selecting:
            a.start_pass()
            for i, (src, plan) in enumerate(zip(a.sources, a.plans)):
                source_moments(src, plan, chunk_size=chunk_size, threads=n_threads, visit=a.visit(i),
                               moments=False)
            a.end_pass()
        h = build(s, a.state, rng, per_tensor, num_bits, unsigned)
        if qs:
            h.quantile_q = tuple(qs)
            h.quantile_values = a.selector.values().reshape(s.unit_shape + (len(qs),))
        h.amax_values = {m: h.amax(m) for m in methods}
        if rerun is not None:
            h._rerun = functools.partial(_rerun_one, rerun, name)
        out[name] = h
    return out


def _tensor_range(stats, a, chunk_size, threads):
    mn, mx = finite_range(stats, a.sources, a.plans,
                          [unit_index(a.sources, a.plans, i) for i in range(len(a.sources))], chunk_size, threads)
    return np.array([mn.min(initial=np.inf)]), np.array([mx.max(initial=-np.inf)])


def _rerun_one(rerun, name, **changes):
    return rerun(**changes)[name]
