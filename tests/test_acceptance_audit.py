"""Acceptance audit of issues 2, 3, 4 and 6: the points and "must do" bullets that
the rest of the suite left uncovered or only partly covered.

Each test names the issue and point it proves. References are independent of
bnstat: h5py / numpy reads of the files, float64 two-pass statistics
(tests/reference.py, written from SPEC 1), and the folding formula of SPEC 3
written out here. CLI tests pin the exit code and the message and check that
no traceback was printed.

The last section holds the regression tests of bugs the audit found
(bnstat/io/hdf5.py, bnstat/io/npy.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tomllib
import tracemalloc
import warnings

import h5py
import numpy as np
import pytest
from conftest import REPO, _env, npy_bytes, run_inproc
from reference import assert_matches, ref_moments

import bnstat

SAMPLE = os.path.join(REPO, "sample_data")


def assert_fails(result, code, pattern):
    """Exit code, a message matching ``pattern`` on stderr, no traceback, nothing on stdout."""
    rc, out, err = result
    assert rc == code, (rc, err)
    assert re.search(pattern, err), (pattern, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert out in ("", b""), out[:300]


def sha256(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def h5_arrays(path) -> dict[str, np.ndarray]:
    """Every numeric dataset of 2+ dimensions of an HDF5 file, read by h5py (SPEC 2)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.ndim >= 2 and obj.dtype.kind in "fiu":
                out[name] = obj[()]
        f.visititems(visit)
    return out


def table_blocks(text: str) -> list[list[str]]:
    """The tables of a `moments`/`show` run: lists of lines, split at the blank lines."""
    blocks, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def table_rows(block: list[str]) -> list[list[str]]:
    """The body rows of one rich table (cells split at the column separator)."""
    return [[c.strip() for c in line.split("│")] for line in block if "│" in line]


# ==== issue 2 =====================================================================


def test_issue2_acceptance1_readme_first_command_prints_a_table_per_layer():
    """Issue 2, acceptance 1: `bnstat moments sample_data/acts.h5 --layout NCHW`, run as the
    README says (from the repository, the default engine), prints one table per layer with
    the statistics of that layer."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert "bnstat moments sample_data/acts.h5 --layout NCHW" in readme
    env = _env()
    env.pop("BNSTAT_ENGINE", None)  # as a user runs it: engine chosen by size
    proc = subprocess.run([sys.executable, "-m", "bnstat", "moments", "sample_data/acts.h5",
                           "--layout", "NCHW"], cwd=REPO, env=env, capture_output=True, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert err == "" and "Traceback" not in err
    arrays = h5_arrays(os.path.join(SAMPLE, "acts.h5"))
    assert len(arrays) >= 2
    blocks = {b[0].split()[0]: b for b in table_blocks(out)}
    assert sorted(blocks) == sorted(arrays)
    for name, x in arrays.items():
        block = blocks[name]
        assert block[0] == (f"{name}  {tuple(x.shape)} {x.dtype} · layout NCHW · reduce NHW · "
                            f"{x.size:,} elements")
        ref = ref_moments(x, "NCHW")
        rows = table_rows(block)
        assert [int(r[0]) for r in rows] == list(range(x.shape[1]))  # every channel (<= 32)
        for r in rows:
            c = int(r[0])
            assert int(r[1].replace(",", "")) == ref.count[c]
            # the table prints 6 significant digits
            for col, want in ((2, ref.mean[c]), (3, ref.std[c]), (4, ref.var[c]),
                              (5, ref.min[c]), (6, ref.max[c])):
                assert float(r[col]) == pytest.approx(want, rel=1e-5, abs=1e-12), (name, c, col)
            assert r[7] == "0"


def test_issue2_sample_data_is_what_the_issue_asks_for():
    """Issue 2, sample_data bullet: 5 MB at most, the script that makes them, an HDF5 dump
    of several layers in nested groups (NCHW, chunked), an NHWC .npy, an .npz, and a
    model.npz in PyTorch state_dict naming (conv/BN/ReLU blocks and one linear+BN1d)."""
    names = os.listdir(SAMPLE)
    assert "make_samples.py" in names
    total = sum(os.path.getsize(os.path.join(SAMPLE, n)) for n in names)
    assert total <= 5 * 1000**2, total
    with h5py.File(os.path.join(SAMPLE, "acts.h5"), "r") as f:
        dsets = []
        f.visititems(lambda n, o: dsets.append((n, o.shape, o.chunks))
                     if isinstance(o, h5py.Dataset) else None)
    assert len(dsets) >= 2
    assert all(n.count("/") >= 2 for n, _, _ in dsets), dsets  # nested groups
    assert all(len(s) == 4 and c is not None for _, s, c in dsets), dsets  # NCHW, chunked
    nhwc = [n for n in names if n.endswith(".npy") and "nhwc" in n.lower()]
    assert nhwc and np.load(os.path.join(SAMPLE, nhwc[0]), mmap_mode="r").ndim == 4
    with np.load(os.path.join(SAMPLE, "acts.npz")) as z:
        assert z.files and all(z[k].ndim >= 2 for k in z.files)
    with np.load(os.path.join(SAMPLE, "model.npz")) as z:
        keys = set(z.files)
        shapes = {k: z[k].shape for k in z.files}
    bns = sorted(k[: -len(".running_mean")] for k in keys if k.endswith(".running_mean"))
    assert len(bns) >= 2
    fed_by = {}
    for bn in bns:
        for part in ("weight", "bias", "running_var", "num_batches_tracked"):
            assert f"{bn}.{part}" in keys, (bn, part)
        prefix, k = bn.rsplit(".", 1)
        conv = f"{prefix}.{int(k) - 1}.weight"
        assert conv in keys, bn
        assert shapes[conv][0] == shapes[f"{bn}.running_mean"][0]
        # the module after the BN is a ReLU: no parameters
        assert not [key for key in keys if key.startswith(f"{prefix}.{int(k) + 1}.")], bn
        fed_by[bn] = len(shapes[conv])
    assert 4 in fed_by.values() and 2 in fed_by.values(), fed_by  # conv blocks and linear+BN1d


def test_issue2_repo_packaging():
    """Issue 2, repo bullet: console script, Python >= 3.11, the five dependencies, a test
    extra with pytest and hypothesis, and .ci/run installing .[test] and running pytest."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    assert project["scripts"]["bnstat"] == "bnstat.cli:main"
    assert project["requires-python"].replace(" ", "") == ">=3.11"
    deps = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert deps == {"numpy", "click", "h5py", "rich", "numba"}
    test = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["optional-dependencies"]["test"]}
    assert {"pytest", "hypothesis"} <= test
    assert os.path.exists(os.path.join(REPO, "bnstat", "__main__.py"))
    ci = os.path.join(REPO, ".ci", "run")
    assert os.stat(ci).st_mode & stat.S_IXUSR
    with open(ci, encoding="utf-8") as fh:
        text = fh.read()
    assert ".[test]" in text and "pytest" in text


def test_issue2_info_lists_every_array_with_shape_dtype_chunks_compression_size(tmp_path):
    """Issue 2, outputs bullet (SPEC 3 info): name, shape, dtype, chunking, compression and
    size of every array of .npy, .npz and HDF5 inputs, checked against numpy and h5py."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "f.npy", np.asfortranarray(rng.integers(0, 9, (5, 6)).astype(np.int16)))
    np.savez(tmp_path / "stored.npz", a=np.ones((4, 3), np.float32))
    np.savez_compressed(tmp_path / "deflated.npz", b=np.ones((2, 3, 4)))
    with h5py.File(tmp_path / "n.h5", "w") as f:
        f.create_dataset("g/h/x", data=np.ones((10, 3, 5), np.float32), chunks=(4, 3, 5),
                         compression="gzip")
        f.create_dataset("flat", data=np.ones((7, 2)))
        f.create_dataset("lz", data=np.ones((6, 2), np.float16), chunks=(3, 2), compression="lzf")
    paths = [tmp_path / "f.npy", tmp_path / "stored.npz", tmp_path / "deflated.npz", tmp_path / "n.h5"]
    rc, out, err = run_inproc("info", *paths, "--format", "json")
    assert rc == 0 and "Traceback" not in err, err
    got = {r["name"]: r for r in json.loads(out)["arrays"]}
    want = {
        "f": ((5, 6), "int16", None, None, 60, "F"),
        "a": ((4, 3), "float32", None, None, 48, "C"),
        "b": ((2, 3, 4), "float64", None, "deflate", 192, "C"),
        "g/h/x": ((10, 3, 5), "float32", [4, 3, 5], "gzip", 600, "C"),
        "flat": ((7, 2), "float64", None, None, 112, "C"),
        "lz": ((6, 2), "float16", [3, 2], "lzf", 24, "C"),
    }
    assert set(got) == set(want)
    for name, (shape, dtype, chunks, comp, nbytes, order) in want.items():
        r = got[name]
        assert (tuple(r["shape"]), r["dtype"], r["chunks"], r["compression"], r["nbytes"],
                r["order"]) == (shape, dtype, chunks, comp, nbytes, order), name
    rc, out, err = run_inproc("info", *paths)
    assert rc == 0, err
    for name in want:
        assert re.search(rf"│ {re.escape(name)} +│", out), name
    assert re.search(r"g/h/x +│ 10x3x5 +│ float32 +│ C +│ 4x3x5 +│ gzip +│ +600 B", out), out


def test_issue2_info_of_a_model_file_shows_the_layers_fold_sees():
    """SPEC 3 info: for model files the layers that fold would see."""
    rc, out, err = run_inproc("info", os.path.join(SAMPLE, "model.npz"), "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    text = "\n".join(doc["fold"])
    assert "PyTorch naming" in text and "4 BatchNorm layers" in text
    assert "features.0 <- features.1" in text and "classifier.0 <- classifier.1" in text


# ---- the table (issue 2, outputs bullet) ------------------------------------------------


def test_issue2_table_header_says_layout_reduced_axes_and_element_count(tmp_path):
    x = np.random.default_rng(2).normal(size=(4, 3, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    rc, out, err = run_inproc("moments", tmp_path / "a.npy", "--layout", "NCL", "--norm", "instance")
    assert rc == 0, err
    assert out.splitlines()[0] == "a  (4, 3, 5) float32 · layout NCL · reduce L · 60 elements"
    # no layout given: assumed, said on stderr and in the title
    rc, out, err = run_inproc("moments", tmp_path / "a.npy")
    assert rc == 0
    assert out.splitlines()[0] == ("a  (4, 3, 5) float32 · layout NCL (assumed, PyTorch default) · "
                                   "reduce NL · 60 elements")
    assert "assuming the PyTorch layout NCL" in err and "Traceback" not in err


@pytest.fixture
def forty(tmp_path):
    """40 channels with distinct spreads, one constant, one with a NaN, one all NaN, one
    with a mean far from the others."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 40, 3)) * np.linspace(0.5, 3.0, 40)[None, :, None]
    x += np.linspace(-1, 1, 40)[None, :, None]
    rng.shuffle(x, axis=1)
    x[:, 5] = 0.25  # constant
    x[0, 7, 0] = np.nan  # one NaN
    x[:, 9] = np.nan  # empty
    x[:, 11] += 100.0  # extreme mean
    np.save(tmp_path / "w.npy", x)
    return tmp_path / "w.npy", x


def _expected_flags(x):
    """SPEC-free, README-documented flags, recomputed from numpy: const, nan, empty, mean."""
    units = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    flags = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(units, axis=1)
    fin = np.isfinite(means)
    med = np.median(means[fin])
    mad = 1.4826 * np.median(np.abs(means[fin] - med))
    for c, row in enumerate(units):
        v = row[~np.isnan(row)]
        f = []
        if v.size == 0:
            f.append("empty")
        elif v.size > 1 and np.all(v == v[0]):
            f.append("const")
        if np.isnan(row).any():
            f.append("nan")
        if fin[c] and abs(means[c] - med) > 6 * mad:
            f.append("mean")
        flags.append(",".join(f))
    return flags


def test_issue2_table_flags_and_summary_line(forty):
    path, x = forty
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "--all", "--quiet")
    assert rc == 0, err
    (block,) = table_blocks(out)
    rows = table_rows(block)
    assert [int(r[0]) for r in rows] == list(range(40))
    got = [r[-1] for r in rows]
    want = _expected_flags(x)
    assert got == want
    assert want[5] == "const" and want[7] == "nan" and want[9] == "empty,nan" and "mean" in want[11]
    caption = " ".join(block[-3:])
    assert "40 units of 24 values" in caption
    n_mean = sum("mean" in f for f in want)
    assert f"flags: 1 zero variance, 2 with NaN, {n_mean} extreme mean, 1 empty" in caption


def test_issue2_table_sort_top_and_default_view(forty):
    """More than 32 units: the default shows 20 rows plus the flagged ones further down, and
    says how many are hidden; --sort/--top choose the rows; --all shows every unit."""
    path, x = forty
    units = np.moveaxis(x, 1, 0).reshape(40, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        var = np.nanvar(units, axis=1)
        mn = np.nanmin(units, axis=1)
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "--quiet", "--sort", "var",
                              "--top", "5")
    assert rc == 0, err
    (block,) = table_blocks(out)
    shown = [int(r[0]) for r in table_rows(block)]
    order = [int(c) for c in np.argsort(-np.where(np.isnan(var), -np.inf, var), kind="stable")]
    assert shown == order[:5]
    assert "35 more units not shown" in out
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "--quiet", "--sort", "min",
                              "--top", "3")
    shown = [int(r[0]) for r in table_rows(table_blocks(out)[0])]
    assert shown == [int(c) for c in np.argsort(np.where(np.isnan(mn), np.inf, mn), kind="stable")[:3]]
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "--quiet")
    shown = [int(r[0]) for r in table_rows(table_blocks(out)[0])]
    flagged = [c for c, f in enumerate(_expected_flags(x)) if f]
    assert shown[:20] == list(range(20))
    assert shown[20:] == [c for c in flagged if c >= 20]
    assert f"{40 - len(shown)} more units not shown" in out


def test_issue2_table_stays_readable_at_4096_channels(tmp_path):
    x = np.random.default_rng(4).normal(size=(3, 4096)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    rc, out, err = run_inproc("moments", tmp_path / "c.npy", "--layout", "NC")
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert len(lines) < 60 and max(map(len, lines)) <= 140
    assert "4,096 units of 3 values" in out and "4,076 more units not shown" in out


# ---- kernels and threads (issue 2, kernels bullet) ------------------------------------


def test_issue2_kernels_compile_nothing_at_import_and_are_cached():
    """Nothing compiled at import, cache=True on every kernel, no fastmath flag that deletes
    the NaN tests (STYLE 8)."""
    code = (
        "import json, bnstat, sys\n"
        "heavy = [m for m in ('numba', 'h5py', 'rich', 'click') if m in sys.modules]\n"
        "import bnstat.kernels._keys, bnstat.kernels.moments, bnstat.kernels.normalize\n"
        "from numba.core.registry import CPUDispatcher\n"
        "from numba.core.caching import NullCache\n"
        "ds = {m + '.' + n: v for m in ('moments', 'normalize')\n"
        "      for n, v in vars(getattr(bnstat.kernels, m)).items() if isinstance(v, CPUDispatcher)}\n"
        "print(json.dumps({'heavy': heavy, 'kernels': {n: [len(d.signatures),\n"
        "    not isinstance(d._cache, NullCache), sorted(d.targetoptions.get('fastmath') or [])]\n"
        "    for n, d in ds.items()}}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["heavy"] == []  # `import bnstat` imports none of them
    assert len(doc["kernels"]) >= 3
    for name, (compiled, cached, fastmath) in doc["kernels"].items():
        assert compiled == 0, f"{name} compiled at import"
        assert cached, f"{name} has no cache"
        assert not {"nnan", "ninf", "fast"} & set(fastmath), (name, fastmath)


def test_issue2_threads_option_is_honoured(tmp_path):
    import numba

    x = np.random.default_rng(5).normal(size=(64, 8, 30))
    np.save(tmp_path / "t.npy", x)
    before = numba.get_num_threads()
    ref = ref_moments(x, "NCL")
    try:
        for t in (1, 2):
            rc, out, err = run_inproc("moments", tmp_path / "t.npy", "--layout", "NCL", "--threads", t,
                                      "--format", "json")
            assert rc == 0, err
            assert numba.get_num_threads() == min(t, numba.config.NUMBA_NUM_THREADS)
            rec = json.loads(out)["arrays"][0]
            np.testing.assert_allclose(rec["var"], ref.var, rtol=1e-12)
        rc, _, err = run_inproc("normalize", tmp_path / "t.npy", "--layout", "NCL", "--threads", "1",
                                "-o", tmp_path / "n.npy")
        assert rc == 0, err
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)


# ---- numerics on the engine small inputs get (issue 2, acceptance 3) --------------------


@pytest.mark.parametrize("layout,shape", [("NCHW", (50, 4, 16, 16)), ("NHWC", (50, 16, 16, 4)),
                                          ("NLC", (200, 512, 4))])
@pytest.mark.parametrize("rows", [None, 7])
def test_issue2_acceptance3_numerics_on_the_numpy_engine(layout, shape, rows):
    """The rest of the suite runs acceptance 3 on the Numba kernels (and on NC alone for the
    numpy engine); inputs under 32 MiB, the sample data included, use the numpy engine."""
    rng = np.random.default_rng(6)
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    chunk = rows and rows * x.nbytes // x.shape[0]
    (got,) = bnstat.moments(x, layout=layout, chunk_size=chunk, engine="numpy").values()
    ref = ref_moments(x, layout)
    assert np.all(got.var > 0)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-6)
    c = np.full(shape, 271.46, np.float32)
    (got,) = bnstat.moments(c, layout=layout, chunk_size=chunk, engine="numpy", ddof=1).values()
    assert got.var.tolist() == [0.0] * got.var.size
    assert got.mean.tolist() == [float(np.float32(271.46))] * got.mean.size


# ---- readers stream, never load whole (issue 2, readers bullet; issue 3, output bullet) --


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
def test_issue2_npz_members_and_hdf5_are_streamed_not_loaded_whole(sixteen_mb, name, tmp_path):
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


# ---- the all-NaN table (found by the audit; fixed in render.summary_line) ----------------


def test_issue2_table_of_an_all_nan_array_warns_only_about_the_nans(tmp_path):
    np.save(tmp_path / "allnan.npy", np.full((3, 4), np.nan))
    rc, out, err = run_inproc("moments", tmp_path / "allnan.npy", "--layout", "NC")
    assert rc == 0, err
    assert "Traceback" not in err and "internal error" not in err
    assert err.splitlines() == ["bnstat: warning: allnan: 12 NaN value(s) in 4 unit(s) counted "
                                "and left out"], err
    words = " ".join(out.split())  # the caption wraps at the table's width
    assert "4 units of 0 values · min NaN, max NaN · flags: 4 with NaN, 4 empty" in words
    rc, _, err = run_inproc("moments", tmp_path / "allnan.npy", "--layout", "NC", "-q",
                            "-o", tmp_path / "s.npz")
    assert rc == 0, err
    rc, out, err = run_inproc("show", tmp_path / "s.npz")
    assert rc == 0 and err == "", err
    assert "flags: 4 with NaN, 4 empty" in " ".join(out.split())


# ==== issue 3 =====================================================================


def _bn_ref(x, mean, var, eps=1e-5, gamma=None, beta=None, axis=1):
    shape = [1] * x.ndim
    shape[axis] = -1
    r = lambda v: np.asarray(v, np.float64).reshape(shape)  # noqa: E731
    y = (x - r(mean)) / np.sqrt(r(var) + eps)
    if gamma is not None:
        y = y * r(gamma) + r(beta)
    return y


def _within_one_f16_ulp(y, ref):
    r16 = ref.astype(np.float16)
    assert y.dtype == np.float16
    assert np.all(np.abs(y.astype(np.float64) - r16) <= np.spacing(np.abs(r16))), \
        np.max(np.abs(y.astype(np.float64) - r16))


def test_issue3_acceptance1_float16_with_every_statistics_source(tmp_path):
    """float16 inputs with --per-batch, --stats and --model (the suite had float16 for the
    input's own statistics only): float16 out, within one float16 ulp of the float64 result."""
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(10, 6, 4, 3)) * 2 + 3).astype(np.float16)
    xf = x.astype(np.float64)
    axes = (0, 2, 3)
    # --per-batch 4: runs of 4, 4, 2
    y = bnstat.normalize(x, layout="NCHW", per_batch=4, chunk_size=500)
    ref = np.concatenate([_bn_ref(xf[i:i + 4], xf[i:i + 4].mean(axes), xf[i:i + 4].var(axes))
                          for i in range(0, 10, 4)])
    _within_one_f16_ulp(y, ref)
    # --stats saved by moments
    np.save(tmp_path / "x.npy", x)
    rc, _, err = run_inproc("moments", tmp_path / "x.npy", "--layout", "NCHW", "-o", tmp_path / "s.npz")
    assert rc == 0, err
    rc, _, err = run_inproc("normalize", tmp_path / "x.npy", "--stats", tmp_path / "s.npz",
                            "-o", tmp_path / "y.npy", "--chunk-size", "500")
    assert rc == 0 and "Traceback" not in err, err
    _within_one_f16_ulp(np.load(tmp_path / "y.npy"), _bn_ref(xf, xf.mean(axes), xf.var(axes)))
    # --model, PyTorch naming, float16 parameters
    c = 6
    model = {"features.0.weight": np.ones((c, 2, 3, 3), np.float16),
             "features.1.running_mean": rng.normal(size=c).astype(np.float16),
             "features.1.running_var": rng.uniform(0.5, 2, c).astype(np.float16),
             "features.1.weight": rng.uniform(0.5, 2, c).astype(np.float16),
             "features.1.bias": rng.normal(size=c).astype(np.float16)}
    np.savez(tmp_path / "m.npz", **model)
    y = bnstat.normalize(x, model=str(tmp_path / "m.npz"), bn="features.1", layout="NCHW")
    f = lambda k: model[f"features.1.{k}"].astype(np.float64)  # noqa: E731
    _within_one_f16_ulp(y, _bn_ref(xf, f("running_mean"), f("running_var"), 1e-5, f("weight"),
                                   f("bias")))


def test_issue3_cli_model_of_the_sample_file_to_stdout(tmp_path):
    """The README's `normalize ... -o - --model model.npz --bn features.1` on the shipped model:
    inference-mode BN with PyTorch's eps 1e-5."""
    with np.load(os.path.join(SAMPLE, "model.npz")) as z:
        p = {k: z[f"features.1.{k}"].astype(np.float64) for k in ("running_mean", "running_var",
                                                                  "weight", "bias")}
    c = p["running_mean"].shape[0]
    x = np.random.default_rng(9).normal(size=(3, c, 5, 4)).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    rc, out, err = run_inproc("normalize", tmp_path / "acts.npy", "-o", "-", "--model",
                              os.path.join(SAMPLE, "model.npz"), "--bn", "features.1", binary=True)
    assert rc == 0 and "Traceback" not in err, err
    y = np.load(io.BytesIO(out))
    assert y.dtype == np.float32 and y.shape == x.shape
    want = _bn_ref(x.astype(np.float64), p["running_mean"], p["running_var"], 1e-5, p["weight"],
                   p["bias"])
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * max(1.0, np.abs(want).max()))
    assert os.listdir(tmp_path) == ["acts.npy"]


def test_issue3_cli_reduce_and_channel_axis(tmp_path):
    x = (np.random.default_rng(10).normal(size=(3, 5, 8)) * 3 + 1).astype(np.float32)
    np.save(tmp_path / "tok.npy", x)
    xf = x.astype(np.float64)
    rc, _, err = run_inproc("normalize", tmp_path / "tok.npy", "--layout", "NLC", "--reduce", "C",
                            "-o", tmp_path / "tok_ln.npy")
    assert rc == 0, err
    want = (xf - xf.mean(2, keepdims=True)) / np.sqrt(xf.var(2, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "tok_ln.npy"), want, rtol=0, atol=1e-6)
    rc, _, err = run_inproc("normalize", tmp_path / "tok.npy", "--channel-axis", "2",
                            "-o", tmp_path / "tok_bn.npy")
    assert rc == 0, err
    want = (xf - xf.mean((0, 1), keepdims=True)) / np.sqrt(xf.var((0, 1), keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "tok_bn.npy"), want, rtol=0, atol=1e-6)


# ==== issue 4 =====================================================================


def _torch_bn(rng, name, c):
    return {f"{name}.weight": rng.uniform(0.5, 1.5, c).astype(np.float32),
            f"{name}.bias": rng.normal(size=c).astype(np.float32),
            f"{name}.running_mean": rng.normal(size=c).astype(np.float32),
            f"{name}.running_var": rng.uniform(0.3, 2.0, c).astype(np.float32),
            f"{name}.num_batches_tracked": np.array(100, np.int64)}


def _folded(w, b, bn, eps):
    """SPEC 3: W' = W * s along the output axis 0, b' = (b - mean) * s + beta, in float64."""
    s = bn["weight"].astype(np.float64) / np.sqrt(bn["running_var"].astype(np.float64) + eps)
    w2 = w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
    b0 = np.zeros_like(s) if b is None else b.astype(np.float64)
    return w2, (b0 - bn["running_mean"]) * s + bn["bias"]


def test_issue4_acceptance3_cli_ambiguous_bn_is_reported_until_pair_settles_it(tmp_path):
    rng = np.random.default_rng(11)
    d = {"stem.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
         "head.weight": rng.normal(size=(8, 8, 1, 1)).astype(np.float32),
         **_torch_bn(rng, "norm", 8)}
    src = tmp_path / "amb.npz"
    np.savez(src, **d)
    rc, out, err = run_inproc("fold", src, "-o", tmp_path / "a.npz")
    assert rc == 0, err
    assert "Traceback" not in err
    assert "1 BatchNorm layer(s) left unfolded (norm)" in err and "--pair" in err
    assert re.search(r"norm +│ +8 +│ ambiguous.*│ stem, head", out), out
    with np.load(tmp_path / "a.npz") as z:
        assert sorted(z.files) == sorted(d)  # nothing folded, nothing guessed
        for k in d:
            np.testing.assert_array_equal(z[k], d[k])
    rc, out, err = run_inproc("fold", src, "-o", tmp_path / "b.npz", "--pair", "head=norm", "--check")
    assert rc == 0, err
    assert re.search(r"head +│ norm +│ conv +│ OIHW +│ +8 +│ 1e-05 +│ --pair", out), out
    with np.load(tmp_path / "b.npz") as z:
        assert sorted(z.files) == ["head.bias", "head.weight", "stem.weight"]
        bn = {k: d[f"norm.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        w, b = _folded(d["head.weight"], None, bn, 1e-5)
        np.testing.assert_allclose(z["head.weight"], w, rtol=2e-7, atol=1e-7)
        np.testing.assert_allclose(z["head.bias"], b, rtol=2e-7, atol=1e-7)
        np.testing.assert_array_equal(z["stem.weight"], d["stem.weight"])


def test_issue4_acceptance4_sample_model_plan_errors_and_folded_values(tmp_path):
    """`bnstat fold sample_data/model.npz -o folded.npz --check`: the printed plan has the
    columns of issue 4 and every max relative error <= 1e-5; the folded arrays are SPEC 3's
    formula computed here in float64 (then float32)."""
    sample = os.path.join(SAMPLE, "model.npz")
    out_path = tmp_path / "folded.npz"
    rc, out, err = run_inproc("fold", sample, "-o", out_path, "--check")
    assert rc == 0 and "Traceback" not in err, err
    lines = out.splitlines()
    head = next(ln for ln in lines if ln.startswith("conv"))
    cols = [c.strip() for c in re.split(r"[┃│]", head)]
    for want in ("conv", "bn", "kind", "layout", "channels", "eps", "max abs err", "max rel err"):
        assert want in cols, cols
    rows = [[c.strip() for c in ln.split("│")] for ln in lines if "│" in ln]
    with np.load(sample) as z:
        d = {k: z[k] for k in z.files}
    bns = sorted(k[: -len(".running_mean")] for k in d if k.endswith(".running_mean"))
    assert sorted(r[cols.index("bn")] for r in rows) == bns
    for r in rows:
        assert float(r[cols.index("max rel err")]) <= 1e-5, r
        assert r[cols.index("eps")] == "1e-05"
    with np.load(out_path) as z:
        folded = {k: z[k] for k in z.files}
    for r in rows:
        conv, bn_name = r[cols.index("conv")], r[cols.index("bn")]
        bn = {k: d[f"{bn_name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        w, b = _folded(d[f"{conv}.weight"], d.get(f"{conv}.bias"), bn, 1e-5)
        np.testing.assert_allclose(folded[f"{conv}.weight"], w.astype(np.float32), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(folded[f"{conv}.bias"], b.astype(np.float32), rtol=1e-6, atol=1e-6)
        assert not [k for k in folded if k.startswith(bn_name + ".")]


def _nan_models(rng):
    base = {"features.0.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
            "features.0.bias": rng.normal(size=8).astype(np.float32), **_torch_bn(rng, "features.1", 8)}

    def changed(key, index, value):
        d = {k: v.copy() for k, v in base.items()}
        d[key][index] = value
        return d

    keras = {"conv/kernel:0": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
             "bn/gamma:0": np.ones(4, np.float32), "bn/beta:0": np.zeros(4, np.float32),
             "bn/moving_mean:0": np.zeros(4, np.float32),
             "bn/moving_variance:0": np.array([1, 1, -0.5, 1], np.float32)}
    return {
        "nan-running-mean": (changed("features.1.running_mean", 4, np.nan),
                             r"features\.1: features\.1\.running_mean: 1 NaN"),
        "nan-conv-bias": (changed("features.0.bias", 1, np.nan), r"features\.0: features\.0\.bias: 1 NaN"),
        "inf-gamma": (changed("features.1.weight", 2, np.inf),
                      r"features\.1: features\.1\.weight: 1 infinite"),
        "keras-negative-variance": (keras, r"bn: .*moving_variance.* negative at channel 2"),
    }


@pytest.mark.parametrize("which", ["nan-running-mean", "nan-conv-bias", "inf-gamma",
                                   "keras-negative-variance"])
def test_issue4_acceptance5_more_refusals(which, tmp_path):
    """Refusals the suite did not cover: NaN running mean, NaN conv bias, infinite gamma, and
    a Keras-named negative moving variance: exit 1, the layer named, nothing written."""
    d, pattern = _nan_models(np.random.default_rng(12))[which]
    np.savez(tmp_path / "m.npz", **d)
    assert_fails(run_inproc("fold", tmp_path / "m.npz", "-o", tmp_path / "o.npz"), 1,
                 pattern + r".*nothing written")
    assert os.listdir(tmp_path) == ["m.npz"]


# ==== issue 6 =====================================================================


def test_issue6_inputs_unchanged_by_show_merge_fold_and_normalize_with_stats(tmp_path):
    """Properties bullet: the input is byte-for-byte unchanged after every command (the
    property tests cover moments, normalize and info)."""
    rng = np.random.default_rng(13)
    for i in (0, 1):
        (tmp_path / f"p{i}").mkdir()
        np.save(tmp_path / f"p{i}" / "acts.npy", rng.normal(size=(5, 3, 4)).astype(np.float32))
        rc, _, err = run_inproc("moments", tmp_path / f"p{i}" / "acts.npy", "--layout", "NCL",
                                "-o", tmp_path / f"s{i}.npz")
        assert rc == 0, err
    np.savez(tmp_path / "model.npz", **{"conv.weight": rng.normal(size=(3, 2, 1, 1)).astype(np.float32),
                                        **_torch_bn(rng, "bn", 3)})
    inputs = [tmp_path / "p0" / "acts.npy", tmp_path / "s0.npz", tmp_path / "s1.npz",
              tmp_path / "model.npz"]
    before = {p: (sha256(p), os.stat(p).st_mtime_ns) for p in inputs}
    runs = [["show", tmp_path / "s0.npz", "--format", "json"],
            ["merge", tmp_path / "s0.npz", tmp_path / "s1.npz", "-o", tmp_path / "m.npz"],
            ["fold", tmp_path / "model.npz", "-o", tmp_path / "f.npz", "--check"],
            ["fold", tmp_path / "model.npz", "--dry-run"],
            ["normalize", tmp_path / "p0" / "acts.npy", "--stats", tmp_path / "s0.npz",
             "-o", tmp_path / "n.npy"]]
    for args in runs:
        rc, _, err = run_inproc(*args)
        assert rc == 0 and "Traceback" not in err, (args, err)
        assert {p: (sha256(p), os.stat(p).st_mtime_ns) for p in inputs} == before, args
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".bnstat-tmp")]


# ==== bugs the audit found (fixed): big-endian gzip HDF5, .npy format 3.0 ============


@pytest.mark.parametrize("dtype", [">f4", ">i2", ">f8"])
def test_bug_big_endian_gzip_hdf5_dataset(tmp_path, dtype):
    x = np.random.default_rng(14).normal(size=(9, 3, 5)) * 100
    data = x.astype(dtype)
    with h5py.File(tmp_path / "be.h5", "w") as f:
        f.create_dataset("a", data=data, chunks=(4, 3, 5), compression="gzip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the garbage overflows in the merges
        (got,) = bnstat.moments(str(tmp_path / "be.h5"), layout="NCL").values()
    assert_matches(got, ref_moments(data, "NCL"), data)


def test_bug_npy_format_version_3(tmp_path):
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


def test_bug_npy_unknown_format_version_is_a_clear_error(tmp_path):
    raw = bytearray(npy_bytes(np.ones((4, 3), np.float32)))
    raw[6:8] = bytes([9, 0])  # version 9.0
    (tmp_path / "v9.npy").write_bytes(bytes(raw))
    assert_fails(run_inproc("moments", tmp_path / "v9.npy", "--layout", "NC"), 1,
                 r"v9\.npy: .*(version|corrupt|not a \.npy)")


def test_merge_of_files_saved_with_different_ddof_warns(tmp_path):
    """m2 merges exactly whatever ddof was saved; the merged var uses the first file's ddof,
    and a warning says the files disagreed."""
    rng = np.random.default_rng(21)
    a = rng.normal(size=(30, 3, 4)).astype(np.float64)
    b = rng.normal(size=(20, 3, 4)).astype(np.float64)
    for part, x in (("p1", a), ("p2", b)):
        (tmp_path / part).mkdir()
        np.save(tmp_path / part / "x.npy", x)  # one array name, "x", in both parts
    assert run_inproc("moments", tmp_path / "p1" / "x.npy", "--layout", "NCL",
                      "-o", tmp_path / "a.npz")[0] == 0
    assert run_inproc("moments", tmp_path / "p2" / "x.npy", "--layout", "NCL", "--ddof", "1",
                      "-o", tmp_path / "b.npz")[0] == 0
    rc, out, err = run_inproc("merge", tmp_path / "a.npz", tmp_path / "b.npz", "--format", "json")
    assert rc == 0, err
    assert "different --ddof (0, 1)" in err and "uses --ddof 0" in err and "Traceback" not in err
    both = np.concatenate([a, b]).transpose(1, 0, 2).reshape(3, -1)
    rec = json.loads(out)["arrays"][0]
    np.testing.assert_allclose(rec["var"], both.var(axis=1, ddof=0), rtol=1e-12)
    rc, out, err = run_inproc("merge", tmp_path / "a.npz", tmp_path / "a.npz", "--format", "json")
    assert rc == 0 and "ddof" not in err
