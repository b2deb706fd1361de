"""The sampled probe of the exact quantiles (bnstat.quantile_probe): whatever the sample says,
the quantiles are np.quantile's bit for bit; a good sample resolves them in the probe pass."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_quantiles import QS, assert_bits, reference

import bnstat
from bnstat import quantile_probe as qp
from bnstat import quantiles as qmod
from bnstat.errors import BnstatWarning


@pytest.fixture
def passes(monkeypatch):
    """The slots left after each probe pass, and the probe's sampling strides."""
    seen = {"left": [], "k": []}
    advance = qmod.Selector._advance_probe
    init = qp.Sampler.__init__

    def spy(self, *a):
        advance(self, *a)
        seen["left"].append(sum(len(s) for s in self.slots))

    def spy_init(self, *a):
        init(self, *a)
        seen["k"].append(self.k)

    monkeypatch.setattr(qmod.Selector, "_advance_probe", spy)
    monkeypatch.setattr(qp.Sampler, "__init__", spy_init)
    return seen


def run(x, qs=QS, bins=4, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        return bnstat.hist(x, bins=bins, quantiles=qs, **kw)["array"]


LAYOUTS = [dict(layout="NCHW"), dict(layout="NHWC"), dict(layout="NC")]


def shaped(x2, layout):
    """(n, 3) values as an array of the layout (the units the last axis of x2)."""
    if layout["layout"] == "NCHW":
        return np.ascontiguousarray(x2.reshape(-1, 5, 4, 3).transpose(0, 3, 1, 2))
    if layout["layout"] == "NHWC":
        return x2.reshape(-1, 5, 4, 3)
    return x2


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.uint16, np.int32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_sampled_probe_resolves_every_rank(dtype, layout, rng, small_sample, passes):
    if np.dtype(dtype).kind == "f":
        x2 = (rng.standard_normal((6000, 3)) * 10).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x2 = rng.integers(max(info.min, -100), min(info.max, 100), size=(6000, 3)).astype(dtype)
    x = shaped(x2, layout)
    for chunk, threads in ((x.nbytes // 7, 1), (x.nbytes, 2)):
        passes["left"].clear()
        got = run(x, chunk_size=chunk, threads=threads, **layout).quantile(QS).reshape(-1, len(QS))
        assert_bits(got, reference(x, **layout))
        assert passes["k"][-1] > 1  # the sample was one value in k
        assert passes["left"] == [0]  # an i.i.d. sample: every rank placed by the probe pass


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_misleading_sample_costs_passes_not_exactness(layout, rng, small_sample, passes, monkeypatch):
    """No margin: the ranks fall between the probe's intervals, whose counts are known,
    and the ordinary passes find them there."""
    monkeypatch.setattr(qp, "MARGIN", 0.0)
    x2 = (rng.standard_normal((6000, 3)) * 10).astype(np.float32)
    x2[::11, 1] = np.nan
    x = shaped(x2, layout)
    got = run(x, chunk_size=x.nbytes // 5, **layout).quantile(QS).reshape(-1, len(QS))
    assert_bits(got, reference(x, **layout))
    assert passes["left"][0] > 0  # the probe did not place every rank


def test_a_sample_from_data_in_order(rng, small_sample):
    """Sorted data, read in order: a group of the sample disagrees with the next (a large
    design effect), so the intervals widen; the result is exact either way."""
    x = np.sort(rng.standard_normal(40000)).reshape(-1, 1)
    got = run(x, layout="NC").quantile(QS).reshape(-1, len(QS))
    assert_bits(got, reference(x, layout="NC"))
    assert qp.design_effect(x[:, 0][::7], np.median(x)) > 100


def test_design_effect_of_independent_values(rng):
    """About 1 for an i.i.d. sample (never below 1)."""
    d = [qp.design_effect(rng.standard_normal(8192), 0.0) for _ in range(20)]
    assert 1.0 <= np.median(d) < 2.0


def test_more_keys_than_room(rng, small_sample, passes):
    """A huge tie at the median: the probe's interval there is one key, with far more
    values than its room; its count is known, and one key is the answer."""
    x = (rng.standard_normal((20000, 2)) * 3).astype(np.float32)
    x[::2, 0] = 1.5
    x[:14000, 1] = np.round(x[:14000, 1])
    got = run(x, layout="NC").quantile(QS).reshape(-1, len(QS))
    assert_bits(got, reference(x, layout="NC"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_run_of_keys_past_its_room(layout, rng, small_sample, monkeypatch):
    """A unit's keys collect in one run (kernels.select._select_task); past its room only the
    slots' starts place the ranks (Selector._between_starts), and the next passes find
    them: with ties and NaN, in every layout, at any chunking (unit 0's room cut to 40 keys)."""
    calls = []
    between, probe = qmod.Selector._between_starts, qmod.Selector.probe

    def spy(self, u, *a):
        calls.append(u)
        between(self, u, *a)

    def small_room(self, samples):
        probe(self, samples)
        for sl in self.slots[0]:
            sl[5] = 10

    monkeypatch.setattr(qmod.Selector, "_between_starts", spy)
    monkeypatch.setattr(qmod.Selector, "probe", small_room)
    x2 = (rng.standard_normal((6000, 3)) * 3).astype(np.float32)
    x2[::3, 0] = np.round(x2[::3, 0] * 4) / 4
    x2[::13, 0] = np.nan
    x = shaped(x2, layout)
    for chunk in (x.nbytes // 9, x.nbytes):
        calls.clear()
        got = run(x, chunk_size=chunk, **layout).quantile(QS).reshape(-1, len(QS))
        assert_bits(got, reference(x, **layout))
        assert calls == [0]


def test_probe_slots_that_count(rng, small_sample, passes, monkeypatch):
    """A counter budget too small for the probe's keys: its largest slots count in buckets
    (with the values below them counted all the same)."""
    monkeypatch.setattr(qmod, "COUNTER_BYTES", 4096)
    x2 = (rng.standard_normal((6000, 3)) * 100).astype(np.float64)
    for layout in LAYOUTS:
        x = shaped(x2, layout)
        got = run(x, **layout).quantile(QS).reshape(-1, len(QS))
        assert_bits(got, reference(x, **layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_signed_zeros_at_the_probe_ends(layout, rng, small_sample, monkeypatch):
    """Zeros of both signs around the ranks: -0.0 and +0.0 are different keys but equal
    values, so a probe interval never starts at +0.0 or ends at -0.0 (the kernel counts
    the values below an interval by comparing values)."""
    for margin in (0.0, qp.MARGIN):
        monkeypatch.setattr(qp, "MARGIN", margin)
        x2 = rng.choice(np.array([-0.0, 0.0, 1.0, -1.0, 2.0], np.float32), size=(6000, 3),
                        p=[0.3, 0.3, 0.2, 0.1, 0.1])
        x = shaped(x2, layout)
        got = run(x, **layout).quantile(QS).reshape(-1, len(QS))
        assert_bits(got, reference(x, **layout))
    x2 = np.where(rng.random((6000, 3)) < 0.6, np.float32(-0.0), np.float32(1.0))
    x = shaped(x2, layout)
    got = run(x, qs=[0.0, 0.3, 0.59], **layout).quantile([0.0, 0.3, 0.59]).reshape(-1, 3)
    ref = reference(x, qs=[0.0, 0.3, 0.59], **layout)  # only -0.0 at those ranks; numpy's
    np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))  # lerp gives -0.0 or +0.0
    assert_bits(got, ref)


@pytest.mark.parametrize("rng_opt", ["auto", "abs"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_bin_counts_from_the_probe(rng_opt, layout, rng, small_sample):
    """One bin over the exact range: its count, the zeros, NaN and inf come from the
    moments and the probe pass (no counting pass); they are np.histogram's."""
    x2 = (rng.standard_normal((6000, 3)) * 4).astype(np.float32)
    x2[rng.random(x2.shape) < 0.2] = 0.0
    x2[::13, 0] = np.nan
    x2[::17, 1] = np.inf
    x2[5, 1] = -np.inf
    x = shaped(x2, layout)
    h = run(x, qs=[0.5], bins=1, range=rng_opt, **layout)
    for u in range(3):
        v = x2[:, u].astype(np.float64)
        v = np.abs(v) if rng_opt == "abs" else v
        fin = v[np.isfinite(v)]
        ref, _ = np.histogram(fin, bins=h.edges[u])
        np.testing.assert_array_equal(h.counts[u], ref)
        assert h.zero_count[u] == (v == 0).sum()
        assert h.underflow[u] == 0 and h.overflow[u] == 0
    assert_bits(h.quantile([0.5])[:, 0], reference(x, qs=[0.5], **layout)[:, 0])


def test_int64_keeps_the_counting_passes(rng, small_sample, passes):
    """int64 values do not order their keys through float64 (ties of different keys): no
    probe, the counting passes as before, the same exact result."""
    x = rng.integers(-2**62, 2**62, size=(5000, 2), dtype=np.int64)
    got = run(x, layout="NC").quantile(QS).reshape(-1, len(QS))
    assert_bits(got, reference(x, layout="NC"))
    assert passes["k"] == []


def test_many_units_keep_the_counting_passes(rng, passes, monkeypatch):
    """A sample of MIN_SAMPLE values a unit must fit in SAMPLE_BYTES; with more units than
    that allows, no sample is taken (its memory stays bounded) and the counting passes run."""
    monkeypatch.setattr(qp, "SAMPLE_BYTES", 4 * 1024 * 10)  # 10 units of 1024 float32
    x = rng.standard_normal((200, 11)).astype(np.float32)
    got = run(x, layout="NC").quantile(QS).reshape(-1, len(QS))
    assert_bits(got, reference(x, layout="NC"))
    assert passes["k"] == []
    x = rng.standard_normal((200, 10)).astype(np.float32)
    assert_bits(run(x, layout="NC").quantile(QS).reshape(-1, len(QS)), reference(x, layout="NC"))
    assert passes["k"] == [1]
