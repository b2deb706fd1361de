"""bnstat.Accumulator (issue 13): batches added one at a time give the statistics of all
of them stacked along N, as numpy computes them, and Stats that merge and save like the others."""

from __future__ import annotations

import numpy as np
import pytest

import bnstat
from bnstat.errors import DataError, UsageProblem


def data(seed=0, shape=(25, 3, 4, 5)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) * 2 + 1e3  # an offset: cancellation would show


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_updates_equal_numpy_over_the_stacked_batches(engine):
    x = data()
    acc = bnstat.Accumulator(layout="NCHW", engine=engine, higher=True)
    for i in range(0, 25, 7):
        acc.update(x[i:i + 7].astype(np.float32))
    x32 = x.astype(np.float32).astype(np.float64)
    s = acc.stats
    np.testing.assert_allclose(s.mean, x32.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(s.var, x32.var(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_array_equal(s.count, [25 * 20] * 3)
    assert s.shape == (25, 3, 4, 5) and acc.batches == 4
    d = x32 - x32.mean(axis=(0, 2, 3)).reshape(1, 3, 1, 1)
    m2 = (d ** 2).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(s.skew, (d ** 3).mean(axis=(0, 2, 3)) / m2 ** 1.5, rtol=1e-6, atol=1e-9)


def test_channels_last_layer_norm_and_array_likes():
    x = data(1, (9, 4, 4, 3))

    class Tensorish:  # anything with __array__
        def __init__(self, a):
            self.a = a

        def __array__(self, dtype=None, copy=None):
            return self.a if dtype is None else self.a.astype(dtype)

    acc = bnstat.Accumulator(layout="NHWC", norm="layer")
    acc.update(Tensorish(x[:4])).update(x[4:])
    np.testing.assert_allclose(acc.stats.var, x.reshape(9, -1).var(axis=1), rtol=1e-12)
    assert acc.stats.unit_shape == (9,)


def test_torch_tensors_with_grad():
    torch = pytest.importorskip("torch", reason="torch tensors as batches")
    x = data(2, (12, 3, 5))
    acc = bnstat.Accumulator(layout="NCL")
    t = torch.from_numpy(x).requires_grad_(True)
    acc.update(t[:5] * 1.0)  # in a forward hook: a tensor that requires grad
    acc.update(t[5:] * 1.0)
    np.testing.assert_allclose(acc.stats.mean, x.mean(axis=(0, 2)), rtol=1e-13)


def test_merge_save_and_show(tmp_path, cli):
    x = data(3)
    a = bnstat.Accumulator(layout="NCHW", name="block1")
    b = bnstat.Accumulator(layout="NCHW", name="block1")
    a.update(x[:10])
    b.update(x[10:])
    both = a.merge(b)
    np.testing.assert_allclose(both.stats.var, x.var(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(a.stats.merge(b.stats).mean, x.mean(axis=(0, 2, 3)), rtol=1e-13)
    a.save(tmp_path / "a.npz")
    b.save(tmp_path / "b.npz")
    code, out, err = cli("merge", tmp_path / "a.npz", tmp_path / "b.npz", "-o", tmp_path / "ab.npz")
    assert code == 0, err
    loaded = bnstat.load_stats(str(tmp_path / "ab.npz"))["block1"]
    np.testing.assert_allclose(loaded.var, x.var(axis=(0, 2, 3)), rtol=1e-12)
    with pytest.raises(Exception, match="exists"):
        a.save(tmp_path / "a.npz")


def test_errors():
    acc = bnstat.Accumulator(layout="NCHW")
    with pytest.raises(DataError, match="no batch added yet"):
        acc.stats
    acc.update(data(0, (4, 3, 2, 2)))
    with pytest.raises(DataError, match="batches must agree on every axis but N"):
        acc.update(data(0, (4, 3, 2, 3)))
    with pytest.raises(UsageProblem, match="--layout NCHW has 4 letters"):
        acc.update(np.ones((4, 3)))
    with pytest.raises(UsageProblem, match="nan="):
        bnstat.Accumulator(nan="raise")
    assert acc.batches == 1


# ---- histograms of batches (bins= and range=) ---------------------------------------------


def test_histograms_of_batches_equal_np_histogram_of_all(rng):
    x = rng.standard_normal((30, 3, 5, 4)).astype(np.float32) * 2
    x[3, 1, 2, 2] = 9.0  # over the range: overflow
    x[7, 0, 0, 0] = np.nan
    acc = bnstat.Accumulator(layout="NCHW", bins=16, range=(-4, 4))
    for i in range(0, 30, 7):
        if i == 7:
            with pytest.warns(bnstat.errors.BnstatWarning, match="1 NaN value"):
                acc.update(x[i:i + 7])
        else:
            acc.update(x[i:i + 7])
    h = acc.hist
    edges = np.linspace(-4.0, 4.0, 17)
    for c in range(3):
        v = x[:, c].astype(np.float64).ravel()
        v = v[~np.isnan(v)]
        want, _ = np.histogram(v, bins=edges)
        assert h.counts[c].tolist() == want.tolist()
        assert h.overflow[c] == np.count_nonzero(v > 4) and h.underflow[c] == np.count_nonzero(v < -4)
        np.testing.assert_allclose(h.edges[c], edges)
    with pytest.warns(bnstat.errors.BnstatWarning, match="1 NaN value"):
        (whole,) = bnstat.hist(x, layout="NCHW", bins=16, range="-4:4").values()
    assert np.array_equal(whole.counts, h.counts)
    np.testing.assert_allclose(h.stats.mean, whole.stats.mean, rtol=1e-12)
    assert acc.stats.count.tolist() == whole.stats.count.tolist()
    per_channel = x.astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(acc.stats.var, np.nanvar(per_channel, axis=1), rtol=1e-10)
    np.testing.assert_allclose(acc.stats.mean, np.nanmean(per_channel, axis=1), rtol=1e-12)


def test_histogram_accumulators_merge_and_save(rng, tmp_path):
    x = rng.standard_normal((20, 4)).astype(np.float32)
    a = bnstat.Accumulator(layout="NC", bins=8, range="-3:3", name="fc")
    b = bnstat.Accumulator(layout="NC", bins=8, range="-3:3", name="fc")
    a.update(x[:12])
    b.update(x[12:])
    both = a.merge(b)
    edges = np.linspace(-3.0, 3.0, 9)
    for c in range(4):
        assert both.hist.counts[c].tolist() == np.histogram(x[:, c], bins=edges)[0].tolist()
    both.save(tmp_path / "h.npz")
    from bnstat.histogram import load_hist

    loaded = load_hist(str(tmp_path / "h.npz"))["fc"]
    assert np.array_equal(loaded.counts, both.hist.counts)
    other = bnstat.Accumulator(layout="NC", bins=4, range="-3:3", name="fc").update(x)
    with pytest.raises(bnstat.errors.DataError, match="cannot merge"):
        a.merge(other)


@pytest.mark.parametrize("kw, match", [
    (dict(bins=8), "need range"),
    (dict(bins=8, range="auto"), "edges must be fixed"),
    (dict(bins=8, range="abs"), "edges must be fixed"),
    (dict(bins=0, range=(0, 1)), "bins"),
    (dict(bins=8, range=(1, 0)), "LO must be smaller"),
])
def test_histogram_options_refused(kw, match):
    with pytest.raises(bnstat.errors.UsageProblem, match=match):
        bnstat.Accumulator(layout="NC", **kw)


def test_hist_of_a_plain_accumulator_is_refused(rng):
    acc = bnstat.Accumulator(layout="NC").update(rng.standard_normal((4, 2)))
    with pytest.raises(bnstat.errors.DataError, match="counts no histogram"):
        acc.hist
