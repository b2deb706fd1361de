"""Property tests (STYLE rule 11, acceptance 5): the statistics of the whole equal
the merge of the statistics of any split along N, in any order, at any chunk
size; `bnstat merge` of saved parts equals one run; `show` reproduces the JSON
of the run that saved the file."""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
from conftest import run_inproc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_matches, ref_moments

import bnstat
from bnstat.stats import Moments

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CASES = [("NC", "batch", None, None), ("NCL", "batch", None, None), ("NLC", "batch", None, None),
         ("NCHW", "batch", None, None), ("NHWC", "batch", None, None), ("NCL", "instance", None, None),
         ("NHWC", "group", 2, None), ("NLC", "layer", None, None), ("NLC", None, None, "C"),
         ("NCDHW", "batch", None, None), ("NDHWC", "instance", None, None)]
N_KEPT = {"instance", "group", "layer"}


@st.composite
def problems(draw, n_min=2):
    layout, norm, groups, reduce = draw(st.sampled_from(CASES))
    n = draw(st.integers(n_min, 9))
    shape = [n] + [4 if ch == "C" else draw(st.integers(1, 4)) for ch in layout[1:]]
    kind = draw(st.sampled_from(["normal", "offset", "ints", "float32", "with_nan"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.normal(size=shape)
    elif kind == "offset":
        x = 1e4 + 1e-2 * rng.normal(size=shape)
    elif kind == "ints":
        x = rng.integers(-5, 6, size=shape).astype(np.int32)
    elif kind == "float32":
        x = rng.normal(3, 2, size=shape).astype(np.float32)
    else:
        x = rng.normal(size=shape)
        x[rng.random(shape) < 0.1] = np.nan
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=3, unique=True)))
    row_bytes = x.nbytes // n
    chunk = draw(st.sampled_from([1, row_bytes * 2, x.nbytes, None]))
    order = draw(st.permutations(range(len(cuts) + 1)))
    return dict(x=x, layout=layout, norm=norm or "batch", groups=groups, reduce=reduce, cuts=cuts,
                chunk=chunk, order=order)


def run(x, p, **kw):
    import warnings

    from bnstat.errors import BnstatWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)  # NaNs omitted: checked elsewhere
        out = bnstat.moments(x, layout=p["layout"], norm=p["norm"] if not p["reduce"] else "batch",
                             groups=p["groups"], reduce=p["reduce"], chunk_size=p["chunk"],
                             higher=True, **kw)
    (s,) = out.values()
    return s


def close(a, b, scale, rtol=1e-9):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True)


def assert_same(merged, whole, x, *, higher=True):
    np.testing.assert_array_equal(merged.count, whole.count)
    np.testing.assert_array_equal(merged.nan_count, whole.nan_count)
    np.testing.assert_array_equal(merged.min, whole.min)
    np.testing.assert_array_equal(merged.max, whole.max)
    finite = np.asarray(x, float)[np.isfinite(np.asarray(x, float))]
    scale = float(np.abs(finite).max()) if finite.size else 1.0
    close(merged.mean, whole.mean, scale * 1e-3)
    close(merged.var, whole.var, scale * scale * 1e-6)
    if higher:
        # skew and kurtosis are dimensionless: 1e-6 relative, or absolute near 0 (an offset
        # unit's skew of 1e-4 moves by 2e-10 between two merge orders: float64 rounding)
        close(merged.skew, whole.skew, 1.0, rtol=1e-6)
        close(merged.kurtosis, whole.kurtosis, 1.0, rtol=1e-6)


@SETTINGS
@given(problems())
def test_whole_equals_merge_of_any_split(p):
    x = p["x"]
    whole = run(x, p)
    bounds = [0, *p["cuts"], x.shape[0]]
    parts = [run(x[bounds[i]:bounds[i + 1]], p) for i in range(len(bounds) - 1)]
    n_kept = p["norm"] in N_KEPT or (p["reduce"] is not None and "N" not in p["reduce"])
    order = list(range(len(parts))) if n_kept else p["order"]  # units along N follow the parts
    merged = parts[order[0]]
    for i in order[1:]:
        merged = merged.merge(parts[i])
    assert merged.shape == whole.shape
    assert_same(merged, whole, x)
    # and both agree with the float64 two-pass reference
    ref = ref_moments(x, p["layout"], p["norm"], p["groups"], p["reduce"])
    assert_matches(whole, ref, x, rtol=1e-9 if x.dtype != np.float32 else 1e-9)


@SETTINGS
@given(problems())
def test_moments_merge_is_order_free(p):
    """Moments.merge of batch-norm parts, in any order and any grouping (associative)."""
    if p["norm"] in N_KEPT or p["reduce"] is not None:
        p = dict(p, norm="batch", groups=None, reduce=None)
    x = p["x"]
    bounds = [0, *p["cuts"], x.shape[0]]
    parts = [run(x[bounds[i]:bounds[i + 1]], p).moments for i in range(len(bounds) - 1)]
    left: Moments = parts[p["order"][0]]
    for i in p["order"][1:]:
        left = left.merge(parts[i])
    right: Moments = parts[-1]
    for m in reversed(parts[:-1]):
        right = m.merge(right)
    np.testing.assert_array_equal(left.count, right.count)
    np.testing.assert_array_equal(left.min, right.min)
    finite = np.asarray(x, float)[np.isfinite(np.asarray(x, float))]
    scale = float(np.abs(finite).max()) if finite.size else 1.0
    close(left.mean, right.mean, scale * 1e-3)
    close(left.m2, right.m2, scale * scale * x.size * 1e-6)
    close(left.m3, right.m3, scale**3 * x.size * 1e-6, rtol=1e-7)
    close(left.m4, right.m4, scale**4 * x.size * 1e-6, rtol=1e-7)


@SETTINGS
@given(problems())
def test_chunk_size_does_not_change_the_result(p):
    x = p["x"]
    a = run(x, dict(p, chunk=1))
    b = run(x, dict(p, chunk=None))
    assert_same(a, b, x)


def _nan_equal(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_nan_equal(u, v) for u, v in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
    return a == b


def _args(p):
    args = ["--layout", p["layout"], "--quiet", "--higher"]
    if p["reduce"]:
        args += ["--reduce", p["reduce"]]
    else:
        args += ["--norm", p["norm"]]
    if p["groups"]:
        args += ["--groups", str(p["groups"])]
    if p["chunk"]:
        args += ["--chunk-size", str(p["chunk"])]
    return args


CLI_SETTINGS = settings(max_examples=12, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@CLI_SETTINGS
@given(problems(), st.integers(0, 1))
def test_cli_merge_of_saved_parts_equals_one_run(p, ddof):
    x = p["x"]
    bounds = [0, *p["cuts"], x.shape[0]]
    with tempfile.TemporaryDirectory() as tmp:
        inputs, stats = [], []
        for i in range(len(bounds) - 1):
            os.mkdir(os.path.join(tmp, f"shard{i}"))
            path = os.path.join(tmp, f"shard{i}", "acts.npy")
            np.save(path, x[bounds[i]:bounds[i + 1]])
            inputs.append(path)
            out = os.path.join(tmp, f"part{i}.npz")
            code, _, err = run_inproc("moments", path, *_args(p), "--ddof", ddof, "-o", out)
            assert code == 0, err
            stats.append(out)
        code, whole, err = run_inproc("moments", *inputs, *_args(p), "--ddof", ddof, "--format", "json")
        assert code == 0, err
        code, merged, err = run_inproc("merge", *stats, "--format", "json")
        assert code == 0, err
    w, m = json.loads(whole)["arrays"][0], json.loads(merged)["arrays"][0]
    assert set(w) == set(m)
    for key in w:
        if key in ("mean", "var", "std", "skew", "kurtosis"):
            finite = np.asarray(x, float)[np.isfinite(np.asarray(x, float))]
            scale = float(np.abs(finite).max()) if finite.size else 1.0
            tol = {"mean": scale * 1e-3, "std": scale * 1e-3, "var": scale**2 * 1e-6}.get(key, 1e-6)
            rtol = 1e-9 if key in ("mean", "var", "std") else 1e-6
            # JSON null (a non-finite value, README "Output formats") as NaN
            close(np.array(m[key], dtype=float), np.array(w[key], dtype=float), tol, rtol=rtol)
        else:
            assert m[key] == w[key], key


@CLI_SETTINGS
@given(problems(), st.integers(0, 1))
def test_cli_show_reproduces_the_json_of_the_run(p, ddof):
    x = p["x"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "acts.npy")
        np.save(path, x)
        out = os.path.join(tmp, "stats.npz")
        code, direct, err = run_inproc("moments", path, *_args(p), "--ddof", ddof, "--format", "json")
        assert code == 0, err
        code, _, err = run_inproc("moments", path, *_args(p), "--ddof", ddof, "-o", out)
        assert code == 0, err
        code, shown, err = run_inproc("show", out, "--format", "json")
        assert code == 0, err
    assert _nan_equal(json.loads(shown), json.loads(direct))
