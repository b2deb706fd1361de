"""Normalization of arrays as BatchNorm / LayerNorm / InstanceNorm / GroupNorm would.

y = (x - mean) / sqrt(var + eps) * gamma + beta per unit, with the biased
variance (README, `bnstat normalize`). The statistics come from

- the input itself: batch norm reads it twice (moments, then the writing
  pass); when the first axis is kept (layer, instance, group norm over N)
  each chunk holds whole units and is normalized in one pass;
- ``per_batch=B``: every run of B samples along N with its own statistics,
  as BatchNorm does in training;
- ``stats``: a stats file written by ``bnstat moments -o``;
- ``model`` and ``bn``: the running statistics and affine parameters of one
  BatchNorm layer of a model file (inference mode).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnstat.affine import WRITE_PIECE, UnitParams, apply_params, out_dtype, unit_range, write_pipeline
from bnstat.errors import DataError, UsageProblem, check_interrupt, warn
from bnstat.io import zlibx
from bnstat.io.base import ArraySource
from bnstat.layout import Plan, array_layout, make_plan
from bnstat.stats import Stats

DEFAULT_EPS = 1e-5


# ---- model files: BatchNorm parameters (the vocabulary is bnstat.folding.layers') ------------

def model_bn_params(arrays: dict[str, np.ndarray], name: str, where: str, eps: float | None):
    """(UnitParams of one channel axis, layer name, eps used) for the BN layer ``name``.

    Raises DataError when the name is unknown or ambiguous (listing the BN
    layers), or the running variance is negative or NaN.
    """
    from bnstat.folding.layers import bn_params

    p = bn_params(arrays, name, eps, where=where)
    _check_bn_shapes(where, p.layer, {k: np.asarray(v) for k, v in (
        ("mean", p.mean), ("variance", p.var), ("gamma", p.gamma), ("beta", p.beta)) if v is not None})
    return UnitParams.from_moments(p.mean, p.var, p.eps, p.gamma, p.beta), p.layer, p.eps


def _check_bn_shapes(where: str, layer: str, parts: dict[str, np.ndarray]) -> None:
    """Refuse BN parameters that are not 1-D arrays of one length (scalars, (C, 1)...)."""
    shapes = {key: v.shape for key, v in parts.items()}
    if any(len(sh) != 1 for sh in shapes.values()) or len(set(shapes.values())) != 1:
        listing = ", ".join(f"{k} {sh}" for k, sh in shapes.items())
        raise DataError(f"{where}: BatchNorm {layer}: its parameters must be 1-D arrays of one "
                        f"length (C); they are {listing}")


# ---- the normalization -----------------------------------------------------------------

def _container_kind(source: ArraySource) -> str:
    return {"npy": "npy", "stdin": "npy", "npz": "npz", "hdf5": "hdf5"}.get(source.kind, "npy")


def _ext_kind(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    return {".npy": "npy", ".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5"}.get(ext)


def _chunk_params(chunk, splan, run: Run, where: str, nans: list[int]) -> UnitParams:
    """Per-unit params, flat, from the chunk's own moments; ``nans`` collects NaN counts."""
    from bnstat.stream import chunk_moments

    m = chunk_moments(chunk, splan, threads=run.threads, engine=run.engine)
    if run.nan == "raise" and m.nan_count.any():
        raise DataError(f"{where}: NaN values in the data",
                        "Use --nan/nan= omit or propagate.")
    nans.append(int(m.nan_count.sum()))
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(m.count > 0, m.m2 / np.maximum(m.count, 1), np.nan)
    mean = np.where(m.count > 0, m.mean, np.nan)
    if run.nan == "propagate":
        mean = np.where(m.nan_count > 0, np.nan, mean)
    return UnitParams.from_moments(mean, var, run.eps).map(lambda a: np.ascontiguousarray(a).ravel())


# ---- resolving the statistics and planning the jobs -----------------------------------------

@dataclass
class Run:
    """The settings one call shares between its jobs."""

    eps: float
    nan: str
    chunk_size: int
    per_batch: int | None
    progress: Callable[[int], None] | None
    engine: str = "numpy"
    threads: int = 1


@dataclass
class Job:
    """One array to normalize and where its statistics come from (``strategy``):
    "own" (a first pass over it), "saved" (``stats``), "model" (``params`` of
    one BN layer), "per-batch" or "per-sample" (each chunk's own moments)."""

    src: ArraySource
    plan: Plan
    strategy: str
    stats: Stats | None = None
    params: UnitParams | None = None
    applied: object = None


def _check_arguments(stats, model, bn, per_batch) -> None:
    if stats is not None and model is not None:
        raise UsageProblem("give --stats/stats= or --model/model=, not both")
    if model is not None and not bn:
        raise UsageProblem("--model/model= needs --bn/bn= NAME, the BatchNorm layer to apply")
    if per_batch is not None and (stats is not None or model is not None):
        raise UsageProblem("--per-batch/per_batch= normalizes with each batch's own statistics; "
                           "drop --stats/stats= and --model/model=")


def _check_eps(eps) -> float:
    eps = DEFAULT_EPS if eps is None else float(eps)
    if eps < 0 or math.isnan(eps):
        raise UsageProblem(f"--eps/eps= {eps}: must be a non-negative number")
    return eps


def _output_kind(sources: list[ArraySource], output, in_memory: bool, force: bool,
                 paths: list[str]) -> str:
    """The container the output is written in (the input's); checks ``output``."""
    from bnstat.io.atomic import check_output

    if len({s.path for s in sources}) > 1:
        raise UsageProblem("normalize takes one input file")
    kind = _container_kind(sources[0])
    if output is None and not in_memory:
        raise UsageProblem("normalize needs -o OUTPUT (output=)")
    if output is not None:
        check_output(output, force=force, inputs=paths)
        want = _ext_kind(output)
        if want is not None and want != kind:
            raise UsageProblem(f"-o/output= {output}: the output is written in the input's format "
                               f"({kind}); give a .{'h5' if kind == 'hdf5' else kind} name")
        if output == "-" and len(sources) != 1:
            raise UsageProblem(f"standard output carries one array; {len(sources)} selected "
                               "(choose one with -d/dataset=)")
    return kind


def _saved_stats(stats) -> dict[str, Stats] | None:
    if stats is None:
        return None
    from bnstat.stats import load_stats

    return load_stats(os.fspath(stats)) if isinstance(stats, str | os.PathLike) else dict(stats)


def _model_params(model, bn: str, eps: float | None):
    """(UnitParams, layer name, eps) of the BN layer ``bn`` of the model file ``model``."""
    from bnstat.io.models import read_model

    path = os.fspath(model)
    return model_bn_params(read_model(path).arrays, bn, path, eps)


def _saved_for(src: ArraySource, saved: dict[str, Stats], n_sources: int) -> Stats:
    st = saved.get(src.name)
    if st is None and len(saved) == 1 and n_sources == 1:
        st = next(iter(saved.values()))
    if st is None:
        raise DataError(f"{src.where}: the stats file has no statistics for {src.name!r} "
                        f"(it has: {', '.join(saved)})",
                        "Select the arrays with -d/dataset=, give the array the saved name with "
                        "--name/name=, or save statistics of this array.")
    return st


def _saved_plan(src: ArraySource, st: Stats) -> Plan:
    """The plan the saved statistics were computed with (no layout or norm given)."""
    if len(st.layout) != len(src.shape):  # the file's fault, not an option's
        raise DataError(
            f"{src.where}: the saved statistics are for {len(st.layout)}-D arrays (layout "
            f"{st.layout}), this array has shape {tuple(src.shape)}",
            "Normalize with statistics saved for arrays of the same layout.")
    if st.norm == "custom":
        return make_plan(src.shape, layout=st.layout, reduce=st.reduce, name=src.where)
    return make_plan(src.shape, layout=st.layout, norm=st.norm, groups=st.groups, name=src.where)


def _check_saved_fit(src: ArraySource, plan: Plan, st: Stats) -> None:
    unit_shape = plan.unit_shape(src.shape)
    if (st.layout, st.reduce) != (plan.letters, plan.reduce_letters) or tuple(st.unit_shape) != unit_shape:
        raise DataError(
            f"{src.where}: the saved statistics (layout {st.layout}, reduce {st.reduce}, "
            f"unit shape {tuple(st.unit_shape)}) do not fit this array (layout {plan.letters}, "
            f"reduce {plan.reduce_letters}, unit shape {unit_shape})",
            "Normalize with statistics saved for the same layout and norm kind.")


def _check_model_fit(src: ArraySource, plan: Plan, params: UnitParams, layer: str) -> None:
    if plan.norm != "batch":
        raise UsageProblem("--model/model= applies a BatchNorm layer: use --norm/norm= batch")
    c = src.shape[plan.channel_axis]
    if params.mean.shape != (c,):
        raise DataError(f"{src.where}: BatchNorm {layer} has {params.mean.size} "
                        f"channels, the array has {c} (layout {plan.letters})")


def _plan_job(src: ArraySource, spec: dict, saved, model, per_batch, n_sources: int) -> Job:
    """The plan and the statistics strategy of one array. Raises DataError, UsageProblem."""
    st = _saved_for(src, saved, n_sources) if saved is not None else None
    explicit = array_layout(src, spec["layout"], spec["channel_axis"], stored=False)
    given = explicit is not None or any(spec[k] is not None for k in ("channel_axis", "reduce", "norm"))
    if st is not None and not given:
        plan = _saved_plan(src, st)  # the saved statistics' layout wins over a stored attribute
    else:
        letters = array_layout(src, spec["layout"], spec["channel_axis"])
        plan = make_plan(src.shape, **{**spec, "layout": letters, "norm": spec["norm"] or "batch"},
                         name=src.where)
    if st is not None:
        _check_saved_fit(src, plan, st)
        return Job(src, plan, "saved", stats=st, applied=st)
    if model is not None:
        params, layer, _eps = model
        _check_model_fit(src, plan, params, layer)
        return Job(src, plan, "model", params=params, applied=f"BatchNorm {layer}")
    if per_batch is not None:
        if plan.n_axis != 0 or src.fortran:
            raise UsageProblem(f"{src.where}: --per-batch/per_batch= needs N as the first axis of a "
                               "C-ordered array")
        return Job(src, plan, "per-batch", applied="per-batch")
    if 0 in (plan.transposed() if src.fortran else plan).reduce:
        if not src.repeatable:
            raise UsageProblem(
                f"{src.where}: batch statistics of standard input need two passes over the data",
                "Save the stream to a file, or give --stats, --per-batch or --model "
                "(stats=, per_batch=, model=).")
        return Job(src, plan, "own")
    return Job(src, plan, "per-sample", applied="per-sample")


# ---- one small function per strategy --------------------------------------------------------

def _own_params(job: Job, run: Run) -> UnitParams:
    """A first pass over the array: its batch statistics."""
    from bnstat.stream import compute_stats

    plan = job.plan
    reduce = None if plan.norm != "custom" else "".join(plan.letters[a] for a in plan.reduce)
    s = compute_stats([job.src], layout=plan.letters, norm=plan.norm, groups=plan.groups,
                      reduce=reduce, nan_policy=run.nan, chunk_size=run.chunk_size,
                      threads=run.threads, progress=run.progress, engine=run.engine)[job.src.name]
    job.applied = s
    return UnitParams.from_moments(s.mean, s.var_with(0), run.eps)


def _fixed_params(job: Job, run: Run) -> UnitParams | None:
    """The params of the whole array (own, saved, model), flat over its read units; None
    for the strategies that compute them per chunk."""
    if job.strategy == "own":
        params = _own_params(job, run)
    elif job.strategy == "saved":
        params = UnitParams.from_moments(job.stats.mean, job.stats.var_with(0), run.eps)
    elif job.strategy == "model":
        params = job.params
    else:
        return None
    # per-channel vectors of a model: broadcast over the kept axes (only C for BN)
    unit_shape = job.plan.unit_shape(job.src.shape)
    p = params.map(lambda a: np.broadcast_to(a, unit_shape))
    if job.src.fortran:
        p = p.map(lambda a: a.transpose())
    return p.map(lambda a: np.ascontiguousarray(a, np.float64).ravel())


@dataclass
class _Array:
    """One job as it is written: its read plan, rows and buffers."""

    job: Job
    run: Run
    splan: Plan
    dtype: np.dtype
    flat: UnitParams | None
    rows: int
    piece_rows: int
    buf: np.ndarray | None = None

    @property
    def read_shape(self):
        return self.job.src.read_shape

    def params_for(self, r0: int, nrows: int) -> UnitParams:
        """The flat params of the units rows [r0, r0+nrows) cover."""
        n_units = math.prod(self.splan.unit_shape(self.read_shape))
        rng = unit_range(self.splan, self.read_shape, r0, nrows, n_units)
        return self.flat if rng is None else self.flat.map(lambda a: a[rng[0]:rng[1]])


def _prepare(job: Job, run: Run, flat: UnitParams | None, pipelined: bool) -> _Array:
    from bnstat.stream import slab_rows, source_rows

    src = job.src
    splan = job.plan.transposed() if src.fortran else job.plan
    dtype = out_dtype(src.dtype)
    read_shape = src.read_shape
    whole_groups = splan.groups is not None and splan.channel_axis == 0
    need = read_shape[0] // splan.groups if whole_groups else (run.per_batch or 1)
    rows = source_rows(src, run.chunk_size, multiple_of=need)
    row_out = math.prod(read_shape[1:]) * dtype.itemsize  # bytes of output per row
    # a piece must hold whole groups (keep the chunk), else whole HDF5 chunks: no partial writes
    piece_rows = rows if whole_groups else slab_rows(rows, row_out, WRITE_PIECE,
                                                     multiple_of=src.row_align)
    arr = _Array(job, run, splan, dtype, flat, rows, piece_rows)
    if not pipelined:
        arr.buf = np.empty(rows * math.prod(read_shape[1:]), dtype)
    return arr


def _fixed_chunk(arr: _Array, r0: int, chunk: np.ndarray, pipe) -> np.ndarray | None:
    """Saved, own or model params; with a pipe, in pieces, each written by the writer thread
    while the next is computed (returns None)."""
    from bnstat.stream import chunk_plan, slabs

    engine = arr.run.engine
    if pipe is None:
        cplan = chunk_plan(arr.splan, arr.read_shape, chunk.shape[0])
        return apply_params(chunk, cplan, arr.params_for(r0, chunk.shape[0]), arr.buf, engine)
    for sl in slabs(chunk.shape[0], arr.piece_rows):
        sub = chunk[sl]
        ring = pipe.buffer()
        pipe.submit(apply_params(sub, chunk_plan(arr.splan, arr.read_shape, sub.shape[0]),
                           arr.params_for(r0 + sl.start, sub.shape[0]), ring.view(arr.dtype),
                           engine), ring)
    return None


def _per_batch_chunk(arr: _Array, chunk: np.ndarray, nans: list[int]) -> np.ndarray:
    """Every run of ``per_batch`` samples with its own statistics."""
    from bnstat.stream import slabs

    y = arr.buf[:chunk.size].reshape(chunk.shape)
    for sl in slabs(chunk.shape[0], arr.run.per_batch):
        sub = chunk[sl]
        cp = _chunk_params(sub, arr.splan, arr.run, arr.job.src.where, nans)
        y[sl] = apply_params(sub, arr.splan, cp, np.empty(sub.size, arr.dtype), arr.run.engine)
    return y


def _per_sample_chunk(arr: _Array, chunk: np.ndarray, nans: list[int]) -> np.ndarray:
    """A kept first axis: the chunk holds whole units, normalized with their own moments."""
    from bnstat.stream import chunk_plan

    cplan = chunk_plan(arr.splan, arr.read_shape, chunk.shape[0])
    cp = _chunk_params(chunk, cplan, arr.run, arr.job.src.where, nans)
    return apply_params(chunk, cplan, cp, arr.buf, arr.run.engine)


def _write_job(job: Job, run: Run, box) -> np.ndarray | None:
    """Normalize one array into ``box`` (a container) or, without one, into a new array."""
    src = job.src
    flat = _fixed_params(job, run)
    pipelined = flat is not None and box is not None
    arr = _prepare(job, run, flat, pipelined)
    result = np.empty(arr.read_shape, arr.dtype) if box is None else None
    writer_cm = box.array(src.key, src.shape, arr.dtype, src.fortran, like=src) if box is not None \
        else contextlib.nullcontext(None)
    nans: list[int] = []
    row_out = math.prod(arr.read_shape[1:]) * arr.dtype.itemsize
    with writer_cm as write, write_pipeline(write if pipelined else None, arr.piece_rows * row_out,
                                       run.threads) as pipe:
        for r0, chunk in src.iter_chunks(arr.rows):
            check_interrupt()
            if flat is not None:
                if run.nan == "raise" and chunk.dtype.kind == "f" and np.isnan(chunk).any():
                    raise DataError(f"{src.where}: NaN values in the data (rows {r0}.."
                                    f"{r0 + chunk.shape[0]})", "Use --nan/nan= omit or propagate.")
                y = _fixed_chunk(arr, r0, chunk, pipe)
            elif job.strategy == "per-batch":
                y = _per_batch_chunk(arr, chunk, nans)
            else:
                y = _per_sample_chunk(arr, chunk, nans)
            if y is not None and write is not None:
                write(y)
            elif y is not None:
                result[r0:r0 + chunk.shape[0]] = y
            if run.progress is not None:
                run.progress(chunk.nbytes)
    if sum(nans):  # the per-sample / per-batch statistics, as check_nans says of moments
        what = ("counted and left out of the statistics" if run.nan == "omit" else
                "their units' statistics, and so their outputs, are NaN")
        warn(f"{src.where}: {sum(nans)} NaN value(s) {what}")
    if result is None:
        return None
    return result.transpose() if src.fortran else result


def _start(jobs: list[Job], run: Run, threads: int | None, engine: str | None) -> None:
    """The engine and the thread counts of the kernels and of the readers' helpers."""
    from bnstat.stream import pick_engine, start_threads

    run.engine = pick_engine(sum(job.src.nbytes for job in jobs), engine, switch=True)
    zlibx.set_threads(threads)  # the readers' helper threads (CRC-32, gzip inflate)
    run.threads = start_threads(threads, run.engine)


def normalize(source, output=None, *, stats=None, model=None, bn=None, eps=None, per_batch=None,
              layout=None, channel_axis=None, norm=None, groups=None, reduce=None, dataset=None,
              chunk_size=None, threads=None, nan="omit", force=False, progress=None, engine=None,
              check_crc=True, name=None):
    """Normalize the selected arrays of ``source`` into ``output`` (same format).

    The parameters and what it raises: :func:`bnstat.normalize`. Returns
    ``{name: what was applied}``, or without ``output`` the normalized
    in-memory input (an array; a dict for a dict).
    """
    from bnstat.io import open_any
    from bnstat.io.writers import open_container
    from bnstat.sizes import size_bytes
    from bnstat.stream import DEFAULT_CHUNK_SIZE

    _check_arguments(stats, model, bn, per_batch)
    chunk = size_bytes(chunk_size, DEFAULT_CHUNK_SIZE)
    sources = open_any(source, dataset, check_crc=check_crc, name=name)
    in_memory = all(s.kind == "memory" for s in sources)
    paths = [] if in_memory else sorted({s.path for s in sources})
    # the secondary inputs are never written over either (README "Nothing lost")
    paths += [os.fspath(p) for p in (stats, model) if isinstance(p, str | os.PathLike)]
    kind = _output_kind(sources, output, in_memory, force, paths)
    saved = _saved_stats(stats)
    model_bn = _model_params(model, bn, eps) if model is not None else None
    run = Run(_check_eps(model_bn[2] if model_bn else eps), nan, chunk, per_batch, progress)
    spec = dict(layout=layout, channel_axis=channel_axis, norm=norm, groups=groups, reduce=reduce)
    jobs = [_plan_job(src, spec, saved, model_bn, per_batch, len(sources)) for src in sources]
    _start(jobs, run, threads, engine)
    if output is None:
        results = {job.src.name: _write_job(job, run, None) for job in jobs}
        return results if isinstance(source, dict) else next(iter(results.values()))
    with open_container(output, kind, force=force, inputs=paths) as box:
        for job in jobs:
            _write_job(job, run, box)
    return {job.src.name: job.applied for job in jobs}
