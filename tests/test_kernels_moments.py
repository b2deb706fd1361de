"""bnstat.kernels.moments called directly, against the float64 reference (tests/reference.py),
over the edge cases of tests/kernel_cases.py; the API over memory layouts; the input is never
modified."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from kernel_cases import cases, kernel_dtype, memory_layouts, values
from reference import assert_matches, ref_moments

import bnstat
from bnstat.errors import BnstatWarning
from bnstat.kernels import moments as kernels
from bnstat.stats import Moments, Stats
from bnstat.stream import split_tasks

CASES = list(cases(np.random.default_rng(7)))
HIGHER_CASES = [c for c in CASES if c.id.split("-")[0] in ("float32", "float64", "int16", "uint8")]


def as_stats(m: Moments, x4: np.ndarray) -> Stats:
    P, _, U, _ = x4.shape
    m = m.map(lambda a: a.reshape(P, U))
    return Stats(name="x", moments=m, shape=x4.shape, dtype=x4.dtype.name, layout="PACB",
                 reduce="AB", unit_axes=["P", "C"])


def run_kernel(x4: np.ndarray, sa: int, su: int, higher: bool = False) -> Moments:
    """The kernel's (sa, P, U) partial outputs merged as its caller does (Chan)."""
    P, _, U, _ = x4.shape
    shape = (sa, P, U)
    cnt, nan = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    mean, m2, m3, m4 = (np.zeros(shape) for _ in range(4))
    mn, mx = np.full(shape, np.inf), np.full(shape, -np.inf)
    if higher:
        kernels.moments4_higher(x4, sa, su, cnt, mean, m2, m3, m4, mn, mx, nan)
    else:
        kernels.moments4(x4, sa, su, cnt, mean, m2, mn, mx, nan)
    parts = [Moments(cnt[i].ravel(), mean[i].ravel(), m2[i].ravel(), mn[i].ravel(), mx[i].ravel(),
                     nan[i].ravel(), m3[i].ravel() if higher else None,
                     m4[i].ravel() if higher else None) for i in range(sa)]
    out = parts[0]
    for part in parts[1:]:
        out = out.merge(part)
    return out


def check(x: np.ndarray, sa: int, su: int, higher: bool = False):
    x4 = kernel_dtype(x)
    before = x4.copy()
    got = as_stats(run_kernel(x4, sa, su, higher), x4)
    np.testing.assert_array_equal(x4, before)  # the input is left as it was (NaN == NaN here)
    with np.errstate(invalid="ignore", over="ignore"):  # the reference's own inf - inf
        ref = ref_moments(x, layout="PACB", reduce="AB")
    assert_matches(got, ref, x, higher=higher)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_moments4_matches_the_reference(case):
    check(case.x, 1, 1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_moments4_split_into_tasks_matches_the_reference(case):
    """The task split of 4 threads (ranges of A merged, ranges of U side by side), and one more
    split than there are rows where there are few (tasks with an empty range)."""
    x = case.x
    check(x, *split_tasks(x.shape, 4))
    check(x, min(x.shape[1] + 1, 40), min(3, max(1, x.shape[2])))


@pytest.mark.parametrize("case", HIGHER_CASES, ids=lambda c: c.id)
def test_moments4_higher_matches_the_reference(case):
    if "extremes" in case.id and case.x.dtype.kind == "f":
        pytest.skip("the 4th power of float max overflows float64: no reference to compare with")
    check(case.x, 1, 1, higher=True)
    check(case.x, *split_tasks(case.x.shape, 4), higher=True)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.uint16])
@pytest.mark.parametrize("shape", [(2, 6, 5, 3), (1, 8, 4, 1)])
def test_every_memory_layout_reaches_the_kernels(dtype, shape, rng):
    """C, Fortran, strided, reversed, zero-stride arrays through the API (the sources hand the
    kernels C-contiguous chunks): one result, the view left as it was."""
    x = values(shape, dtype, rng, "nan" if np.dtype(dtype).kind == "f" else "normal")
    for name, view in memory_layouts(x):
        before = view.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BnstatWarning)  # the NaN counts
            (got,) = bnstat.moments(view, layout="PACB", reduce="AB", engine="numba",
                                    threads=2).values()
        np.testing.assert_array_equal(view, before, err_msg=name)
        assert_matches(got, ref_moments(view, layout="PACB", reduce="AB"), view)


def test_a_huge_count():
    """2**24 + 8 values in one unit (float32 cannot count them); int8 0, 1, 2, 3 repeated:
    mean 1.5 and variance 1.25 exactly (bottleneck gh-443)."""
    n = 2**24 + 8
    x = np.tile(np.arange(4, dtype=np.int8), n // 4).reshape(1, n, 1, 1)
    m = run_kernel(x, 1, 1)
    assert m.count.tolist() == [n] and m.nan_count.tolist() == [0]
    assert m.mean.tolist() == [1.5]
    assert abs(m.m2[0] / n - 1.25) <= 1e-12
    assert m.min.tolist() == [0.0] and m.max.tolist() == [3.0]
    m = run_kernel(x.reshape(1, n // 8, 1, 8), *split_tasks((1, n // 8, 1, 8), 4))
    assert m.count.tolist() == [n] and m.mean.tolist() == [1.5]


def test_a_float32_constant_has_zero_variance():
    """271.46 in float32, 2**21 times (STYLE 10): mean its float64 value, m2 exactly 0."""
    v = np.float32(271.46)
    for shape in [(1, 2**21, 1, 1), (1, 2**15, 1, 64), (1, 2**19, 4, 1)]:
        m = run_kernel(np.full(shape, v), 1, 1)
        assert set(m.mean.tolist()) == {float(v)} and set(m.m2.tolist()) == {0.0}


@pytest.mark.parametrize("offset", [2.0**20, 1e4])
def test_a_large_offset_with_a_tiny_spread(offset, rng):
    x = (offset + 1e-2 * rng.standard_normal((1, 20000, 3, 1))).astype(np.float32)
    got = as_stats(run_kernel(x, 1, 1), x)
    want = np.var(x.astype(np.float64), axis=(1, 3)).ravel()
    np.testing.assert_allclose(got.var.ravel(), want, rtol=1e-6)


@pytest.mark.parametrize("scale", [2.0**100, 2.0**-100])
def test_extreme_scales(scale, rng):
    x = rng.standard_normal((2, 50, 3, 4)) * scale
    check(x, 1, 1)


@pytest.mark.parametrize("shape", [(1, 3 * 2340, 1, 7), (1, 3 * 16384, 1, 1)])
@pytest.mark.parametrize("higher", [False, True])
def test_infinite_values_in_several_blocks(shape, higher):
    """Blocks of -inf only merge into a -inf mean, +inf and -inf in different blocks into NaN,
    as numpy's sum / n (the block merge once made inf - inf of every such mean)."""
    x = np.full(shape, -np.inf)
    both = np.ones(shape)
    both[0, 0] = np.inf
    both[0, -1] = -np.inf
    for data, mean in ((x, -np.inf), (both, np.nan)):
        m = run_kernel(data, 1, 1, higher)
        np.testing.assert_array_equal(m.mean, [mean])
        assert np.isnan(m.m2).all()
        if higher:
            assert np.isnan(m.m3).all() and np.isnan(m.m4).all()
