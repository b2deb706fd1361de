"""HDF5 datasets whose bytes lie in one run of the file, read as a .npy is (io/hdf5.raw_extents).

The raw path must give the bytes HDF5 gives, and must be taken only where the file
proves the layout: contiguous storage, or whole-row chunks, all written, unfiltered,
one after the other in row order. Everything else goes through h5py as before.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import run_cli

h5py = pytest.importorskip("h5py")

import bnstat  # noqa: E402
from bnstat.io import open_sources  # noqa: E402
from bnstat.io.hdf5 import raw_extents  # noqa: E402

SHAPE = (37, 6, 5, 4)


def data(dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE) * 3 + 1
    return x.astype(dtype) if np.dtype(dtype).kind == "f" else (x * 20).astype(dtype)


def region(path, name):
    with h5py.File(path, "r") as f:
        return raw_extents(str(path), f[name])


def slabs(path, name, chunk_size, raw: bool):
    """The (row, chunk) pairs bnstat's reader yields, through the raw path or through h5py."""
    (src,) = open_sources([str(path)], [name], check_crc=True)
    if not raw:
        src.raw_runs = None
    rows = src.rows_for(chunk_size)
    return [(r0, chunk.copy()) for r0, chunk in src.iter_chunks(rows)]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", ">f4", ">f8", "int16", "uint8"])
@pytest.mark.parametrize("storage", ["contiguous", "chunks of 4 rows", "chunks of 1 row"])
def test_raw_path_yields_the_bytes_hdf5_reads(tmp_path, dtype, storage):
    x = data(dtype)
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        if storage == "contiguous":
            f["x"] = x
        else:
            f.create_dataset("x", data=x, chunks=(4 if "4" in storage else 1,) + SHAPE[1:])
    assert region(path, "x") is not None, "the layout this test is about"
    for chunk_size in (480 * x.itemsize, 7 * 480 * x.itemsize, x.nbytes):
        raw = slabs(path, "x", chunk_size, raw=True)
        ref = slabs(path, "x", chunk_size, raw=False)
        assert [r for r, _ in raw] == [r for r, _ in ref] or chunk_size == x.nbytes
        got = np.concatenate([c for _, c in raw])
        want = np.concatenate([c for _, c in ref])
        assert got.dtype == want.dtype and got.dtype.isnative
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, x.astype(x.dtype.newbyteorder("=")))


def test_the_same_statistics_bit_for_bit_as_the_npy_of_the_same_data(tmp_path):
    x = data("float32", seed=3)
    np.save(tmp_path / "a.npy", x)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("a", data=x, chunks=(4,) + SHAPE[1:])
    for chunk_size in ("2KiB", "64KiB", "64MiB"):
        h = bnstat.moments(tmp_path / "a.h5", layout="NCHW", chunk_size=chunk_size)["a"]
        n = bnstat.moments(tmp_path / "a.npy", layout="NCHW", chunk_size=chunk_size)["a"]
        for field in ("count", "mean", "var", "min", "max"):
            np.testing.assert_array_equal(getattr(h, field), getattr(n, field), err_msg=field)
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(h.mean, x64.mean(axis=(0, 2, 3)), rtol=1e-13)
        np.testing.assert_allclose(h.var, x64.var(axis=(0, 2, 3)), rtol=1e-12)


def _chunks_written_backwards(path):
    """Whole-row chunks stored in the reverse of row order (another dataset between each)."""
    x = data("float32")
    with h5py.File(path, "w") as f:
        d = f.create_dataset("x", shape=SHAPE, chunks=(4,) + SHAPE[1:], dtype="f4")
        for k, r0 in enumerate(reversed(range(0, SHAPE[0], 4))):
            d[r0:r0 + 4] = x[r0:r0 + 4]
            f[f"between{k}"] = np.ones((50, 50))
    return x


def _make(kind, path):
    x = data("float32")
    kw = {}
    if kind == "user block":
        kw["userblock_size"] = 512
    with h5py.File(path, "w", **kw) as f:
        if kind == "chunks cut across a row":
            f.create_dataset("x", data=x, chunks=(4, 3, 5, 4))
        elif kind == "gzip":
            f.create_dataset("x", data=x, chunks=(4,) + SHAPE[1:], compression="gzip")
        elif kind == "shuffle":
            f.create_dataset("x", data=x, chunks=(4,) + SHAPE[1:], shuffle=True)
        elif kind == "fletcher32":
            f.create_dataset("x", data=x, chunks=(4,) + SHAPE[1:], fletcher32=True)
        elif kind == "a chunk never written":
            d = f.create_dataset("x", shape=SHAPE, chunks=(4,) + SHAPE[1:], dtype="f4", fillvalue=2.5)
            d[:8] = x[:8]
            d[12:] = x[12:]
            x = x.copy()
            x[8:12] = 2.5
        elif kind == "user block":
            f["x"] = x
        elif kind == "external storage":
            f.create_dataset("x", data=x, external=[(str(path) + ".raw", 0, h5py.h5f.UNLIMITED)])
        else:
            raise AssertionError(kind)
    return x


FALLBACKS = ["chunks cut across a row", "gzip", "shuffle", "fletcher32", "a chunk never written",
             "user block", "external storage"]


@pytest.mark.parametrize("kind", FALLBACKS + ["chunks stored backwards"])
def test_other_layouts_are_read_by_hdf5_with_the_right_values(tmp_path, kind):
    path = tmp_path / "a.h5"
    x = _chunks_written_backwards(path) if kind == "chunks stored backwards" else _make(kind, path)
    assert region(path, "x") is None
    s = bnstat.moments(path, dataset="x", layout="NCHW", chunk_size="2KiB")["x"]
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(s.mean, x64.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_array_equal(s.min, x64.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(s.max, x64.max(axis=(0, 2, 3)))


def test_the_raw_path_is_taken_where_the_layout_is_proven(tmp_path):
    path = tmp_path / "a.h5"
    x = data("float32")
    with h5py.File(path, "w") as f:
        f["contiguous"] = x
        f.create_dataset("rows", data=x, chunks=(4,) + SHAPE[1:])
        f["compound"] = np.zeros((4, 3), dtype=[("a", "f4"), ("b", "f4")])
        f.create_dataset("empty", shape=(0, 6), dtype="f4")
    with h5py.File(path, "r") as f:
        for name in ("contiguous", "rows"):
            ((first, offset, rows),) = raw_extents(str(path), f[name])
            assert (first, rows) == (0, SHAPE[0])
            with open(path, "rb") as fh:  # the bytes at that offset are the array's
                fh.seek(offset)
                got = np.frombuffer(fh.read(x.nbytes), np.float32).reshape(SHAPE)
            np.testing.assert_array_equal(got, x)
        assert raw_extents(str(path), f["compound"]) is None
        assert raw_extents(str(path), f["empty"]) is None


def test_a_truncated_file_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f["x"] = data("float32")
    os.truncate(path, os.path.getsize(path) - 1000)
    before = path.read_bytes()
    rc, out, err = run_cli("moments", path, "--layout", "NCHW")
    assert rc == 1, err
    assert "a.h5" in err and "Traceback" not in err and "internal error" not in err
    assert path.read_bytes() == before


def test_normalize_of_a_raw_hdf5_dataset_equals_numpy(tmp_path):
    x = data("float32", seed=5)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("a", data=x, chunks=(2,) + SHAPE[1:])
    out = tmp_path / "y.h5"
    rc, _, err = run_cli("normalize", tmp_path / "a.h5", "-o", out, "--layout", "NCHW",
                         "--chunk-size", "4KiB")
    assert rc == 0, err
    x64 = x.astype(np.float64)
    m = x64.mean(axis=(0, 2, 3), keepdims=True)
    v = x64.var(axis=(0, 2, 3), keepdims=True)
    with h5py.File(out, "r") as f:
        y = f["a"][...]
    np.testing.assert_allclose(y, (x64 - m) / np.sqrt(v + 1e-5), rtol=1e-5, atol=1e-6)


def test_chunks_in_several_runs_of_the_file(tmp_path):
    """Past some dozens of chunks HDF5 puts its chunk index's nodes between them: the data
    is then several runs, mapped as one and read with the rows in order, none across two."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((801, 8, 32, 32)).astype(np.float32)  # 26 MB, 401 chunks
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(2, 8, 32, 32))
    runs = region(path, "x")
    assert runs is not None and len(runs) > 1, runs
    assert [r[0] for r in runs] == sorted(r[0] for r in runs) and runs[0][0] == 0
    assert [r[1] for r in runs] == sorted(r[1] for r in runs)
    assert sum(r[2] for r in runs) == x.shape[0]
    row_bytes = x[0].nbytes
    for chunk_size in (row_bytes * 3, row_bytes * 64, x.nbytes):
        got = slabs(path, "x", chunk_size, raw=True)
        assert [r for r, _ in got] == sorted(r for r, _ in got)
        starts = {first for first, _, _ in runs}
        for r0, c in got:  # no chunk crosses the start of a run
            assert not any(r0 < s < r0 + c.shape[0] for s in starts)
        np.testing.assert_array_equal(np.concatenate([c for _, c in got]), x)
    s = bnstat.moments(path, layout="NCHW", chunk_size="1MiB")["x"]
    np.testing.assert_allclose(s.mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_array_equal(s.count, np.full(8, x.size // 8))


def test_a_run_read_into_a_buffer_when_the_file_cannot_be_leased(tmp_path, monkeypatch):
    """Without a lease the runs are read with readinto, seeking to each run."""
    import bnstat.io.npy as npy

    monkeypatch.setattr(npy, "_mappable", lambda fh, itemsize: None)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((801, 8, 32, 32)).astype(np.float32)
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, chunks=(2, 8, 32, 32))
    assert len(region(path, "x")) > 1
    got = slabs(path, "x", x[0].nbytes * 50, raw=True)
    np.testing.assert_array_equal(np.concatenate([c for _, c in got]), x)
