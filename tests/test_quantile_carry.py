"""A first pass that carries the probe (bnstat.histrun._Array.presample): where the counts need
one pass (--range LO:HI, or one bin) and the rows can be read on their own, a sample read ahead
of the pass plans the probe, the pass runs it beside the moments, and the quantiles are
np.quantile's bit for bit in that one pass; elsewhere the sampled pass and a probe pass, as
before."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_quantile_probe import LAYOUTS, shaped
from test_quantiles import QS, assert_bits, reference

import bnstat
import bnstat.histrun as hr
import bnstat.stream as stream
from bnstat import quantile_probe as qp
from bnstat.errors import BnstatWarning


@pytest.fixture
def spy(monkeypatch):
    """The passes over the data (``stream.source_moments`` calls) and the carried probes."""
    seen = {"passes": 0, "carried": 0}
    source_moments, end_carried = stream.source_moments, hr._Array.end_carried

    def passes(*a, **k):
        seen["passes"] += 1
        return source_moments(*a, **k)

    def carried(self):
        seen["carried"] += 1
        end_carried(self)

    monkeypatch.setattr(stream, "source_moments", passes)
    monkeypatch.setattr(hr._Array, "end_carried", carried)
    return seen


def run(x, qs=QS, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        return bnstat.hist(x, quantiles=qs, **kw)["array"]


def data(dtype, rng, n=6000):
    if np.dtype(dtype).kind == "f":
        x2 = (rng.standard_normal((n, 3)) * 10).astype(dtype)
        x2[::11, 1] = np.nan
        x2[::29, 2] = -0.0
        return x2
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), size=(n, 3)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.uint16, np.int32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opts", [dict(bins=1), dict(bins=1, range="abs"), dict(bins=4, range=(-5, 5))])
def test_one_pass_carries_the_probe(dtype, layout, opts, rng, small_sample, spy):
    x2 = data(dtype, rng)
    x = shaped(x2, layout)
    for chunk, threads in ((x.nbytes // 7, 1), (x.nbytes, 2)):
        spy.update(passes=0, carried=0)
        h = run(x, chunk_size=chunk, threads=threads, **layout, **opts)
        assert_bits(h.quantile(QS).reshape(-1, len(QS)), reference(x, **layout))
        assert spy["carried"] == 1
        if np.dtype(dtype).kind == "f":  # an i.i.d. sample of distinct values: one pass in all
            assert spy["passes"] == 1
        for u in range(3):  # the counts of that pass are np.histogram's
            v = x2[:, u].astype(np.float64)
            v = np.abs(v) if opts.get("range") == "abs" else v
            v = v[np.isfinite(v)]
            ref, _ = np.histogram(v[(v >= h.edges[u][0]) & (v <= h.edges[u][-1])], bins=h.edges[u])
            np.testing.assert_array_equal(h.counts[u], ref)
            assert h.zero_count[u] == (v == 0).sum()


def test_files_split_along_n(tmp_path, rng, small_sample, spy):
    """Three .npz files of one array (stored members): the sample is read from all of them."""
    x = shaped(data(np.float32, rng, 6000), LAYOUTS[0])
    paths = []
    for i, part in enumerate(np.array_split(x, 3)):
        paths.append(tmp_path / f"part{i}.npz")
        np.savez(paths[-1], acts=part)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        h = bnstat.hist([str(p) for p in paths], layout="NCHW", bins=1, quantiles=QS)
    (h,) = h.values()
    assert_bits(h.quantile(QS).reshape(-1, len(QS)), reference(x, layout="NCHW"))
    assert spy == {"passes": 3, "carried": 1}  # one pass: each file read once


def test_hdf5_contiguous_carries_and_compressed_does_not(tmp_path, rng, small_sample, spy):
    h5py = pytest.importorskip("h5py")
    x = shaped(data(np.float32, rng), LAYOUTS[0])
    for name, kw, carried in (("plain", {}, 1), ("gzip", dict(compression="gzip", chunks=(50, 3, 5, 4)), 0)):
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("acts", data=x, **kw)
        spy.update(passes=0, carried=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BnstatWarning)
            (h,) = bnstat.hist(str(path), layout="NCHW", bins=1, quantiles=QS).values()
        assert_bits(h.quantile(QS).reshape(-1, len(QS)), reference(x, layout="NCHW"))
        assert spy["carried"] == carried
        assert spy["passes"] == (1 if carried else 2)


def test_kept_first_axis_and_counting_pass_do_not_carry(rng, small_sample, spy):
    """Units of their own in every row (layer norm over each sample), and a counting pass
    after the first (2048 bins over the exact range): the sampled pass and a probe pass."""
    x = (rng.standard_normal((40, 3, 50)) * 3).astype(np.float32)
    h = run(x, layout="NCL", norm="layer", bins=1)
    assert_bits(h.quantile(QS).reshape(-1, len(QS)), reference(x, layout="NCL", norm="layer"))
    assert spy["carried"] == 0
    x = shaped(data(np.float32, rng), LAYOUTS[0])
    h = run(x, layout="NCHW", bins=4)
    assert_bits(h.quantile(QS).reshape(-1, len(QS)), reference(x, layout="NCHW"))
    assert spy["carried"] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_unit_the_sample_saw_as_nan(layout, rng, small_sample, spy):
    """A unit whose values all lie in rows the sample did not read (NaN in every row it
    read), and a unit of NaN alone: estimated counts are wrong for both, the result exact."""
    x2 = (rng.standard_normal((6000, 3)) * 10).astype(np.float32)
    x = shaped(x2, layout)
    rows = x.shape[0]
    per_row = x2.shape[0] // rows
    read = np.zeros(rows, bool)
    for _, r0, r1 in hr._spread_blocks([rows], 64, x.nbytes, [x[0].nbytes]):
        read[r0:r1] = True
    assert read.any() and not read.all()
    keep = np.repeat(~read, per_row)
    x2[~keep, 0] = np.nan  # unit 0: values only where the sample did not look
    x2[:, 2] = np.nan  # unit 2: no value at all
    x = shaped(x2, layout)
    h = run(x, bins=1, **layout)
    got = h.quantile(QS).reshape(-1, len(QS))
    assert_bits(got, reference(x, **layout))
    assert np.isnan(got[2]).all() and np.isfinite(got[0]).all()
    assert spy["carried"] == 1


def test_a_misleading_read_ahead_sample(rng, small_sample, spy, monkeypatch):
    """No margin around the sample's estimates: ranks fall between the intervals and the
    counting passes after the first find them, exactly."""
    monkeypatch.setattr(qp, "MARGIN", 0.0)
    x = shaped(data(np.float32, rng), LAYOUTS[1])
    h = run(x, bins=1, layout="NHWC")
    assert_bits(h.quantile(QS).reshape(-1, len(QS)), reference(x, layout="NHWC"))
    assert spy["carried"] == 1 and spy["passes"] > 1


def test_one_bin_without_the_carry(rng, small_sample, spy, monkeypatch):
    """Rows that cannot be read on their own: one bin from the sampled pass and the probe
    pass, as before (counts, zeros and quantiles np.histogram's and np.quantile's)."""
    monkeypatch.setattr(hr, "_rows_readable", lambda src, plan: False)
    x2 = data(np.float32, rng)
    x = shaped(x2, LAYOUTS[0])
    h = run(x, bins=1, layout="NCHW")
    assert_bits(h.quantile(QS).reshape(-1, len(QS)), reference(x, layout="NCHW"))
    assert spy == {"passes": 2, "carried": 0}
    for u in range(3):
        v = x2[:, u].astype(np.float64)
        v = v[np.isfinite(v)]
        np.testing.assert_array_equal(h.counts[u], np.histogram(v, bins=h.edges[u])[0])
        assert h.zero_count[u] == (v == 0).sum()


@pytest.mark.parametrize("rows", [1, 3])
def test_the_pass_sample_stays_within_its_bound_in_small_chunks(rows, rng):
    """Chunks of fewer rows than the row stride: the stride runs on across them, so the
    sample holds at most ``cap`` values a unit (each chunk's first row would be k times more)."""
    A, U, B = 30000, 2, 64
    s = qp.Sampler(U, A * B, np.float32)
    x = rng.standard_normal((1, A, U, B)).astype(np.float32)
    sa, sb = s.strides(B)
    assert sa > rows
    for a0 in range(0, A, rows):
        s.add(x[:, a0:a0 + rows], np.arange(U))
    got = s.samples()
    want = np.ascontiguousarray(x[0, ::sa, :, ::sb].transpose(1, 0, 2)).reshape(U, -1)
    for u in range(U):
        np.testing.assert_array_equal(got[u], want[u])
        assert got[u].size <= s.cap
