"""``bnstat.dask.hist``: the histograms, quantiles and amax of a dask array.

The passes are those of ``bnstat hist`` (``bnstat.dask_hist.drive_passes``):
the moments pass (with the ``LO:HI`` counts and the first quantile pass),
for ``auto``/``abs`` a range pass over the units holding +-inf (only when
there are some) and the counting pass, then the quantile passes left. Each
pass is one dask graph, computed by whatever scheduler is active:

- a task per block runs ``dask_hist.hist_pass`` (bnstat's kernels) on the
  block in memory, with the array's flat units of the block's units, and
  returns the partials of ``bnstat hist --scheduler``'s tasks;
- the partials merge in a fixed pairwise tree over the blocks in C order
  (``merge_partials``): counts add (int64), the keys a block collects for a
  quantile slot follow those of the blocks before it (a slot's keys are
  sorted before use), finite min and max by np.minimum and np.maximum;
- the moments merge as in ``bnstat.dask.moments`` (a fixed tree along the
  reduced axes, joined along the kept ones).

The client takes the one merged partial into the array's state and plans
the next pass. So counts, edges, quantiles and amax are bit-identical to
``bnstat.hist`` on the same data in memory, for any chunking and any
scheduler; the moments are ``bnstat.dask.moments``'s.
"""

from __future__ import annotations

import functools
import uuid

import numpy as np

from bnstat.dask_hist import _EXTRA, _add_into, _dense, _merge, _pack, _runs


class _Whole:
    """The dask array as the one source of ``histrun._Array``: its name, shape and dtype."""

    fortran = False

    def __init__(self, x, name: str):
        self.name = self.where = name
        self.shape = self.read_shape = tuple(x.shape)
        self.dtype = np.dtype(x.dtype)


def hist(x, *, name: str, layout=None, channel_axis=None, norm="batch", groups=None, reduce=None,
         ddof=0, bins=2048, range="auto", quantiles=None, amax=None, per_tensor=False, num_bits=8,
         unsigned=False, nan="omit"):
    """The Histogram of the dask array ``x`` (options of ``bnstat.hist``). Raises BnstatError."""
    import dask

    from bnstat.dask import tree_merge
    from bnstat.dask_array import block_units, stats_of
    from bnstat.dask_hist import drive_passes
    from bnstat.histrun import _Array, check_options, finish
    from bnstat.io.base import check_dtype, check_shape
    from bnstat.layout import array_layout, make_plan
    from bnstat.stream import pick_engine

    options = dict(layout=layout, channel_axis=channel_axis, norm=norm, groups=groups,
                   reduce=reduce, ddof=ddof, bins=bins, range=range, quantiles=quantiles, amax=amax,
                   per_tensor=per_tensor, num_bits=num_bits, unsigned=unsigned, nan=nan)
    check_dtype(np.dtype(x.dtype), name)
    check_shape(x.shape, name)
    bins_, rng, qs, methods = check_options(bins, range, quantiles, amax)
    whole = _Whole(x, name)
    plan = make_plan(whole.shape, layout=array_layout(whole, layout, channel_axis),
                     channel_axis=channel_axis, norm=norm, groups=groups, reduce=reduce, name=name)
    if plan.groups is not None:  # a block must hold whole groups of channels
        x = x.rechunk({plan.channel_axis: -1})
    a = _Array([whole], [plan], bins_, rng, qs, per_tensor)
    # the engine of the moments by the whole array's size, as bnstat.dask.moments
    engine = pick_engine(int(x.nbytes))
    blocks = x.to_delayed()
    units = block_units(x, plan)  # block index -> the array's flat units of its units

    def run(specs: dict, *, moments: bool = False, ranges=None):
        spec = specs[name]
        one_unit = per_tensor and spec["bad"] is None
        shared = dask.delayed(spec, name=f"bnstat-hist-spec-{uuid.uuid4().hex}", traverse=False)
        task = dask.delayed(_block_pass, pure=False)
        parts = {index: task(blocks[index], plan, None if one_unit else units[index], shared,
                             engine, name) for index in np.ndindex(*x.numblocks)}
        merge = dask.delayed(merge_partials, pure=False)
        merged = tree_merge(list(parts.values()), lambda p, q: merge(p, q, shared))
        if not moments:
            (partial,) = dask.compute(merged)
            _merge(a, partial, ranges, name)
            return None
        from bnstat.dask_array import joined_moments

        joined = joined_moments(x, plan, lambda index: parts[index]["moments"])
        partial, m = dask.compute(merged, joined)
        _merge(a, partial, ranges, name)
        return {name: stats_of(m, x, plan, name=name, ddof=ddof, nan=nan)}

    drive_passes({name: a}, rng, run)
    h = finish(a, rng, qs, methods, num_bits, unsigned)
    h._rerun = functools.partial(_rerun, x, name, options)
    return h


def _rerun(x, name, options, **changes):
    return hist(x, name=name, **{**options, **changes})


def _block_pass(block, plan, units, spec: dict, engine: str, name: str) -> dict:
    """In a task: one pass over one block (``dask_hist.hist_pass``). ``units``: the array's
    flat units of the block's units in C order, ascending (None: --per-tensor's one unit).

    The counting and the quantile tables are those of the block's units alone (``_local``),
    its partials placed back among the array's units, sparse (``_placed``)."""
    from bnstat.dask_hist import hist_pass
    from bnstat.distributions import unit_index
    from bnstat.io import MemorySource

    src = MemorySource(np.asarray(block), name)
    if units is None:
        return hist_pass(src, plan, np.zeros(1, np.int64), spec, threads=1, engine=engine,
                         chunk_size=max(1, src.nbytes))
    scan = unit_index([src], [plan], 0)  # the block's units in its scan order (a Fortran
    # -ordered block is read transposed) -> its units in C order
    local = spec["bad"] is None and units.size < _n_units(spec)
    out = hist_pass(src, plan, scan if local else units[scan], _local(spec, units) if local else spec,
                    threads=1, engine=engine, chunk_size=max(1, src.nbytes))
    return _placed(out, spec, units) if local else out


def _n_units(spec: dict) -> int:
    if spec["count"] is not None:
        return spec["count"]["n_units"]
    return spec["select"]["nslot"].size if spec["select"] is not None else 0


def _collected(t: dict) -> np.ndarray:
    """(U, S) bool: the slots of a quantile pass that collect keys."""
    return (np.arange(t["slo"].shape[1]) < t["nslot"][:, None]) & t["scollect"]


def _counted(t: dict) -> tuple[np.ndarray, np.ndarray]:
    """(U, S) bool of the slots that count buckets, and (U, S) their numbers of buckets."""
    counted = (np.arange(t["slo"].shape[1]) < t["nslot"][:, None]) & ~t["scollect"]
    nb = np.where(counted, ((t["shi"] - t["slo"]) >> t["sshift"]).astype(np.int64) + 1, 0)
    return counted, nb


def _local(spec: dict, units: np.ndarray) -> dict:
    """``spec`` for the units ``units`` of the array alone (their rows, in that order; the
    bucket counters and key buffers of their slots packed one after the other)."""
    out = dict(spec)
    if spec["count"] is not None:
        c = spec["count"]
        out["count"] = dict(c, n_units=units.size,
                            **{k: c[k][units] for k in ("lo", "hi", "inv", "margin", "edges")})
    if spec["select"] is not None:
        t = spec["select"]
        lt = {k: (t[k][units] if isinstance(t[k], np.ndarray) else t[k]) for k in t}
        counted, nb = _counted(lt)
        flat = nb.ravel()
        lt["sbase"] = np.where(counted, (np.cumsum(flat) - flat).reshape(nb.shape), 0)
        cap = _capacity(t)[units]
        lt["pos"] = np.where(_collected(lt), (np.cumsum(cap.ravel()) - cap.ravel()).reshape(cap.shape), 0)
        lt["pend"] = lt["pos"] + cap
        lt["n_counts"], lt["n_keys"] = int(flat.sum()), int(cap.sum())
        out["select"] = lt
    return out


def _capacity(t: dict) -> np.ndarray:
    """(U, S): the keys each collecting slot of the array's tables has room for (the slots'
    buffers follow each other in (unit, slot) order, ``quantiles.Selector.tables``)."""
    coll = _collected(t)
    cap = np.zeros(coll.shape, np.int64)
    cap[coll] = np.diff(np.append(t["pos"][coll], t["n_keys"]))
    return cap


def _placed(out: dict, spec: dict, units: np.ndarray) -> dict:
    """The partials of ``hist_pass`` over the tables of ``_local(spec, units)`` as those over
    the array's (sparse: flat indices among the array's units)."""
    placed = {"moments": out["moments"]}
    if "counts" in out:
        c = spec["count"]
        placed["counts"] = _sparse(_dense(out["counts"], (units.size, c["bins"])),
                                   units[:, None] * c["bins"] + np.arange(c["bins"]))
        placed["extra"] = {k: _sparse(_dense(v, units.shape), units) for k, v in out["extra"].items()}
    if "scounts" in out:
        t = spec["select"]
        lt = _local(spec, units)["select"]
        counted, nb = _counted(lt)
        where = np.append(_runs(t["sbase"][units][counted], nb[counted]), t["n_counts"])  # + scratch
        placed["scounts"] = _sparse(_dense(out["scounts"], (lt["n_counts"] + 1,)), where)
        S = t["slo"].shape[1]
        placed["nkeys"] = _sparse(_dense(out["nkeys"], (units.size, S)),
                                  units[:, None] * S + np.arange(S))
        placed["keys"] = out["keys"]  # in (unit, slot) order, the units ascending
    return placed


def _sparse(local: np.ndarray, where: np.ndarray) -> tuple:
    """("sparse", flat indices, values) of the nonzero values of ``local``, placed at ``where``
    (the flat index of each of its values among the array's)."""
    flat = local.reshape(-1)
    nz = np.flatnonzero(flat)
    return ("sparse", where.reshape(-1)[nz].astype(np.int64), flat[nz])


def _sum(a, b, shape) -> object:
    """The sum of two packed (``dask_hist._pack``) int64 arrays of ``shape``, packed; two
    sparse ones are added without the dense array (a block's partials hold the counters of
    every unit of the array, but the values of its own units only)."""
    size = int(np.prod(shape))
    if isinstance(a, tuple) and isinstance(b, tuple) and 2 * (a[1].size + b[1].size) < size:
        idx = np.concatenate([a[1], b[1]])
        val = np.concatenate([a[2], b[2]])
        order = np.argsort(idx, kind="stable")
        idx, val = idx[order], val[order]
        first = np.flatnonzero(np.diff(idx, prepend=-1))
        return ("sparse", idx[first], np.add.reduceat(val, first) if idx.size else val)
    out = np.zeros(shape, np.int64)
    _add_into(out, a)
    _add_into(out, b)
    return _pack(out)


def merge_partials(p: dict, q: dict, spec: dict) -> dict:
    """The partials of two parts of a pass (``dask_hist.hist_pass``), ``p`` before ``q``:
    what one task over both would return, but the moments (merged apart)."""
    out = {}
    if "counts" in p:
        c = spec["count"]
        out["counts"] = _sum(p["counts"], q["counts"], (c["n_units"], c["bins"]))
        out["extra"] = {k: _sum(p["extra"][k], q["extra"][k], (c["n_units"],)) for k in _EXTRA}
    if "scounts" in p:
        t = spec["select"]
        shape = t["pos"].shape
        out["scounts"] = _sum(p["scounts"], q["scounts"], (t["n_counts"] + 1,))
        na, nb = _dense(p["nkeys"], shape).ravel(), _dense(q["nkeys"], shape).ravel()
        n = na + nb
        start = np.cumsum(n) - n  # a (unit, slot)'s keys: p's, then q's
        keys = np.empty(int(n.sum()), np.uint64)
        keys[_runs(start, na)] = p["keys"]
        keys[_runs(start + na, nb)] = q["keys"]
        out["nkeys"] = _pack(n.reshape(shape))
        out["keys"] = keys
    if "min" in p:
        out["min"], out["max"] = np.minimum(p["min"], q["min"]), np.maximum(p["max"], q["max"])
    return out
