"""The readers (SPEC 2) through bnstat.moments(path): .npy, .npz, HDF5, several
files, -d selection, against the float64 reference of the same data."""

from __future__ import annotations

import json
import os
import tracemalloc

import h5py
import numpy as np
import pytest
from conftest import moments_on_few_threads, npy_bytes, run_inproc
from helpers import assert_fails
from reference import assert_matches, ref_moments

import bnstat
from bnstat.errors import BnstatError, InputError

CASES = [("NCHW", "batch", None), ("NHWC", "batch", None), ("NHWC", "group", 2),
         ("NCL", "instance", None), ("NLC", "layer", None)]
SHAPES = {"NCHW": (10, 4, 3, 5), "NHWC": (10, 3, 5, 4), "NCL": (10, 4, 7), "NLC": (10, 7, 4)}


moments = moments_on_few_threads


def data(shape, rng, dtype=np.float64):
    return rng.normal(-1.0, 2.5, size=shape).astype(dtype)


def chunk_bytes(x, rows):
    return max(1, rows * (x.nbytes // x.shape[0]))


ROWS = [1, 3, 10]  # one row, a ragged split (3+3+3+1), the whole array


# ---- .npy ---------------------------------------------------------------------

@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("order", ["C", "F", "swapped", "swapped_F"])
@pytest.mark.parametrize("layout,norm,groups", CASES)
def test_npy(tmp_path, rng, layout, norm, groups, order, rows):
    x = data(SHAPES[layout], rng, np.float32)
    if order in ("swapped", "swapped_F"):
        x = x.astype(">f4")
    if order in ("F", "swapped_F"):
        x = np.asfortranarray(x)
    path = tmp_path / "acts.npy"
    np.save(path, x)
    before = path.read_bytes()
    got = moments(str(path), layout=layout, norm=norm, groups=groups,
                         chunk_size=chunk_bytes(x, rows))
    assert list(got) == ["acts"]
    assert_matches(got["acts"], ref_moments(x, layout, norm, groups), x)
    assert path.read_bytes() == before


def test_npy_fortran_header_is_what_we_test(tmp_path, rng):
    x = np.asfortranarray(data((4, 3, 5), rng))
    np.save(tmp_path / "f.npy", x)
    with open(tmp_path / "f.npy", "rb") as fh:
        assert np.lib.format.read_magic(fh) == (1, 0)
        _, fortran, _ = np.lib.format.read_array_header_1_0(fh)
    assert fortran


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "int16", "int32",
                                   "int64", "uint8", "uint16", ">i4", ">f8"])
def test_npy_dtypes(tmp_path, rng, dtype):
    x = (rng.normal(0, 50, size=(9, 3, 4))).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    got = moments(str(tmp_path / "x.npy"), layout="NCL", chunk_size=chunk_bytes(x, 2))
    assert_matches(got["x"], ref_moments(x, "NCL"), x)


def test_pathlike_and_list_sources(tmp_path, rng):
    x = data((6, 4), rng)
    np.save(tmp_path / "a.npy", x)
    got = moments(tmp_path / "a.npy", layout="NC")
    assert_matches(got["a"], ref_moments(x, "NC"), x)
    got = moments([tmp_path / "a.npy"], layout="NC")
    assert_matches(got["a"], ref_moments(x, "NC"), x)


# ---- .npz ---------------------------------------------------------------------

@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("saver", ["savez", "savez_compressed"])
@pytest.mark.parametrize("layout,norm,groups", CASES)
def test_npz(tmp_path, rng, layout, norm, groups, saver, rows):
    a = data(SHAPES[layout], rng, np.float32)
    b = np.asfortranarray(data(SHAPES[layout], rng))
    c = (rng.integers(0, 255, size=SHAPES[layout])).astype(np.uint8)
    path = tmp_path / "acts.npz"
    getattr(np, saver)(path, first=a, second=b, third=c)
    got = moments(str(path), layout=layout, norm=norm, groups=groups,
                         chunk_size=chunk_bytes(a, rows))
    assert list(got) == ["first", "second", "third"]
    for name, x in (("first", a), ("second", b), ("third", c)):
        assert_matches(got[name], ref_moments(x, layout, norm, groups), x)


def test_npz_skips_nothing_silently_and_names_members(tmp_path, rng):
    a = data((4, 3), rng)
    np.savez(tmp_path / "m.npz", **{"layer1.out": a})
    got = moments(str(tmp_path / "m.npz"), layout="NC")
    assert list(got) == ["layer1.out"]


# ---- HDF5 -------------------------------------------------------------------------

def make_h5(path, arrays: dict, *, chunk_rows=3, compression="gzip"):
    with h5py.File(path, "w") as f:
        for name, x in arrays.items():
            kwargs = {}
            if chunk_rows:
                kwargs["chunks"] = (chunk_rows,) + tuple(x.shape[1:])
            if compression:
                kwargs["compression"] = compression
            f.create_dataset(name, data=x, **kwargs)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("chunked", ["gzip", "chunked", "contiguous"])
@pytest.mark.parametrize("layout,norm,groups", CASES)
def test_hdf5(tmp_path, rng, layout, norm, groups, chunked, rows):
    # N = 10 with chunks of 3 rows: a last chunk of 1 row
    a = data(SHAPES[layout], rng, np.float32)
    b = data(SHAPES[layout], rng, np.float64)
    path = tmp_path / "acts.h5"
    make_h5(path, {"features/block1/conv": a, "features/block2/deep/conv": b},
            chunk_rows=None if chunked == "contiguous" else 3,
            compression="gzip" if chunked == "gzip" else None)
    got = moments(str(path), layout=layout, norm=norm, groups=groups,
                         chunk_size=chunk_bytes(a, rows))
    assert sorted(got) == ["features/block1/conv", "features/block2/deep/conv"]
    assert_matches(got["features/block1/conv"], ref_moments(a, layout, norm, groups), a)
    assert_matches(got["features/block2/deep/conv"], ref_moments(b, layout, norm, groups), b)


def test_hdf5_skips_what_is_not_a_numeric_array(tmp_path, rng):
    a = data((10, 4, 6), rng)
    path = tmp_path / "mixed.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("g/acts", data=a, chunks=(3, 4, 6))
        f.create_dataset("g/labels", data=np.arange(10))  # 1-D
        f.create_dataset("g/name", data=np.array([b"abc", b"de"]))  # strings
        f.create_dataset("scalar", data=3.0)
        f["g"].attrs["note"] = "attributes are not datasets"
    got = moments(str(path), layout="NCL")
    assert list(got) == ["g/acts"]
    assert_matches(got["g/acts"], ref_moments(a, "NCL"), a)


def test_hdf5_integer_dataset(tmp_path, rng):
    x = rng.integers(-1000, 1000, size=(10, 3, 4)).astype(np.int16)
    make_h5(tmp_path / "i.h5", {"i": x})
    got = moments(str(tmp_path / "i.h5"), layout="NCL", chunk_size=1)
    assert_matches(got["i"], ref_moments(x, "NCL"), x)


def test_hdf5_chunk_rows_larger_than_chunk_size(tmp_path, rng):
    """A chunk size below one HDF5 chunk still reads whole (aligned) chunks correctly."""
    x = data((10, 4, 5), rng)
    make_h5(tmp_path / "c.h5", {"x": x}, chunk_rows=4)
    got = moments(str(tmp_path / "c.h5"), layout="NCL", norm="instance", chunk_size=1)
    assert_matches(got["x"], ref_moments(x, "NCL", "instance"), x)


# ---- -d patterns ---------------------------------------------------------------------

@pytest.fixture
def nested(tmp_path, rng):
    arrays = {"features/block1/conv": data((5, 3, 4), rng), "features/block2/conv": data((5, 3, 4), rng),
              "features/block2/bn": data((5, 3, 4), rng), "head/fc": data((5, 3, 4), rng)}
    make_h5(tmp_path / "n.h5", arrays, chunk_rows=2)
    return str(tmp_path / "n.h5"), arrays


@pytest.mark.parametrize("patterns,want", [
    (["*conv"], ["features/block1/conv", "features/block2/conv"]),
    (["features/*"], ["features/block1/conv", "features/block2/conv", "features/block2/bn"]),
    (["*/block2/*"], ["features/block2/conv", "features/block2/bn"]),
    (["head/fc", "*bn"], ["features/block2/bn", "head/fc"]),
    (["features/block?/conv"], ["features/block1/conv", "features/block2/conv"]),
    (["*[12]/bn"], ["features/block2/bn"]),
])
def test_dataset_patterns(nested, patterns, want):
    path, arrays = nested
    got = moments(path, layout="NCL", dataset=patterns)
    assert sorted(got) == sorted(want)
    for name in want:
        assert_matches(got[name], ref_moments(arrays[name], "NCL"), arrays[name])


def test_dataset_pattern_matches_nothing(nested):
    path, _ = nested
    with pytest.raises(InputError, match=r"no array matches -d/dataset= nothing\*"):
        moments(path, layout="NCL", dataset="nothing*")


def test_dataset_pattern_on_npz_members(tmp_path, rng):
    a, b = data((4, 3), rng), data((4, 3), rng)
    np.savez(tmp_path / "z.npz", keep_me=a, drop_me=b)
    got = moments(str(tmp_path / "z.npz"), layout="NC", dataset="keep*")
    assert list(got) == ["keep_me"]


def test_selected_non_numeric_hdf5_dataset_is_an_error(tmp_path, rng):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("acts", data=data((4, 3), rng))
        f.create_dataset("names", data=np.array([[b"a", b"b"], [b"c", b"d"]]))
    with pytest.raises(InputError, match=r"names.*not supported"):
        moments(str(path), layout="NC", dataset="names")


# ---- several files --------------------------------------------------------------------

@pytest.mark.parametrize("layout,norm,groups", CASES)
@pytest.mark.parametrize("kind", ["npy", "npz", "h5", "mixed"])
def test_several_files_merge_along_n(tmp_path, rng, layout, norm, groups, kind):
    x = data((13,) + SHAPES[layout][1:], rng)
    cuts = [0, 4, 5, 13]
    paths = []
    for i in range(3):
        part = x[cuts[i]:cuts[i + 1]]
        k = kind if kind != "mixed" else ["npy", "npz", "h5"][i]
        d = tmp_path / f"shard{i}"
        d.mkdir()
        if k == "npy":
            p = d / "acts.npy"
            np.save(p, part)
        elif k == "npz":
            p = d / "part.npz"
            np.savez(p, acts=part)
        else:
            p = d / "part.h5"
            make_h5(p, {"acts": part}, chunk_rows=min(2, len(part)))
        paths.append(str(p))
    got = moments(paths, layout=layout, norm=norm, groups=groups, chunk_size=chunk_bytes(x, 2))
    assert list(got) == ["acts"]
    assert_matches(got["acts"], ref_moments(x, layout, norm, groups), x)
    assert got["acts"].shape == x.shape
    assert got["acts"].sources == paths


def test_several_files_layout_with_n_not_first(tmp_path, rng):
    """Merged along N, wherever N is."""
    x = data((4, 9, 3), rng)  # C N L
    np.save(tmp_path / "a.npy", x[:, :5])
    (tmp_path / "b").mkdir()
    np.save(tmp_path / "b" / "a.npy", x[:, 5:])
    got = moments([str(tmp_path / "a.npy"), str(tmp_path / "b" / "a.npy")], layout="CNL",
                         norm="instance")
    assert_matches(got["a"], ref_moments(x, "CNL", "instance"), x)


def test_per_file_keeps_arrays_apart(tmp_path, rng):
    x, y = data((6, 3, 4), rng), data((5, 3, 4), rng)
    make_h5(tmp_path / "a.h5", {"acts": x})
    make_h5(tmp_path / "b.h5", {"acts": y})
    paths = [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
    got = moments(paths, layout="NCL", per_file=True)
    assert len(got) == 2
    keys = list(got)
    assert paths[0] in keys[0] and paths[1] in keys[1]
    assert all(k.endswith("acts") for k in keys)
    assert_matches(got[keys[0]], ref_moments(x, "NCL"), x)
    assert_matches(got[keys[1]], ref_moments(y, "NCL"), y)


def test_several_files_with_disagreeing_shapes(tmp_path, rng):
    make_h5(tmp_path / "a.h5", {"acts": data((6, 3, 4), rng)})
    make_h5(tmp_path / "b.h5", {"acts": data((6, 3, 5), rng)})
    with pytest.raises(InputError, match=r"acts.*\(6, 3, 4\).*\(6, 3, 5\)"):
        moments([str(tmp_path / "a.h5"), str(tmp_path / "b.h5")], layout="NCL")


# ---- broken inputs (library side) --------------------------------------------------------

def test_truncated_npy(tmp_path, rng):
    path = tmp_path / "t.npy"
    np.save(path, data((8, 3, 4), rng))
    raw = path.read_bytes()
    path.write_bytes(raw[:-40])
    with pytest.raises(InputError, match=r"t\.npy.*truncated"):
        moments(str(path), layout="NCL")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.npy: no such file"):
        moments(str(tmp_path / "nope.npy"), layout="NC")


def test_corrupt_deflated_npz_member(tmp_path, rng):
    path = tmp_path / "c.npz"
    np.savez_compressed(path, a=data((50, 3, 8), rng))
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(BnstatError, match=r"c\.npz"):
        moments(str(path), layout="NCL")


def test_not_an_array_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt: unknown file format"):
        moments(str(path), layout="NC")


@pytest.mark.parametrize("saver", ["savez", "savez_compressed"])
def test_npz_reader_closes_its_files(tmp_path, rng, saver):
    """Every file the .npz reader opens is closed (no ResourceWarning on collection)."""
    import gc
    import warnings

    a = data((6, 3, 4), rng)
    getattr(np, saver)(tmp_path / "z.npz", a=a)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        got = moments(str(tmp_path / "z.npz"), layout="NCL")
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []
    assert_matches(got["a"], ref_moments(a, "NCL"), a)


# ---- moved from the acceptance audit --------------------------------------------------


@pytest.fixture(scope="module")
def sixteen_mb(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    a = np.random.default_rng(7).random((4000, 1000)).astype(np.float32)  # 16 MB
    np.savez(d / "stored.npz", a=a)
    np.savez_compressed(d / "deflated.npz", a=a)
    with h5py.File(d / "gzip.h5", "w") as f:
        f.create_dataset("a", data=a, chunks=(128, 1000), compression="gzip", compression_opts=1)
    return d, a


@pytest.mark.parametrize("name", ["stored.npz", "deflated.npz", "gzip.h5"])
def test_npz_members_and_hdf5_are_streamed_not_loaded_whole(sixteen_mb, name, tmp_path):
    """Peak Python/numpy allocations (tracemalloc) of moments and normalize with a 1 MiB chunk
    stay under half the 16 MB array: a reader that loads a member whole cannot pass."""
    d, a = sixteen_mb
    path = str(d / name)
    out = str(tmp_path / ("o" + os.path.splitext(name)[1]))
    # warm: imports, and the kernels compiled or loaded (compiling allocates a lot in Python)
    bnstat.moments(path, layout="NC", chunk_size=1 << 20)
    bnstat.normalize(path, out, layout="NC", norm="layer", chunk_size=1 << 20)
    os.unlink(out)
    tracemalloc.start()
    try:
        (got,) = bnstat.moments(path, layout="NC", chunk_size=1 << 20).values()
        peak_moments = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        bnstat.normalize(path, out, layout="NC", norm="layer", chunk_size=1 << 20)
        peak_normalize = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_moments < a.nbytes // 2, peak_moments
    assert peak_normalize < a.nbytes // 2, peak_normalize
    np.testing.assert_allclose(got.mean, a.astype(np.float64).mean(axis=0), rtol=1e-12)
    if name.endswith(".npz"):
        with np.load(out) as z:
            y = z["a"]
    else:
        with h5py.File(out, "r") as f:
            y = f["a"][()]
    rows = slice(0, 4000, 397)  # a sample of rows, against the float64 reference
    xa = a[rows].astype(np.float64)
    want = (xa - xa.mean(1, keepdims=True)) / np.sqrt(xa.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y[rows], want, rtol=0, atol=1e-5)


def test_npy_format_version_3(tmp_path):
    x = np.random.default_rng(15).normal(size=(6, 3, 4)).astype(np.float32)
    with open(tmp_path / "v3.npy", "wb") as fh:
        np.lib.format.write_array(fh, x, version=(3, 0))
    assert np.load(tmp_path / "v3.npy").shape == x.shape  # numpy reads it
    rc, out, err = run_inproc("moments", tmp_path / "v3.npy", "--layout", "NCL", "--format", "json")
    assert rc == 0, err
    rec = json.loads(out)["arrays"][0]
    ref = ref_moments(x, "NCL")
    np.testing.assert_allclose(rec["mean"], ref.mean, rtol=1e-12)
    rc, out, err = run_inproc("moments", "-", "--layout", "NCL", "--format", "csv",
                              input=(tmp_path / "v3.npy").read_bytes())
    assert rc == 0, err


def test_npy_unknown_format_version_is_a_clear_error(tmp_path):
    raw = bytearray(npy_bytes(np.ones((4, 3), np.float32)))
    raw[6:8] = bytes([9, 0])  # version 9.0
    (tmp_path / "v9.npy").write_bytes(bytes(raw))
    assert_fails(run_inproc("moments", tmp_path / "v9.npy", "--layout", "NC"), 1,
                 r"v9\.npy: .*(version|corrupt|not a \.npy)")
