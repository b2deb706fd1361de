"""bnstat: exact, out-of-core statistics for normalization layers.

The Python API (README, "Python API")::

    import bnstat
    stats = bnstat.moments("acts.h5", layout="NCHW")      # {name: Stats}
    s = stats["features/block1/conv"]
    s.mean, s.var, s.std, s.min, s.max, s.count, s.nan_count
    both = s.merge(other)                                  # exact

``source`` may be a path (or any path-like), a list of them, a numpy array,
a dict of named arrays, or anything with ``__array__`` (a torch tensor, an
xarray DataArray). ``chunk_size`` is bytes or a size string (``"64MiB"``).
Heavy modules (numba, h5py) are imported on first use. Every function raises
:class:`bnstat.errors.BnstatError` subclasses: InputError (unreadable
input), OutputError, DataError (NaN under ``nan="raise"``, bad model values),
UsageProblem (arguments that do not fit the data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from bnstat._version import __version__

if TYPE_CHECKING:
    from bnstat.stats import Stats

__all__ = ["__version__", "moments", "hist", "normalize", "fold", "load_stats", "save_stats",
           "running", "recalibrate", "diff", "Accumulator", "warm_up"]


def moments(source, *, layout: str | None = None, channel_axis: int | None = None,
            norm: str = "batch", groups: int | None = None, reduce: str | None = None,
            ddof: int = 0, dataset: str | Iterable[str] | None = None,
            chunk_size: int | str | None = None, threads: int | None = None, higher: bool = False,
            nan: str = "omit", per_file: bool = False,
            progress: Callable[[int], None] | None = None, engine: str | None = None,
            check_crc: bool = True, name: str | None = None) -> dict[str, Stats]:
    """Per-unit statistics of every selected array of ``source``: ``{name: Stats}``.

    ``source``: see the module docstring; several paths are one data set
    split along N. ``engine``: "numba" (the parallel kernels), "numpy", or
    None: numpy for inputs under 32 MiB, where loading the kernels would cost
    more. ``check_crc=False`` skips the CRC-32 check of .npz members
    (``--skip-crc``). ``name``: the one array of each input is called ``name``
    (``--name``): shards ``["s1.npy", "s2.npy"]`` with ``name="act"`` are one
    array. Raises InputError (unreadable input, nothing selected),
    UsageProblem (a layout that does not fit an array, a bad ``chunk_size``),
    DataError (NaN values with ``nan="raise"``).
    """
    from bnstat.io import open_any
    from bnstat.sizes import size_bytes
    from bnstat.stream import DEFAULT_CHUNK_SIZE, compute_stats

    chunk = size_bytes(chunk_size, DEFAULT_CHUNK_SIZE)
    sources = open_any(source, dataset, check_crc=check_crc, name=name)
    return compute_stats(sources, layout=layout, channel_axis=channel_axis, norm=norm,
                         groups=groups, reduce=reduce, ddof=ddof, higher=higher, nan_policy=nan,
                         chunk_size=chunk, threads=threads, per_file=per_file,
                         progress=progress, engine=engine)


def normalize(source, output: str | None = None, *, stats=None, model=None, bn: str | None = None,
              eps: float | None = None, per_batch: int | None = None, layout: str | None = None,
              channel_axis: int | None = None, norm: str | None = None, groups: int | None = None,
              reduce: str | None = None, dataset: str | Iterable[str] | None = None,
              chunk_size: int | str | None = None, threads: int | None = None, nan: str = "omit",
              force: bool = False, progress: Callable[[int], None] | None = None,
              engine: str | None = None, check_crc: bool = True, name: str | None = None):
    """Normalize the selected arrays of ``source`` as BN/LN/IN/GN would.

    y = (x - mean) / sqrt(var + eps) * gamma + beta. ``output``: a path in the
    input's format ('-': a .npy stream); without it, an in-memory ``source``
    is returned normalized (an array, or a dict for a dict). Statistics:
    the input's own (default), ``per_batch=B``, ``stats`` (a stats file or
    ``{name: Stats}``), or ``model`` + ``bn`` (a model file and one of its
    BatchNorm layers). ``name``: as for ``moments`` (the name looked up in ``stats``).
    Returns ``{name: what was applied}`` when writing.
    Raises InputError, OutputError (the output exists without ``force``, is
    an input), DataError (stats that do not fit, NaN with ``nan="raise"``, a
    bad BN layer), UsageProblem (conflicting arguments).
    """
    from bnstat.normalizing import normalize as _normalize

    return _normalize(source, output, stats=stats, model=model, bn=bn, eps=eps,
                      per_batch=per_batch, layout=layout, channel_axis=channel_axis, norm=norm,
                      groups=groups, reduce=reduce, dataset=dataset, chunk_size=chunk_size,
                      threads=threads, nan=nan, force=force, progress=progress, engine=engine,
                      check_crc=check_crc, name=name)


def fold(source, *, output: str | None = None, pairs: Iterable = (), plan=None,
         eps: float | None = None, bn: str = "drop", check: bool = False, dry_run: bool = False,
         plan_output: str | None = None, force: bool = False, seed: int = 0,
         strict: bool = False):
    """Fold every BatchNorm of a model into the layer that feeds it; a FoldResult.

    ``source``: a model file or a mapping of named arrays; ``pairs``:
    ``"CONV=BN"`` strings or ``(conv, bn)`` tuples; ``plan``: a plan file or
    dict; ``bn``: "drop" or "identity"; ``check``: test every pair on random
    inputs (and the whole model where the file has a graph); ``strict``:
    refuse pairs that rest on an assumption. Writes ``output`` (and
    ``plan_output``) atomically unless ``dry_run``. Raises InputError
    (unreadable model or plan), DataError (refusals; FoldCheckError when a
    check fails; FoldAssumptionError with strict), UsageProblem (bad pairs),
    OutputError. Nothing is written when it raises.
    """
    from bnstat.folding import fold as _fold

    return _fold(source, output=output, pairs=pairs, plan=plan, eps=eps, bn=bn, check=check,
                 dry_run=dry_run, plan_output=plan_output, force=force, seed=seed, strict=strict)


def load_stats(path) -> dict[str, Stats]:
    """Read a stats file written by ``save_stats`` / ``bnstat moments -o``: ``{name: Stats}``.

    Raises InputError (missing, unreadable, not a stats file)."""
    import os

    from bnstat.stats import load_stats as _load

    return _load(os.fspath(path))


def save_stats(stats: Mapping[str, Stats], path, *, force: bool = False) -> None:
    """Write ``{name: Stats}`` to a stats file (.npz), atomically.

    Raises OutputError (the file exists without ``force``, cannot be written)."""
    import os

    from bnstat.io.atomic import atomic_open
    from bnstat.stats import save_stats as _save

    with atomic_open(os.fspath(path), "wb", force=force) as fh:
        _save(dict(stats), fh)


def hist(source, *, layout=None, channel_axis=None, norm="batch", groups=None, reduce=None, ddof=0,
         bins=2048, range="auto", quantiles=None, amax=None, per_tensor=False, num_bits=8,
         unsigned=False, dataset=None, chunk_size=None, threads=None, nan="omit", per_file=False,
         progress=None, check_crc=True, name=None):
    """Exact per-unit histograms of every selected array of ``source`` (README "Histograms").

    ``source`` and ``name`` as for ``moments``. ``range``: "auto" (each unit's min..max), "abs"
    (|x| over 0..max |x|) or (lo, hi) / "LO:HI"; ``quantiles``: q values computed
    exactly (np.quantile, method "linear"); ``amax``: calibration methods (max,
    percentile:P, mse, entropy; with ``range="abs"``). Returns ``{name: Histogram}``,
    each with ``edges``, ``counts``, ``quantile(q)``, ``amax(method)`` and ``stats``.
    Raises bnstat.errors.BnstatError.
    """
    from bnstat.histrun import compute_hist
    from bnstat.io import open_any
    from bnstat.sizes import size_bytes
    from bnstat.stream import DEFAULT_CHUNK_SIZE

    kwargs = dict(layout=layout, channel_axis=channel_axis, norm=norm, groups=groups, reduce=reduce,
                  ddof=ddof, bins=bins, range=range, quantiles=quantiles, amax=amax,
                  per_tensor=per_tensor, num_bits=num_bits, unsigned=unsigned, nan_policy=nan,
                  chunk_size=size_bytes(chunk_size, DEFAULT_CHUNK_SIZE), threads=threads,
                  per_file=per_file, progress=progress)

    def run(**changes):  # quantile(q) / amax(method) not computed: the passes again
        return compute_hist(open_any(source, dataset, check_crc=check_crc, name=name),
                            **{**kwargs, **changes})

    return compute_hist(open_any(source, dataset, check_crc=check_crc, name=name), **kwargs, rerun=run)


# ---- training vs inference (README.md, "Training and inference statistics") ----------

def running(source, *, batch_size, framework="pytorch", momentum=None, cumulative=False, epochs=1,
            drop_last=False, from_model=None, bn=None, layout=None, channel_axis=None, dataset=None,
            chunk_size=None, threads=None, engine=None, progress=None, check_crc=True, name=None):
    """Running mean/var a framework's BN would hold after ``epochs`` passes over ``source``
    in batches of ``batch_size``: ``{name: RunningResult}``; see ``bnstat.running_stats.running``."""
    from bnstat.running_stats import running as _running

    return _running(source, batch_size=batch_size, framework=framework, momentum=momentum,
                    cumulative=cumulative, epochs=epochs, drop_last=drop_last, from_model=from_model,
                    bn=bn, layout=layout, channel_axis=channel_axis, dataset=dataset,
                    chunk_size=chunk_size, threads=threads, engine=engine, progress=progress,
                    check_crc=check_crc, name=name)


def recalibrate(model, source=None, *, stats=None, output=None, map=(), map_file=None,
                estimator="population", batch_size=None, drop_last=False, layout=None,
                channel_axis=None, dataset=None, chunk_size=None, threads=None, engine=None,
                force=False, check_crc=True):
    """Precise BN: ``model``'s BN running statistics from activations (``source``) or a
    stats file (``stats``), written to ``output``; see ``bnstat.recalibration.recalibrate``."""
    from bnstat.recalibration import recalibrate as _recalibrate

    return _recalibrate(model, source, stats=stats, output=output, map=map, map_file=map_file,
                        estimator=estimator, batch_size=batch_size, drop_last=drop_last,
                        layout=layout, channel_axis=channel_axis, dataset=dataset,
                        chunk_size=chunk_size, threads=threads, engine=engine, force=force,
                        check_crc=check_crc)


def diff(a, b, *, map=(), fail_over=(), layout=None, channel_axis=None, norm="batch", groups=None,
         reduce=None, dataset=None, chunk_size=None, threads=None, engine=None, check_crc=True):
    """Per-unit drift between two stats / activation / model files: a ``DiffResult``;
    see ``bnstat.drift.diff``."""
    from bnstat.drift import diff as _diff

    return _diff(a, b, map=map, fail_over=fail_over, layout=layout, channel_axis=channel_axis,
                 norm=norm, groups=groups, reduce=reduce, dataset=dataset, chunk_size=chunk_size,
                 threads=threads, engine=engine, check_crc=check_crc)


def warm_up(kernels: Iterable[str] = ("moments", "normalize"),
            dtypes: Iterable[str] = ("float32", "float64")) -> dict[str, float]:
    """Load the Numba kernels now, compiling them into numba's cache the first time.

    For a notebook or a service that wants its first call fast: ``kernels``
    among "moments", "higher" (``higher=True``), "normalize"; ``dtypes`` of
    the inputs to come. Returns the seconds each variant took (a few seconds
    each the first time, milliseconds from the cache). Without it, the first
    call of a large input computes with numpy while the kernels compile apart
    (README, "The first run").
    """
    from bnstat.kernels import loader

    return loader.warm_up(tuple(kernels), tuple(dtypes))


def __getattr__(name):
    if name == "Accumulator":  # imported on first use, like the functions above
        from bnstat.accumulate import Accumulator

        return Accumulator
    raise AttributeError(f"module 'bnstat' has no attribute {name!r}")
