"""Inputs and outputs. Only this package opens files by name.

``open_any(source, dataset)`` is the one way to turn what a caller gives (a
path, a list of paths, a numpy array, a dict of arrays, anything with
``__array__``) into named :class:`ArraySource` objects that are read chunk
by chunk; ``open_sources(paths, patterns)`` is its path half (the CLI).
"""

from __future__ import annotations

import fnmatch

from bnstat.errors import InputError
from bnstat.io.base import ArraySource, MemorySource, check_shape, read_head

__all__ = ["ArraySource", "MemorySource", "open_any", "open_sources", "sniff"]

def sniff(path: str) -> str:
    """'npy', 'npz' (any zip), 'hdf5' or 'safetensors' from the first bytes (else the extension).

    Raises InputError for missing, unreadable, empty or unknown files.
    """
    from bnstat.io import magic

    head = read_head(path, magic.HEAD_BYTES)
    if not head:
        raise InputError(f"{path}: empty file")
    kind = {"npy": "npy", "zip": "npz", "hdf5": "hdf5",
            "safetensors": "safetensors"}.get(magic.container(path, head))
    if kind is not None:
        return kind
    ext = magic.extension(path)
    if ext in (".pt", ".pth", ".ckpt", ".bin"):
        from bnstat.io.models.torch_zip import RESAVE, refuse_legacy

        refuse_legacy(path, read_head(path, 263))
        raise InputError(f"{path}: not a torch.save (zip) file", RESAVE)
    if ext in magic.HDF5_EXTS:
        raise InputError(f"{path}: not an HDF5 file (no HDF5 signature)")
    kinds = {".npy": "a .npy array", ".npz": "a .npz (zip) file"}
    if ext in kinds:
        raise InputError(f"{path}: not {kinds[ext]} (bad magic bytes {head[:6]!r})")
    raise InputError(f"{path}: unknown file format",
                     "bnstat reads .npy, .npz and HDF5 (.h5, .hdf5) files, and '-' for a .npy stream.")


def _selector(patterns):
    """name -> True (matched by a pattern), False (not matched), None (no patterns)."""
    if not patterns:
        return lambda name: None
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def open_path(path: str, patterns=(), *, check_crc: bool = True,
              skipped: list | None = None) -> list[ArraySource]:
    """The selected arrays of one path ('-' is a .npy stream on stdin).

    ``check_crc=False``: the CRC-32 of .npz members is not checked. ``skipped``: a
    list collecting the .npz members that no pattern selected and whose dtype moments
    cannot use (without it they raise, as a selected one does), and the HDF5 datasets
    a walk leaves out."""
    selected = _selector(patterns)
    if path == "-":
        from bnstat.io.npy import open_stdin

        sources = open_stdin()
    else:
        kind = sniff(path)
        if kind == "hdf5":
            from bnstat.io.hdf5 import open_hdf5

            return open_hdf5(path, selected, skipped)
        if kind == "safetensors":
            from bnstat.io.models.torch_zip import open_safetensors

            return open_safetensors(path, selected)
        if kind == "npz":
            from bnstat.io.models.torch_zip import is_torch_zip, open_torch

            if is_torch_zip(path):
                return open_torch(path, selected)
        from bnstat.io.npy import open_npy, open_npz

        sources = open_npy(path) if kind == "npy" else open_npz(
            path, check_crc=check_crc, selected=selected, skipped=skipped)
    return [s for s in sources if selected(s.name) is not False]


# kinds of source that are the one array of their input: never skipped, always checked
_SINGLE_KINDS = ("npy", "stdin", "memory")


def open_sources(paths, patterns=(), *, check: bool = True, check_crc: bool = True,
                 name: str | None = None, skipped: list | None = None) -> list[ArraySource]:
    """All selected arrays of all paths, in command-line and file order.

    With ``check`` (for computing), arrays of fewer than 2 dimensions or no
    elements are refused; ``bnstat info`` lists them all. Without ``patterns``,
    the arrays of a container (.npz) that moments cannot use (string or object
    dtype, 0-D, 1-D, empty) are skipped with one warning per file, and collected
    in ``skipped`` when a list is given (README, inputs). ``name``: the one array
    of each path is called ``name`` (--name). Raises InputError when a path fails
    or nothing usable is selected, UsageProblem when ``name`` meets a path of
    several arrays.
    """
    if list(paths).count("-") > 1:
        raise InputError("-: standard input can be given once")
    sources, skips = [], []
    for path in paths:
        opened = open_path(path, patterns, check_crc=check_crc, skipped=skips)
        if check:
            opened = _usable(opened, skips, bool(patterns))
        if name is not None:
            _rename(opened, path, name)
        sources.extend(opened)
    if skipped is not None:
        skipped.extend(skips)
    if not sources:
        where = ", ".join(paths)
        if patterns:
            raise InputError(f"{where}: no array matches -d/dataset= {' -d '.join(patterns)}",
                             "List the arrays with: bnstat info " + " ".join(paths))
        skipped_text = f"; skipped {_skip_list(skips)}" if skips else ""
        raise InputError(f"{where}: no numeric array of 2 or more dimensions found{skipped_text}",
                         "List the arrays with: bnstat info " + " ".join(paths))
    if check:
        _warn_skipped(skips)
    _warn_unmatched(paths, patterns, sources)
    return sources


def _rename(sources: list[ArraySource], path: str, name: str) -> None:
    """--name: the one array of ``path`` becomes ``name``. Raises UsageProblem for several."""
    from bnstat.errors import UsageProblem

    if len(sources) > 1:
        shown = ", ".join(s.name for s in sources[:4]) + (" ..." if len(sources) > 4 else "")
        raise UsageProblem(f"{path}: --name/name= names one array, but {len(sources)} are selected "
                           f"({shown})", "Select one with -d, or give --name only with "
                           ".npy files and standard input.")
    for src in sources:
        src.rename(name)


def _usable(sources: list[ArraySource], skips: list, explicit: bool) -> list[ArraySource]:
    """The sources moments can use; the others of containers (no -d) join ``skips``.
    Raises InputError for a single array, or one selected by -d."""
    from bnstat.io.base import SkippedArray, shape_problem

    kept = []
    for src in sources:
        problem = shape_problem(src.shape)
        if problem is None:
            kept.append(src)
        elif explicit or src.kind in _SINGLE_KINDS:
            check_shape(src.shape, src.where)
        else:
            skips.append(SkippedArray(src.path, src.key, src.shape, src.dtype, problem))
    return kept


def _warn_skipped(skips) -> None:
    """One warning per file naming the arrays skipped and why."""
    from bnstat.errors import warn

    for path in dict.fromkeys(s.path for s in skips if s.warn):
        mine = [s for s in skips if s.path == path and s.warn]
        warn(f"{path}: skipping {_skip_list(mine)}: moments need numeric arrays of 2+ "
             "dimensions (select arrays with -d to leave them out quietly)")


def _skip_list(skips) -> str:
    """``s (string dtype <U1), v (1-D)``: the skipped arrays and why."""
    return ", ".join(f"{s.name} ({s.reason})" for s in skips)


def same_file_twice(paths) -> tuple[str, str] | None:
    """The first two of ``paths`` naming one file (same device and inode), else None."""
    import os

    seen = {}
    for path in paths:
        if path == "-":
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue  # the reader reports it
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return seen[key], path
        seen[key] = path
    return None


def refuse_same_file_twice(paths, allow: bool) -> None:
    """InputError when a file is given twice (its counts would double), unless ``allow``."""
    pair = None if allow else same_file_twice(paths)
    if pair:
        raise InputError(f"{pair[0]} and {pair[1]}: the same file twice; its counts would double",
                         "Give each file once, or --allow-duplicates to count it twice.")


def _warn_unmatched(paths, patterns, sources) -> None:
    """Warn of each -d pattern that matches no array of ``paths`` when others do (a typo)."""
    for pattern in dict.fromkeys(patterns):
        if not any(fnmatch.fnmatchcase(s.key, pattern) for s in sources):
            from bnstat.errors import warn

            warn(f"-d/dataset= {pattern}: matches no array of {', '.join(paths)} "
                 "(the other patterns do); list the arrays with: bnstat info " + " ".join(paths))


_SOURCE_KINDS = "a path, a list of paths, a numpy array, a dict of arrays or an object with __array__"


def _is_path(obj) -> bool:
    return isinstance(obj, str | bytes) or hasattr(obj, "__fspath__")


def _as_array(obj, name: str):
    """``np.asarray(obj)`` (a tensor, an xarray DataArray, a dask block...). Raises InputError."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        return obj
    try:
        return np.asarray(obj)
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. a tensor that requires grad
        raise InputError(f"{name}: cannot be read as a numpy array ({exc})",
                         "Pass a numpy array, e.g. tensor.detach().cpu().numpy().") from exc


def open_any(source, dataset=None, *, check_crc: bool = True, name: str | None = None) -> list[ArraySource]:
    """The arrays of ``source`` as ArraySources, for computing (2+ dimensions, not empty).

    ``source``: a path or path-like ('-': a .npy stream on stdin), a list of
    them (one data set split along N), a numpy array, a dict of named arrays,
    or anything with ``__array__`` (a torch tensor, an xarray DataArray).
    ``dataset``: a pattern or list of patterns selecting arrays of files.
    ``name``: what to call the one array of each input (``--name``; a dict of
    several arrays, or a file of several selected arrays, is a UsageProblem).
    Raises UsageProblem for anything else, InputError for unreadable inputs.
    """
    import os

    import numpy as np

    from bnstat.errors import UsageProblem

    if isinstance(source, dict):
        if not source:
            raise UsageProblem("source=: an empty dict; give at least one array")
        sources = [MemorySource(_as_array(v, str(k)), str(k)) for k, v in source.items()]
        if name is not None:
            _rename(sources, "source=", name)
        return sources
    if isinstance(source, np.ndarray) or (hasattr(source, "__array__") and not _is_path(source)):
        return [MemorySource(_as_array(source, name or "array"), name or "array")]
    if _is_path(source):
        paths = [source]
    elif isinstance(source, list | tuple) and source and all(_is_path(p) for p in source):
        paths = list(source)
    else:
        raise UsageProblem(f"source=: {type(source).__name__} is not an input; give {_SOURCE_KINDS}")
    patterns = [dataset] if isinstance(dataset, str) else list(dataset or ())
    return open_sources([os.fsdecode(os.fspath(p)) for p in paths], patterns, check_crc=check_crc,
                        name=name)
