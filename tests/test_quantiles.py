"""Exact quantiles: bit-identical to np.quantile(method="linear") of each unit's non-NaN float64 values."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import units

import bnstat
from bnstat import quantiles as qmod
from bnstat.errors import BnstatWarning

QS = [0.0, 0.001, 0.25, 0.5, 0.7, 0.999, 0.9999, 1.0]


def exact(x, qs=QS, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        h = bnstat.hist(x, bins=4, quantiles=qs, **kw)["array"]
    return h.quantile(qs).reshape(-1, len(qs))


def reference(x, qs=QS, **kw):
    _, rows = units(x, **kw)
    out = []
    for row in rows:
        v = row[~np.isnan(row)]
        with np.errstate(invalid="ignore"):  # inf - inf in numpy's _lerp
            out.append(np.quantile(v, qs) if v.size else np.full(len(qs), np.nan))
    return np.array(out)


def assert_bits(got, ref):
    """Bit for bit, except that -0.0 == +0.0 where numpy's sort leaves zeros of both signs
    in an unspecified order (README "Exact quantiles")."""
    got, ref = np.asarray(got), np.asarray(ref)
    same = (got.view(np.int64) == ref.view(np.int64)) | (np.isnan(got) & np.isnan(ref)) | ((got == 0) & (ref == 0))
    assert same.all(), f"{got[~same]} != {ref[~same]}"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.uint16, np.int32, np.int64])
@pytest.mark.parametrize("layout", [dict(layout="NCHW"), dict(layout="NHWC"), dict(layout="NCL", norm="layer")])
def test_bit_identical_to_np_quantile(dtype, layout, rng):
    shape = (6, 3, 4, 5) if len(layout["layout"]) == 4 else (6, 3, 7)
    if np.dtype(dtype).kind == "f":
        x = (rng.standard_normal(shape) * 10).astype(dtype)
        x.flat[::7] = np.round(x.flat[::7])  # ties
    else:
        info = np.iinfo(dtype)
        x = rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape).astype(dtype)
    if dtype == np.int64:
        x.flat[::5] = np.int64(2**62) + np.arange(x.size)[::5]  # beyond float64's integers
    row = x[0].nbytes
    for chunk in (row, x.nbytes):
        got = exact(x, chunk_size=chunk, threads=1 if chunk == row else 2, **layout)
        assert_bits(got, reference(x, **layout))


def test_special_values(rng):
    x = rng.standard_normal((40, 6)).astype(np.float64)
    x[:, 0] = 3.25                          # a constant
    x[::3, 1] = np.nan                       # NaN mixed in
    x[:, 2] = np.where(np.arange(40) % 2, -0.0, 5e-324)  # subnormals and -0.0
    x[:20, 3] = np.inf                       # +inf and finite
    x[:, 3] = np.where(np.arange(40) % 3 == 0, -np.inf, x[:, 3])
    x[:, 4] = np.nan                         # an empty unit
    x[:, 5] = np.repeat([1.0, 2.0], 20)      # ties at the median
    got = exact(x, layout="NC")
    with np.errstate(invalid="ignore"):
        ref = reference(x, layout="NC")
    assert_bits(got, ref)
    assert np.isnan(got[4]).all()


def test_signed_zeros_of_one_sign_are_kept():
    x = np.array([[-0.0], [-0.0], [-0.0], [1.0]])
    got = exact(x, qs=[0.0, 0.5, 0.6], layout="NC")
    ref = np.quantile(x[:, 0], [0.0, 0.5, 0.6])
    np.testing.assert_array_equal(np.signbit(got[0]), np.signbit(ref))
    assert_bits(got[0], ref)


def test_float32_subnormals_and_extremes():
    f = np.float32
    x = np.array([f(1e-45), f(-1e-45), f(3e38), f(-3e38), f(1e-40), f(0.0), f(-0.0), f(np.inf)] * 3,
                 dtype=np.float32).reshape(-1, 1)
    assert_bits(exact(x, layout="NC"), reference(x, layout="NC"))


def test_many_counting_passes(monkeypatch, rng):
    """Tiny counter budgets: every slot narrows by 2**8 per pass, down to single keys."""
    monkeypatch.setattr(qmod, "COUNTER_BYTES", 2048)
    x = (rng.standard_normal((300, 2)) * 1e3).astype(np.float64)
    x[:150, 1] = 7.0  # a huge tie
    assert_bits(exact(x, layout="NC"), reference(x, layout="NC"))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), n=st.integers(1, 60), kind=st.sampled_from(["f32", "f64", "i16"]),
       q=st.lists(st.floats(0, 1), min_size=1, max_size=4))
def test_hypothesis(seed, n, kind, q):
    r = np.random.default_rng(seed)
    if kind == "i16":
        x = r.integers(-5, 5, size=(n, 2)).astype(np.int16)
    else:
        x = (r.standard_normal((n, 2)) * r.choice([1e-30, 1.0, 1e30])).astype(np.float32 if kind == "f32" else np.float64)
        x[r.random(x.shape) < 0.1] = np.nan
    assert_bits(exact(x, qs=q, layout="NC"), reference(x, qs=q, layout="NC"))


def test_per_tensor(rng):
    x = rng.standard_normal((10, 3, 4)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        h = bnstat.hist(x, layout="NCL", bins=8, quantiles=[0.1, 0.9], per_tensor=True)["array"]
    assert h.unit_shape == (1,)
    assert_bits(h.quantile([0.1, 0.9])[0], np.quantile(x.astype(np.float64).ravel(), [0.1, 0.9]))
    np.testing.assert_array_equal(h.counts[0], np.histogram(x.astype(np.float64).ravel(), bins=h.edges[0])[0])


def test_quantile_not_computed_runs_again(rng):
    x = rng.standard_normal((30, 2))
    h = bnstat.hist(x, layout="NC", bins=4, quantiles=[0.5])["array"]
    assert_bits(h.quantile(0.3), np.quantile(x, 0.3, axis=0))


def test_bad_quantiles():
    for bad in ("1.5", "-0.1", "a", ""):
        with pytest.raises(ValueError, match="quantiles must be between 0 and 1|give numbers"):
            qmod.check_quantiles(bad)


def test_counting_slot_buckets_of_float32_keys(rng):
    """A counting slot's bucket of each float32 value (kernels.hist ``_row_buckets``, the first
    quantile pass and any unit with one counting slot) is base + (key - lo) >> shift for keys
    in the slot, else the scratch index, for slots anywhere in the float32 keys, at their
    ends, straddling the sign, and past them; NaN in none."""
    from numba import njit

    from bnstat.kernels import select as kh

    @njit
    def buckets(row, lo, span, sh, base, dummy, out):
        kh._row_buckets(row, lo, span, sh, base, dummy, out)

    f = np.float32
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan, 1.0, -1.0], f)
    row = np.concatenate([special, (rng.standard_normal(500) * rng.choice([1e-30, 1.0, 1e30], 500)).astype(f)])
    keys = qmod.to_keys(row, np.float32)
    lo_all, hi_all = qmod.key_span(np.float32)
    slots = [(lo_all, hi_all - lo_all, 24), (lo_all, 2**31, 20), (lo_all + 1, 2**31 - 2, 12),
             (hi_all - 2**16 + 1, 2**16 - 1, 8), (qmod.SIGN - 2**20, 2**21, 13), (qmod.SIGN, 0, 0),
             (lo_all - 5, 2**32 + 10, 25), (qmod.SIGN - 1, 1, 31)]
    for k in rng.choice(keys[~np.isnan(row)], 6):
        slots.append((int(k) - 300, 600, 2))
    for lo, span, sh in slots:
        got = np.full(row.size, -7, np.int64)
        buckets(row, np.uint64(lo), np.uint64(span), np.uint64(sh), 40, 9999, got)
        want = [40 + ((int(k) - lo) >> sh) if (not np.isnan(v) and 0 <= int(k) - lo <= span) else 9999
                for k, v in zip(keys, row)]
        np.testing.assert_array_equal(got, want, err_msg=f"slot {lo:#x} + {span:#x} >> {sh}")
