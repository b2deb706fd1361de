"""Array outputs in the input's format, written chunk by chunk, atomically.

``open_container(path, kind)`` yields a container whose ``array(...)``
context manager returns a ``write(chunk)`` function taking consecutive
chunks along the first axis as read (for Fortran-ordered arrays, the
transposed chunks the reader yields). ``-`` writes one .npy stream to
standard output.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zipfile
from collections.abc import Iterator

import numpy as np

from bnstat.errors import OutputError
from bnstat.io.atomic import STDOUT, StreamOnly, atomic_path, hdf5_file


def npy_header(shape, dtype, fortran: bool) -> bytes:
    """The bytes of a .npy header (version 1.0, or 2.0 when it does not fit)."""
    import io

    fmt = np.lib.format
    d = {"descr": fmt.dtype_to_descr(np.dtype(dtype)), "fortran_order": bool(fortran),
         "shape": tuple(int(s) for s in shape)}
    buf = io.BytesIO()
    try:
        fmt.write_array_header_1_0(buf, d)
    except ValueError:
        buf = io.BytesIO()
        fmt.write_array_header_2_0(buf, d)
    return buf.getvalue()


def _writer(fh, path):
    def write(chunk: np.ndarray) -> None:
        try:
            fh.write(np.ascontiguousarray(chunk).data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return write


class _NpyFile:
    def __init__(self, fh, path):
        self.fh = fh
        self.path = path
        self.used = False

    @contextlib.contextmanager
    def array(self, name, shape, dtype, fortran=False, like=None) -> Iterator:
        if self.used:
            raise OutputError(f"{self.path}: a .npy output holds one array; select one with -d")
        self.used = True
        try:
            self.fh.write(npy_header(shape, dtype, fortran))
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc
        yield _writer(self.fh, self.path)


class _NpzFile:
    def __init__(self, zf: zipfile.ZipFile, path):
        self.zf = zf
        self.path = path

    @contextlib.contextmanager
    def array(self, name, shape, dtype, fortran=False, like=None) -> Iterator:
        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        deflate = like is not None and getattr(like, "compression", None) == "deflate"
        info.compress_type = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
        try:
            with self.zf.open(info, "w", force_zip64=True) as fh:
                fh.write(npy_header(shape, dtype, fortran))
                yield _writer(fh, self.path)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc


class _Hdf5File:
    def __init__(self, f, path, check=lambda: None):
        self.f = f
        self.path = path
        self.check = check  # raises OutputError once a write failed (atomic.hdf5_file)

    @contextlib.contextmanager
    def array(self, name, shape, dtype, fortran=False, like=None) -> Iterator:
        kwargs = {}
        if like is not None and getattr(like, "kind", "") == "hdf5":
            import h5py

            with h5py.File(like.path, "r") as src:
                ds = src[like.key]
                if ds.chunks:
                    kwargs["chunks"] = ds.chunks
                for key in ("compression", "compression_opts", "shuffle", "fletcher32", "scaleoffset"):
                    value = getattr(ds, key)
                    if value not in (None, False):
                        kwargs[key] = value
        try:
            ds = self.f.create_dataset(name, shape=tuple(shape), dtype=dtype, **kwargs)
        except (ValueError, OSError) as exc:
            raise OutputError(f"{self.path}:{name}: cannot create the dataset ({exc})") from exc
        pos = [0]

        def write(chunk: np.ndarray) -> None:
            r0 = pos[0]
            try:
                ds[r0:r0 + chunk.shape[0]] = chunk
            except OSError as exc:
                raise OutputError(f"{self.path}:{name}: cannot write ({exc})") from exc
            self.check()
            pos[0] += chunk.shape[0]

        yield write


@contextlib.contextmanager
def open_container(path: str, kind: str, *, force: bool = False, inputs=()) -> Iterator:
    """A container of arrays of ``kind`` ('npy', 'npz', 'hdf5') at ``path``, atomically."""
    if path == STDOUT:
        if kind != "npy":
            raise OutputError("-: standard output carries one .npy array; give -o FILE for "
                              f"a {kind} output")
        yield _NpyFile(sys.stdout.buffer, "<stdout>")
        sys.stdout.buffer.flush()
        return
    # The temporary file exists (empty) and is opened without truncating it: ext4
    # flushes a file truncated to size 0 when it is closed (auto_da_alloc), which
    # took 0.16 s of a 0.55 s normalize of 513 MB here (bench/README.md).
    with atomic_path(path, force=force, inputs=inputs) as tmp:
        mode = "r+b" if tmp != path else "wb"  # a FIFO or a device is written straight into
        try:
            if kind == "npy":
                with open(tmp, mode) as fh:
                    yield _NpyFile(fh, path)
            elif kind == "npz":
                with open(tmp, mode) as fh, zipfile.ZipFile(
                        fh if tmp != path else StreamOnly(fh), "w", allowZip64=True) as zf:
                    yield _NpzFile(zf, path)
            elif kind == "hdf5":
                with hdf5_file(tmp, path) as (f, check):
                    yield _Hdf5File(f, path, check)
            else:  # pragma: no cover - callers pass one of the three
                raise ValueError(kind)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc


class BackgroundWriter:
    """``write(chunk)`` in a thread of its own, from a ring of buffers the caller fills.

    The caller takes a free buffer (``buffer()``), computes a chunk into it and
    hands both over (``submit``); the thread writes the chunk and frees the
    buffer. Computing piece i+1 overlaps writing piece i: normalize's output
    goes through ``write()`` into the page cache at about the speed of ``cp``,
    which a kernel waiting for each write could not reach (bench/README.md).
    As a context manager: on a normal exit every write is waited for and the
    first write error raised; on an exception (SIGINT included) the thread is
    joined after its current write and the error is the caller's.
    """

    def __init__(self, write, nbytes: int, count: int = 3):
        import queue
        import threading

        self._write = write
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(np.empty(nbytes, np.uint8))
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bnstat-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            chunk, buf = item
            if self._error is None:
                try:
                    self._write(chunk)
                except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                    self._error = exc
            self._free.put(buf)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def buffer(self) -> np.ndarray:
        """A free buffer (uint8, ``nbytes``); waits while every buffer is queued."""
        self._raise()
        buf = self._free.get()
        self._raise()
        return buf

    def submit(self, chunk: np.ndarray, buf: np.ndarray) -> None:
        """Queue ``chunk`` (a view of ``buf``, from ``buffer()``) for writing."""
        self._todo.put((chunk, buf))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self._todo.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise()
        return False
