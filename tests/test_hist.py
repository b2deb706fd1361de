"""bnstat hist: counts equal np.histogram per unit with the same edges, merges, files, CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import hist_edges, units

import bnstat
from bnstat.histogram import load_hist, merge_hists

DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64]
CASES = [  # shape, layout options, reference options
    ((5, 3, 4, 2), dict(layout="NCHW"), dict(layout="NCHW")),
    ((5, 2, 3, 4), dict(layout="NHWC"), dict(layout="NHWC")),
    ((4, 3, 6), dict(layout="NCL", norm="layer"), dict(layout="NCL", norm="layer")),
    ((3, 4, 2, 3), dict(layout="NCHW", norm="instance"), dict(layout="NCHW", norm="instance")),
    ((3, 2, 2, 4), dict(layout="NHWC", norm="group", groups=2), dict(layout="NHWC", norm="group", groups=2)),
    ((4, 5, 6), dict(layout="NLC", reduce="C"), dict(layout="NLC", reduce="C")),
]


def data(shape, dtype, rng):
    if np.dtype(dtype).kind == "f":
        x = rng.standard_normal(shape) * 3
        x[..., 0] = np.round(x[..., 0])  # values on bin edges and ties
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), size=shape, endpoint=True).astype(dtype)


def quiet_hist(x, **kw):
    """bnstat.hist with its NaN warning silenced (the data here hold NaN on purpose)."""
    from bnstat.errors import BnstatWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        return bnstat.hist(x, **kw)["array"]


def check_counts(h, x, ref_opts, rng_mode, bins):
    _, rows = units(x, **ref_opts)
    counts = h.counts.reshape(rows.shape[0], bins)
    edges = h.edges.reshape(rows.shape[0], bins + 1)
    for u, row in enumerate(rows):
        v = np.abs(row) if rng_mode == "abs" else row
        ref_edges = hist_edges(v, rng_mode, bins)
        lo, hi = ref_edges[0], ref_edges[-1]
        np.testing.assert_array_equal(edges[u], ref_edges)
        ref, _ = np.histogram(v, bins=edges[u])
        np.testing.assert_array_equal(counts[u], ref, err_msg=f"unit {u}")
        # numpy's own fast path (bins and range) on the float64 values gives the same counts
        ref2, e2 = np.histogram(v, bins=bins, range=(lo, hi))
        np.testing.assert_array_equal(counts[u], ref2)
        np.testing.assert_array_equal(edges[u], e2)
        assert h.underflow.ravel()[u] == np.count_nonzero(v < lo)
        assert h.overflow.ravel()[u] == np.count_nonzero(v > hi)
        assert h.zero_count.ravel()[u] == np.count_nonzero(row == 0)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_counts_equal_np_histogram(case, dtype, rng):
    shape, opts, ref_opts = CASES[case]
    x = data(shape, dtype, rng)
    row = x[0].nbytes
    for chunk in (row, 2 * row, x.nbytes):
        for mode, bins in (("auto", 7), ("abs", 5), ((-2.0, 2.5), 4)):
            # two threads on the whole array (split tasks), one on the many small chunks (fast)
            h = bnstat.hist(x, bins=bins, range=mode, chunk_size=chunk, threads=2 if chunk == x.nbytes else 1,
                            **opts)["array"]
            check_counts(h, x, ref_opts, mode, bins)


@pytest.mark.parametrize("case", [0, 1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_one_bin(case, dtype, rng):
    """One bin (``--bins 1``, the quantiles' runs) is counted without a guess
    (kernels.hist._one_bin): lo <= v <= hi, the rest counted apart as with more bins."""
    shape, opts, ref_opts = CASES[case]
    x = data(shape, dtype, rng)
    for mode in ("auto", "abs", (-2.0, 2.5), (0.5, 0.75)):
        for chunk, threads in ((x[0].nbytes, 1), (x.nbytes, 2)):
            h = bnstat.hist(x, bins=1, range=mode, chunk_size=chunk, threads=threads, **opts)["array"]
            check_counts(h, x, ref_opts, mode, 1)


def test_one_bin_with_nan_inf_and_zeros(rng):
    x = rng.standard_normal((9, 2, 5)).astype(np.float32)
    x[0, 0, :3] = [np.nan, np.inf, -np.inf]
    x[1, 1] = 0.0
    x[2, 1, 0] = -0.0
    x[3, 0, 0] = 2.5  # on the closed upper edge of (-1, 2.5)
    for mode in ("auto", "abs", (-1.0, 2.5)):
        h = quiet_hist(x, layout="NCL", bins=1, range=mode)
        for c in range(2):
            v = x[:, c].ravel().astype(np.float64)
            v = np.abs(v) if mode == "abs" else v
            fin = v[np.isfinite(v)]
            lo, hi = (mode if isinstance(mode, tuple) else (fin.min() if mode == "auto" else 0.0, fin.max()))
            assert h.counts[c, 0] == np.count_nonzero((fin >= lo) & (fin <= hi))
            assert h.underflow[c] == np.count_nonzero(fin < lo)
            assert h.overflow[c] == np.count_nonzero(fin > hi)
            assert h.zero_count[c] == np.count_nonzero(v == 0)
        np.testing.assert_array_equal(h.stats.nan_count, [1, 0])
        np.testing.assert_array_equal(h.stats.inf_count, [2, 0])


@pytest.mark.parametrize("engine", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_values_on_and_next_to_every_edge(engine, dtype, layout, rng, monkeypatch):
    """The kernel takes a value's guessed bin without the edges only away from them
    (kernels.hist._hist_guess), the numpy engine numpy's equal-bins path: data holding every
    edge and both its neighbours, zeros, and a narrow range far from 0, count as
    np.histogram over the edges, with 1 and 2 threads."""
    monkeypatch.setenv("BNSTAT_ENGINE", engine)
    bins = 64
    for scale, offset in ((1.0, 0.0), (1e-3, 1e4), (1e-30, 0.0)):
        v = (offset + rng.standard_normal(600) * scale).astype(dtype)
        v[:100] = 0.0 if offset == 0.0 else v[:100]
        e = np.linspace(float(v.min()), float(v.max()), bins + 1).astype(dtype)
        near = np.concatenate([e, np.nextafter(e, dtype(np.inf)), np.nextafter(e, dtype(-np.inf))])
        near = near[(near >= v.min()) & (near <= v.max())]
        w = rng.permutation(np.concatenate([v, near]))
        w = w[:w.size // 6 * 6]
        x = w.reshape(-1, 2, 3, 1) if layout == "NCHW" else w.reshape(-1, 3, 1, 2)
        for threads in (1, 2):
            for mode in ("auto", "abs"):
                h = bnstat.hist(x, layout=layout, bins=bins, range=mode, threads=threads)["array"]
                check_counts(h, x, dict(layout=layout), mode, bins)


def test_fortran_order_and_files_split_along_n(tmp_path, rng):
    x = rng.standard_normal((6, 3, 5)).astype(np.float32)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    h = bnstat.hist(str(tmp_path / "f.npy"), layout="NCL", bins=9)["f"]
    check_counts(h, x, dict(layout="NCL"), "auto", 9)
    for d in ("p1", "p2"):
        (tmp_path / d).mkdir()
    np.save(tmp_path / "p1" / "x.npy", x[:2])  # one array (same name) split along N
    np.save(tmp_path / "p2" / "x.npy", x[2:])
    for norm in ("batch", "layer"):
        files = [str(tmp_path / "p1" / "x.npy"), str(tmp_path / "p2" / "x.npy")]
        got = bnstat.hist(files, layout="NCL", norm=norm, bins=6, range=(-1.0, 1.0))
        h = next(iter(got.values()))
        check_counts(h, x, dict(layout="NCL", norm=norm), (-1.0, 1.0), 6)


def test_nan_and_inf_counted_apart(rng):
    x = rng.standard_normal((8, 3, 4))
    x[0, 0, 0] = np.nan
    x[1, 0, 1] = np.inf
    x[2, 1, 2] = -np.inf
    h = quiet_hist(x, layout="NCL", bins=5, range="auto")
    np.testing.assert_array_equal(h.stats.nan_count, [1, 0, 0])
    np.testing.assert_array_equal(h.stats.inf_count, [1, 1, 0])
    for c in range(3):
        v = x[:, c].ravel()
        v = v[np.isfinite(v)]
        assert h.edges[c, 0] == v.min() and h.edges[c, -1] == v.max()
        np.testing.assert_array_equal(h.counts[c], np.histogram(v, bins=h.edges[c])[0])


def test_dead_units_and_zero_fraction(rng):
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    x[:, 1] = 0.0
    x[:3, 2] = 0.0
    h = bnstat.hist(x, layout="NCL", bins=4)["array"]
    np.testing.assert_array_equal(h.dead, [False, True, False])
    np.testing.assert_allclose(h.zero_fraction, [0.0, 1.0, 0.5])
    # numpy's rule for a constant unit: c - 0.5 .. c + 0.5
    np.testing.assert_array_equal(h.edges[1], np.linspace(-0.5, 0.5, 5))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 11), min_size=1, max_size=4, unique=True), seed=st.integers(0, 99))
def test_merge_of_any_split_equals_the_whole(cuts, seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal((12, 3, 5)).astype(np.float32)
    x[r.random(x.shape) < 0.05] = np.nan
    whole = quiet_hist(x, layout="NCL", bins=8, range=(-2.0, 2.0))
    bounds = [0] + sorted(cuts) + [12]
    parts = [quiet_hist(x[a:b], layout="NCL", bins=8, range=(-2.0, 2.0))
             for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    merged = merge_hists(parts)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_array_equal(merged.edges, whole.edges)
    for key in ("underflow", "overflow", "zero_count"):
        np.testing.assert_array_equal(getattr(merged, key), getattr(whole, key))
    np.testing.assert_array_equal(merged.stats.count, whole.stats.count)
    np.testing.assert_allclose(merged.stats.mean, whole.stats.mean, rtol=1e-12, atol=1e-14)


def test_file_round_trip_merge_and_show(cli, tmp_path, rng):
    x = rng.standard_normal((10, 3, 4)).astype(np.float32)
    for name, part in (("a", x[:4]), ("b", x[4:]), ("all", x)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "x.npy", part)
        code, _, err = cli("hist", tmp_path / name / "x.npy", "--layout", "NCL", "--range", "-3:3", "--bins",
                           "16", "-o", tmp_path / f"{name}.npz")
        assert code == 0, err
    code, _, err = cli("merge", tmp_path / "a.npz", tmp_path / "b.npz", "-o", tmp_path / "m.npz")
    assert code == 0, err
    m = load_hist(str(tmp_path / "m.npz"))
    whole = load_hist(str(tmp_path / "all.npz"))
    key = next(iter(whole))
    np.testing.assert_array_equal(next(iter(m.values())).counts, whole[key].counts)
    with np.load(tmp_path / "m.npz") as z:  # plain numpy reads it
        assert z["x/counts"].shape == (3, 16) and z["x/edges"].shape == (3, 17)
    code, out, err = cli("show", tmp_path / "all.npz")
    assert code == 0 and "Traceback" not in err
    assert "16 bins, range -3.0:3.0" in out and ("▁" in out or "█" in out)
    code, out, _ = cli("show", tmp_path / "all.npz", "--format", "json")
    rec = json.loads(out)["arrays"][0]
    assert len(rec["counts"]) == 3 and len(rec["counts"][0]) == 16 and len(rec["edges"][0]) == 17


def test_json_of_hist_with_quantiles_and_amax(cli, tmp_path, rng):
    x = rng.standard_normal((20, 2, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    code, out, err = cli("hist", tmp_path / "a.npy", "--layout", "NCL", "--quantiles", "0.5,0.99",
                         "--amax", "max", "--amax", "percentile:99", "--format", "json")
    assert code == 0, err
    rec = json.loads(out)["arrays"][0]
    assert rec["range"] == "abs" and rec["bins"] == 2048
    assert rec["quantiles"]["q"] == [0.5, 0.99]
    for c in range(2):
        v = x[:, c].ravel().astype(np.float64)
        assert rec["quantiles"]["values"][c] == np.quantile(v, [0.5, 0.99]).tolist()
        assert rec["amax"]["max"][c] == np.abs(v).max()
    assert rec["inf_count"] == [0, 0] and rec["zero_fraction"] == [0.0, 0.0]


def test_moments_inf_count_and_flag(cli, tmp_path):
    x = np.ones((4, 3), np.float32)
    x[1, 2] = np.inf
    x[2, 2] = -np.inf
    np.save(tmp_path / "a.npy", x)
    code, out, err = cli("moments", tmp_path / "a.npy", "--layout", "NC", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["arrays"][0]["inf_count"] == [0, 0, 2]
    code, out, err = cli("moments", tmp_path / "a.npy", "--layout", "NC")
    assert "inf" in out.splitlines()[-2] or "with inf" in out
    code, _, _ = cli("moments", tmp_path / "a.npy", "--layout", "NC", "-o", tmp_path / "s.npz")
    assert bnstat.load_stats(str(tmp_path / "s.npz"))["a"].inf_count.tolist() == [0, 0, 2]


@pytest.mark.parametrize("args, code, message", [
    (["--bins", "0"], 2, "Invalid value for '--bins': 0: needs at least one bin"),
    (["--range", "5:1"], 2, "LO must be smaller than HI"),
    (["--range", "x"], 2, "give auto, abs or LO:HI"),
    (["--quantiles", "1.5"], 2, "1.5: quantiles must be between 0 and 1"),
    (["--amax", "kl"], 2, "give max, percentile:P"),
    (["--amax", "mse", "--range", "0:1"], 2, "--amax/amax= works on the histogram of |x|"),
    (["--amax", "entropy", "--bins", "64"], 2, "needs more than 128 bins"),
])
def test_bad_options(cli, tmp_path, args, code, message):
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    got, _, err = cli("hist", tmp_path / "a.npy", "--layout", "NC", *args)
    assert got == code, err
    assert message in err and "Traceback" not in err


def test_merge_refuses_different_edges(cli, tmp_path, rng):
    for n, scale in (("a", 1), ("b", 2)):  # one array (x) in two parts whose auto ranges differ
        (tmp_path / n).mkdir()
        np.save(tmp_path / n / "x.npy", rng.standard_normal((4, 3)) * scale)
        assert cli("hist", tmp_path / n / "x.npy", "--layout", "NC", "-o", tmp_path / f"{n}.npz")[0] == 0
    code, _, err = cli("merge", tmp_path / "a.npz", tmp_path / "b.npz", "-o", tmp_path / "m.npz")
    assert code == 1 and "different bin edges" in err and "Traceback" not in err
    assert not (tmp_path / "m.npz").exists()
    assert cli("moments", tmp_path / "a" / "x.npy", "--layout", "NC", "-o", tmp_path / "s.npz")[0] == 0
    code, _, err = cli("merge", tmp_path / "a.npz", tmp_path / "s.npz", "-o", tmp_path / "m.npz")
    assert code == 1 and "is a histogram file but" in err


def test_stdin_needs_a_fixed_range(cli):
    from conftest import npy_bytes

    data = npy_bytes(np.arange(12, dtype=np.float32).reshape(4, 3))
    code, _, err = cli("hist", "-", "--layout", "NC", input=data)
    assert code == 2 and "standard input can be read once" in err
    code, out, err = cli("hist", "-", "--layout", "NC", "--range", "0:12", "--bins", "3", "--format", "json",
                         input=data)
    assert code == 0, err
    assert json.loads(out)["arrays"][0]["counts"] == [[2, 1, 1], [1, 2, 1], [1, 1, 2]]


@pytest.mark.parametrize("rng_spec", ["auto", "abs", "-2:2"])
def test_numpy_counting_equals_the_kernels(monkeypatch, rng_spec):
    """The numpy engine's counting (small inputs, and a first run while the kernel compiles)
    gives the kernel's integers: counts, under/overflow, zeros; quantiles still exact."""
    r = np.random.default_rng(21)
    x = (r.standard_normal((30, 4, 3, 5)) * 2).astype(np.float32)
    x[0, 1, 1, 1] = np.nan
    x[1, 2, 0, 0] = np.inf
    x[3, 2, 1, 0] = -np.inf
    x[2, 0, :, :] = 0.0
    kw = dict(layout="NCHW", bins=32, range=rng_spec, quantiles=[0.01, 0.5, 0.99])
    results = {}
    for engine in ("numba", "numpy"):
        monkeypatch.setenv("BNSTAT_ENGINE", engine)
        with pytest.warns(bnstat.errors.BnstatWarning, match="NaN"):
            (results[engine],) = bnstat.hist(x, **kw).values()
    a, b = results["numba"], results["numpy"]
    assert np.array_equal(a.counts, b.counts) and np.array_equal(a.edges, b.edges)
    for key in ("underflow", "overflow", "zero_count"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    assert np.array_equal(a.quantile_values, b.quantile_values)
    v = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(4, -1)
    for c in range(4):
        vals = v[c][np.isfinite(v[c])]
        if rng_spec == "abs":
            vals = np.abs(vals)
        edges = b.edges[c]
        inside = vals[(vals >= edges[0]) & (vals <= edges[-1])]
        assert b.counts[c].tolist() == np.histogram(inside, bins=edges)[0].tolist()
        assert b.underflow[c] == np.count_nonzero(vals < edges[0])  # finite values only
        assert b.overflow[c] == np.count_nonzero(vals > edges[-1])


@pytest.mark.parametrize("bins", [64, 2048, 5000])
def test_float32_guess_and_32_bit_counters(bins, rng):
    """Float32 data take the float32 guess where its margin is small (kernels.hist.margin32)
    and count into 32-bit task counters: every edge's float32 value and both neighbours,
    zeros in and out of the range, NaN and inf, on ranges whose edges are not float32
    values, count as np.histogram; a range too narrow for float32 falls back to float64."""
    from bnstat.distributions import UnitState
    from bnstat.histogram import make_edges
    from bnstat.kernels import hist as kernels_hist

    for lo, hi in ((-5.5, 5.5), (0.0, 6.1), (-0.3, 2.7), (1e4, 1e4 + 1e-3)):
        e64 = make_edges(np.array([lo]), np.array([hi]), bins)[0]
        *_, mg, m1 = kernels_hist.margin32(e64, lo, bins / (hi - lo))
        assert (mg < 1.0 and 0.0 < mg < 1e-3 < m1 < 1.0) if hi - lo > 1.0 else mg == 1.0
        e = e64.astype(np.float32)
        near = np.concatenate([e, np.nextafter(e, np.float32(np.inf)), np.nextafter(e, np.float32(-np.inf))])
        v = np.concatenate([near, (lo + (hi - lo) * rng.random(3000)).astype(np.float32),
                            np.float32([0.0, -0.0, 0.0, np.nan, np.inf, -np.inf, lo - 1, hi + 1])])
        v = rng.permutation(v)[: v.size // 12 * 12]
        x = v.reshape(-1, 3, 4)  # NCL: 3 units of rows of 4 values
        for absval in (False, True):
            st = UnitState(3, bins, absval=absval)
            for threads in (1, 2):
                st.set_edges(np.full(3, lo), np.full(3, hi))
                st.count(x.reshape(1, -1, 3, 4), np.arange(3), threads, "numba")
                for u in range(3):
                    w = x[:, u, :].astype(np.float64).ravel()
                    w = np.abs(w) if absval else w
                    f = w[np.isfinite(w)]
                    ref = np.histogram(f[(f >= lo) & (f <= hi)], bins=st.edges[u])[0]
                    np.testing.assert_array_equal(st.counts[u], ref, err_msg=f"{lo}:{hi} unit {u}")
                    assert st.extra["underflow"][u] == np.count_nonzero(f < lo)
                    assert st.extra["overflow"][u] == np.count_nonzero(f > hi)
                    assert st.extra["zero_count"][u] == np.count_nonzero(w == 0)


def test_32_bit_task_counters_flushed_before_they_overflow():
    """kernels.hist._flush: the task's 32-bit counters go into the int64 counts (and are
    cleared) before the values counted since the last flush could pass 2**32 - 1."""
    from bnstat.kernels import hist as kernels_hist

    t = np.array([5, 7, 0, 0, 0, 0], np.uint32)
    c = np.array([2**40, 1], np.int64)
    seen = np.array([2**32 - 100], np.int64)
    kernels_hist._flush(t, seen, 0, 99, c)  # 2**32 - 1 values at most: no flush yet
    assert seen[0] == 2**32 - 1 and c.tolist() == [2**40, 1] and t[0] == 5
    kernels_hist._flush(t, seen, 0, 1, c)  # one more could overflow: flushed first
    assert c.tolist() == [2**40 + 5, 8] and not t.any() and seen[0] == 1
    t[:2] = 3
    kernels_hist._flush(t, seen, 0, -1, c)  # the end of the task
    assert c.tolist() == [2**40 + 8, 11] and not t.any()
