"""``bnstat hist --scheduler``: every pass of ``compute_hist`` as tasks on a Dask cluster.

The passes are those of a local run (bnstat.histrun): the moments pass
(with the ``LO:HI`` counts and the first quantile pass), for ``auto``/``abs``
a range pass over the units holding +-inf (only when there are some) and the
counting pass, then the quantile passes left. Each pass is one round of
tasks over the same slabs (``bnstat.dask.plan_tasks``: whole chunks along N,
about ``--chunk-size`` bytes, named by (path, array, rows)); the pass's
parameters (the edges, the quantile slots, the units of the range pass) go
to the workers once per array (``Client.scatter``), every task returns small
partials, the client merges them in task order, then plans the next pass:

- histogram and bucket counts are int64 and add exactly (sent sparse when
  most are 0: the first quantile pass counts 2**16 buckets per unit);
- the keys a task collects for a quantile slot are placed after those of
  the tasks before it; the slot's keys are sorted before use, so any order
  gives the same keys;
- finite min and max merge exactly (np.minimum, np.maximum);
- the moments merge in the fixed tree of ``bnstat.dask.group_stats``.

So counts, edges, quantiles and amax are bit-identical to a local run's,
for any number of workers and any order of completion; the moments agree to
1e-15 relative, as for ``moments --scheduler``.
"""

from __future__ import annotations

import numpy as np

from bnstat.dask import open_task, task_errors

_EXTRA = ("underflow", "overflow", "zero_count")


# ---- in a worker ----------------------------------------------------------------

def run_hist_task(task, plan, units, spec: dict, *, threads: int, engine: str, check_crc: bool,
                  chunk_size: int):
    """In a worker: one pass over one task's slab; its partials (see ``_partials``).

    ``units`` maps the slab's units to the array's flat units; ``spec`` is the pass
    (``_spec``). Raises BnstatError naming the file.
    """
    with task_errors(task):
        return hist_pass(open_task(task, check_crc), plan, units, spec, threads=threads,
                         engine=engine, chunk_size=chunk_size)


def hist_pass(src, plan, units, spec: dict, *, threads: int, engine: str, chunk_size: int) -> dict:
    """One pass of ``spec`` (``_spec``) over source ``src``: its partials (see ``_merge``).

    ``units`` maps the source's units (scan order) to the array's flat units; the
    moments, when the pass takes them, are the source's own (of its unit shape)."""
    from bnstat.distributions import UnitState, finite_visitor
    from bnstat.histrun import chunk_visitor
    from bnstat.stream import set_threads, source_moments

    set_threads(threads)  # the counting kernels are Numba's whatever the moments engine
    state = tables = bad = None
    visits = []
    if spec["count"] is not None:
        c = spec["count"]
        state = UnitState(c["n_units"], c["bins"], absval=c["absval"])
        state.lo, state.hi, state.inv, state.edges = c["lo"], c["hi"], c["inv"], c["edges"]
        state.margin = c["margin"]
        state.counts = np.zeros((c["n_units"], c["bins"]), np.int64)
        state.extra = {k: np.zeros(c["n_units"], np.int64) for k in _EXTRA}
    if spec["select"] is not None:
        t = spec["select"]  # shared by the worker's tasks: never written to
        tables = dict(t, pos=t["pos"].copy(), counts=np.zeros(t["n_counts"] + 1, np.int64),
                      keys=np.zeros(max(1, t["n_keys"]), np.uint64))
    if state is not None or tables is not None:
        visits.append(chunk_visitor(spec["dtype"], spec["per_tensor"], units, state, tables,
                                    threads))
    if spec["bad"] is not None:
        bad = spec["bad"]
        mn, mx = np.full(bad.size, np.inf), np.full(bad.size, -np.inf)
        visits.append(finite_visitor(bad, mn, mx, units))
    visit = visits[0] if len(visits) == 1 else None
    if len(visits) > 1:
        def visit(x, lo, hi):
            for v in visits:
                v(x, lo, hi)
    moments = source_moments(src, plan, chunk_size=chunk_size, threads=threads, engine=engine,
                             visit=visit, moments=spec["moments"])
    out = {"moments": moments}
    if state is not None:
        out["counts"] = _pack(state.counts)
        out["extra"] = {k: _pack(v) for k, v in state.extra.items()}
    if tables is not None:
        out["scounts"] = _pack(tables["counts"])
        start = spec["select"]["pos"]
        n = tables["pos"] - start  # keys collected per (unit, slot)
        out["nkeys"] = _pack(n)
        out["keys"] = tables["keys"][_runs(start.ravel(), n.ravel())]
    if bad is not None:
        out["min"], out["max"] = mn, mx
    return out


def _runs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices of the runs starts[i]:starts[i] + lengths[i], one after the other."""
    lengths = lengths.astype(np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64) - offsets, lengths) + np.arange(int(lengths.sum()))


def _pack(a: np.ndarray):
    """``a`` as sent back: ("sparse", flat indices, values) when that is smaller."""
    flat = a.reshape(-1)
    nz = np.flatnonzero(flat)
    return ("sparse", nz, flat[nz]) if 2 * nz.size < flat.size else a


def _add_into(target: np.ndarray, packed) -> None:
    flat = target.reshape(-1)  # a view: the targets are contiguous
    if isinstance(packed, tuple):
        flat[packed[1]] += packed[2]  # indices are unique
    else:
        flat += packed.reshape(-1)


def _dense(packed, shape) -> np.ndarray:
    if not isinstance(packed, tuple):
        return packed
    out = np.zeros(shape, np.int64)
    _add_into(out, packed)
    return out


# ---- on the client ----------------------------------------------------------------

def _spec(a, *, moments: bool, bad=None) -> dict:
    """The parameters of array ``a``'s next pass (its counting state, quantile slots, or
    the units of a range pass), as the workers need them."""
    st = a.state
    count = None
    if a.counting and bad is None:
        count = dict(n_units=st.n_units, bins=st.bins, absval=st.absval, lo=st.lo, hi=st.hi,
                     inv=st.inv, margin=st.margin, edges=st.edges)
    select = None
    if a.selecting and bad is None:
        select = {k: v for k, v in a._tables.items() if k not in ("counts", "keys")}
    return dict(dtype=a.dtype, per_tensor=a.per_tensor, moments=moments, count=count,
                select=select, bad=bad)


def _merge(a, r: dict, ranges: dict | None, name: str) -> None:
    """Add task result ``r`` into array ``a``'s state (tasks taken in index order)."""
    if "counts" in r:
        _add_into(a.state.counts, r["counts"])
        for k in _EXTRA:
            _add_into(a.state.extra[k], r["extra"][k])
    if "scounts" in r:
        t = a._tables
        _add_into(t["counts"], r["scounts"])
        n = _dense(r["nkeys"], t["pos"].shape)
        t["keys"][_runs(t["pos"].ravel(), n.ravel())] = r["keys"]
        t["pos"] += n
    if "min" in r:
        mn, mx = ranges[name]
        np.minimum(mn, r["min"], out=mn)
        np.maximum(mx, r["max"], out=mx)


def _source_numbers(tasks) -> list[int]:
    """Each task's source index within its group (a source's tasks follow each other,
    its first one starting at row 0 or covering the whole array)."""
    out, last = [], {}
    for t in tasks:
        if t.rows is None or t.rows[0] == 0:
            last[t.group] = last.get(t.group, -1) + 1
        out.append(last[t.group])
    return out


def _task_units(t, src, plan, g: np.ndarray, one_unit: bool) -> np.ndarray:
    """The array's flat units of task ``t``'s slab, from its source's ``g`` (unit_index)."""
    if t.rows is None or 0 in plan.reduce or one_unit:
        return g  # the whole source, N reduced (every unit), or --per-tensor's one unit
    per_row = g.size // src.shape[0]
    return g[t.rows[0] * per_row:t.rows[1] * per_row]


def hist_passes(address: str, sources, arrays: dict, rng, *, ddof, nan_policy, chunk_size: int,
                threads, per_file, progress, engine, check_crc, **layout) -> None:
    """Every pass of ``compute_hist`` for ``arrays`` (bnstat.histrun._Array by name) on the
    Dask cluster at ``address``, into ``arrays``. Raises BnstatError (a task's own error,
    or the scheduler's)."""
    from bnstat.dask import group_stats, plan_tasks, run_tasks, session, source_plans
    from bnstat.stream import pick_engine, plan_groups

    array_groups, plans = plan_groups(sources, per_file=per_file, **layout)
    engine = pick_engine(sum(s.nbytes for s in sources), engine)
    threads = max(1, threads or 1)
    tasks = plan_tasks(array_groups, plans, chunk_size)
    names = [g.name for g in array_groups]
    numbers = _source_numbers(tasks)
    plan_of = source_plans(array_groups, plans)
    kwargs = dict(threads=threads, engine=engine, check_crc=check_crc, chunk_size=chunk_size)
    for a in arrays.values():
        a.threads = threads

    with session(address, sources=sources, warm=engine == "numba", hist=True) as client:
        def run(specs: dict, *, moments: bool = False, ranges=None) -> dict | None:
            todo = [t for t in tasks if names[t.group] in specs]
            shared = {name: client.scatter([spec], hash=False)[0] for name, spec in specs.items()}
            gidx = {name: (arrays[name].unit_gidx() if spec["bad"] is not None else arrays[name].gidx)
                    for name, spec in specs.items()}

            def args(t):
                name = names[t.group]
                i = numbers[t.index]
                a = arrays[name]
                one_unit = a.per_tensor and specs[name]["bad"] is None
                return (plan_of[(t.group, t.shown, t.name)],
                        _task_units(t, a.sources[i], a.plans[i], gidx[name][i], one_unit),
                        shared[name])

            results = run_tasks(client, todo, run_hist_task, args, kwargs,
                                progress=progress if moments else None)
            for t in todo:
                _merge(arrays[names[t.group]], results[t.index], ranges, names[t.group])
            if moments:
                return group_stats(array_groups, plans, tasks,
                                   {i: r["moments"] for i, r in results.items()},
                                   ddof=ddof, nan_policy=nan_policy)
            return None

        drive_passes(arrays, rng, run)


def drive_passes(arrays: dict, rng, run) -> None:
    """The passes of ``compute_hist`` for ``arrays`` (bnstat.histrun._Array by name), each
    a call ``run(specs, moments=, ranges=)``: the pass of every array named in ``specs``
    (``_spec``) run and its partials merged (``_merge``), the arrays' ``{name: Stats}``
    returned when ``moments``. The order of the passes is that of a local run."""
    from bnstat.distributions import with_finite

    # pass 1: the moments, with the LO:HI counts and the first quantile pass
    for a in arrays.values():
        a.start_pass()
    stats = run({n: _spec(a, moments=True) for n, a in arrays.items()}, moments=True)
    for name, a in arrays.items():
        a.moments_done(stats[name])
    if not isinstance(rng, tuple):
        # the exact ranges: the moments' min and max, but in units holding +-inf
        bad = {n: stats[n].moments.inf_count.ravel() > 0 for n in arrays}
        bad = {n: b for n, b in bad.items() if b.any()}
        ranges = {n: (np.full(b.size, np.inf), np.full(b.size, -np.inf)) for n, b in bad.items()}
        if bad:
            run({n: _spec(arrays[n], moments=False, bad=b) for n, b in bad.items()}, ranges=ranges)
        for name, a in arrays.items():
            m = stats[name].moments
            mn, mx = (with_finite(stats[name], bad[name], *ranges[name]) if name in bad else
                      (m.min.ravel().astype(np.float64), m.max.ravel().astype(np.float64)))
            a.set_range(rng, mn, mx)
    while True:  # the counting pass and the quantile passes left
        active = {n: a for n, a in arrays.items() if a.counting or a.selecting}
        if not active:
            break
        for a in active.values():
            a.start_pass()
        run({n: _spec(a, moments=False) for n, a in active.items()})
        for a in active.values():
            a.end_pass()
