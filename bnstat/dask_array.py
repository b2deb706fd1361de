"""``bnstat.dask.moments`` and ``bnstat.dask.hist``: dask arrays and xarray DataArrays.

``moments(x, ...)``: one fused pass per block (count, mean, m2, min, max, NaN
count together), the partials of blocks along reduced axes merged in a fixed
tree, those along kept axes concatenated; computed by whatever scheduler is
active. ``hist(x, ...)``: every pass of ``bnstat hist`` one dask graph of
per-block tasks, merged exactly (bnstat.dask_array_hist).

dask is imported inside the functions only (the ``dask`` extra).
"""

from __future__ import annotations

import numpy as np

_DIM_LETTERS = {"batch": "N", "sample": "N", "samples": "N", "n": "N",
                "channel": "C", "channels": "C", "c": "C", "feature": "C", "features": "C",
                "height": "H", "h": "H", "y": "H", "width": "W", "w": "W", "x": "W",
                "depth": "D", "d": "D", "z": "D", "time": "T", "t": "T", "length": "L",
                "l": "L", "seq": "L", "token": "L", "tokens": "L"}


def layout_from_dims(dims) -> str | None:
    """Layout letters from an xarray DataArray's dimension names, where they all fit."""
    letters = [_DIM_LETTERS.get(str(d).lower()) for d in dims]
    if None in letters or len(set(letters)) != len(letters) or letters.count("C") != 1:
        return None
    return "".join(letters)


def _block_moments(block, plan, higher: bool, engine: str):
    from bnstat.io import MemorySource
    from bnstat.stream import source_moments

    block = np.asarray(block)
    return source_moments(MemorySource(block, "block"), plan, chunk_size=max(1, block.nbytes),
                          higher=higher, threads=1, engine=engine)


def _concat(axis: int, *parts):
    from bnstat.stats import concatenate

    return concatenate(list(parts), axis=axis)


def _merge(a, b):
    return a.merge(b)


def _unwrap(x, layout, channel_axis, name):
    """(array, layout, name) of ``x``: an xarray DataArray's data, its dimension names as the
    layout (where they all fit and none was given) and its name; a dask array whose chunk
    sizes are unknown (after boolean indexing, or from a dataframe) gets them computed, on a
    copy (one more evaluation of its graph: the plan needs the shape)."""
    if hasattr(x, "dims") and hasattr(x, "data"):  # xarray.DataArray
        if layout is None and channel_axis is None:
            layout = layout_from_dims(x.dims)
        name = name or (str(x.name) if x.name is not None else None)
        x = x.data
    chunks = getattr(x, "chunks", None)
    if hasattr(x, "compute_chunk_sizes") and chunks is not None \
            and any(c != c for axis in chunks for c in axis):  # NaN: unknown
        x = x.copy()
        x.compute_chunk_sizes()
    return x, layout, name or "array"


def moments(x, *, layout=None, channel_axis=None, norm="batch", groups=None, reduce=None,
            ddof=0, higher=False, nan="omit", name=None):
    """Exact per-unit statistics of a dask array (or xarray DataArray): one ``Stats``.

    Options as for ``bnstat.moments``. An xarray DataArray's dimension names give
    the layout where they all fit (N/batch, C/channel, H/height, W/width, ...).
    A numpy-backed input is computed by ``bnstat.moments``. Raises BnstatError
    (UsageProblem when the layout does not fit).
    """
    from bnstat.dask import _require

    _require("dask")
    import dask
    import dask.array as da

    x, layout, name = _unwrap(x, layout, channel_axis, name)
    if not isinstance(x, da.Array):
        import bnstat

        stats = bnstat.moments(np.asarray(x), layout=layout, channel_axis=channel_axis, norm=norm,
                               groups=groups, reduce=reduce, ddof=ddof, higher=higher, nan=nan)
        stats = next(iter(stats.values()))
        stats.name = name
        return stats
    from bnstat.io.base import check_dtype, check_shape
    from bnstat.layout import make_plan

    check_dtype(np.dtype(x.dtype), name)
    check_shape(x.shape, name)
    plan = make_plan(tuple(x.shape), layout=layout, channel_axis=channel_axis, norm=norm,
                     groups=groups, reduce=reduce, name=name)
    if plan.groups is not None:  # a block must hold whole groups of channels
        x = x.rechunk({plan.channel_axis: -1})
    from bnstat.stream import pick_engine

    # the engine by the whole array's size: its blocks (often under 32 MiB each) are many
    merged = _graph(x, plan, higher, pick_engine(int(x.nbytes)))
    (moments_,) = dask.compute(merged)
    return stats_of(moments_, x, plan, name=name, ddof=ddof, nan=nan)


def hist(x, *, layout=None, channel_axis=None, norm="batch", groups=None, reduce=None, ddof=0,
         bins=2048, range="auto", quantiles=None, amax=None, per_tensor=False, num_bits=8,
         unsigned=False, nan="omit", name=None):
    """Exact per-unit histograms of a dask array (or xarray DataArray): one ``Histogram``.

    Options and results as for ``bnstat.hist`` (README "Histograms"), the layout and
    name as for ``moments``. Every pass is one dask graph of per-block tasks, merged
    exactly (bnstat.dask_array_hist): counts, edges, quantiles and amax are those of
    ``bnstat.hist`` on the same data in memory, for any chunking. A numpy-backed input
    is computed by ``bnstat.hist``. Raises BnstatError.
    """
    from bnstat.dask import _require

    _require("dask")
    import dask.array as da

    x, layout, name = _unwrap(x, layout, channel_axis, name)
    options = dict(layout=layout, channel_axis=channel_axis, norm=norm, groups=groups,
                   reduce=reduce, ddof=ddof, bins=bins, range=range, quantiles=quantiles,
                   amax=amax, per_tensor=per_tensor, num_bits=num_bits, unsigned=unsigned, nan=nan)
    if not isinstance(x, da.Array):
        import bnstat

        return next(iter(bnstat.hist(np.asarray(x), name=name, **options).values()))
    from bnstat.dask_array_hist import hist as _hist

    return _hist(x, name=name, **options)


def stats_of(moments_, x, plan, *, name: str, ddof: int, nan: str):
    """The Stats of the dask array ``x`` from its merged Moments, checked (--nan)."""
    from bnstat.stats import Stats
    from bnstat.stream import finish_group

    stats = Stats(name=name, moments=moments_, shape=tuple(x.shape), dtype=np.dtype(x.dtype).name,
                  layout=plan.letters, reduce=plan.reduce_letters, unit_axes=plan.unit_axes,
                  ddof=ddof, sources=[name], norm=plan.norm, groups=plan.groups,
                  assumed_layout=plan.assumed, nan_policy=nan)
    if plan.assumed:
        from bnstat.errors import warn

        warn(f"{name}: no layout given: assuming the PyTorch layout {plan.letters} (channel axis 1)")
    return finish_group(stats, nan)


def _graph(x, plan, higher: bool, engine: str):
    """The delayed Moments of ``x``: block partials, merged along reduced axes, joined along kept."""
    import dask

    blocks = x.to_delayed()
    part = dask.delayed(_block_moments, pure=True)
    return joined_moments(x, plan, lambda index: part(blocks[index], plan, higher, engine))


def joined_moments(x, plan, part):
    """The delayed Moments of ``x`` from ``part(block index)``, the delayed Moments of each
    block: merged in a fixed tree along the reduced axes, joined along the kept ones."""
    import itertools

    import dask

    from bnstat.dask import tree_merge

    merge = dask.delayed(_merge, pure=True)
    concat = dask.delayed(_concat, pure=True)
    keep = plan.keep
    red = plan.reduce
    grid = {}
    for kidx in itertools.product(*(range(x.numblocks[a]) for a in keep)):
        parts = []
        for ridx in itertools.product(*(range(x.numblocks[a]) for a in red)):
            index = [0] * x.ndim
            for a, i in zip(keep, kidx):
                index[a] = i
            for a, i in zip(red, ridx):
                index[a] = i
            parts.append(part(tuple(index)))
        grid[kidx] = tree_merge(parts, merge)
    # join along the kept axes, last first: unit axis k is the k-th kept axis
    for k in reversed(range(len(keep))):
        joined = {}
        for kidx in sorted(grid):
            joined.setdefault(kidx[:k], []).append(grid[kidx])
        grid = {key: (vals[0] if len(vals) == 1 else concat(k, *vals)) for key, vals in joined.items()}
    return grid[()]


def block_units(x, plan) -> dict:
    """Block index of ``x`` -> the flat units (of the whole array's unit shape) of the
    block's units, in C order: unit axis k is the k-th kept axis (the groups of group
    norm: the channel axis, whole in every block)."""
    import itertools

    whole = np.arange(int(np.prod(plan.unit_shape(tuple(x.shape))))).reshape(
        plan.unit_shape(tuple(x.shape)))
    starts = [np.concatenate([[0], np.cumsum(c)]) for c in x.chunks]
    out = {}
    for index in itertools.product(*(range(n) for n in x.numblocks)):
        sl = tuple(slice(None) if (plan.groups is not None and a == plan.channel_axis) else
                   slice(int(starts[a][index[a]]), int(starts[a][index[a] + 1])) for a in plan.keep)
        out[index] = whole[sl].ravel()
    return out
