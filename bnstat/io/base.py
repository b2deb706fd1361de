"""The array source: a named array read chunk by chunk along its first axis."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np

from bnstat.errors import InputError

SUPPORTED_KINDS = "fiu"


def input_error(path: str, exc: OSError) -> InputError:
    """An OSError met reading ``path`` as the InputError naming the file: the one mapping."""
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{path}: no such file")
    if isinstance(exc, PermissionError):
        return InputError(f"{path}: permission denied")
    return InputError(f"{path}: cannot read: {exc.strerror or exc}")


def open_input(path: str, directory_hint: str = "Give the files inside it."):
    """``open(path, "rb")``, its failures as InputError naming the file (README, errors)."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory", directory_hint)
    try:
        return open(path, "rb")
    except OSError as exc:
        raise input_error(path, exc) from exc


def read_head(path: str, n: int, directory_hint: str = "Give the files inside it.") -> bytes:
    """The first ``n`` bytes of a file (fewer if it is shorter). Raises InputError."""
    with open_input(path, directory_hint) as fh:
        try:
            return fh.read(n)
        except OSError as exc:
            raise input_error(path, exc) from exc


def check_dtype(dtype: np.dtype, where: str) -> None:
    """Refuse dtypes whose moments mean nothing here. Raises InputError."""
    if dtype.kind in SUPPORTED_KINDS and dtype.fields is None and dtype.subdtype is None:
        return
    kinds = {"b": "bool", "c": "complex", "O": "object", "V": "structured/void", "U": "string",
             "S": "bytes", "M": "datetime", "m": "timedelta"}
    kind = kinds.get(dtype.kind, dtype.kind)
    raise InputError(
        f"{where}: dtype {dtype} ({kind}) is not supported; bnstat reads integer and float arrays",
        "Convert it first, e.g. with numpy's astype(np.float32).")


def check_shape(shape: tuple[int, ...], where: str) -> None:
    """Refuse arrays with fewer than 2 dimensions or no elements. Raises InputError."""
    if len(shape) < 2:
        raise InputError(
            f"{where}: a {len(shape)}-D array of shape {tuple(shape)}; bnstat needs at least 2 "
            "dimensions (N and C)", "Reshape it, e.g. to (N, 1) or (1, C).")
    if math.prod(shape) == 0:
        raise InputError(f"{where}: the array of shape {tuple(shape)} is empty; nothing to compute")


class ArraySource:
    """One named array of a file.

    ``shape`` and ``dtype`` are the array's as stored. ``fortran`` arrays are
    read as their C-ordered transpose: ``iter_chunks`` then yields chunks of
    shape ``(rows, *reversed(shape)[1:])``. Chunks are C-contiguous, in
    native byte order, and may be views into a buffer reused by the next
    chunk: use each before asking for the next.
    """

    kind = "array"
    name: str
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool = False
    chunks: tuple[int, ...] | None = None  # HDF5 chunk shape
    compression: str | None = None
    row_align: int = 1  # read rows in multiples of this (HDF5 chunk rows)
    repeatable: bool = True  # can be read more than once (not stdin)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.name}" if self.kind != "npy" else self.path

    @property
    def read_shape(self) -> tuple[int, ...]:
        """The shape of the array as read (reversed for Fortran order)."""
        return tuple(reversed(self.shape)) if self.fortran else tuple(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        return math.prod(self.read_shape[1:]) * self.dtype.itemsize

    double_buffered: bool = False  # the reader fills a second buffer while one is in use

    def rows_for(self, chunk_size: int) -> int:
        """Rows per chunk for a chunk size in bytes (``bnstat.stream.source_rows``: at least
        one row, aligned to ``row_align``, halved for a double-buffered reader)."""
        from bnstat.stream import source_rows

        return source_rows(self, chunk_size)

    def iter_chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError  # pragma: no cover - every reader defines it

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "shape": list(self.shape), "dtype": str(self.dtype),
                "order": "F" if self.fortran else "C",
                "chunks": list(self.chunks) if self.chunks else None,
                "compression": self.compression, "nbytes": self.nbytes, "kind": self.kind}


def native(arr: np.ndarray) -> np.ndarray:
    """Byte-swap a non-native chunk in place (it lives in our own buffer)."""
    if arr.dtype.byteorder not in ("=", "|") and arr.dtype.byteorder != (
            "<" if np.little_endian else ">"):
        arr.byteswap(inplace=True)
        return arr.view(arr.dtype.newbyteorder("="))
    return arr


class MemorySource(ArraySource):
    """An in-memory numpy array (the Python API)."""

    kind = "memory"

    def __init__(self, array: np.ndarray, name: str = "array"):
        check_dtype(array.dtype, name)
        check_shape(array.shape, name)
        self.array = array
        self.name = name
        self.path = "<array>"
        self.shape = tuple(array.shape)
        self.dtype = array.dtype
        self.fortran = array.ndim > 1 and array.flags.f_contiguous and not array.flags.c_contiguous

    @property
    def where(self) -> str:
        return self.name

    def iter_chunks(self, rows):
        from bnstat.stream import slabs

        arr = self.array.T if self.fortran else self.array
        for sl in slabs(arr.shape[0], rows):
            r0, chunk = sl.start, arr[sl]
            if not chunk.flags.c_contiguous or not chunk.dtype.isnative:
                chunk = np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("="))
            yield r0, chunk
