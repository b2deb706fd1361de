"""Properties over files (issue 6, STYLE 11): for random shapes, layouts, norm
kinds, chunk sizes, dtypes, NaN positions and file formats,

- ``bnstat.moments`` of the file equals an independent float64 numpy reference
  written here (two passes, one row of values per unit);
- the input file is byte-for-byte unchanged after moments, normalize and info;
- normalize's output has the input's shape, and its dtype (float16/32/64 kept,
  integers become float32, SPEC 3).

Function-scoped fixtures do not mix with @given, so every example makes its
own temporary folder.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
import zipfile

import h5py
import numpy as np
import pytest
from conftest import run_inproc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnstat
from bnstat.errors import BnstatWarning

# hypothesis's failure report imports mypy_extensions, whose TypedDict warns under
# -W error and turns a falsifying example into a pytest INTERNALERROR
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

LETTERS = {2: "NC", 3: "NCL", 4: "NCHW"}
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8]
FORMATS = ["npy", "npy-fortran", "npz-stored", "npz-deflated", "h5", "h5-chunked"]


# ---- the reference ------------------------------------------------------------------------


def reference(x, layout, norm, groups, reduce, ddof):
    """Per-unit count, mean, var, min, max, nan_count in float64, from SPEC 1 alone."""
    a = np.asarray(x).astype(np.float64)
    c, n = layout.index("C"), layout.index("N")
    if reduce is not None:
        keep = [i for i, ch in enumerate(layout) if ch not in reduce]
    elif norm == "batch":
        keep = [c]
    elif norm == "layer":
        keep = [n]
    elif norm == "instance":
        keep = sorted([n, c])
    else:  # group: C splits into (G, C/G); axes after C move one place right
        size = a.shape[c]
        a = a.reshape(a.shape[:c] + (groups, size // groups) + a.shape[c + 1:])
        keep = sorted([n if n < c else n + 1, c])
    red = [i for i in range(a.ndim) if i not in keep]
    t = a.transpose(keep + red)
    unit_shape = t.shape[:len(keep)]
    rows = t.reshape(math.prod(unit_shape), -1)
    out = {k: np.full(rows.shape[0], np.nan) for k in ("mean", "var", "min", "max")}
    count = np.zeros(rows.shape[0], np.int64)
    nan_count = np.zeros(rows.shape[0], np.int64)
    for i, row in enumerate(rows):
        isnan = np.isnan(row)
        v = row[~isnan]
        nan_count[i] = isnan.sum()
        count[i] = v.size
        if v.size:
            mean = math.fsum(v.tolist()) / v.size
            out["mean"][i] = mean
            if v.size > ddof:
                out["var"][i] = math.fsum(((v - mean) ** 2).tolist()) / (v.size - ddof)
            out["min"][i], out["max"][i] = v.min(), v.max()
    res = {k: v.reshape(unit_shape) for k, v in out.items()}
    res["count"] = count.reshape(unit_shape)
    res["nan_count"] = nan_count.reshape(unit_shape)
    return res


# ---- examples -------------------------------------------------------------------------------


@st.composite
def cases(draw):
    ndim = draw(st.integers(2, 4))
    layout = "".join(draw(st.permutations(LETTERS[ndim])))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    c = layout.index("C")
    kind = draw(st.sampled_from(["batch", "layer", "instance", "group", "reduce"]))
    groups = reduce = None
    norm = kind
    if kind == "group":
        groups = draw(st.sampled_from([g for g in range(1, shape[c] + 1) if shape[c] % g == 0]))
    if kind == "reduce":
        norm = None
        kept = draw(st.sets(st.sampled_from(layout), min_size=1, max_size=ndim - 1))
        reduce = "".join(ch for ch in layout if ch not in kept)
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    size = math.prod(shape)
    if dtype.kind == "f":
        offset = draw(st.sampled_from([0.0, 1e3]))
        x = (rng.standard_normal(size) * 3 + offset).astype(dtype)
        nans = draw(st.lists(st.integers(0, size - 1), max_size=min(size, 4)))
        x[nans] = np.nan
    else:
        info = np.iinfo(dtype)
        x = rng.integers(max(info.min, -1000), min(info.max, 1000), size, endpoint=True).astype(dtype)
    x = x.reshape(shape)
    fmt = draw(st.sampled_from(FORMATS))
    chunk_size = draw(st.sampled_from([None, 1, 7, 64, 1000, 4096]))
    ddof = draw(st.sampled_from([0, 1]))
    return dict(x=x, layout=layout, norm=norm, groups=groups, reduce=reduce, fmt=fmt,
                chunk_size=chunk_size, ddof=ddof)


def write(folder, x, fmt) -> str:
    if fmt.startswith("npy"):
        path = os.path.join(folder, "acts.npy")
        np.save(path, np.asfortranarray(x) if fmt == "npy-fortran" else x)
    elif fmt.startswith("npz"):
        path = os.path.join(folder, "acts.npz")
        (np.savez_compressed if fmt == "npz-deflated" else np.savez)(path, acts=x)
        with zipfile.ZipFile(path) as zf:
            want = zipfile.ZIP_DEFLATED if fmt == "npz-deflated" else zipfile.ZIP_STORED
            assert zf.getinfo("acts.npy").compress_type == want
    else:
        path = os.path.join(folder, "acts.h5")
        with h5py.File(path, "w") as f:
            if fmt == "h5-chunked":
                f.create_dataset("grp/acts", data=x, chunks=(1,) + x.shape[1:])
            else:
                f["grp/acts"] = x
    return path


def sha256(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def api_kwargs(case):
    kw = dict(layout=case["layout"], groups=case["groups"], reduce=case["reduce"],
              chunk_size=case["chunk_size"], threads=1)
    if case["norm"] is not None:
        kw["norm"] = case["norm"]
    return kw


def check_moments(got, ref, x):
    finite = np.asarray(x, np.float64)
    finite = finite[np.isfinite(finite)]
    scale = max(1.0, float(np.abs(finite).max()) if finite.size else 1.0)
    np.testing.assert_array_equal(got.count, ref["count"], err_msg="count")
    np.testing.assert_array_equal(got.nan_count, ref["nan_count"], err_msg="nan_count")
    np.testing.assert_array_equal(got.min, ref["min"], err_msg="min")
    np.testing.assert_array_equal(got.max, ref["max"], err_msg="max")
    np.testing.assert_allclose(got.mean, ref["mean"], rtol=1e-10, atol=1e-12 * scale, err_msg="mean")
    np.testing.assert_allclose(got.var, ref["var"], rtol=1e-8, atol=1e-12 * scale * scale,
                               err_msg="var")


PROPS = settings(max_examples=60, deadline=None, derandomize=False,
                 suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(case=cases())
def test_moments_of_files_match_reference(case):
    x = case["x"]
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, x, case["fmt"])
        before = sha256(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BnstatWarning)
            result = bnstat.moments(path, ddof=case["ddof"], **api_kwargs(case))
        assert len(result) == 1
        got = next(iter(result.values()))
        ref = reference(x, case["layout"], case["norm"], case["groups"], case["reduce"], case["ddof"])
        assert tuple(got.mean.shape) == tuple(ref["mean"].shape)
        check_moments(got, ref, x)
        assert sha256(path) == before
        assert sorted(os.listdir(folder)) == [os.path.basename(path)]


def _expected_out_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(dtype) if np.dtype(dtype).kind == "f" else np.dtype(np.float32)


def _read_output(path, fmt):
    if fmt.startswith("npy"):
        return np.load(path)
    if fmt.startswith("npz"):
        with np.load(path) as z:
            assert z.files == ["acts"]
            return z["acts"]
    with h5py.File(path, "r") as f:
        return f["grp/acts"][()]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_commands_leave_the_input_unchanged(case):
    """moments (CLI, stats file out), normalize (API) and info (CLI) on one file."""
    x = case["x"]
    with tempfile.TemporaryDirectory() as folder:
        path = write(folder, x, case["fmt"])
        ext = os.path.splitext(path)[1]
        before = sha256(path)
        mtime = os.stat(path).st_mtime_ns

        args = ["moments", path, "--layout", case["layout"], "--ddof", str(case["ddof"]), "--threads", "1",
                "-q", "-o", os.path.join(folder, "stats.npz")]
        if case["reduce"] is not None:
            args += ["--reduce", case["reduce"]]
        else:
            args += ["--norm", case["norm"]]
        if case["groups"] is not None:
            args += ["--groups", str(case["groups"])]
        if case["chunk_size"] is not None:
            args += ["--chunk-size", str(case["chunk_size"])]
        rc, out, err = run_inproc(*args)
        assert rc == 0, err
        assert sha256(path) == before

        out_path = os.path.join(folder, "normed" + ext)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BnstatWarning)
            bnstat.normalize(path, out_path, **api_kwargs(case))
        assert sha256(path) == before
        y = _read_output(out_path, case["fmt"])
        assert y.shape == x.shape
        assert y.dtype == _expected_out_dtype(x.dtype), (y.dtype, x.dtype)

        rc, out, err = run_inproc("info", path, "--format", "json")
        assert rc == 0, err
        assert sha256(path) == before and os.stat(path).st_mtime_ns == mtime
        leftovers = [n for n in os.listdir(folder) if n.endswith(".bnstat-tmp")]
        assert leftovers == []
