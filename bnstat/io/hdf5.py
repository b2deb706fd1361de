"""HDF5 files: every numeric dataset of 2 or more dimensions, walked recursively.

Datasets are read in slabs along axis 0 aligned to the dataset's chunks, with
``read_direct`` into one reused buffer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from bnstat.errors import InputError
from bnstat.io.base import ArraySource, check_dtype

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _h5py():
    import h5py

    return h5py


def is_hdf5(path: str) -> bool:
    try:
        return _h5py().is_hdf5(path)
    except OSError:
        return False


def walk(path: str, h5file) -> Iterator[tuple[str, object, str | None]]:
    """Yield (name, dataset or None, problem) for every dataset below the root.

    ``problem`` describes a link that cannot be followed (a broken soft or
    external link); such entries have no dataset.
    """
    h5py = _h5py()

    def visit(group, prefix):
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

    def iter_chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        h5py = _h5py()
        n = self.shape[0]
        buf = np.empty((min(rows, n),) + self.shape[1:], self.dtype.newbyteorder("="))
        try:
            with h5py.File(self.path, "r") as f:
                ds = f[self.name]
                for r0 in range(0, n, rows):
                    r1 = min(n, r0 + rows)
                    ds.read_direct(buf, np.s_[r0:r1], np.s_[0:r1 - r0])
                    yield r0, buf[:r1 - r0]
        except (OSError, KeyError) as exc:
            raise InputError(f"{self.where}: cannot read ({exc})") from exc


def open_hdf5(path: str, selected) -> list[ArraySource]:
    """The numeric datasets of ``path`` of 2+ dimensions that ``selected(name)`` accepts.

    A selected dataset that cannot be read (non-numeric, broken link) is an
    error only when named by a pattern; when walking everything, non-numeric
    and scalar datasets are skipped (SPEC 2) but broken links are errors.
    """
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc
    sources = []
    with f:
        for name, ds, problem in walk(path, f):
            explicit = selected(name)
            if explicit is False:
                continue
            if problem:
                raise InputError(f"{path}:{name}: {problem}",
                                 "Fix the link, or leave the dataset out with -d.")
            numeric = ds.dtype.kind in "fiu" and ds.dtype.fields is None
            if explicit is None and (not numeric or ds.ndim < 2):
                continue  # walking everything: only numeric arrays of 2+ dimensions
            sources.append(Hdf5Source(path, name, ds))
    return sources
