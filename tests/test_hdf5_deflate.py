"""The parallel inflate reader of gzip HDF5 datasets (bnstat.io.hdf5._iter_deflate):
chunks that do or do not span whole rows, shuffle, edge chunks in every axis,
unallocated chunks, slab sizes from one chunk row to the whole dataset, with
libdeflate and with zlib. Every result against the float64 numpy reference,
and every slab against h5py's own read of the same rows."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
from reference import assert_matches, ref_moments

import bnstat
from bnstat.io.hdf5 import open_hdf5

CASES = [
    # shape, chunks, shuffle, dtype
    ((23, 4, 6, 5), (5, 4, 6, 5), False, np.float32),   # whole rows, ragged last chunk row
    ((23, 4, 6, 5), (5, 4, 6, 5), True, np.float32),    # shuffled
    ((17, 5, 7, 3), (4, 2, 3, 3), False, np.float64),   # edges in every axis
    ((17, 5, 7, 3), (4, 2, 3, 2), True, np.int16),
    ((9, 3, 4), (2, 3, 4), True, np.float16),
    ((30, 6), (7, 6), False, np.uint8),
]


@pytest.mark.parametrize("shape, chunks, shuffle, dtype", CASES)
@pytest.mark.parametrize("chunk_size", [1, 700, 1 << 30])
def test_gzip_dataset_moments(tmp_path, zlib_backend, shape, chunks, shuffle, dtype, chunk_size):
    rng = np.random.default_rng(sum(shape))
    if np.dtype(dtype).kind == "f":
        x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    else:
        x = rng.integers(0, 100, shape).astype(dtype)
    path = tmp_path / "g.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("a/b", data=x, chunks=chunks, compression="gzip", compression_opts=4,
                         shuffle=shuffle)
    layout = "NC" + "HWD"[: len(shape) - 2] if len(shape) > 2 else "NC"
    got = bnstat.moments(str(path), layout=layout, chunk_size=chunk_size)["a/b"]
    assert_matches(got, ref_moments(x, layout), x)

    (src,) = open_hdf5(str(path), lambda name: None)
    rows = src.rows_for(chunk_size)
    seen = 0
    for r0, slab in src.iter_chunks(rows):
        np.testing.assert_array_equal(slab, x[r0:r0 + slab.shape[0]])
        seen += slab.shape[0]
    assert seen == shape[0]


def test_unallocated_chunks_read_as_fill_value(tmp_path, zlib_backend):
    """Chunks never written have no raw data: the slab falls back to HDF5's read."""
    path = tmp_path / "sparse.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", shape=(20, 3, 4), dtype=np.float32, chunks=(2, 3, 4),
                              compression="gzip", fillvalue=7.0)
        ds[4:6] = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
        x = ds[...]
    got = bnstat.moments(str(path), layout="NCL", chunk_size=1 << 20)["x"]
    assert_matches(got, ref_moments(x, "NCL"), x)


# ---- moved from the acceptance audit --------------------------------------------------


@pytest.mark.parametrize("dtype", [">f4", ">i2", ">f8"])
def test_big_endian_gzip_hdf5_dataset(tmp_path, dtype):
    x = np.random.default_rng(14).normal(size=(9, 3, 5)) * 100
    data = x.astype(dtype)
    with h5py.File(tmp_path / "be.h5", "w") as f:
        f.create_dataset("a", data=data, chunks=(4, 3, 5), compression="gzip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the garbage overflows in the merges
        (got,) = bnstat.moments(str(tmp_path / "be.h5"), layout="NCL").values()
    assert_matches(got, ref_moments(data, "NCL"), data)
