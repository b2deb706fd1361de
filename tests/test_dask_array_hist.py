"""bnstat.dask.hist: the histograms, quantiles and amax of a dask array, pass by pass in dask.

Two references: ``bnstat.hist`` on the same data in memory (counts, edges,
under/overflow, zeros, quantiles and amax bit-identical, whatever the
chunking), and numpy on its own (np.histogram per unit over the same edges,
edges as np.linspace of the unit's min..max, np.quantile method "linear" in
float64; units by tests/reference.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from reference import hist_edges, units

da = pytest.importorskip("dask.array", reason="the dask extra is not installed")

import bnstat  # noqa: E402
import bnstat.dask  # noqa: E402
from bnstat.errors import BnstatError, BnstatWarning, DataError, UsageProblem  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")

QS = [0.0, 0.001, 0.37, 0.5, 0.999, 1.0]


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)  # the NaN values here are on purpose
        return fn(*args, **kw)


def _data(shape, rng):
    """Normal float32 data with ties, values on bin edges, a few NaN and a constant unit."""
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x.reshape(-1)[::7] = np.round(x.reshape(-1)[::7])
    x.reshape(-1)[5::97] = np.nan
    return x


def _same(got, want):
    """``got`` bit-identical to ``want`` (bnstat.hist's Histogram)."""
    assert got.unit_shape == want.unit_shape and got.range == want.range
    for f in ("edges", "counts", "underflow", "overflow", "zero_count"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
    assert got.quantile_q == want.quantile_q
    if want.quantile_values is not None:
        np.testing.assert_array_equal(got.quantile_values, want.quantile_values)
    assert got.amax_values.keys() == want.amax_values.keys()
    for m in want.amax_values:
        np.testing.assert_array_equal(got.amax_values[m], want.amax_values[m], err_msg=m)
    for f in ("count", "nan_count", "min", "max"):
        np.testing.assert_array_equal(getattr(got.stats, f), getattr(want.stats, f), err_msg=f)
    np.testing.assert_allclose(got.stats.mean, want.stats.mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.stats.var, want.stats.var, rtol=1e-12)


def _against_numpy(h, x, ref, rng_mode, bins, qs=None):
    """Counts (np.histogram over the unit's edges), edges (np.linspace) and quantiles
    (np.quantile of the unit's non-NaN values, float64) of every unit."""
    unit_shape, rows = units(x, **ref)
    assert h.unit_shape == unit_shape
    counts = h.counts.reshape(-1, bins)
    edges = h.edges.reshape(-1, bins + 1)
    qv = None if qs is None else h.quantile_values.reshape(-1, len(qs))
    for u, row in enumerate(rows):
        v = row[~np.isnan(row)]
        if rng_mode == "abs":
            v = np.abs(v)
        np.testing.assert_array_equal(edges[u], hist_edges(v, rng_mode, bins), err_msg=f"unit {u}")
        np.testing.assert_array_equal(counts[u], np.histogram(v, bins=edges[u])[0], err_msg=f"unit {u}")
        if qv is not None:
            np.testing.assert_array_equal(qv[u], np.quantile(row[~np.isnan(row)], qs, method="linear"),
                                          err_msg=f"unit {u}")


# shape, layout options (also those of the numpy reference), chunkings: one block, blocks
# along N, blocks along C and the spatial axes (and N)
CASES = [
    ((12, 6, 5, 4), dict(layout="NCHW"), [-1, (5, 6, 5, 4), (12, 4, 2, 3), (7, 1, 5, 1)]),
    ((12, 6, 5, 4), dict(layout="NCHW", norm="layer"), [(5, 6, 5, 4), (4, 4, 2, 3)]),
    ((12, 6, 5, 4), dict(layout="NCHW", norm="instance"), [-1, (5, 2, 5, 3)]),
    ((12, 6, 5, 4), dict(layout="NCHW", norm="group", groups=3), [(5, 6, 5, 4), (4, 2, 3, 4)]),
    ((10, 5, 4, 6), dict(layout="NHWC"), [-1, (3, 5, 4, 6), (10, 2, 3, 4)]),
    ((40, 7), dict(layout="NC"), [-1, (9, 7), (13, 3)]),
]
PASSES = [dict(range="auto", bins=32, quantiles=QS),
          dict(range="abs", bins=256, amax=["max", "percentile:99.9", "mse", "entropy"]),
          dict(range=(-2.5, 3.0), bins=16, quantiles=[0.5])]


@pytest.mark.parametrize("shape,opts,chunkings", CASES,
                         ids=[f"{o['layout']}-{o.get('norm', 'batch')}" for _, o, _ in CASES])
def test_equal_to_bnstat_hist_and_numpy(rng, shape, opts, chunkings):
    x = _data(shape, rng)
    for kw in PASSES:
        want = _quiet(bnstat.hist, x, **opts, **kw)["array"]
        for chunks in chunkings:
            got = _quiet(bnstat.dask.hist, da.from_array(x, chunks=chunks), **opts, **kw)
            assert got.name == "array"
            _same(got, want)
        _against_numpy(got, x, opts, kw["range"], kw["bins"], kw.get("quantiles"))


def test_per_tensor_inf_and_fortran_blocks(rng):
    """--per-tensor (one unit); +-inf in some units (their finite range in a pass of its own);
    Fortran-ordered blocks (read transposed by bnstat: the units in another scan order)."""
    x = _data((12, 6, 5, 4), rng)
    x[3, 2, 1, 1] = np.inf
    x[7, 4, 0, 2] = -np.inf
    for kw in (dict(per_tensor=True, bins=64, quantiles=[0.25, 0.5]),
               dict(bins=32, quantiles=[0.1, 0.9]), dict(range="abs", bins=200, amax=["mse"])):
        want = _quiet(bnstat.hist, x, layout="NCHW", **kw)["array"]
        for arr in (da.from_array(x, chunks=(5, 4, 5, 4)), da.from_array(np.asfortranarray(x), chunks=-1),
                    da.from_array(x, chunks=(12, 6, 5, 4)).T.T):
            got = _quiet(bnstat.dask.hist, arr, layout="NCHW", **kw)
            _same(got, want)
    finite = np.where(np.isinf(x), np.nan, x)  # the edges over the finite values
    h = _quiet(bnstat.dask.hist, da.from_array(x, chunks=(5, 2, 5, 4)), layout="NCHW", bins=32)
    _against_numpy(h, finite, dict(layout="NCHW"), "auto", 32)
    # +-inf counted apart, never in a bin nor under/overflow (README "Histograms")
    np.testing.assert_array_equal(h.stats.moments.inf_count, [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(h.overflow + h.underflow, 0)


def test_quantile_counting_passes(rng, monkeypatch):
    """Small counter bounds: the slots are counted over several passes before their keys are
    collected, the keys of a slot gathered from many blocks; float64 keys take more passes."""
    import bnstat.quantiles as quantiles

    monkeypatch.setattr(quantiles, "COUNTER_BYTES", 4096)
    x = _data((30, 4, 6), rng).astype(np.float64)
    got = []
    for kw in (dict(quantiles=[0.001, 0.37, 0.5, 1.0], bins=8),
               dict(quantiles=[0.5], bins=8, per_tensor=True)):
        want = _quiet(bnstat.hist, x, layout="NCL", **kw)["array"]
        got.append(_quiet(bnstat.dask.hist, da.from_array(x, chunks=(7, 3, 4)), layout="NCL", **kw))
        _same(got[-1], want)
    _against_numpy(got[0], x, dict(layout="NCL"), "auto", 8, [0.001, 0.37, 0.5, 1.0])
    np.testing.assert_array_equal(got[1].quantile_values, [np.quantile(x[~np.isnan(x)], [0.5])])


def test_identical_between_runs_and_chunkings(rng):
    x = _data((16, 6, 4, 4), rng)
    runs = [_quiet(bnstat.dask.hist, da.from_array(x, chunks=c), layout="NCHW", quantiles=[0.5],
                   bins=64) for c in [(3, 5, 4, 4), (3, 5, 4, 4), (16, 1, 2, 4)]]
    for h in runs[1:]:
        _same(h, runs[0])


def test_quantile_and_amax_not_asked_for_run_the_passes_again(rng):
    x = _data((20, 3, 8), rng)
    h = _quiet(bnstat.dask.hist, da.from_array(x, chunks=(6, 2, 8)), layout="NCL", bins=256)
    _, rows = units(x, layout="NCL")
    want = [np.quantile(r[~np.isnan(r)], 0.3) for r in rows]
    np.testing.assert_array_equal(_quiet(h.quantile, 0.3), want)
    np.testing.assert_array_equal(_quiet(h.amax, "max"), [np.nanmax(np.abs(r)) for r in rows])


@pytest.mark.filterwarnings("ignore::bnstat.errors.BnstatWarning")
def test_xarray_dims_name_and_numpy_backed(rng):
    xr = pytest.importorskip("xarray", reason="xarray is not installed")
    x = _data((8, 5, 4, 3), rng)
    want = bnstat.hist(x, layout="NCHW", quantiles=[0.5], bins=16)["array"]
    arr = xr.DataArray(da.from_array(x, chunks=(3, 2, 4, 3)), dims=("N", "C", "H", "W"), name="acts")
    got = bnstat.dask.hist(arr, quantiles=[0.5], bins=16)
    assert got.name == "acts" and got.stats.layout == "NCHW" and not got.stats.assumed_layout
    _same(got, want)
    nhwc = xr.DataArray(da.from_array(x.transpose(0, 2, 3, 1), chunks=(3, 4, 3, 2)),
                        dims=("batch", "height", "width", "channel"))
    _same(bnstat.dask.hist(nhwc, quantiles=[0.5], bins=16), want)
    numpy_backed = bnstat.dask.hist(xr.DataArray(x, dims=("N", "C", "H", "W"), name="np"),
                                    quantiles=[0.5], bins=16)
    assert numpy_backed.name == "np"
    _same(numpy_backed, want)
    assert bnstat.dask.hist(da.from_array(x), layout="NCHW", name="given", bins=4).name == "given"


@pytest.mark.filterwarnings("ignore::bnstat.errors.BnstatWarning")
def test_on_a_distributed_client(rng):
    distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
    x = _data((24, 6, 5, 4), rng)
    x[2, 3, 1, 1] = np.inf
    kw = dict(layout="NCHW", quantiles=[0.01, 0.5], bins=128)
    want = bnstat.hist(x, **kw)["array"]
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster):
        got = bnstat.dask.hist(da.from_array(x, chunks=(7, 4, 5, 4)), **kw)
        absval = bnstat.dask.hist(da.from_array(x, chunks=(7, 4, 5, 4)), layout="NCHW",
                                  range="abs", amax=["entropy"], bins=256)
    _same(got, want)
    _same(absval, bnstat.hist(x, layout="NCHW", range="abs", amax=["entropy"], bins=256)["array"])


@pytest.mark.parametrize("kw", [dict(bins=0), dict(range="5:1"), dict(range="a:b"),
                                dict(quantiles=[1.5]), dict(quantiles="0.5,x"),
                                dict(layout="NCHW"), dict(layout="NCC"),
                                dict(amax=["mse"]), dict(range="abs", amax=["nope"]),
                                dict(range="abs", amax=["mse"], bins=64),
                                dict(norm="group", groups=4)])
def test_bad_inputs_give_the_errors_of_bnstat_hist(rng, kw):
    x = rng.standard_normal((6, 3, 5)).astype(np.float32)
    with pytest.raises(BnstatError) as want:
        bnstat.hist(x, **{"layout": "NCL", **kw})
    with pytest.raises(BnstatError) as got:
        bnstat.dask.hist(da.from_array(x, chunks=(2, 3, 5)), **{"layout": "NCL", **kw})
    assert type(got.value) is type(want.value) and isinstance(got.value, UsageProblem)
    assert got.value.message == want.value.message


def test_nan_raise_and_bad_arrays(rng):
    x = _data((6, 3, 5), rng)
    with pytest.raises(DataError) as want:
        bnstat.hist(x, layout="NCL", nan="raise")
    with pytest.raises(DataError) as got:
        bnstat.dask.hist(da.from_array(x, chunks=2), layout="NCL", nan="raise")
    assert got.value.message == want.value.message
    with pytest.raises(BnstatError, match="at least 2"):
        bnstat.dask.hist(da.ones((5,), chunks=2))
    with pytest.raises(BnstatError) as got:
        bnstat.dask.hist(da.from_array(np.array([[1, 2]], dtype=complex)), layout="NC")
    with pytest.raises(BnstatError) as want:
        bnstat.hist(np.array([[1, 2]], dtype=complex), layout="NC")
    assert got.value.message == want.value.message


def test_merge_partials_places_the_keys_of_each_slot_in_order():
    from bnstat.dask_array_hist import merge_partials
    from bnstat.dask_hist import _dense, _pack

    t = dict(pos=np.zeros((2, 2), np.int64), n_counts=5)
    spec = dict(count=None, select=t)
    p = dict(scounts=_pack(np.array([1, 0, 0, 0, 0, 0])), nkeys=_pack(np.array([[2, 0], [1, 0]])),
             keys=np.array([10, 11, 20], np.uint64))
    q = dict(scounts=_pack(np.array([1, 0, 0, 3, 0, 0])), nkeys=_pack(np.array([[1, 0], [0, 2]])),
             keys=np.array([12, 30, 31], np.uint64))
    m = merge_partials(p, q, spec)
    np.testing.assert_array_equal(_dense(m["scounts"], (6,)), [2, 0, 0, 3, 0, 0])
    np.testing.assert_array_equal(_dense(m["nkeys"], (2, 2)), [[3, 0], [1, 2]])
    np.testing.assert_array_equal(m["keys"], [10, 11, 12, 20, 30, 31])


def test_unknown_chunk_sizes_are_computed_on_a_copy():
    """Boolean indexing leaves a dask array's chunk sizes unknown (NaN); both functions compute
    them (on a copy: the caller's array keeps its chunks) instead of failing on the shape."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((60, 3, 4, 4)).astype(np.float32)
    keep = a[:, 0, 0, 0] > 0
    x = da.from_array(a, chunks=(10, 3, 4, 4))
    y = x[x[:, 0, 0, 0] > 0]
    assert np.isnan(y.chunks[0][0])
    kept = a[keep].astype(np.float64)
    s = bnstat.dask.moments(y, layout="NCHW")
    np.testing.assert_allclose(s.mean, kept.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_array_equal(s.count, np.full(3, kept.size // 3))
    h = bnstat.dask.hist(y, layout="NCHW", bins=8, quantiles=[0.5])
    for c in range(3):
        v = kept[:, c].ravel()
        np.testing.assert_array_equal(h.counts[c], np.histogram(v, bins=h.edges[c])[0])
        assert h.quantile_values[c, 0] == np.quantile(v, 0.5)
    assert np.isnan(y.chunks[0][0])  # the caller's array is as it was
