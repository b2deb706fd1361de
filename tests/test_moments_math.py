"""bnstat.moments on in-memory arrays against the float64 two-pass reference.

Every layout and norm kind of SPEC 1, --reduce, ddof 0 and 1, every dtype,
memory orders, chunk sizes from one row to the whole array, NaN and inf,
higher moments, and the numerical regressions of STYLE rule 10.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
from conftest import moments_on_few_threads
from reference import assert_matches, ref_moments

from bnstat.errors import BnstatError, BnstatWarning, DataError, UsageProblem

SHAPES = {
    "NC": (7, 4),
    "NCL": (5, 4, 9),
    "NLC": (5, 9, 4),
    "NCHW": (4, 4, 5, 6),
    "NHWC": (4, 5, 6, 4),
    "NCDHW": (3, 4, 2, 3, 5),
    "NDHWC": (3, 2, 3, 5, 4),
}
NORMS = [("batch", None), ("layer", None), ("instance", None), ("group", 2)]
# chunk size and ddof together: each chunking once, each ddof at two chunkings
CHUNK_DDOF = [("row", 0), ("3rows", 1), ("whole", 0), ("whole", 1)]


moments = moments_on_few_threads


def data(shape, rng, dtype=np.float64):
    x = rng.normal(2.0, 3.0, size=shape)
    return x.astype(dtype)


def chunk_sizes(x):
    """Bytes for one row, three rows, and the whole array."""
    row = x.nbytes // x.shape[0]
    return {"row": 1, "3rows": 3 * row, "whole": x.nbytes}


def expect_degenerate(ref, ddof):
    """pytest.warns when some unit has ddof values or fewer (SPEC 1: NaN and a warning)."""
    if np.any(ref.count <= ddof):
        return pytest.warns(BnstatWarning, match=f"ddof {ddof}")
    return contextlib.nullcontext()


def only(result):
    assert len(result) == 1
    return next(iter(result.values()))


def test_reference_agrees_with_numpy(rng):
    """The reference itself, checked against numpy's mean/var/min/max on NCHW batch norm."""
    x = data((4, 3, 5, 6), rng)
    ref = ref_moments(x, "NCHW", ddof=1)
    np.testing.assert_allclose(ref.mean, x.mean(axis=(0, 2, 3)), rtol=1e-14)
    np.testing.assert_allclose(ref.var, x.var(axis=(0, 2, 3), ddof=1), rtol=1e-13)
    np.testing.assert_array_equal(ref.min, x.min(axis=(0, 2, 3)))
    ref_g = ref_moments(x.transpose(0, 2, 3, 1)[:, :, :, :2].copy(), "NHWC", norm="group", groups=2)
    assert ref_g.unit_shape == (4, 2)
    np.testing.assert_allclose(ref_g.mean, x[:, :2].mean(axis=(2, 3)), rtol=1e-14)


@pytest.mark.parametrize("chunk,ddof", CHUNK_DDOF)
@pytest.mark.parametrize("norm,groups", NORMS)
@pytest.mark.parametrize("layout", list(SHAPES))
def test_layouts_and_norms(layout, norm, groups, ddof, chunk, rng):
    x = data(SHAPES[layout], rng)
    before = x.copy()
    ref = ref_moments(x, layout, norm, groups, ddof=ddof)
    with expect_degenerate(ref, ddof):
        got = only(moments(x, layout=layout, norm=norm, groups=groups, ddof=ddof,
                                  chunk_size=chunk_sizes(x)[chunk]))
    assert_matches(got, ref, x)
    np.testing.assert_array_equal(x, before)  # the input is left unmodified


@pytest.mark.parametrize("chunk", ["row", "whole"])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NCL"])
def test_group_norm_extremes(layout, groups, chunk, rng):
    """GroupNorm(1) is LayerNorm, GroupNorm(C) is InstanceNorm (unit shapes (N, G))."""
    x = data(SHAPES[layout], rng)
    got = only(moments(x, layout=layout, norm="group", groups=groups,
                              chunk_size=chunk_sizes(x)[chunk]))
    assert_matches(got, ref_moments(x, layout, "group", groups), x)
    same = ref_moments(x, layout, "layer" if groups == 1 else "instance")
    np.testing.assert_allclose(got.mean.ravel(), same.mean.ravel(), rtol=1e-9, atol=1e-12)

@pytest.mark.parametrize("chunk,ddof", CHUNK_DDOF)
@pytest.mark.parametrize("layout,reduce", [("NLC", "C"), ("NLC", "LC"), ("NLC", "NL"), ("NCHW", "HW"),
                                           ("NCHW", "NC"), ("NHWC", "NHW"), ("NCHW", "C"),
                                           ("NDHWC", "DHW")])
def test_reduce_letters(layout, reduce, ddof, chunk, rng):
    x = data(SHAPES[layout], rng)
    ref = ref_moments(x, layout, reduce=reduce, ddof=ddof)
    with expect_degenerate(ref, ddof):
        got = only(moments(x, layout=layout, reduce=reduce, ddof=ddof,
                                  chunk_size=chunk_sizes(x)[chunk]))
    assert_matches(got, ref, x)


def test_reduce_c_with_nlc_gives_per_token_statistics(rng):
    """A transformer LayerNorm: one unit per (N, L) token, over its C features."""
    x = data((3, 7, 16), rng)
    got = only(moments(x, layout="NLC", reduce="C"))
    assert got.mean.shape == (3, 7)
    np.testing.assert_allclose(got.mean, x.mean(axis=2), rtol=1e-12)
    np.testing.assert_allclose(got.var, x.var(axis=2), rtol=1e-12)


@pytest.mark.parametrize("layout", ["CN", "CNHW", "HWCN", "NHCW", "XNCY", "CXY"])
@pytest.mark.parametrize("norm,groups", [("batch", None), ("instance", None), ("group", 2),
                                         ("layer", None)])
@pytest.mark.parametrize("chunk", ["row", "whole"])
def test_unusual_layouts(layout, norm, groups, chunk, rng):
    """Any letters, C and N anywhere (SPEC 2)."""
    shape = tuple({"C": 4, "N": 3}.get(ch, 2 + i) for i, ch in enumerate(layout))
    x = data(shape, rng)
    if norm != "batch" and "N" not in layout:
        with pytest.raises(UsageProblem, match="N"):
            moments(x, layout=layout, norm=norm, groups=groups)
        return
    got = only(moments(x, layout=layout, norm=norm, groups=groups,
                              chunk_size=chunk_sizes(x)[chunk]))
    assert_matches(got, ref_moments(x, layout, norm, groups), x)


DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16"]


def typed_data(dtype, shape, rng):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.normal(1.5, 4.0, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
    x = rng.integers(lo, hi, size=shape, endpoint=True, dtype=np.int64 if dtype.kind == "i" else np.uint64)
    x.flat[0] = lo  # the extremes of the type are exact in float64
    x.flat[-1] = hi
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,norm,groups", [("NCHW", "batch", None), ("NHWC", "batch", None),
                                                ("NHWC", "group", 2), ("NCL", "instance", None),
                                                ("NLC", "layer", None)])
@pytest.mark.parametrize("chunk", ["row", "whole"])
def test_dtypes(dtype, layout, norm, groups, chunk, rng):
    """Accumulation in float64 whatever the input dtype: the reference casts to float64."""
    x = typed_data(dtype, SHAPES[layout], rng)
    got = only(moments(x, layout=layout, norm=norm, groups=groups,
                              chunk_size=chunk_sizes(x)[chunk]))
    assert_matches(got, ref_moments(x, layout, norm, groups), x)


@pytest.mark.parametrize("order", ["C", "F", "strided", "reversed", "swapped", "transposed_view"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NC"])
@pytest.mark.parametrize("norm,groups", [("batch", None), ("instance", None), ("group", 2)])
def test_memory_orders(order, layout, norm, groups, rng):
    """C, Fortran, strided, reversed and byte-swapped arrays give the same statistics."""
    base = data(tuple(2 * s for s in SHAPES[layout]), rng)
    if order == "C":
        x = np.ascontiguousarray(base[tuple(slice(0, s) for s in SHAPES[layout])])
    elif order == "F":
        x = np.asfortranarray(base[tuple(slice(0, s) for s in SHAPES[layout])])
    elif order == "strided":
        x = base[tuple(slice(None, None, 2) for _ in SHAPES[layout])]
    elif order == "reversed":
        x = base[tuple(slice(None, None, -2) for _ in SHAPES[layout])]
    elif order == "swapped":
        x = base[tuple(slice(0, s) for s in SHAPES[layout])].astype(">f8")
    else:  # neither C nor Fortran contiguous: channels last in memory, first in the view
        y = base[tuple(slice(0, s) for s in SHAPES[layout])]
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(y, 1, -1)), -1, 1)
    assert x.shape == SHAPES[layout]
    before = x.copy()
    for chunk in chunk_sizes(np.ascontiguousarray(x)).values():
        got = only(moments(x, layout=layout, norm=norm, groups=groups, chunk_size=chunk))
        assert_matches(got, ref_moments(x, layout, norm, groups), x)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_give_the_same_statistics(threads, rng):
    x = data((64, 4, 16, 16), rng)
    got = only(moments(x, layout="NCHW", threads=threads, chunk_size=x.nbytes // 3))
    assert_matches(got, ref_moments(x, "NCHW"), x)


def test_dict_source_names_the_arrays(rng):
    a, b = data((4, 3), rng), data((2, 5, 6), rng)
    got = moments({"first": a, "sub/second": b}, layout=None, channel_axis=1)
    assert set(got) == {"first", "sub/second"}
    assert_matches(got["first"], ref_moments(a, "NC"), a)
    assert_matches(got["sub/second"], ref_moments(b, "NCL"), b)


# ---- the seed example (acceptance 4) -------------------------------------------

def seed():
    return np.repeat(np.arange(1, 25), 5).reshape(2, 3, 4, 5).astype(np.float32)


def test_seed_example_nchw():
    got = only(moments(seed(), layout="NCHW"))
    np.testing.assert_array_equal(got.mean, [8.5, 12.5, 16.5])
    np.testing.assert_array_equal(got.count, [40, 40, 40])
    np.testing.assert_array_equal(got.min, [1, 5, 9])
    np.testing.assert_array_equal(got.max, [16, 20, 24])


def test_seed_example_nhwc():
    got = only(moments(seed(), layout="NHWC"))
    np.testing.assert_array_equal(got.mean, [12.5] * 5)
    np.testing.assert_array_equal(got.count, [24] * 5)


def test_default_layout_is_pytorch_and_warns():
    with pytest.warns(BnstatWarning, match="NCHW"):
        got = only(moments(seed()))
    np.testing.assert_array_equal(got.mean, [8.5, 12.5, 16.5])
    assert got.layout == "NCHW"


def test_channel_axis_option(rng):
    x = data((3, 5, 4), rng)
    got = only(moments(x, channel_axis=-1))
    assert_matches(got, ref_moments(x, "NLC"), x)


# ---- numerics (STYLE rule 10, acceptance 3) ---------------------------------------

@pytest.mark.parametrize("rows", [7, 61, None])
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_offset_1e4_tiny_spread_float32(rows, layout, rng):
    x = (1e4 + 1e-2 * rng.standard_normal((200, 4, 512) if layout == "NCL" else (200, 512, 4))
         ).astype(np.float32)
    chunk = rows and rows * x.nbytes // x.shape[0]
    got = only(moments(x, layout=layout, chunk_size=chunk))
    ref = ref_moments(x, layout)
    assert np.all(got.var > 0)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-6)
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-12)


@pytest.mark.parametrize("rows", [7, 61, None])
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_constant_271_46_float32(rows, layout):
    shape = (200, 3, 512) if layout == "NCL" else (200, 512, 3)
    x = np.full(shape, 271.46, dtype=np.float32)
    chunk = rows and rows * x.nbytes // x.shape[0]
    got = only(moments(x, layout=layout, chunk_size=chunk, ddof=1))
    np.testing.assert_array_equal(got.var, 0.0)
    np.testing.assert_array_equal(got.mean, np.float64(np.float32(271.46)))
    np.testing.assert_array_equal(got.std, 0.0)


def test_two_to_the_25_float32_ones():
    """bottleneck gh-443: a huge count through a zero-stride broadcast view."""
    x = np.broadcast_to(np.float32(1.0), (2**15, 1, 2**10))
    assert x.strides == (0, 0, 0)
    got = only(moments(x, layout="NCL"))
    np.testing.assert_array_equal(got.count, [2**25])
    np.testing.assert_array_equal(got.mean, [1.0])
    np.testing.assert_array_equal(got.var, [0.0])


def test_two_to_the_25_float32_ones_nhwc_layout():
    x = np.broadcast_to(np.float32(1.0), (2**23, 4))
    got = only(moments(x, layout="NC", chunk_size=2**22))
    np.testing.assert_array_equal(got.count, [2**23] * 4)
    np.testing.assert_array_equal(got.mean, [1.0] * 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_offset_2_to_the_20(dtype, layout, rng):
    # values 2**20 + k/8: exactly representable in float32 (its ulp at 2**20 is 1/8)
    k = rng.integers(0, 16, size=(300, 3, 50) if layout == "NCL" else (300, 50, 3))
    x = (2.0**20 + k / 8).astype(dtype)
    got = only(moments(x, layout=layout, chunk_size=x.nbytes // 7))
    ref = ref_moments(x, layout)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-9)
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-15)
    assert np.all(got.var > 0)


@pytest.mark.parametrize("scale", [2.0**100, 2.0**-100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_extreme_scales(scale, dtype, layout, rng):
    x = (rng.normal(0.5, 1.0, size=SHAPES[layout]) * scale).astype(dtype)
    got = only(moments(x, layout=layout, chunk_size=x.nbytes // 3, higher=True))
    ref = ref_moments(x, layout)
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-9)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-9)
    np.testing.assert_allclose(got.skew, ref.skew, rtol=1e-7)
    np.testing.assert_array_equal(got.min, ref.min)
    assert np.all(np.isfinite(got.var)) and np.all(got.var > 0)


# ---- higher moments ------------------------------------------------------------------

@pytest.mark.parametrize("chunk", ["row", "3rows", "whole"])
@pytest.mark.parametrize("layout,norm,groups", [("NCHW", "batch", None), ("NHWC", "batch", None),
                                                ("NHWC", "instance", None), ("NCL", "group", 2),
                                                ("NLC", "layer", None)])
@pytest.mark.parametrize("ddof", [0, 1])
def test_higher_moments(layout, norm, groups, ddof, chunk, rng):
    """Population skewness and excess kurtosis, whatever --ddof (SPEC 1)."""
    x = rng.gamma(2.0, 1.5, size=SHAPES[layout]) + 1.0  # skewed data
    ref = ref_moments(x, layout, norm, groups, ddof=ddof)
    with expect_degenerate(ref, ddof):
        got = only(moments(x, layout=layout, norm=norm, groups=groups, ddof=ddof, higher=True,
                                  chunk_size=chunk_sizes(x)[chunk]))
    assert_matches(got, ref, x, higher=True)


def test_higher_against_textbook_formula(rng):
    x = rng.exponential(2.0, size=(50, 2, 30))
    got = only(moments(x, layout="NCL", higher=True, chunk_size=x.nbytes // 5))
    v = x.transpose(1, 0, 2).reshape(2, -1)
    d = v - v.mean(axis=1, keepdims=True)
    m2, m3, m4 = (d**2).mean(1), (d**3).mean(1), (d**4).mean(1)
    np.testing.assert_allclose(got.skew, m3 / m2**1.5, rtol=1e-10)
    np.testing.assert_allclose(got.kurtosis, m4 / m2**2 - 3, rtol=1e-10)


def test_higher_off_by_default(rng):
    got = only(moments(data((4, 3), rng), layout="NC"))
    assert got.skew is None and got.kurtosis is None


# ---- ddof edge ----------------------------------------------------------------------

def test_ddof1_single_value_unit_is_nan_with_warning(rng):
    x = data((5, 4), rng)
    with pytest.warns(BnstatWarning, match="ddof 1"):
        got = only(moments(x, layout="NC", norm="instance", ddof=1))
    assert got.var.shape == (5, 4)
    assert np.all(np.isnan(got.var))
    assert not np.any(np.isinf(got.var))
    np.testing.assert_array_equal(got.mean, x)


# ---- NaN and inf ---------------------------------------------------------------------

def with_nans(rng, shape=(6, 4, 5, 5)):
    x = data(shape, rng)
    x[0, 1, 2, 3] = np.nan
    x[3, 1, 0, 0] = np.nan
    x[5, 3, 4, 4] = np.nan
    x[:, 2] = np.nan  # a unit that is all NaN
    return x


@pytest.mark.parametrize("chunk", ["row", "whole"])
@pytest.mark.parametrize("layout,norm", [("NCHW", "batch"), ("NCHW", "instance"), ("NCHW", "layer")])
def test_nan_omit(layout, norm, chunk, rng):
    x = with_nans(rng)
    with pytest.warns(BnstatWarning, match="NaN"):
        got = only(moments(x, layout=layout, norm=norm, chunk_size=chunk_sizes(x)[chunk]))
    ref = ref_moments(x, layout, norm, nan="omit")
    assert_matches(got, ref, x)
    assert got.nan_count.sum() == np.isnan(x).sum()
    np.testing.assert_array_equal(got.count + got.nan_count, np.full(ref.unit_shape, x.size // got.count.size))


def test_nan_omit_matches_numpy_nanfunctions(rng):
    x = with_nans(rng)
    with pytest.warns(BnstatWarning):
        got = only(moments(x, layout="NCHW"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN channel
        np.testing.assert_allclose(got.mean, np.nanmean(x, axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_allclose(got.var, np.nanvar(x, axis=(0, 2, 3)), rtol=1e-12)
        np.testing.assert_array_equal(got.min, np.nanmin(x, axis=(0, 2, 3)))


def test_nan_propagate_like_numpy(rng):
    x = with_nans(rng)
    with pytest.warns(BnstatWarning, match="NaN"):
        got = only(moments(x, layout="NCHW", nan="propagate"))
    assert np.isnan(got.mean).tolist() == [False, True, True, True]
    np.testing.assert_allclose(got.mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(got.var, x.var(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_array_equal(np.isnan(got.min), np.isnan(x.min(axis=(0, 2, 3))))
    np.testing.assert_array_equal(got.nan_count, np.isnan(x).sum(axis=(0, 2, 3)))


def test_nan_raise_names_array_and_first_unit(rng):
    x = with_nans(rng)
    with pytest.raises(DataError, match=r"acts.*\(C=1\)"):
        moments({"acts": x}, layout="NCHW", nan="raise")


def test_nan_raise_first_unit_of_instance_norm(rng):
    x = rng.normal(size=(3, 4, 5))
    x[2, 3, 1] = np.nan
    x[1, 2, 0] = np.nan
    with pytest.raises(DataError, match=r"\(N=1, C=2\)"):
        moments({"acts": x}, layout="NCL", norm="instance", nan="raise")


@pytest.mark.parametrize("chunk", ["row", "whole"])
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_inf_like_numpy(layout, chunk, rng):
    shape = (6, 4, 8) if layout == "NCL" else (6, 8, 4)
    x = data(shape, rng)
    c_axis = layout.index("C")

    def put(c, n, v):
        if layout == "NCL":
            x[n, c, 0] = v
        else:
            x[n, 0, c] = v

    put(0, 2, np.inf)
    put(1, 3, -np.inf)
    put(2, 0, np.inf)
    put(2, 5, -np.inf)
    axes = tuple(a for a in range(3) if a != c_axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want_mean, want_var = x.mean(axis=axes), x.var(axis=axes)
    got = only(moments(x, layout=layout, chunk_size=chunk_sizes(x)[chunk]))
    np.testing.assert_allclose(got.mean, want_mean, rtol=1e-12)  # inf, -inf, nan exactly; finite
    np.testing.assert_array_equal(np.isnan(got.var), np.isnan(want_var))
    np.testing.assert_allclose(got.var[3], want_var[3], rtol=1e-12)
    np.testing.assert_array_equal(got.max, x.max(axis=axes))
    np.testing.assert_array_equal(got.min, x.min(axis=axes))
    np.testing.assert_array_equal(got.nan_count, 0)


# ---- errors of the API -------------------------------------------------------------

def test_layout_length_mismatch_is_usage_problem(rng):
    with pytest.raises(UsageProblem, match=r"NCHW.*4 letters.*3 dimensions"):
        moments(data((2, 3, 4), rng), layout="NCHW")


def test_groups_must_divide_channels(rng):
    with pytest.raises(UsageProblem, match="--groups 3 does not divide the 4 channels"):
        moments(data((2, 4, 5), rng), layout="NCL", norm="group", groups=3)


@pytest.mark.parametrize("x", [np.zeros(5), np.zeros((0, 3)), np.array([[1 + 2j]]),
                               np.array([["a"]])], ids=["1d", "empty", "complex", "str"])
def test_unsupported_arrays_are_refused(x):
    with pytest.raises(BnstatError, match=r"dimension|empty|not supported"):
        moments(x, layout="NC" if x.ndim == 2 else None)
