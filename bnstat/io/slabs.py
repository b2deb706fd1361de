"""Rows r0:r1 of one array of a file, read on their own (a Dask task's slab).

A task of ``--scheduler`` names its slab by (path, array name, rows) and reads
it here, in the worker process, without reading the rows before it:

- ``.npy`` and stored ``.npz`` members: a read-only memory map of the slab's
  bytes (file-backed pages, released when the task's array goes);
- HDF5: ``read_direct`` of the slab (whole chunks: the task planner aligns
  slabs to the dataset's chunk rows), HDF5's own filters decompress;
- a deflated ``.npz`` member cannot be entered in the middle: its task is the
  whole member, streamed chunk by chunk by the ordinary reader.

``splittable(source)`` says whether a source's rows can be read this way.
"""

from __future__ import annotations

import fnmatch
import zipfile
from collections.abc import Iterator

import numpy as np

from bnstat.errors import InputError
from bnstat.io.base import ArraySource

__all__ = ["exact_pattern", "read_row_blocks", "read_rows", "splittable"]


def exact_pattern(name: str) -> str:
    """An fnmatch pattern matching ``name`` only (brackets, * and ? escaped)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def splittable(source: ArraySource) -> bool:
    """Whether ``read_rows`` can read a part of ``source`` on its own."""
    if source.fortran or not source.repeatable:
        return False
    if source.kind == "npy" or source.kind == "hdf5":
        return True
    return source.kind == "npz" and source.compression is None


def _member_offset(path: str, name: str) -> int:
    from bnstat.io.npy import _open_file, _stored_offset

    with _open_file(path) as fh, zipfile.ZipFile(fh) as zf:
        for member in (name + ".npy", name):
            try:
                info = zf.getinfo(member)
            except KeyError:
                continue
            return _stored_offset(path, info)
    raise InputError(f"{path}:{name}: no such member")


def read_rows(source: ArraySource, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of ``source`` (C order, native byte order not guaranteed).

    Raises InputError when the file cannot be read.
    """
    return next(read_row_blocks(source, [(r0, r1)]))


def read_row_blocks(source: ArraySource, ranges) -> Iterator[np.ndarray]:
    """``read_rows`` of each (r0, r1) of ``ranges``, in order (an HDF5 file opened once)."""
    row_bytes = source.row_bytes
    r0 = r1 = 0
    try:
        if source.kind in ("npy", "npz"):
            base = 0 if source.kind == "npy" else _member_offset(source.path, source.key)
            for r0, r1 in ranges:
                offset = base + source.data_offset + r0 * row_bytes
                yield np.memmap(source.path, dtype=source.dtype, mode="r", offset=offset,
                                shape=(r1 - r0,) + tuple(source.shape[1:]))
            return
        if source.kind == "hdf5":
            from bnstat.io.hdf5 import _h5py

            h5py = _h5py()
            with h5py.File(source.path, "r") as f:
                ds = f[source.key]
                for r0, r1 in ranges:
                    out = np.empty((r1 - r0,) + tuple(source.shape[1:]), source.dtype.newbyteorder("="))
                    ds.read_direct(out, np.s_[r0:r1], np.s_[0:r1 - r0])
                    yield out
            return
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{source.where}: cannot read rows {r0}:{r1} ({exc})") from exc
    raise InputError(f"{source.where}: rows of a {source.kind} source cannot be read on their own")


def select(sources: list[ArraySource], name: str) -> ArraySource:
    """The source called ``name`` (as opened by ``open_path`` with ``exact_pattern``)."""
    for src in sources:
        if fnmatch.fnmatchcase(src.name, exact_pattern(name)):
            return src
    raise InputError(f"{name}: no such array")
