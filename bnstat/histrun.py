"""``compute_hist``: the histograms, quantiles and amax of every named array.

Pass 1 is ``stream.compute_stats`` (moments), visited by the LO:HI counts and
the quantiles' sample (or their first counting pass: int64, Dask); then, for
``auto``/``abs``, the counting pass over the exact ranges (with the probe or
the next quantile pass; one bin needs no counting), then the quantile passes
left (bnstat.quantiles). See bnstat.distributions for the per-unit state.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from bnstat.distributions import (UnitState, build, check_passes, default_bins, finite_range,
                                  group_units, per_tensor_view, tensor_stats, unit_index)
from bnstat.errors import UsageProblem, check_interrupt
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
        self.engine = "numba"  # of the counting passes (the quantile passes are numba's)
        self.sampler = None
        self.one_bin = False
        self.carried = False  # the first pass carries the probe (``presample``)

    def sample_first(self) -> None:
        """The first pass samples the values for a probe pass (bnstat.quantile_probe) instead
        of counting every key's top bits, where the keys allow it."""
        from bnstat.quantile_probe import Sampler, eligible

        if self.selector is not None and eligible(self.dtype, self.n_units):
            values = sum(math.prod(s.shape) for s in self.sources) // max(1, self.n_units)
            self.sampler = Sampler(self.n_units, values, self.dtype)
            self.selecting = False

    def presample(self, chunk_size: int, one_pass: bool) -> None:
        """Where the first pass is the only one the counts need (``one_pass``: LO:HI, or one
        bin) and every source's rows can be read on their own: a sample read ahead of
        it, from blocks of rows spread over the sources (``_spread_blocks``, each at most a
        chunk), so that the first pass carries the probe too: one pass less than with the
        sample of ``sample_first``, which that pass takes. The probe is planned on counts
        estimated from the sample; ``moments_done`` gives it the true ones."""
        from bnstat.quantile_probe import Sampler, eligible, sample_cap
        from bnstat.stream import kernel_input

        if not (one_pass and self.selector is not None and eligible(self.dtype, self.n_units)
                and all(_rows_readable(s, p) for s, p in zip(self.sources, self.plans))):
            return
        rows = [s.read_shape[0] for s in self.sources]
        values = sum(math.prod(s.shape) for s in self.sources) // max(1, self.n_units)  # a unit's
        per_row = values / max(1, sum(rows))
        need = math.ceil(sample_cap(self.n_units, self.dtype) / max(per_row, 1e-300))  # a sample's rows
        blocks = list(_spread_blocks(rows, need, chunk_size, [s.row_bytes for s in self.sources]))
        read = sum(r1 - r0 for _, r0, r1 in blocks)
        sampler = Sampler(self.n_units, int(read * per_row), self.dtype, along_rows=False)
        for i, src in enumerate(self.sources):
            visit = chunk_visitor(self.dtype, self.per_tensor, self.gidx[i], None, None,
                                  self.threads, self.engine, sampler)
            for block in _read_blocks(src, [(r0, r1) for j, r0, r1 in blocks if j == i]):
                check_interrupt()
                visit(kernel_input(block, self.plans[i]), 0, self.gidx[i].size)
        samples = sampler.samples()
        # the non-NaN values of each unit, as its sample has them (at least 1: a unit the
        # sample saw as NaN alone still gets a slot, whose keys then tell)
        est = np.array([max(1, round(values * v.size / max(1, t))) if values else 0
                        for v, t in zip(samples, sampler.taken)], np.int64)
        self.selector.set_counts(est)
        self.selector.probe(samples)
        self.carried = True
        self.selecting = True

    def visit(self, i: int):
        """The chunk visitor of source i for the current pass (None: nothing to do)."""
        if not (self.counting or self.selecting or self.sampler):
            return None
        return chunk_visitor(self.dtype, self.per_tensor, self.gidx[i],
                             self.state if self.counting else None,
                             self._tables if self.selecting else None, self.threads,
                             self.engine, self.sampler)

    def start_pass(self) -> None:
        if self.selecting:
            self._tables = pass_tables(self.selector)

    def moments_done(self, stats) -> None:
        """The moments pass is over: ``stats`` are the array's; the wanted ranks follow."""
        self.stats = tensor_stats(stats) if self.per_tensor else stats
        if self.carried:  # the pass carried the probe: its ranks follow the true counts
            self.selector.set_counts(self.stats.count.ravel())
            self.counting = False
            return
        if self.selector is not None:
            self.selector.set_counts(self.stats.count.ravel())
        if self.sampler is not None:
            self.selector.probe(self.sampler.samples())
            self.sampler = None
            self.selecting = not self.selector.done
            self.counting = False
            return
        self.end_pass()

    def unit_gidx(self) -> list:
        """Per source, its units -> the array's flat units (also with --per-tensor, whose
        counting passes see one unit)."""
        return [unit_index(self.sources, self.plans, i) for i in range(len(self.sources))]

    def set_range(self, rng, mn: np.ndarray, mx: np.ndarray) -> None:
        """The edges of the counting pass from every unit's finite min and max (flat)."""
        if self.per_tensor:
            mn, mx = np.array([mn.min(initial=np.inf)]), np.array([mx.max(initial=-np.inf)])
        s = self.stats
        lo, hi = outer_edges(s, rng, mn.reshape(s.unit_shape), mx.reshape(s.unit_shape))
        self.state.set_edges(lo, hi)
        # one bin over the exact range holds every finite value: its counts follow from the
        # moments, and the probe pass counts the zeros (no counting pass of its own)
        self.one_bin = self.state.bins == 1 and self.selecting and self.selector.probing
        self.counting = not self.one_bin

    def _one_bin_counts(self) -> None:
        st, m = self.state, self.stats.moments
        st.counts[:, 0] = self.selector.n - m.inf_count.ravel()
        st.extra["zero_count"][:] = self.selector.zeros

    def end_carried(self) -> None:
        """After ``moments_done`` and ``set_range`` of a first pass that carried the probe."""
        self.carried = False
        self.selector.advance(self._tables)
        self.selecting = not self.selector.done
        if self.one_bin:
            self._one_bin_counts()

    def end_pass(self) -> None:
        if self.selecting:
            probe = self.selector.probing
            self.selector.advance(self._tables)
            self.selecting = not self.selector.done
            if probe and self.one_bin:
                self._one_bin_counts()
        self.counting = False


READ_AHEAD_SHARE = 8  # a presample's blocks start in at most one row in 8


def _rows_readable(src, plan) -> bool:
    """Whether rows of ``src`` can be read on their own, cheaply, for a presample: an array in
    memory, a .npy or stored .npz member, an unfiltered HDF5 dataset (a filtered one would
    inflate whole chunks for a few rows); C order; axis 0 reduced into every unit (else a
    row's units are its own, and a few rows sample a few units)."""
    from bnstat.io.slabs import splittable

    if src.fortran or not src.repeatable:
        return False
    if src.kind != "memory" and not (splittable(src) and (src.kind != "hdf5" or src.compression is None)):
        return False
    return 0 in plan.reduce and not (plan.groups is not None and plan.channel_axis == 0)


def _spread_blocks(rows: list[int], need: int, chunk_size: int, row_bytes: list[int]):
    """(source, r0, r1): blocks of rows spread evenly over the sources' rows (one after
    the other), as many as 64 (but in at most one row in READ_AHEAD_SHARE), of ``need``
    rows in all or one row each, none over ``chunk_size``."""
    total = sum(rows)
    n_blocks = max(1, min(64, total // READ_AHEAD_SHARE))
    per = max(1, -(-need // n_blocks))
    starts = np.cumsum([0] + rows)
    for j in range(n_blocks):
        g0 = total * j // n_blocks
        i = int(np.searchsorted(starts, g0, side="right") - 1)
        r0 = g0 - int(starts[i])
        r1 = min(rows[i], r0 + min(per, max(1, chunk_size // max(1, row_bytes[i]))))
        if r1 > r0:
            yield i, r0, r1


def _read_blocks(src, ranges: list):
    """Rows r0:r1 of ``src`` (``_rows_readable``) for each (r0, r1) of ``ranges``, in order,
    C-contiguous in native byte order."""
    from bnstat.io.slabs import read_row_blocks

    blocks = (src.array[r0:r1] for r0, r1 in ranges) if src.kind == "memory" else read_row_blocks(src, ranges)
    for block in blocks:
        yield np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("="))


def chunk_visitor(dtype, per_tensor: bool, g: np.ndarray, state, tables, threads: int,
                  engine: str = "numba", sampler=None):
    """A chunk visitor (``stream.source_moments``) counting into ``state`` (a UnitState, or
    None) and the quantile pass's ``tables`` (or None), sampling into ``sampler`` (a
    quantile_probe.Sampler, or None); ``g`` maps the chunks' units to the array's flat
    units, ``dtype`` is the kernels' input dtype; ``engine`` the counting's
    (``UnitState.count``)."""
    from bnstat.stream import read_only

    def visit(x, lo, hi):
        if x.dtype != dtype:  # read-only as every kernel input (one compiled variant)
            x = read_only(x.astype(dtype))
        if per_tensor:
            x, units = per_tensor_view(x), g
        else:
            units = g[lo:hi]
        if state is not None:
            state.count(x, units, threads, engine)
        if tables is not None:
            _select(x, units, tables, threads)
        if sampler is not None:
            sampler.add(x, units)

    def with_moments(x, lo, hi, kthreads, moments_engine):
        """``visit(x, lo, hi)`` and the moments view_moments gives with ``kthreads`` and
        ``moments_engine`` (stream.source_moments), in one walk where that applies, else None
        (and nothing done)."""
        if x.dtype != dtype or per_tensor or tables is None or sampler is not None:
            return None
        part = _moments_select(x, g[lo:hi], tables, kthreads, moments_engine)
        if part is not None and state is not None:
            state.count(x, g[lo:hi], threads, engine)
        return part

    visit.with_moments = with_moments
    return visit


def warm_kernels(dtype) -> None:
    """Load (or compile) the counting kernels for inputs of ``dtype`` (a Dask worker's warm-up)."""
    dtype = _kernel_dtype(dtype)
    x = np.zeros((1, 2, 1, 2), dtype)
    state = UnitState(1, 2)
    state.set_edges(np.zeros(1), np.ones(1))
    from bnstat.quantiles import Selector

    tables = pass_tables(Selector(1, dtype, [0.5]))
    chunk_visitor(dtype, False, np.zeros(1, np.int64), state, tables, 1)(x, 0, 1)
    _moments_select(x, np.zeros(1, np.int64), tables, 1, "numba")  # and the one walk (B > 1)


def pass_tables(selector) -> dict:
    """The tables of a quantile pass (``Selector.tables``) with its empty counts and keys."""
    t = selector.tables()
    t["counts"] = np.zeros(t["n_counts"] + 1, np.int64)  # the last: scratch (kernels.select._select4)
    t["keys"] = np.zeros(max(1, t["n_keys"]), np.uint64)
    return t


def _select_args(x, units, t, su) -> tuple:
    """(select4's arguments after ``su`` for the units ``units`` of the view ``x``: the pass's
    tables ``t`` (``pass_tables``) at those units, as (P, U, ..) arrays; ``done()``, which
    writes the positions, and a probe's counts below, back into ``t`` after the kernel)."""
    P, _, U, _ = x.shape
    S = t["slo"].shape[1]
    probe = "below" in t  # a probe pass (quantiles.Selector.probe): the values below each slot
    below = t["below"][units].reshape(P, U, S + 1) if probe else np.zeros((1, 1, 1), np.int64)
    pos = t["pos"][units].reshape(P, U, S)

    def done():
        t["pos"][units] = pos.reshape(-1, S)
        if probe:
            t["below"][units] = below.reshape(-1, S + 1)
    return (t["nslot"][units].reshape(P, U), t["slo"][units].reshape(P, U, S),
            t["shi"][units].reshape(P, U, S), t["sshift"][units].reshape(P, U, S),
            t["sbase"][units].reshape(P, U, S), t["scollect"][units].reshape(P, U, S),
            pos, t["pend"][units].reshape(P, U, S), t["nint"][units].reshape(P, U),
            t["ilo"][units].reshape(P, U, S), t["ihi"][units].reshape(P, U, S), below, probe,
            t["counts"], t["keys"]), done


def _select(x, units, t, threads) -> None:
    from bnstat.kernels import select as kernels_select
    from bnstat.distributions import _split

    P, A, U, B = x.shape
    _, su = _split(P, A, U, threads, split_a=False)
    if B == 1:  # rows of every unit (NHWC): as few tasks as threads, each reads all the rows
        su = min(U, threads)
    args, done = _select_args(x, units, t, su)
    kernels_select.select4(x, su, *args)
    done()


def _moments_select(x, units, t, threads, engine):
    """The moments of the view ``x`` (stream.view_moments with ``engine``) and its selection
    (``_select``) in one walk (kernels.fused), or None where that kernel does not apply: B == 1,
    a split of A in the moments' tasks (whose merges the kernel does not make), or where
    view_moments would not take the numba kernel ("numpy"; "auto" while it compiles) or the
    one walk is not loaded yet ("auto" on a first run: then the two apart, the same results); and
    for integer data (rare for activations: each variant of the kernel costs its compile, about
    14 s)."""
    from bnstat.kernels.loader import moments_kernel
    from bnstat.stream import kernel_engine, kernel_moments, read_only, split_tasks

    x = read_only(x)
    sa, su = split_tasks(x.shape, threads)
    if (x.shape[3] == 1 or sa != 1 or x.dtype.kind != "f"
            or kernel_engine(moments_kernel(x), x, engine, threads) != "numba"
            or kernel_engine("moments_select4", x, engine, threads) != "numba"):
        return None
    from bnstat.kernels import fused

    args, done = _select_args(x, units, t, su)
    part = kernel_moments(x, 1, False, lambda *outs: fused.moments_select4(x, 1, su, *outs, *args))
    done()
    return part


def _plans(sources, per_file, layout, channel_axis, norm, groups, reduce):
    from bnstat.layout import array_layout, make_plan
    from bnstat.stream import group_sources

    out = {}
    for g in group_sources(sources, per_file=per_file):
        out[g.name] = (g.sources, [make_plan(s.shape, layout=array_layout(s, layout, channel_axis),
                                             channel_axis=channel_axis, norm=norm,
                                             groups=groups, reduce=reduce, name=s.where) for s in g.sources])
    return out


def compute_hist(sources, *, layout=None, channel_axis=None, norm="batch", groups=None, reduce=None,
                 ddof=0, bins=None, range="auto", quantiles=None, amax=None, per_tensor=False,
                 num_bits=8, unsigned=False, nan_policy="omit", chunk_size=None, threads=None,
                 per_file=False, progress=None, engine=None, rerun=None, scheduler=None,
                 check_crc=True):
    """``{name: Histogram}`` of every array of ``sources``. Raises BnstatError subclasses.

    ``range``: "auto", "abs", "LO:HI" or (lo, hi); ``quantiles``: q values in [0, 1];
    ``amax``: methods (max, percentile:P, mse, entropy), computed on the |x| histogram
    (so they need ``range="abs"``). ``scheduler``: a Dask address (``--scheduler``): every
    pass runs there, as tasks over slabs (bnstat.dask_hist; ``check_crc`` for the workers'
    reads); the counts, edges and quantiles are those of a local run.
    """
    from bnstat.stream import DEFAULT_CHUNK_SIZE

    bins, rng, qs, methods = check_options(bins, range, quantiles, amax)
    check_passes(sources, rng, qs)
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    arrays = {name: _Array(srcs, plans, bins, rng, qs, per_tensor)
              for name, (srcs, plans) in _plans(sources, per_file, layout, channel_axis, norm, groups,
                                                reduce).items()}
    if scheduler is not None:
        from bnstat.dask_hist import hist_passes

        hist_passes(scheduler, sources, arrays, rng, layout=layout, channel_axis=channel_axis,
                    norm=norm, groups=groups, reduce=reduce, ddof=ddof, nan_policy=nan_policy,
                    chunk_size=chunk_size, threads=threads, per_file=per_file, progress=progress,
                    engine=engine, check_crc=check_crc)
    else:
        _local_passes(sources, arrays, rng, layout=layout, channel_axis=channel_axis, norm=norm,
                      groups=groups, reduce=reduce, ddof=ddof, nan_policy=nan_policy,
                      chunk_size=chunk_size, threads=threads, per_file=per_file, progress=progress,
                      engine=engine)
    out = {}
    for name, a in arrays.items():
        h = finish(a, rng, qs, methods, num_bits, unsigned)
        if rerun is not None:
            h._rerun = functools.partial(_rerun_one, rerun, name)
        out[name] = h
    return out


def check_options(bins, range, quantiles, amax):
    """The checked ``(bins, range, quantiles or None, amax methods)`` of ``compute_hist``.
    Raises UsageProblem."""
    from bnstat.amax import check_method
    from bnstat.quantiles import check_quantiles

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
    return bins, rng, qs, methods


def finish(a: _Array, rng, qs, methods, num_bits: int, unsigned: bool):
    """The Histogram of array ``a`` once its passes are over, with its quantiles and amax."""
    s = a.stats
    h = build(s, a.state, rng, a.per_tensor, num_bits, unsigned)
    if qs:
        h.quantile_q = tuple(qs)
        h.quantile_values = a.selector.values().reshape(s.unit_shape + (len(qs),))
    h.amax_values = {m: h.amax(m) for m in methods}
    return h


def _local_passes(sources, arrays: dict, rng, *, chunk_size: int, threads, progress, **compute):
    """The passes of ``compute_hist`` in this process, into ``arrays``."""
    from bnstat.stream import compute_stats, pick_engine, source_moments, start_threads

    # the moments and the counting switch to numba as the first run's kernels get compiled
    # (README, "The first run"); the quantile passes always take numba's kernels
    engine = pick_engine(sum(s.nbytes for s in sources), compute.pop("engine", None), switch=True)
    n_threads = start_threads(threads, engine)
    for a in arrays.values():
        a.threads = n_threads
        a.engine = engine
        if a.selector is not None:
            a.selector.threads = n_threads
        a.presample(chunk_size, one_pass=isinstance(rng, tuple) or a.state.bins == 1)
        if not a.carried:
            a.sample_first()
        a.start_pass()
    stats = compute_stats(sources, chunk_size=chunk_size, threads=threads, progress=progress,
                          visit=lambda name, i, src, plan: arrays[name].visit(i), engine=engine,
                          **compute)
    n_threads = start_threads(threads, engine)
    for name, a in arrays.items():
        a.moments_done(stats[name])
        if not isinstance(rng, tuple):
            gidx = a.gidx if not a.per_tensor else a.unit_gidx()
            a.set_range(rng, *finite_range(stats[name], a.sources, a.plans, gidx, chunk_size, n_threads))
        if a.carried:
            a.end_carried()
        while a.counting or a.selecting:
            a.start_pass()
            for i, (src, plan) in enumerate(zip(a.sources, a.plans)):
                source_moments(src, plan, chunk_size=chunk_size, threads=n_threads, visit=a.visit(i),
                               moments=False)
            a.end_pass()


def _rerun_one(rerun, name, **changes):
    return rerun(**changes)[name]
