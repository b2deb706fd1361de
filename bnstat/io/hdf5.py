"""HDF5 files: every numeric dataset of 2 or more dimensions, walked recursively.

Datasets are read in slabs along axis 0 aligned to the dataset's chunks: from
the file as a .npy is where the dataset's bytes lie in runs of the file
(``raw_extents``), else with ``read_direct`` into two reused buffers (deflated
chunks read raw and inflated by a pool of threads).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import numpy as np

from bnstat.errors import InputError
from bnstat.io.base import ArraySource, SkippedArray, check_dtype, dtype_problem, shape_problem


def _h5py():
    import h5py

    return h5py


def is_hdf5(path: str) -> bool:
    try:
        return _h5py().is_hdf5(path)
    except OSError:
        return False


def open_h5(path: str):
    """``h5py.File(path, "r")``, its failure an InputError naming the file."""
    try:
        return _h5py().File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc


def tracks_creation_order(group) -> bool:
    """Whether ``group`` iterates its links in creation order (else alphabetically)."""
    try:
        if isinstance(group, _h5py().File):  # the File's plist never reports order tracking,
            group = group["/"]  # even for h5py.File(..., track_order=True): the root group's does
        return bool(group.id.get_create_plist().get_link_creation_order())
    except Exception:  # noqa: BLE001 - an old HDF5 library: assume alphabetical
        return False


def walk(path: str, h5file, groups: list | None = None) -> Iterator[tuple[str, object, str | None]]:
    """Yield (name, dataset or None, problem) for every dataset below the root.

    ``problem`` describes a link that cannot be followed (a broken soft or
    external link); such entries have no dataset. ``groups``, if given,
    receives every group visited, the root first.
    """
    h5py = _h5py()
    seen: set = set()  # groups walked: a link back (soft, hard, external to itself) is a cycle

    def visit(group, prefix):
        try:
            info = h5py.h5o.get_info(group.id)
            ident = (info.fileno, info.addr)
        except (OSError, ValueError, AttributeError):
            ident = None
        if ident in seen:
            return
        seen.add(ident)
        if groups is not None:
            groups.append(group)
        for key in group:
            name = f"{prefix}{key}"
            link = group.get(key, getlink=True)
            try:
                obj = group[key]
            except (KeyError, OSError) as exc:
                if isinstance(link, h5py.ExternalLink):
                    problem = f"broken external link to {link.filename}:{link.path}"
                elif isinstance(link, h5py.SoftLink):
                    problem = f"broken soft link to {link.path}"
                else:
                    problem = f"cannot be read ({exc})"
                yield name, None, problem
                continue
            if isinstance(obj, h5py.Group):
                yield from visit(obj, name + "/")
            elif isinstance(obj, h5py.Dataset):
                yield name, obj, None

    yield from visit(h5file, "")


# registered HDF5 filter ids (https://github.com/HDFGroup/hdf5_plugins) whose
# name a file may leave out
_FILTER_NAMES = {307: "bzip2", 32000: "LZF", 32001: "Blosc", 32004: "LZ4", 32008: "Bitshuffle",
                 32013: "ZFP", 32015: "Zstandard", 32017: "SZ", 32026: "Blosc2"}


def check_filters(dataset, where: str) -> None:
    """Refuse, before reading, a dataset whose filter HDF5 does not have (a missing plugin).

    hdf5plugin, when installed, is imported first: it registers Blosc, LZ4,
    Zstd, Bitshuffle... HDF5's own message names a plugin folder, not the filter.
    """
    h5py = _h5py()
    plist = dataset.id.get_create_plist()
    missing = []
    for i in range(plist.get_nfilters()):
        code, _flags, _values, name = plist.get_filter(i)
        if not h5py.h5z.filter_avail(code):
            missing.append((code, name.decode("latin1", "replace") if isinstance(name, bytes) else name))
    if missing:
        try:
            import hdf5plugin  # noqa: F401 - registers the filters it ships
        except ImportError:
            pass
        missing = [(c, n) for c, n in missing if not h5py.h5z.filter_avail(c)]
    if missing:
        names = ", ".join(f"{n or _FILTER_NAMES.get(c, 'unnamed')} (id {c})" for c, n in missing)
        raise InputError(f"{where}: compressed with a filter HDF5 does not have here: {names}",
                         "Install hdf5plugin (pip install hdf5plugin), or the filter's plugin "
                         "in HDF5_PLUGIN_PATH.")


def stored_layout(dataset):
    """The dataset's ``layout`` attribute (``"NCHW"``) as text, None without one; a value
    that is no text comes back as it is, for ``layout.array_layout`` to refuse."""
    try:
        value = dataset.attrs.get("layout")
    except (OSError, RuntimeError, KeyError, TypeError, ValueError):
        return None  # an attribute HDF5 cannot read: as if there were none
    if isinstance(value, bytes | np.bytes_):
        value = value.decode("utf-8", "replace")
    return str(value) if isinstance(value, str) else value


class Hdf5Source(ArraySource):
    kind = "hdf5"

    def __init__(self, path: str, name: str, dataset):
        self.path = path
        self.name = name
        self.shape = tuple(int(s) for s in dataset.shape)
        self.dtype = dataset.dtype
        self.chunks = dataset.chunks
        self.compression = dataset.compression
        self.row_align = int(dataset.chunks[0]) if dataset.chunks else 1
        check_dtype(self.dtype, self.where)
        check_filters(dataset, self.where)
        # the data as runs of the file (no filter, whole-row chunks in order): read as a
        # .npy is (raw_extents); else two slab buffers, reading (or inflating) the next slab
        # while the caller computes on this one
        self.raw_runs = raw_extents(path, dataset)
        self.double_buffered = self.raw_runs is None
        self.layout = stored_layout(dataset)

    def iter_chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Slabs of ``rows`` rows (aligned to the dataset's chunks by the caller).

        Deflate-compressed datasets: the chunks of a slab are read raw
        (``read_direct_chunk``) and decompressed by a pool of threads
        (_iter_deflate; one core inflates about 0.12 GB/s, measured on these machines).
        Everything else: ``read_direct`` of the next slab runs in a thread.
        Either way the next slab is prepared while the caller computes on
        this one (two buffers; ``double_buffered`` tells the driver to halve
        the chunk size so memory stays one chunk).
        """
        if self.raw_runs is not None:
            from bnstat.io.npy import RawRegionSource

            yield from RawRegionSource(self.path, self.name, self.raw_runs, self.shape,
                                       self.dtype).iter_chunks(rows)
            return
        h5py = _h5py()
        n = self.shape[0]
        shape = (min(rows, n),) + self.shape[1:]
        dtype = self.dtype.newbyteorder("=")
        try:
            with h5py.File(self.path, "r") as f:
                ds = f[self.name]
                pipeline = _deflate_pipeline(ds)
                bufs = [np.empty(shape, dtype), np.empty(shape, dtype)]
                if pipeline is not None:
                    yield from _iter_deflate(ds, rows, bufs, pipeline)
                else:
                    yield from _iter_overlapped(ds, rows, bufs)
        except (OSError, KeyError) as exc:
            raise InputError(f"{self.where}: cannot read ({exc})") from exc


MAX_CHUNKS_LISTED = 1 << 16  # more chunks than this without chunk_iter: read through HDF5
MIN_EXTENT = 1 << 20  # more than MANY_RUNS runs shorter than this on average: read by HDF5
MANY_RUNS = 64
MAX_BETWEEN = 1 << 20  # bytes of other objects between the runs read along, beyond 1/64


def raw_extents(path: str, ds) -> list[tuple[int, int, int]] | None:
    """Where the C-order bytes of dataset ``ds`` lie in the file, as runs ``(first row, file
    offset, rows)`` in row order, or None.

    So they do for contiguous storage (one run), and for chunked storage whose chunks span
    whole rows (``chunks[1:] == shape[1:]``), are all written and unfiltered: chunks stored
    one after the other in row order form a run (h5py writes a dataset created with its
    data so, with the chunk index's nodes between some of them), in file order with little
    between them (1/64 of the data or 1 MiB at most). They are read as a .npy is: one memory map
    populated ahead by a thread, no copy (h5py's ``read_direct``
    copies each slab: bench/README.md, "HDF5 read as runs of the file"). Anything else, or
    any doubt (a user block, external or virtual storage, a compound dtype, over
    ``MANY_RUNS`` runs under ``MIN_EXTENT`` on average), is left to HDF5.
    """
    from h5py import h5d

    try:
        if ds.is_virtual or ds.external or ds.file.userblock_size:
            return None
        dtype = ds.dtype
        if dtype.kind not in "fiu" or dtype.fields is not None or dtype.subdtype is not None:
            return None
        shape = tuple(int(s) for s in ds.shape)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        if not shape or not shape[0] or not row_bytes:
            return None
        plist = ds.id.get_create_plist()
        if plist.get_nfilters():
            return None
        layout = plist.get_layout()
        if layout == h5d.CONTIGUOUS:
            offset = ds.id.get_offset()
            runs = None if offset is None else [(0, int(offset), shape[0])]
        elif layout == h5d.CHUNKED and tuple(ds.chunks[1:]) == shape[1:]:
            runs = _chunk_runs(ds, shape, dtype.itemsize)
        else:
            return None
        data = shape[0] * row_bytes
        if not runs or (len(runs) > MANY_RUNS and len(runs) * MIN_EXTENT > data):
            return None  # many short runs: a window each; HDF5 reads them in slabs
        size = os.path.getsize(path)
        ends = [offset + rows * row_bytes for _, offset, rows in runs]
        if ends[-1] > size or any(nxt[1] < end for nxt, end in zip(runs[1:], ends)):
            return None  # past the end, or runs out of file order: HDF5 reads it
        if ends[-1] - runs[0][1] - data > max(data // 64, MAX_BETWEEN):
            return None  # other objects between the runs: mapping them would read them too
        return runs
    except Exception:  # noqa: BLE001 - any doubt: the HDF5 library reads it
        return None


def _chunk_runs(ds, shape, itemsize: int) -> list[tuple[int, int, int]] | None:
    """The runs of whole-row chunks stored one after the other in row order: ``(first row,
    file offset, rows)``; None unless every chunk is written, whole and unfiltered."""
    c0 = int(ds.chunks[0])
    size = math.prod(ds.chunks) * itemsize
    count = math.ceil(shape[0] / c0)
    dsid = ds.id
    if dsid.get_num_chunks() != count:  # an unwritten chunk reads as the fill value
        return None
    found = []

    def visit(info):
        found.append((info.chunk_offset[0], info.byte_offset, info.size, info.filter_mask))

    if hasattr(dsid, "chunk_iter"):
        dsid.chunk_iter(visit)
    elif count <= MAX_CHUNKS_LISTED:
        for i in range(count):
            visit(dsid.get_chunk_info(i))
    else:
        return None
    found.sort()
    if len(found) != count:
        return None
    runs: list[list[int]] = []
    for k, (row, offset, nbytes, mask) in enumerate(found):
        if row != k * c0 or nbytes != size or mask or offset is None:
            return None
        if runs and offset == runs[-1][1] + runs[-1][2] // c0 * size:
            runs[-1][2] += c0
        else:
            runs.append([row, int(offset), c0])
    runs[-1][2] -= count * c0 - shape[0]  # the last chunk holds the last rows only
    return [tuple(r) for r in runs]


def _read_slab(ds, buf, r0, r1):
    ds.read_direct(buf, np.s_[r0:r1], np.s_[0:r1 - r0])
    return buf[:r1 - r0]


def _iter_overlapped(ds, rows, bufs):
    """read_direct of slab i+1 in a thread while slab i is in use."""
    from concurrent.futures import ThreadPoolExecutor

    n = ds.shape[0]
    starts = range(0, n, max(1, rows))  # the starts of stream.slabs(n, rows), lazily
    with ThreadPoolExecutor(1, thread_name_prefix="bnstat-h5read") as pool:
        pending = pool.submit(_read_slab, ds, bufs[0], 0, min(n, rows))
        for i, r0 in enumerate(starts):
            chunk = pending.result()
            if i + 1 < len(starts):
                r1 = starts[i + 1]
                pending = pool.submit(_read_slab, ds, bufs[(i + 1) % 2], r1, min(n, r1 + rows))
            yield r0, chunk
        # nothing pending: the last iteration submitted nothing


def _deflate_pipeline(ds):
    """('shuffle'?, level) if the dataset's only filters are deflate (and
    shuffle before it), which this module can undo itself; else None."""
    from h5py import h5z

    if ds.chunks is None:
        return None
    try:
        plist = ds.id.get_create_plist()
        codes = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    except Exception:  # noqa: BLE001 - any doubt: the HDF5 library reads it
        return None
    if codes == [h5z.FILTER_DEFLATE]:
        return (False,)
    if codes == [h5z.FILTER_SHUFFLE, h5z.FILTER_DEFLATE]:
        return (True,)
    return None


def _unshuffle(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """HDF5's shuffle filter undone: byte planes back to values."""
    arr = np.empty(raw.size, np.uint8)
    arr.reshape(-1, itemsize)[...] = raw.reshape(itemsize, -1).T
    return arr


def _place(chunk: np.ndarray, offset, shape, r0: int, out: np.ndarray) -> None:
    """Copy a decoded chunk at ``offset`` of a dataset of ``shape`` into the slab from row ``r0``
    (edge chunks are cut to the dataset)."""
    sel = tuple(slice(o, min(o + c, s)) for o, c, s in zip(offset, chunk.shape, shape, strict=True))
    src = chunk[tuple(slice(0, sl.stop - sl.start) for sl in sel)]
    out[(slice(sel[0].start - r0, sel[0].stop - r0),) + sel[1:]] = src


def _iter_deflate(ds, rows, bufs, pipeline):
    """Slabs of a deflate dataset, its chunks decompressed in parallel.

    The raw chunks (``read_direct_chunk``, serialized: h5py holds one lock)
    are inflated by a pool of threads (zlib and libdeflate release the GIL;
    see bnstat.io.zlibx), straight into the slab buffer where a chunk spans
    whole rows of the dataset and is not shuffled, else through a per-thread
    scratch buffer. The pool inflates slab i+1 into the second buffer while
    the caller computes on slab i.
    """
    import itertools
    import threading
    from concurrent.futures import ThreadPoolExecutor, wait

    from bnstat.io import zlibx

    shuffle = pipeline[0]
    n = ds.shape[0]
    cshape = tuple(int(c) for c in ds.chunks)
    itemsize = ds.dtype.itemsize
    cbytes = int(np.prod(cshape)) * itemsize
    grids = [range(0, s, c) for s, c in zip(ds.shape[1:], cshape[1:], strict=True)]
    # a chunk is c0 contiguous rows of a slab, in the slab's (native) byte order
    whole_rows = cshape[1:] == tuple(ds.shape[1:]) and ds.dtype.isnative
    dsid = ds.id
    lock = threading.Lock()
    local = threading.local()

    def scratch():
        b = getattr(local, "buf", None)
        if b is None:
            b = local.buf = np.empty(cbytes, np.uint8)
        return b

    def decode(r0, offset, out):
        with lock:
            mask, raw = dsid.read_direct_chunk(offset)
        if mask:
            raise ValueError("a filter was skipped for this chunk")
        c0 = offset[0] - r0
        if whole_rows and not shuffle and offset[0] + cshape[0] <= n:
            zlibx.inflate_into(raw, out[c0:c0 + cshape[0]].reshape(-1).view(np.uint8))
            return
        tmp = scratch()
        zlibx.inflate_into(raw, tmp)
        arr = _unshuffle(tmp, itemsize) if shuffle else tmp
        _place(arr.view(ds.dtype).reshape(cshape), offset, ds.shape, r0, out)

    def submit(pool, i):
        r0 = starts[i]
        r1 = min(n, r0 + rows)
        out = bufs[i % 2]
        offsets = [(c0,) + rest for c0 in range(r0, r1, cshape[0])
                   for rest in itertools.product(*grids)]
        return [pool.submit(decode, r0, off, out) for off in offsets]

    starts = range(0, n, max(1, rows))  # the starts of stream.slabs(n, rows), lazily
    with ThreadPoolExecutor(zlibx.workers(), thread_name_prefix="bnstat-inflate") as pool:
        pending = submit(pool, 0)
        try:
            for i, r0 in enumerate(starts):
                r1 = min(n, r0 + rows)
                wait(pending)
                failed = any(fut.exception() is not None for fut in pending)
                pending = submit(pool, i + 1) if i + 1 < len(starts) else []
                buf = bufs[i % 2]
                if failed:
                    # an unallocated chunk, a skipped filter, a bad stream: HDF5 reads the slab
                    # (and reports a corrupt chunk as an error of its own)
                    ds.read_direct(buf, np.s_[r0:r1], np.s_[0:r1 - r0])
                yield r0, buf[:r1 - r0]
        finally:
            for fut in pending:
                fut.cancel()
            wait(pending)  # nothing writes into a buffer after the caller is gone


@contextlib.contextmanager
def _corrupt(path: str):
    """What HDF5 raises on a damaged file while it is walked, as an InputError."""
    try:
        yield
    except RecursionError as exc:
        raise InputError(f"{path}: groups nested too deep to walk") from exc
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{path}: corrupt HDF5 file ({first})") from exc


def open_hdf5(path: str, selected, skipped: list | None = None) -> list[ArraySource]:
    """The numeric datasets of ``path`` of 2+ dimensions that ``selected(name)`` accepts.

    A selected dataset that cannot be read (non-numeric, broken link) is an
    error only when named by a pattern; when walking everything, non-numeric
    and scalar datasets are skipped (README, inputs), quietly (``skipped``
    collects them, for ``bnstat info``), but broken links are errors.
    """
    sources = []
    with open_h5(path) as f, _corrupt(path):
        for name, ds, problem in walk(path, f):
            explicit = selected(name)
            if explicit is False:
                continue
            if problem:
                raise InputError(f"{path}:{name}: {problem}",
                                 "Fix the link, or leave the dataset out with -d.")
            numeric = ds.dtype.kind in "fiu" and ds.dtype.fields is None
            if explicit is None and (not numeric or ds.ndim < 2):
                if skipped is not None:  # walking everything: only numeric arrays of 2+ dimensions
                    shape = tuple(ds.shape) if ds.shape is not None else None
                    reason = dtype_problem(ds.dtype) or (shape_problem(shape) if shape is not None
                                                         else "no dataspace")
                    skipped.append(SkippedArray(path, name, shape, ds.dtype, reason, warn=False))
                continue
            sources.append(Hdf5Source(path, name, ds))
    return sources
