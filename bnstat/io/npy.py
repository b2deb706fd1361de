""".npy files, .npy members of .npz files, and .npy streams on standard input.

All three are read the same way: a stream positioned at the array's data is
read sequentially with ``readinto`` into one reused buffer, so resident
memory is the buffer, whatever the file size (page-cache pages are not
mapped into the process).
"""

from __future__ import annotations

import io
import math
import mmap
import os
import platform
import stat
import sys
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from bnstat.errors import InputError
from bnstat.io import zlibx
from bnstat.io.base import ArraySource, SkippedArray, UnsupportedArray, check_dtype, native, open_input
from bnstat.io.readahead import MADV_POPULATE_READ, MapPrefetcher
from bnstat.stream import slabs

_ZIP_LOCAL_HEADER = 30
# Populating the page tables of a window (MADV_POPULATE_READ, Linux 5.14+) rather
# than letting the kernel threads fault it in: two threads faulting the same map
# contend on the mm lock (page-cached 822 MB NCHW file: 1.5 GB/s by faults, 3.3 GB/s
# populated; bench/README.md). bnstat/io/readahead.py populates ahead in a thread.


def _ahead(window: int, page: int) -> int:
    """Bytes populated past the window in use: half a window (bench/README.md, "Cold reads")."""
    half = window // 2
    return max(page, half - half % page)


def read_npy_header(fh, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Parse the header of a .npy stream. Raises InputError."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
    except ValueError as exc:
        raise InputError(f"{where}: not a .npy array (bad magic string)",
                         "bnstat reads .npy, .npz and HDF5 files.") from exc
    try:
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh, max_header_size=1 << 20)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh, max_header_size=1 << 20)
        else:  # 3.0 (utf-8 field names) and any later version: numpy's own parser decides
            read_header = getattr(fmt, "_read_array_header", None)
            if read_header is None:  # numpy 2: the implementation module
                from numpy.lib import _format_impl

                read_header = _format_impl._read_array_header
            shape, fortran, dtype = read_header(fh, version, max_header_size=1 << 20)
    except (ValueError, SyntaxError, TypeError, OSError, EOFError, KeyError, MemoryError,
            RecursionError, tokenize.TokenError) as exc:
        # numpy's messages run to three lines (the header-size limit): the first one
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{where}: corrupt .npy header ({first})") from exc
    shape = tuple(int(s) for s in shape)
    check_declared_shape(shape, dtype, where)
    if dtype.hasobject:  # its data is a pickle, which bnstat never loads
        raise UnsupportedArray(f"{where}: dtype {dtype} holds Python objects; bnstat reads numeric "
                               "arrays only", shape=shape, dtype=dtype,
                               reason="object dtype: a pickle, never loaded")
    return shape, bool(fortran), dtype


MAX_DIMS = 32


def check_declared_shape(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """Refuse a shape no array can have: negative, over 32 dimensions, over 2**63 bytes."""
    if any(s < 0 for s in shape):
        raise InputError(f"{where}: corrupt .npy header: shape {shape} has a negative dimension",
                         "numpy cannot load it either; restore the file from its source.")
    if len(shape) > MAX_DIMS:
        raise InputError(f"{where}: a {len(shape)}-D array; bnstat reads up to {MAX_DIMS} dimensions",
                         "Reshape it first.")
    if math.prod(shape) * max(dtype.itemsize, 1) >= 1 << 63:
        raise InputError(f"{where}: corrupt .npy header: shape {shape} of {dtype} declares more "
                         "bytes than any file can hold")


def readinto_full(fh, view: memoryview) -> int:
    """readinto until ``view`` is full or the stream ends; the bytes read."""
    got = 0
    total = len(view)
    while got < total:
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class NpyStreamSource(ArraySource):
    """An array read sequentially from a stream that ``opener`` positions at its magic."""

    kind = "npy"

    def __init__(self, opener: Callable, name: str, path: str, kind: str = "npy",
                 data_size: int | None = None, repeatable: bool = True,
                 crc: int | None = None):
        self.opener = opener
        self.name = name
        self.path = path
        self.kind = kind
        self.repeatable = repeatable
        self.data_size = data_size
        self.crc = crc  # a stored zip member's CRC-32, checked as the data streams past
        self._pending = None
        fh = opener()
        try:
            self.shape, self.fortran, self.dtype = read_npy_header(fh, self.where)
            self.data_offset = fh.tell() if fh.seekable() else None
            check_dtype(self.dtype, self.where, self.shape)
            if data_size is not None and self.data_offset is not None:
                have = data_size - self.data_offset
                if have < self.nbytes:
                    raise InputError(
                        f"{self.where}: truncated: the header promises {self.nbytes} bytes of data "
                        f"(shape {self.shape}, {self.dtype}), the file holds {max(have, 0)}")
        except BaseException:
            fh.close()
            raise
        if repeatable:
            fh.close()
        else:
            self._pending = fh  # stdin: keep the stream, already past the header

    def _open_data(self):
        if self._pending is not None:
            fh, self._pending = self._pending, None
            return fh
        if not self.repeatable:
            raise InputError(f"{self.where}: standard input can be read only once",
                             "Save the stream to a file first.")
        fh = self.opener()
        read_npy_header(fh, self.where)
        return fh

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        """Where the rows lie: ``(first row, bytes after data_offset, rows)`` runs in row order
        (one for a .npy; RawRegionSource may have several)."""
        return [(0, 0, self.read_shape[0])]

    def iter_chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        fh = self._open_data()
        self._running_crc = None
        if self.crc is not None:  # the member's CRC covers its .npy header too
            with self.opener() as head:
                self._running_crc = zlib.crc32(head.read(self.data_offset))
        mapped = _mappable(fh, self.dtype.itemsize)
        self._watch = _watch(fh, self.where, mapped is not None)
        if self._watch is not None and not self._watch.leased:
            mapped = None  # no lease to stop a writer: a map could SIGBUS (bnstat/io/guard.py)
        try:
            if mapped is not None:
                yield from self._iter_mapped(fh, mapped, rows)
            else:
                yield from self._iter_read(fh, rows)
        finally:
            if self._watch is not None:
                self._watch.release()

    def _check_changed(self) -> None:
        if getattr(self, "_watch", None) is not None:
            self._watch.check()

    def _update_crc(self, raw) -> None:
        if self._running_crc is not None:
            self._running_crc = zlibx.crc32(raw, self._running_crc)

    def _check_crc(self) -> None:
        """Compare the CRC-32 of the whole member (trailing bytes included) with the zip's."""
        if self._running_crc is None:
            return
        crc = self._running_crc
        end = self.data_offset + self.nbytes
        if self.data_size > end:
            with self.opener() as fh:  # bytes after the array: in blocks, never all at once
                fh.seek(end)
                while block := fh.read(1 << 20):
                    crc = zlib.crc32(block, crc)
        if crc != self.crc:
            raise InputError(f"{self.where}: corrupt zip member (bad CRC-32: the data was damaged)",
                             "numpy's np.load refuses it too; restore the file from its source.")

    def verify_crc(self) -> None:
        """Check the whole member's CRC-32 now, reading it in blocks: for a member whose slabs
        other processes compute (``--scheduler``), which no single reader sees whole.
        Raises InputError."""
        if self.crc is None:
            return
        crc, left = 0, self.data_size
        with self.opener() as fh:
            while left > 0 and (block := fh.read(min(left, 4 << 20))):
                crc = zlibx.crc32(block, crc)
                left -= len(block)
        if left or crc != self.crc:
            raise InputError(f"{self.where}: corrupt zip member (bad CRC-32: the data was damaged)",
                             "numpy's np.load refuses it too; restore the file from its source.")

    def _iter_mapped(self, fh, offset: int, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Chunks as windows of one read-only memory map of the file.

        No copy: the kernels read the page cache directly (a 64 MiB
        ``readinto`` ran at 6.3 GB/s (measured), about what the 2-thread
        kernel needs for itself). A thread populates the map ahead of the
        window in use (bnstat/io/readahead.py: cold, the disk reads while the
        kernels compute) and a window is dropped with MADV_DONTNEED once the
        consumer asks for the next one, so resident memory (file pages mapped
        into the process count) stays one window and a half whatever the file size.
        """
        shape = self.read_shape
        row_bytes = self.row_bytes
        segments = self.segments
        page = mmap.ALLOCATIONGRANULARITY
        base = offset - offset % page  # the map starts on a page; data at `lead`
        lead = offset - base
        length = lead + max(off + k * row_bytes for _, off, k in segments)
        try:
            mm = mmap.mmap(fh.fileno(), length, access=mmap.ACCESS_READ, offset=base)
        except (OSError, ValueError):
            yield from self._iter_read(fh, rows)
            return
        whole = np.frombuffer(mm, np.uint8)
        advise = hasattr(mm, "madvise")
        populate = advise
        prefetch = None

        def span(start, r):  # the page-aligned byte range of the window of r rows at `start`
            lo = start - start % page
            return lo, start + r * row_bytes - lo

        try:
            if advise:
                mm.madvise(mmap.MADV_SEQUENTIAL)
                window = rows * row_bytes + page
                prefetch = MapPrefetcher(mm, 0, length, window=window, page=page,
                                         ahead=_ahead(window, page))
            for first, off, r0, r in _windows(segments, rows):
                self._check_changed()  # a writer waits on the lease: stop before it truncates
                start = lead + off + r0 * row_bytes
                if populate and not (prefetch is not None and prefetch.wait(sum(span(start, r)))):
                    try:  # map the window's pages in one call, not by faults
                        mm.madvise(MADV_POPULATE_READ, *span(start, r))
                    except OSError:
                        populate = False  # kernel before 5.14
                self._update_crc(whole[start:start + r * row_bytes])
                if first + r0 + r == shape[0]:
                    self._check_crc()  # before the last chunk is used: a bad member yields no result
                    self._check_changed()
                chunk = whole[start:start + r * row_bytes].view(self.dtype).reshape((r,) + shape[1:])
                if not chunk.dtype.isnative:
                    chunk = chunk.astype(chunk.dtype.newbyteorder("="))  # a copy, bounded by the chunk
                yield first + r0, chunk
                del chunk
                if advise:  # asked for the next chunk: done with this window (ArraySource)
                    mm.madvise(mmap.MADV_DONTNEED, *span(start, r))
                    if prefetch is not None:  # then the thread may read past the next one
                        prefetch.advance(sum(span(start, r)))
        finally:
            if prefetch is not None:
                prefetch.close()  # joined before the map goes
            del whole
            try:
                mm.close()
            except BufferError:
                pass  # the consumer still holds the last chunk; the map goes with it
            fh.close()

    def _iter_read(self, fh, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        shape = self.read_shape
        row_bytes = self.row_bytes
        buf = np.empty(rows * row_bytes, np.uint8)
        try:
            for first, off, w0, r in _windows(self.segments, rows):
                if off and not w0:  # a later run of the file (RawRegionSource)
                    fh.seek(self.data_offset + off)
                r0 = first + w0
                nb = r * row_bytes
                self._check_changed()
                got = readinto_full(fh, memoryview(buf)[:nb])
                if got < nb:
                    self._check_changed()  # truncated by another program, or on disk
                    raise InputError(
                        f"{self.where}: truncated: the data ends after {r0 * row_bytes + got} of "
                        f"{self.nbytes} bytes (shape {self.shape}, {self.dtype})")
                self._update_crc(buf[:nb])
                if r0 + r == shape[0]:
                    self._check_crc()
                    self._check_changed()
                chunk = buf[:nb].view(self.dtype).reshape((r,) + shape[1:])
                yield r0, native(chunk)
        except zlib.error as exc:
            raise InputError(f"{self.where}: corrupt compressed data ({exc})") from exc
        finally:
            fh.close()


class RawRegionSource(NpyStreamSource):
    """An array whose C-order bytes lie in runs of a regular file, ``(first row, file
    offset, rows)`` in row and file order (an HDF5 dataset's contiguous storage, or its
    whole-row chunks: bnstat.io.hdf5.raw_extents), read by the .npy reader: one read-only
    map over them all, populated ahead by a thread across the runs (the few bytes between
    runs too), leased against writers; or read into a buffer. A chunk never spans two runs."""

    def __init__(self, path: str, name: str, runs, shape: tuple[int, ...], dtype: np.dtype):
        offset = runs[0][1]
        self._segments = [(first, off - offset, n) for first, off, n in runs]
        self.path = path
        self.name = name
        self.kind = "hdf5"
        self.repeatable = True
        self.data_size = None
        self.crc = None
        self._pending = None
        self.opener = lambda: open(path, "rb")
        self.data_offset = offset
        self.shape = tuple(shape)
        self.fortran = False
        self.dtype = np.dtype(dtype)

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        return self._segments

    def _open_data(self):
        fh = self.opener()
        fh.seek(self.data_offset)
        return fh


def _windows(segments, rows: int):
    """``(first row of the run, its bytes after the data start, row in the run, rows)`` of
    every window: ``rows`` rows at most, in order, none across two runs."""
    for first, off, n in segments:
        for sl in slabs(n, rows):
            yield first, off, sl.start, sl.stop - sl.start


def _watch(fh, where: str, lease: bool):
    """A guard.Watch on the regular file under ``fh`` (None for a pipe or a compressed member)."""
    from bnstat.io.guard import Watch

    raw = fh.fh if isinstance(fh, _Window) else fh
    if not isinstance(raw, io.BufferedReader):
        return None
    try:
        fd = raw.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
    except (OSError, ValueError):
        return None
    return Watch(fd, where, lease=lease)


def _mappable(fh, itemsize: int) -> int | None:
    """The file offset of the data if ``fh`` is a regular file (or a stored zip
    member of one) whose data can be memory-mapped aligned to its dtype."""
    raw = fh.fh if isinstance(fh, _Window) else fh
    if not isinstance(raw, io.BufferedReader):
        return None
    try:
        if not stat.S_ISREG(os.fstat(raw.fileno()).st_mode):
            return None
        offset = raw.tell()
    except (OSError, ValueError):
        return None
    if offset % itemsize == 0 or _UNALIGNED_OK:
        return offset
    return None


# np.savez puts a member's data at an odd offset (30-byte zip header, the name,
# a 20-byte zip64 extra field, the .npy header: 183 for "x.npy"). numba types
# such a view as an ordinary (aligned) array, and the compiled loops read it
# correctly where the hardware allows misaligned loads, as x86-64 and arm64 do
# (the kernels' loads carry the element's alignment, never a vector's).
# Measured on a 1 GB stored member: mapped 12 GB/s, read into a buffer 2.7 GB/s
# (bench/README.md). Elsewhere such members are read into an aligned buffer.
_UNALIGNED_OK = platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64")


def _open_file(path: str):
    return open_input(path)


def npy_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def open_npy(path: str) -> list[ArraySource]:
    size = os.stat(path).st_size
    if size == 0:
        raise InputError(f"{path}: empty file")
    return [NpyStreamSource(lambda: _open_file(path), npy_name(path), path, "npy", data_size=size)]


class _Window:
    """A read-only view of ``length`` bytes of a file from ``offset`` (a stored zip member)."""

    def __init__(self, path: str, offset: int, length: int):
        self.fh = _open_file(path)
        self.fh.seek(offset)
        self.start = offset
        self.end = offset + length

    def read(self, n=-1):
        left = self.end - self.fh.tell()
        n = left if n is None or n < 0 else min(n, left)
        return self.fh.read(max(n, 0))

    def readinto(self, b):
        left = self.end - self.fh.tell()
        view = memoryview(b)
        if left < len(view):
            view = view[:max(left, 0)]
        return self.fh.readinto(view)

    def tell(self):
        return self.fh.tell() - self.start

    def seek(self, pos):
        self.fh.seek(self.start + pos)

    def seekable(self):
        return True

    def fileno(self):
        return self.fh.fileno()

    def close(self):
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Inflated:
    """The bytes of a deflated zip member, decompressed as they are read.

    zipfile's member object has no ``readinto``: io's fallback calls
    ``read(n)``, which builds each chunk as ``bytes`` by concatenation before
    copying it into the caller's buffer (388 MB peak RSS at --chunk-size
    64MiB, bench/README.md). Here ``readinto`` decompresses into the caller's
    buffer at most ``OUT`` bytes at a time, from ``PIECE`` bytes of
    compressed data, so memory is the caller's buffer plus a few MiB. The
    CRC-32 is the caller's to check (NpyStreamSource does, as zipfile would).
    Seeks go forward only (by decompressing), which is all the reader needs.
    """

    PIECE = 1 << 20
    OUT = 4 << 20

    def __init__(self, path: str, offset: int, compress_size: int):
        self.raw = _Window(path, offset, compress_size)
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # a zip member is raw deflate
        self.pending = b""
        self.pos = 0

    def readinto(self, b) -> int:
        view = memoryview(b).cast("B")
        want = min(len(view), self.OUT)
        while want:
            if not self.pending:
                if self.inflater.eof:
                    return 0
                self.pending = self.raw.read(self.PIECE)
                if not self.pending:
                    return 0  # the compressed data ends early: the caller says truncated
            out = self.inflater.decompress(self.pending, want)
            self.pending = self.inflater.unconsumed_tail
            if out:
                n = len(out)
                view[:n] = out
                self.pos += n
                return n
        return 0

    def read(self, n=-1) -> bytes:
        if n is None or n < 0:
            parts = []
            while True:
                part = self.read(self.OUT)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        buf = bytearray(n)
        got = readinto_full(self, memoryview(buf))
        return bytes(buf[:got])

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int) -> None:
        if pos < self.pos:
            raise io.UnsupportedOperation("a deflated member is read forward only")
        scratch = bytearray(min(self.OUT, pos - self.pos))
        while self.pos < pos:
            view = memoryview(scratch)[:pos - self.pos]
            if not self.readinto(view):
                break

    def close(self) -> None:
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stored_offset(path: str, info: zipfile.ZipInfo) -> int:
    with _open_file(path) as fh:
        fh.seek(info.header_offset)
        header = fh.read(_ZIP_LOCAL_HEADER)
    if len(header) != _ZIP_LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        raise InputError(f"{path}:{info.filename}: corrupt zip local header")
    name_len = int.from_bytes(header[26:28], "little")
    extra_len = int.from_bytes(header[28:30], "little")
    return info.header_offset + _ZIP_LOCAL_HEADER + name_len + extra_len


def open_npz(path: str, *, check_crc: bool = True, selected: Callable | None = None,
             skipped: list | None = None) -> list[ArraySource]:
    """The members of a .npz, streamed (stored members read straight from the file).

    Each member's CRC-32 is checked as it is read, unless ``check_crc`` is False.
    ``selected(name)`` False: the member is left out unread (only the zip's listing
    names it). A member of a dtype moments cannot use (string, object...) that no
    pattern selected (``selected`` None) goes to ``skipped`` as a SkippedArray when a
    list is given; otherwise it raises UnsupportedArray, like a corrupt member InputError.
    """
    try:
        with _open_file(path) as fh, zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: not a valid .npz (zip) file ({exc})") from exc
    sources = []
    for info in infos:
        if info.is_dir():
            continue
        name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        explicit = selected(name) if selected is not None else None
        if explicit is False:
            continue
        try:
            sources.append(_npz_member(path, info, name, check_crc))
        except UnsupportedArray as exc:
            if explicit or skipped is None:
                raise
            skipped.append(SkippedArray(path, name, exc.shape, exc.dtype, exc.reason))
    return sources


def _npz_member(path: str, info: zipfile.ZipInfo, name: str, check_crc: bool) -> ArraySource:
    """The source of one member of a .npz (its header parsed). Raises InputError."""
    where = f"{path}:{name}"
    if info.flag_bits & 0x1:
        raise InputError(f"{where}: the zip member is encrypted; bnstat cannot read it")
    if info.compress_type == zipfile.ZIP_STORED:
        offset = _stored_offset(path, info)

        def opener(offset=offset, info=info):
            return _Window(path, offset, info.file_size)

        return NpyStreamSource(opener, name, path, "npz", data_size=info.file_size,
                               crc=info.CRC if check_crc else None)
    if info.compress_type == zipfile.ZIP_DEFLATED:
        offset = _stored_offset(path, info)

        def opener(offset=offset, info=info):
            return _Inflated(path, offset, info.compress_size)

        try:
            src = NpyStreamSource(opener, name, path, "npz", data_size=info.file_size,
                                  crc=info.CRC if check_crc else None)
        except (zlib.error, EOFError) as exc:
            raise InputError(f"{where}: corrupt zip member ({exc})") from exc
        src.compression = "deflate"
        return src
    raise InputError(f"{where}: zip compression method {info.compress_type} is not supported")


def open_stdin() -> list[ArraySource]:
    stream = sys.stdin.buffer if sys.stdin is not None else None
    if stream is None:
        raise InputError("-: no standard input")
    try:
        if os.isatty(stream.fileno()):
            raise InputError("-: standard input is a terminal; pipe a .npy stream into bnstat",
                             "Example: python -c 'import numpy as np, sys; np.save(sys.stdout.buffer, a)' | bnstat moments -")
    except (OSError, ValueError, AttributeError):
        pass
    first = stream.peek(1)[:1] if hasattr(stream, "peek") else b"?"
    if not first:
        raise InputError("-: standard input is empty; expected a .npy stream")
    return [NpyStreamSource(lambda: stream, "stdin", "-", "stdin", repeatable=False)]
