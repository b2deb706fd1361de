"""The array source: a named array read chunk by chunk along its first axis."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
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


class UnsupportedArray(InputError):
    """An array moments cannot use (its dtype or shape), with what its header told.

    A ``.npz`` member of this kind is skipped (with a warning) when no -d
    pattern selects it, and listed by ``bnstat info`` (README, inputs)."""

    def __init__(self, message: str, hint: str | None = None, *, shape=None, dtype=None,
                 reason: str = ""):
        super().__init__(message, hint)
        self.shape, self.dtype, self.reason = shape, dtype, reason


_DTYPE_KINDS = {"b": "bool", "c": "complex", "O": "object", "V": "structured/void", "U": "string",
                "S": "bytes", "M": "datetime", "m": "timedelta"}


def dtype_problem(dtype: np.dtype) -> str | None:
    """Why moments cannot use ``dtype`` ("string dtype <U1"), or None for integers and floats."""
    if dtype.kind in SUPPORTED_KINDS and dtype.fields is None and dtype.subdtype is None:
        return None
    return f"{_DTYPE_KINDS.get(dtype.kind, dtype.kind)} dtype {dtype}"


def shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why moments cannot use an array of ``shape`` ("1-D", "empty"), or None."""
    if len(shape) < 2:
        return f"{len(shape)}-D"
    return "empty" if math.prod(shape) == 0 else None


def check_dtype(dtype: np.dtype, where: str, shape=None) -> None:
    """Refuse dtypes whose moments mean nothing here. Raises UnsupportedArray."""
    problem = dtype_problem(dtype)
    if problem is None:
        return
    kind = _DTYPE_KINDS.get(dtype.kind, dtype.kind)
    raise UnsupportedArray(
        f"{where}: dtype {dtype} ({kind}) is not supported; bnstat reads integer and float arrays",
        "Convert it first, e.g. with numpy's astype(np.float32).", shape=shape, dtype=dtype,
        reason=problem)


def check_shape(shape: tuple[int, ...], where: str) -> None:
    """Refuse arrays with fewer than 2 dimensions or no elements. Raises InputError."""
    if len(shape) < 2:
        raise InputError(
            f"{where}: a {len(shape)}-D array of shape {tuple(shape)}; bnstat needs at least 2 "
            "dimensions (N and C)", "Reshape it, e.g. to (N, 1) or (1, C).")
    if math.prod(shape) == 0:
        raise InputError(f"{where}: the array of shape {tuple(shape)} is empty; nothing to compute")


@dataclass
class SkippedArray:
    """An array of a container that moments skip: its name, what its header told, and why."""

    path: str
    name: str
    shape: tuple[int, ...] | None
    dtype: np.dtype | None
    reason: str
    warn: bool = True  # moments warn of it (HDF5 skips its non-array datasets quietly)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.name}"

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path,
                "shape": [] if self.shape is None else list(self.shape),
                "dtype": None if self.dtype is None else str(self.dtype), "order": "C",
                "chunks": None, "compression": None, "kind": "npz", "skip": self.reason,
                "nbytes": 0 if None in (self.shape, self.dtype) else
                math.prod(self.shape) * self.dtype.itemsize}


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
    layout: str | None = None  # the layout stored with the array (an HDF5 ``layout`` attribute)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.key}" if self.kind != "npy" else self.path

    @property
    def key(self) -> str:
        """The array's name in its file: ``name`` unless --name/name= gave it another."""
        return self.__dict__.get("_key", self.name)

    def rename(self, name: str) -> None:
        """Call the array ``name`` in results (--name/name=); ``key`` keeps its name in the file."""
        self._key = self.key
        self.name = name

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
                "compression": self.compression, "nbytes": self.nbytes, "kind": self.kind,
                "layout": self.layout}


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
