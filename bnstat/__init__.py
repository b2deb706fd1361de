"""bnstat: exact, out-of-core statistics for normalization layers.

The Python API (SPEC 4b)::

    import bnstat
    stats = bnstat.moments("acts.h5", layout="NCHW")      # {name: Stats}
    s = stats["features/block1/conv"]
    s.mean, s.var, s.std, s.min, s.max, s.count, s.nan_count
    both = s.merge(other)                                  # exact

``source`` may be a path, a list of paths, or a numpy array. Heavy modules
(numba, h5py) are imported on first use.
"""

from __future__ import annotations

from bnstat._version import __version__

__all__ = ["__version__", "moments", "normalize", "fold", "load_stats", "save_stats"]


def _sources(source, dataset=None, check_crc=True):
    import numpy as np

    from bnstat.io import MemorySource, open_sources

    if isinstance(source, np.ndarray):
        return [MemorySource(source)]
    if isinstance(source, dict):
        return [MemorySource(np.asarray(v), str(k)) for k, v in source.items()]
    paths = [source] if isinstance(source, str | bytes) or hasattr(source, "__fspath__") else list(source)
    patterns = [dataset] if isinstance(dataset, str) else list(dataset or ())
    import os

    return open_sources([os.fspath(p) for p in paths], patterns, check_crc=check_crc)


def moments(source, *, layout=None, channel_axis=None, norm="batch", groups=None, reduce=None,
            ddof=0, dataset=None, chunk_size=None, threads=None, higher=False, nan="omit",
            per_file=False, progress=None, engine=None, check_crc=True):
    """Per-unit statistics of every selected array of ``source``.

    ``source``: a path, a list of paths (one data set split along N), a
    numpy array, or a dict of named arrays. Returns ``{name: Stats}``.
    ``engine``: "numba" (the parallel kernels), "numpy", or None: numpy for
    inputs under 32 MiB, where loading the kernels would cost more.
    ``check_crc=False`` skips the CRC-32 check of .npz members (``--skip-crc``).
    Raises bnstat.errors.BnstatError (UsageProblem when the layout does not
    fit an array).
    """
    from bnstat.stream import compute_stats

    sources = _sources(source, dataset, check_crc)
    return compute_stats(sources, layout=layout, channel_axis=channel_axis, norm=norm,
                         groups=groups, reduce=reduce, ddof=ddof, higher=higher, nan_policy=nan,
                         chunk_size=chunk_size, threads=threads, per_file=per_file,
                         progress=progress, engine=engine)


def normalize(*args, **kwargs):
    """Normalize arrays as BN/LN/IN/GN would; see ``bnstat.normalizing.normalize``."""
    from bnstat.normalizing import normalize as _normalize

    return _normalize(*args, **kwargs)


def fold(*args, **kwargs):
    """Fold BatchNorm layers into the layers that feed them; see ``bnstat.folding.fold``."""
    from bnstat.folding import fold as _fold

    return _fold(*args, **kwargs)


def load_stats(path):
    """Read a stats file: ``{name: Stats}``."""
    from bnstat.stats import load_stats as _load

    return _load(path)


def save_stats(stats, path, *, force=False):
    """Write ``{name: Stats}`` to a stats file, atomically."""
    from bnstat.io.atomic import atomic_open
    from bnstat.stats import save_stats as _save

    with atomic_open(path, "wb", force=force) as fh:
        _save(stats, fh)
