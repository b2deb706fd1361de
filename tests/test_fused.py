"""The moments and a quantile pass's selection in one walk (bnstat.kernels.fused): bit for bit
what the moments kernel and select4 give apart, in the kernels and through ``bnstat.hist``."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
from test_quantiles import QS, assert_bits, reference

import bnstat
import bnstat.histrun as hr
from bnstat.errors import BnstatWarning
from bnstat.quantiles import Selector

pytest.importorskip("numba")
from bnstat.kernels import fused  # noqa: E402
from bnstat.kernels import select as ks  # noqa: E402
from bnstat.kernels import moments as km  # noqa: E402


def view(dtype, P, A, U, B, rng):
    """A (P, A, U, B) view with NaN, +-inf, both zeros, a unit of NaN alone and a constant one;
    with 5 or more units and rows of 1000 values (blocks of 16 rows, kernels.moments), units of
    zeros whose -0.0 is in a later block than their +0.0 and the other way round, and a unit
    whose middle block is NaN alone."""
    if np.dtype(dtype).kind == "f":
        x = (rng.standard_normal((P, A, U, B)) * 5).astype(dtype)
        x[0, A // 2, 0, B // 3] = np.nan
        x[:, :, 1] = np.nan  # a unit of NaN alone
        x[-1, 0, 2 % U, :2] = -0.0
        x[-1, A - 1, 2 % U, -1] = 0.0
        x[0, 1 % A, 3 % U, 0] = np.inf
        x[0, 0, 4 % U, :] = -np.inf
        x[:, :, 5 % U] = 0.0  # constant: +0.0 and (first) -0.0
        x[0, 0, 5 % U, 0] = -0.0
        if U >= 5 and B == 1000 and A >= 40:
            x[:, :, 2] = np.abs(x[:, :, 2]) + 1.0  # min +0.0 in block 0, -0.0 in block 2
            x[0, 1, 2, 5] = 0.0
            x[0, 35, 2, 7] = -0.0
            x[:, :, 3] = -np.abs(x[:, :, 3]) - 1.0  # max -0.0 in block 0, +0.0 in block 2
            x[-1, 2, 3, 1] = -0.0
            x[-1, 36, 3, 9] = 0.0
            x[:, 16:32, 4] = np.nan  # the middle block of unit 4: NaN alone
    else:
        info = np.iinfo(dtype)
        x = rng.integers(max(info.min, -300), min(info.max, 300), size=(P, A, U, B)).astype(dtype)
        x[:, :, 1] = x.flat[0]
    x.setflags(write=False)
    return x


def tables(x, probe: bool):
    """A real pass's tables (histrun.pass_tables) for the units of x: a probe pass planned on
    each unit's own values, or the first pass counting the keys' top bits."""
    P, A, U, B = x.shape
    vals = [x[p, :, u].ravel() for p in range(P) for u in range(U)]
    sel = Selector(P * U, x.dtype, [0.001, 0.5, 0.999])
    sel.set_counts(np.array([np.count_nonzero(~np.isnan(v.astype(np.float64))) for v in vals]))
    if probe:
        sel.probe([v[~np.isnan(v.astype(np.float64))] for v in vals])
    return hr.pass_tables(sel)


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint64) if a.dtype == np.float64 else a


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 9, 8, 2), (2, 13, 6, 700), (2, 40, 6, 1000), (1, 7, 8, 3136),
                                   (1, 3, 6, 20000)])
@pytest.mark.parametrize("probe", [True, False])
def test_one_walk_is_the_two_kernels_bit_for_bit(dtype, shape, probe, rng):
    """One block (B small), blocks of 16 rows and a short last one (B = 1000, P = 2), of 5 rows
    and of one row (B large); units of NaN alone, a block of NaN alone, -0.0 and +0.0 as the
    minimum or the maximum in different blocks, inf; tasks of 1 to 8 units: the moments'
    every bit, the selection's positions, counts below, bucket counts and stored keys."""
    x = view(dtype, *shape, rng)
    P, A, U, B = shape
    t = tables(x, probe)
    units = np.arange(P * U)
    for su in sorted({1, 3, U}):
        out = {}
        for how in ("apart", "fused"):
            tt = copy.deepcopy(t)
            m = [np.zeros((1, P, U), np.int64), np.zeros((1, P, U)), np.zeros((1, P, U)),
                 np.full((1, P, U), np.inf), np.full((1, P, U), -np.inf), np.zeros((1, P, U), np.int64)]
            args, done = hr._select_args(x, units, tt, su)
            if how == "apart":
                km.moments4_units(x, 1, su, *m)
                ks.select4(x, su, *args)
            else:
                fused.moments_select4(x, 1, su, *m, *args)
            done()
            out[how] = (m, tt)
        (ma, ta), (mf, tf) = out["apart"], out["fused"]
        for a, f in zip(ma, mf):
            np.testing.assert_array_equal(bits(f), bits(a))
        assert not probe or (ta["pos"] != t["pos"]).any()  # the pass stored keys
        # the last count is the kernels' scratch (tasks add to it at once: not compared)
        for key in ("pos", "keys") + (("below",) if probe else ()):
            np.testing.assert_array_equal(tf[key], ta[key], err_msg=key)
        np.testing.assert_array_equal(tf["counts"][:-1], ta["counts"][:-1])


def hist(x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        return bnstat.hist(x, quantiles=QS, **kw)["array"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opts", [dict(bins=1), dict(bins=4, range=(-5, 5))])
def test_hist_takes_one_walk_and_gives_the_same_results(dtype, opts, rng, small_sample, monkeypatch):
    """A carried first pass over NCHW chunks with 8 or more units (tasks of whole units): the one
    walk is taken, and moments, counts and quantiles are those of the kernels apart, the
    quantiles np.quantile's."""
    x2 = view(dtype, 1, 3000, 10, 1, rng)[0, :, :, 0]
    x = np.ascontiguousarray(x2.reshape(-1, 5, 4, 10).transpose(0, 3, 1, 2))
    walks = []
    one_walk = hr._moments_select

    def spy(*a):
        walks.append(one_walk(*a))
        return walks[-1]

    results = {}
    for how, fn in (("fused", spy), ("apart", lambda *a: None)):
        monkeypatch.setattr(hr, "_moments_select", fn)
        results[how] = hist(x, layout="NCHW", chunk_size=x.nbytes // 5, threads=2, **opts)
    assert walks and all(w is not None for w in walks)
    f, a = results["fused"], results["apart"]
    assert_bits(f.quantile(QS).reshape(-1, len(QS)), reference(x, layout="NCHW"))
    np.testing.assert_array_equal(f.quantile(QS), a.quantile(QS))
    np.testing.assert_array_equal(f.counts, a.counts)
    for key in ("count", "mean", "m2", "min", "max", "nan_count", "inf_count"):
        np.testing.assert_array_equal(bits(getattr(f.stats.moments, key)),
                                      bits(getattr(a.stats.moments, key)), err_msg=key)


@pytest.mark.parametrize("shape,threads,engine,dtype", [((1, 50, 3, 20), 2, "numba", np.float32),
                                                        ((1, 50, 16, 1), 2, "numba", np.float32),
                                                        ((1, 50, 16, 20), 2, "numpy", np.float32),
                                                        ((1, 50, 16, 20), 2, "numba", np.int16)])
def test_no_walk_where_the_moments_split_rows_or_units_are_lanes(shape, threads, engine, dtype, rng):
    """Three units on two threads (the moments' tasks cut A, whose merges the one walk does not
    make), B == 1 (NHWC), the numpy engine, integer data: the kernels apart."""
    x = view(dtype, *shape, rng)
    t = tables(x, True)
    assert hr._moments_select(x, np.arange(shape[2]), t, threads, engine) is None
    if engine == "numba":  # and where it applies, it is taken
        x = view(np.float32, 1, 50, 16, 20, rng)
        assert hr._moments_select(x, np.arange(16), tables(x, True), threads, engine) is not None


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_a_pass_with_a_visitor_has_the_moments_of_its_engine(engine, rng):
    """stream.source_moments with a selecting visitor (one walk or not) gives the moments it gives
    without one, bit for bit, for either engine (a Dask worker's pass: its visitor counts with
    numba whatever the moments' engine)."""
    from bnstat.io import open_any
    from bnstat.layout import make_plan
    from bnstat.stream import source_moments

    x = view(np.float32, 3, 40, 10, 1000, rng)[0]  # (40, 10, 1000): N C (H*W)
    (src,) = open_any(x)
    plan = make_plan(x.shape, layout="NCL")
    got = {}
    for visited in (False, True):
        t = tables(x.reshape(1, 40, 10, 1000), True)
        visit = hr.chunk_visitor(x.dtype, False, np.arange(10), None, t, 2) if visited else None
        got[visited] = source_moments(src, plan, chunk_size=x.nbytes // 3, threads=2, engine=engine,
                                      visit=visit)
    for key in ("count", "mean", "m2", "min", "max", "nan_count"):
        np.testing.assert_array_equal(bits(getattr(got[True], key)), bits(getattr(got[False], key)),
                                      err_msg=key)
