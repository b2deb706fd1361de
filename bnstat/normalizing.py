"""Normalization of arrays as BatchNorm / LayerNorm / InstanceNorm / GroupNorm would.

y = (x - mean) / sqrt(var + eps) * gamma + beta per unit, with the biased
variance (SPEC 1). The statistics come from

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
import re
from dataclasses import dataclass

import numpy as np

from bnstat.errors import DataError, InputError, UsageProblem, check_interrupt, warn
from bnstat.io import zlibx
from bnstat.io.base import ArraySource
from bnstat.layout import Plan, make_plan
from bnstat.stats import Stats

DEFAULT_EPS = 1e-5
# Bytes of output normalized and written at a time: a piece this size is still in
# the CPU's cache (L3: 32-48 MiB on these machines) when write() copies it into the page cache.
# Whole 64 MiB chunks wrote at about half the speed (bench/README.md).
WRITE_PIECE = 4 << 20


@dataclass
class UnitParams:
    """Per-unit mean, scale = gamma/sqrt(var+eps) and shift = beta, float64, of unit_shape."""

    mean: np.ndarray
    scale: np.ndarray
    shift: np.ndarray

    @classmethod
    def from_moments(cls, mean, var, eps, gamma=None, beta=None) -> UnitParams:
        mean = np.asarray(mean, np.float64)
        var = np.asarray(var, np.float64)
        gamma = np.ones_like(var) if gamma is None else np.broadcast_to(np.asarray(gamma, np.float64), var.shape)
        beta = np.zeros_like(var) if beta is None else np.broadcast_to(np.asarray(beta, np.float64), var.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = gamma / np.sqrt(var + eps)
        return cls(mean, scale, np.array(beta, np.float64))

    def map(self, fn) -> UnitParams:
        return UnitParams(fn(self.mean), fn(self.scale), fn(self.shift))


def out_dtype(dtype: np.dtype) -> np.dtype:
    """float16/32/64 keep their dtype; integers become float32 (SPEC 3)."""
    dtype = np.dtype(dtype).newbyteorder("=")
    if dtype.kind == "f" and dtype.itemsize <= 8:
        return dtype
    if dtype.kind == "f":
        return np.dtype(np.float64)
    return np.dtype(np.float32)


# ---- model files: BatchNorm parameters ---------------------------------------------

_PT_KEYS = ("running_mean", "running_var", "weight", "bias")
_KERAS_KEYS = ("moving_mean", "moving_variance", "gamma", "beta")


def _strip(key: str) -> str:
    return key[:-2] if key.endswith(":0") else key


def bn_layers(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, str]]:
    """The BatchNorm layers of a model's named arrays: {layer: {role: key}}.

    PyTorch naming: NAME.running_mean, .running_var, .weight, .bias. Keras
    naming: .../NAME/moving_mean(:0), moving_variance, gamma, beta.
    """
    layers: dict[str, dict[str, str]] = {}
    for key in arrays:
        k = _strip(key)
        for sep in (".", "/"):
            prefix, _, leaf = k.rpartition(sep)
            if not prefix:
                continue
            if sep == "." and leaf in ("running_mean", "running_var"):
                layers.setdefault(prefix, {})[leaf] = key
            if sep == "/" and leaf in ("moving_mean", "moving_variance"):
                layers.setdefault(prefix, {})[leaf] = key
    out = {}
    for layer, roles in layers.items():
        keras = "moving_mean" in roles or "moving_variance" in roles
        names = _KERAS_KEYS if keras else _PT_KEYS
        sep = "/" if keras else "."
        found = {}
        for role in names:
            for key in (f"{layer}{sep}{role}", f"{layer}{sep}{role}:0"):
                if key in arrays:
                    found[role] = key
        if names[0] in found and names[1] in found:
            out[layer] = found
    return out


def _short_names(layer: str) -> set[str]:
    """Names a user may give for a layer: the full path and its trailing parts."""
    parts = re.split(r"[/]", layer)
    names = {layer}
    for i in range(len(parts)):
        names.add("/".join(parts[i:]))
    return names


def model_bn_params(arrays: dict[str, np.ndarray], name: str, where: str, eps: float | None):
    """(UnitParams of one channel axis, eps used) for the BN layer ``name``.

    Raises DataError when the name is unknown or ambiguous (listing the BN
    layers), or the running variance is negative or NaN.
    """
    layers = bn_layers(arrays)
    if not layers:
        raise DataError(f"{where}: no BatchNorm layer found (no running_mean/running_var or "
                        "moving_mean/moving_variance arrays)")
    matches = [layer for layer in layers if name in _short_names(layer)]
    if len(matches) != 1:
        listing = ", ".join(layers)
        what = "ambiguous" if matches else "unknown"
        raise DataError(f"{where}: {what} BatchNorm layer {name!r}; the file has: {listing}",
                        "Give one of those names with --bn.")
    layer = matches[0]
    roles = layers[layer]
    keras = "moving_mean" in roles
    get = lambda role: (np.asarray(arrays[roles[role]], np.float64) if role in roles else None)  # noqa: E731
    mean = get("moving_mean" if keras else "running_mean")
    var = get("moving_variance" if keras else "running_var")
    gamma = get("gamma" if keras else "weight")
    beta = get("beta" if keras else "bias")
    parts = {roles[r]: v for r, v in zip(("moving_mean" if keras else "running_mean",
                                          "moving_variance" if keras else "running_var",
                                          "gamma" if keras else "weight", "beta" if keras else "bias"),
                                         (mean, var, gamma, beta), strict=True) if v is not None}
    shapes = {key: v.shape for key, v in parts.items()}
    if any(len(sh) != 1 for sh in shapes.values()) or len(set(shapes.values())) != 1:
        listing = ", ".join(f"{k} {sh}" for k, sh in shapes.items())
        raise DataError(f"{where}: BatchNorm {layer}: its parameters must be 1-D arrays of one "
                        f"length (C); they are {listing}")
    if np.any(np.isnan(var)) or np.any(var < 0):
        raise DataError(f"{where}: BatchNorm {layer}: running variance is negative or NaN")
    for label, value in (("running mean", mean), ("weight", gamma), ("bias", beta)):
        if value is not None and np.any(np.isnan(value)):
            raise DataError(f"{where}: BatchNorm {layer}: {label} has NaN values")
    if eps is None:
        eps = 1e-3 if keras else DEFAULT_EPS
    return UnitParams.from_moments(mean, var, eps, gamma, beta), layer, eps


def load_model_arrays(path: str) -> dict[str, np.ndarray]:
    """Named arrays of a model file (.npz or HDF5). Raises InputError."""
    from bnstat.io import sniff

    kind = sniff(path)
    if kind == "npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: np.asarray(z[k]) for k in z.files}
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: cannot read the model ({exc})") from exc
    if kind == "hdf5":
        import h5py

        from bnstat.io.hdf5 import walk

        with h5py.File(path, "r") as f:
            return {name: ds[()] for name, ds, problem in walk(path, f) if ds is not None}
    raise InputError(f"{path}: a model file is a .npz or HDF5 file of named arrays")


# ---- the normalization -----------------------------------------------------------------

def _container_kind(source: ArraySource) -> str:
    return {"npy": "npy", "stdin": "npy", "npz": "npz", "hdf5": "hdf5"}.get(source.kind, "npy")


def _ext_kind(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower()
    return {".npy": "npy", ".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5"}.get(ext)


@contextlib.contextmanager
def _pipeline(write, nbytes: int, n_threads: int):
    """A BackgroundWriter for ``write`` (None: no pipeline, yields None).

    While it runs, the kernels use one thread fewer: the writer thread has a
    core of its own (on 2 cores: one computes, one writes).
    """
    if write is None:
        yield None
        return
    from bnstat.io.writers import BackgroundWriter
    from bnstat.stream import set_threads

    if n_threads > 1:
        set_threads(n_threads - 1)
    try:
        with BackgroundWriter(write, nbytes) as pipe:
            yield pipe
    finally:
        if n_threads > 1:
            set_threads(n_threads)


def _unit_range(splan: Plan, read_shape, r0: int, rows: int, n_units: int):
    """The flat units a chunk of rows [r0, r0+rows) covers (None: all units)."""
    if 0 in splan.reduce and not (splan.groups is not None and splan.channel_axis == 0):
        return None
    if splan.groups is not None and splan.channel_axis == 0:
        per = read_shape[0] // splan.groups
        per_group = n_units // splan.groups
        return (r0 // per) * per_group, ((r0 + rows) // per) * per_group
    per_row = n_units // read_shape[0]
    return r0 * per_row, (r0 + rows) * per_row


def _apply(chunk: np.ndarray, splan: Plan, params: UnitParams, out: np.ndarray,
           engine: str = "numba") -> np.ndarray:
    """Normalize one chunk with flat per-unit params of its units into ``out`` (a buffer)."""
    from bnstat.stream import blocks, kernel_input

    shape4, perm = splan.kernel_view(chunk.shape)
    x4 = kernel_input(chunk, splan)
    P, _, U, _ = x4.shape
    kdtype = np.float32 if out.dtype == np.float16 else out.dtype
    result = out[:chunk.size].reshape(chunk.shape)
    target = result if (perm is None and kdtype == out.dtype) else np.empty(shape4, kdtype)
    mean, scale, shift = (a.reshape(P, 1, U, 1) for a in (params.mean, params.scale, params.shift))
    if engine == "numpy":  # the kernel's arithmetic, in float64, a block at a time
        t4 = target.reshape(shape4)
        for ps, as_ in blocks(shape4):
            t4[ps, as_] = (x4[ps, as_] - mean[ps]) * scale[ps] + shift[ps]
    else:
        from bnstat import kernels

        kernels.normalize4(x4, params.mean.reshape(P, U), params.scale.reshape(P, U),
                           params.shift.reshape(P, U), target.reshape(shape4))
    if perm is None and target is result:
        return result
    if perm is not None:
        exp, _ = splan.expanded(chunk.shape)
        inv = np.argsort(perm)
        target = target.reshape(tuple(exp[i] for i in perm)).transpose(inv).reshape(chunk.shape)
    result[...] = target.reshape(chunk.shape)
    return result


def _chunk_params(chunk, splan, eps, nan_policy, where, engine="numba",
                  nans: list[int] | None = None) -> UnitParams:
    """Per-unit params from the chunk's own moments; ``nans`` collects NaN counts."""
    from bnstat.stream import chunk_moments

    m = chunk_moments(chunk, splan, threads=_threads(), engine=engine)
    if nan_policy == "raise" and m.nan_count.any():
        raise DataError(f"{where}: NaN values in the data", "Use --nan omit or --nan propagate.")
    if nans is not None:
        nans.append(int(m.nan_count.sum()))
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(m.count > 0, m.m2 / np.maximum(m.count, 1), np.nan)
    mean = np.where(m.count > 0, m.mean, np.nan)
    if nan_policy == "propagate":
        mean = np.where(m.nan_count > 0, np.nan, mean)
    return UnitParams.from_moments(mean, var, eps)


_THREADS = [1]


def _threads() -> int:
    return _THREADS[0]


def normalize(source, output=None, *, stats=None, model=None, bn=None, eps=None, per_batch=None,
              layout=None, channel_axis=None, norm=None, groups=None, reduce=None, dataset=None,
              chunk_size=None, threads=None, nan="omit", force=False, progress=None, engine=None,
              check_crc=True):
    """Normalize the selected arrays of ``source`` into ``output`` (same format).

    ``source``: a path ('-' for a .npy stream on stdin) or a numpy array; with
    an array and no ``output`` the normalized array is returned. ``stats``: a
    stats file path or ``{name: Stats}``; ``model`` + ``bn``: a model file and
    the name of a BatchNorm layer. Returns ``{name: description}`` of what
    was applied (or the array). Raises BnstatError subclasses.
    """
    from bnstat import _sources
    from bnstat.io.atomic import check_output
    from bnstat.io.writers import open_container
    from bnstat.stream import (
        DEFAULT_CHUNK_SIZE,
        chunk_plan,
        compute_stats,
        pick_engine,
        set_threads,
    )

    if stats is not None and model is not None:
        raise UsageProblem("give --stats or --model, not both")
    if model is not None and not bn:
        raise UsageProblem("--model needs --bn NAME, the BatchNorm layer to apply")
    if per_batch is not None and (stats is not None or model is not None):
        raise UsageProblem("--per-batch normalizes with each batch's own statistics; drop --stats/--model")
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    in_memory = isinstance(source, np.ndarray)
    sources = _sources(source, dataset, check_crc)
    paths = [] if in_memory else ([source] if isinstance(source, str) else list(source))
    # the secondary inputs are never written over either (README "Nothing lost")
    paths += [os.fspath(p) for p in (stats, model) if isinstance(p, str | os.PathLike)]
    if len(set(s.path for s in sources)) > 1:
        raise UsageProblem("normalize takes one input file")
    kind = _container_kind(sources[0])
    if output is None and not in_memory:
        raise UsageProblem("normalize needs -o OUTPUT")
    if output is not None:
        check_output(output, force=force, inputs=paths)
        want = _ext_kind(output)
        if want is not None and want != kind:
            raise UsageProblem(f"-o {output}: the output is written in the input's format ({kind}); "
                               f"give a .{'h5' if kind == 'hdf5' else kind} name")
        if output == "-" and len(sources) != 1:
            raise UsageProblem(f"standard output carries one array; {len(sources)} selected "
                               "(choose one with -d)")

    layout_given = layout is not None or channel_axis is not None or reduce is not None
    norm_given = norm is not None
    norm = norm or "batch"

    # where the statistics come from, per array
    saved: dict[str, Stats] | None = None
    if stats is not None:
        from bnstat.stats import load_stats

        saved = load_stats(stats) if isinstance(stats, str | os.PathLike) else dict(stats)
    model_params = None
    if model is not None:
        arrays = load_model_arrays(os.fspath(model))
        model_params, bn_layer, eps = model_bn_params(arrays, bn, os.fspath(model), eps)
    eps = DEFAULT_EPS if eps is None else float(eps)
    if eps < 0 or math.isnan(eps):
        raise UsageProblem(f"--eps {eps}: must be a non-negative number")

    jobs = []
    for src in sources:
        st = None
        if saved is not None:
            st = saved.get(src.name)
            if st is None and len(saved) == 1 and len(sources) == 1:
                st = next(iter(saved.values()))
            if st is None:
                raise DataError(f"{src.where}: the stats file has no statistics for {src.name!r} "
                                f"(it has: {', '.join(saved)})",
                                "Select the arrays with -d, or save statistics of this array.")
        if st is not None and not layout_given and not norm_given:
            if len(st.layout) != len(src.shape):  # the file's fault, not an option's
                raise DataError(
                    f"{src.where}: the saved statistics are for {len(st.layout)}-D arrays (layout "
                    f"{st.layout}), this array has shape {tuple(src.shape)}",
                    "Normalize with statistics saved for arrays of the same layout.")
            if st.norm == "custom":
                plan = make_plan(src.shape, layout=st.layout, reduce=st.reduce, name=src.where)
            else:
                plan = make_plan(src.shape, layout=st.layout, norm=st.norm, groups=st.groups,
                                 name=src.where)
        else:
            plan = make_plan(src.shape, layout=layout, channel_axis=channel_axis, norm=norm,
                             groups=groups, reduce=reduce, name=src.where)
        if st is not None:
            unit_shape = plan.unit_shape(src.shape)
            if (st.layout, st.reduce) != (plan.letters, plan.reduce_letters) or tuple(st.unit_shape) != unit_shape:
                raise DataError(
                    f"{src.where}: the saved statistics (layout {st.layout}, reduce {st.reduce}, "
                    f"unit shape {tuple(st.unit_shape)}) do not fit this array (layout {plan.letters}, "
                    f"reduce {plan.reduce_letters}, unit shape {unit_shape})",
                    "Normalize with statistics saved for the same layout and norm kind.")
        if model_params is not None:
            if plan.norm != "batch":
                raise UsageProblem("--model applies a BatchNorm layer: use --norm batch")
            c = src.shape[plan.channel_axis]
            if model_params.mean.shape != (c,):
                raise DataError(f"{src.where}: BatchNorm {bn_layer} has {model_params.mean.size} "
                                f"channels, the array has {c} (layout {plan.letters})")
        if per_batch is not None:
            if plan.n_axis != 0 or src.fortran:
                raise UsageProblem(f"{src.where}: --per-batch needs N as the first axis of a "
                                   "C-ordered array")
        jobs.append((src, plan, st))

    engine = pick_engine(sum(src.nbytes for src, _, _ in jobs), engine)
    zlibx.set_threads(threads)  # the readers' helper threads (CRC-32, gzip inflate)
    n_threads = set_threads(threads) if engine == "numba" else 1
    _THREADS[0] = n_threads

    # the statistics that need a first pass over the data
    own = {}
    two_pass = [(src, plan) for src, plan, st in jobs if st is None and model_params is None
                and per_batch is None and 0 in (plan.transposed() if src.fortran else plan).reduce]
    for src, _ in two_pass:
        if not src.repeatable:
            raise UsageProblem(
                f"{src.where}: batch statistics of standard input need two passes over the data",
                "Save the stream to a file, or give --stats, --per-batch or --model.")
    applied: dict[str, object] = {}
    containers = open_container(output, kind, force=force, inputs=paths) if output is not None else None
    results = {}

    with (containers if containers is not None else contextlib.nullcontext()) as box:
        for src, plan, st in jobs:
            if (src, plan) in two_pass:
                s = compute_stats([src], layout=plan.letters, norm=plan.norm, groups=plan.groups,
                                  reduce=None if plan.norm != "custom" else
                                  "".join(plan.letters[a] for a in plan.reduce),
                                  nan_policy=nan, chunk_size=chunk_size, threads=n_threads,
                                  progress=progress, engine=engine)[src.name]
                own[src.name] = s
                params = UnitParams.from_moments(s.mean, s.var_with(0), eps)
                applied[src.name] = s
            elif st is not None:
                params = UnitParams.from_moments(st.mean, st.var_with(0), eps)
                applied[src.name] = st
            elif model_params is not None:
                params = model_params
                applied[src.name] = f"BatchNorm {bn_layer}"
            else:
                params = None  # per chunk (kept first axis) or per batch
                applied[src.name] = "per-batch" if per_batch else "per-sample"
            dtype = out_dtype(src.dtype)
            splan = plan.transposed() if src.fortran else plan
            read_shape = src.read_shape
            flat = None
            if params is not None:
                # per-channel vectors of a model: broadcast over the kept axes (only C for BN)
                unit_shape = plan.unit_shape(src.shape)
                p = params.map(lambda a, shape=unit_shape: np.broadcast_to(a, shape))
                if src.fortran:
                    p = p.map(lambda a: a.transpose())
                flat = p.map(lambda a: np.ascontiguousarray(a, np.float64).ravel())
            n_units = math.prod(splan.unit_shape(read_shape))
            rows = src.rows_for(chunk_size)
            if per_batch is not None:
                rows = max(per_batch, rows - rows % per_batch)
            if splan.groups is not None and splan.channel_axis == 0:
                g = read_shape[0] // splan.groups
                rows = max(g, rows - rows % g)
            rows = min(rows, read_shape[0])
            row_out = math.prod(read_shape[1:]) * dtype.itemsize  # bytes of output per row
            piece_rows = max(1, min(rows, WRITE_PIECE // max(1, row_out)))
            if src.row_align > 1:  # whole HDF5 chunks (the output has the input's): no partial writes
                piece_rows = min(rows, max(src.row_align, piece_rows - piece_rows % src.row_align))
            if splan.groups is not None and splan.channel_axis == 0:
                piece_rows = rows  # a piece must hold whole groups: keep the chunk
            pipelined = flat is not None and box is not None  # written in pieces by a thread
            buf = None if pipelined else np.empty(rows * math.prod(read_shape[1:]), dtype)
            if box is None:
                result = np.empty(read_shape, dtype)
            writer_cm = box.array(src.name, src.shape, dtype, src.fortran, like=src) if box is not None \
                else contextlib.nullcontext(None)
            nans: list[int] = []
            with writer_cm as write, _pipeline(write if pipelined else None, piece_rows * row_out,
                                               n_threads) as pipe:
                for r0, chunk in src.iter_chunks(rows):
                    check_interrupt()
                    if nan == "raise" and chunk.dtype.kind == "f" and (flat is not None) and np.isnan(chunk).any():
                        raise DataError(f"{src.where}: NaN values in the data (rows {r0}..{r0 + chunk.shape[0]})",
                                        "Use --nan omit or --nan propagate.")
                    cplan = chunk_plan(splan, read_shape, chunk.shape[0])
                    if flat is not None and write is not None:
                        # in pieces, each written by the writer thread while the next is computed
                        for s0 in range(0, chunk.shape[0], piece_rows):
                            sub = chunk[s0:s0 + piece_rows]
                            rng = _unit_range(splan, read_shape, r0 + s0, sub.shape[0], n_units)
                            cp = flat if rng is None else flat.map(lambda a, r=rng: a[r[0]:r[1]])
                            ring = pipe.buffer()
                            pipe.submit(_apply(sub, chunk_plan(splan, read_shape, sub.shape[0]), cp,
                                               ring.view(dtype), engine), ring)
                        y = None
                    elif flat is not None:
                        rng = _unit_range(splan, read_shape, r0, chunk.shape[0], n_units)
                        cp = flat if rng is None else flat.map(lambda a, r=rng: a[r[0]:r[1]])
                        y = _apply(chunk, cplan, cp, buf, engine)
                    elif per_batch is not None:
                        y = buf[:chunk.size].reshape(chunk.shape)
                        for b0 in range(0, chunk.shape[0], per_batch):
                            sub = chunk[b0:b0 + per_batch]
                            cp = _chunk_params(sub, splan, eps, nan, src.where, engine, nans)
                            cp = cp.map(lambda a: np.ascontiguousarray(a).ravel())
                            part = np.empty(sub.size, dtype)
                            y[b0:b0 + sub.shape[0]] = _apply(sub, splan, cp, part, engine)
                    else:
                        cp = _chunk_params(chunk, cplan, eps, nan, src.where, engine, nans)
                        y = _apply(chunk, cplan, cp.map(lambda a: np.ascontiguousarray(a).ravel()), buf,
                                   engine)
                    if y is None:
                        pass  # written in pieces above
                    elif write is not None:
                        write(y)
                    else:
                        result[r0:r0 + chunk.shape[0]] = y
                    if progress is not None:
                        progress(chunk.nbytes)
            if sum(nans):  # the per-sample / per-batch statistics, as check_nans says of moments
                what = ("counted and left out of the statistics" if nan == "omit" else
                        "their units' statistics, and so their outputs, are NaN")
                warn(f"{src.where}: {sum(nans)} NaN value(s) {what}")
            if box is None:
                results[src.name] = result.transpose() if src.fortran else result
    if box is None and in_memory:
        return next(iter(results.values()))
    return applied
