"""bnstat.kernels.numpy_engine (small inputs) against the float64 reference, and the choice of
engine (stream.pick_engine).

The rest of the suite runs the Numba kernels (conftest sets BNSTAT_ENGINE=numba);
bnstat computes inputs under ``stream.SMALL_INPUT`` bytes with numpy, because
loading the cached kernels costs more than such an input takes. Both engines
must give the same statistics and the same normalized output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from kernel_cases import cases, memory_layouts
from reference import assert_matches, ref_moments

import bnstat
from bnstat import stream
from bnstat.kernels import numpy_engine
from bnstat.stats import Stats

LAYOUTS = [("NC", (40, 6), "batch", None), ("NCHW", (5, 4, 6, 7), "batch", None),
           ("NHWC", (5, 6, 7, 4), "batch", None), ("NCL", (6, 4, 9), "instance", None),
           ("NLC", (6, 9, 4), "layer", None), ("NCHW", (5, 6, 3, 4), "group", 3),
           ("CNHW", (6, 5, 3, 4), "group", 2)]


def only(result):
    (stats,) = result.values()
    return stats


@pytest.mark.parametrize("layout,shape,norm,groups", LAYOUTS)
@pytest.mark.parametrize("chunk", [1, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.float16])
def test_numpy_engine_matches_reference(layout, shape, norm, groups, chunk, dtype, rng):
    x = (rng.standard_normal(shape) * 30 + 100).astype(dtype)
    got = only(bnstat.moments(x, layout=layout, norm=norm, groups=groups, higher=True,
                              chunk_size=chunk, engine="numpy"))
    assert_matches(got, ref_moments(x, layout, norm, groups), x, higher=True)


def test_numpy_engine_blocks_merge_exactly(monkeypatch, rng):
    """Tiny blocks (every merge path: along A, and split along P) change nothing."""
    x = rng.standard_normal((7, 5, 11, 3)) * 1e3 + 1e4
    want = ref_moments(x, "NCHW", "instance")
    for block in (1, 4, 40, 10**6):
        monkeypatch.setattr(numpy_engine, "NUMPY_BLOCK", block)
        assert_matches(only(bnstat.moments(x, layout="NCHW", norm="instance", engine="numpy")),
                       want, x)


@pytest.mark.parametrize("case", list(cases(np.random.default_rng(13))), ids=lambda c: c.id)
def test_numpy_moments_matches_the_reference(case):
    """numpy_moments called directly over the kernels' edge cases, the input left as it was."""
    x = case.x
    before = x.copy()
    P, _, U, _ = x.shape
    m = numpy_engine.numpy_moments(x, higher=True).map(lambda a: a.reshape(P, U))
    np.testing.assert_array_equal(x, before)
    got = Stats(name="x", moments=m, shape=x.shape, dtype=x.dtype.name, layout="PACB", reduce="AB",
                unit_axes=["P", "C"])
    with np.errstate(invalid="ignore", over="ignore"):
        ref = ref_moments(x, layout="PACB", reduce="AB")
    higher = x.dtype.kind != "f" or not any(k in case.id for k in ("extremes", "inf"))
    assert_matches(got, ref, x, higher=higher)


def test_numpy_moments_takes_every_memory_layout(rng):
    x = rng.standard_normal((3, 7, 4, 5))
    for name, view in memory_layouts(x):
        want = ref_moments(np.ascontiguousarray(view), layout="PACB", reduce="AB")
        got = numpy_engine.numpy_moments(view).map(lambda a: a.reshape(3, 4))
        np.testing.assert_array_equal(got.count, want.count, err_msg=name)
        for key in ("mean", "m2", "min", "max"):
            np.testing.assert_allclose(getattr(got, key), getattr(want, key), rtol=1e-12,
                                       atol=1e-14, err_msg=f"{name} {key}")


@pytest.mark.parametrize("shape,block,want", [
    # all of P, rows of A: ragged last block
    ((2, 10, 3, 1), 18, [(slice(0, 2), slice(0, 3)), (slice(0, 2), slice(3, 6)),
                         (slice(0, 2), slice(6, 9)), (slice(0, 2), slice(9, 12))]),
    # one row of A is more than a block: P split, a row at a time
    ((4, 2, 3, 2), 12, [(slice(0, 2), slice(0, 1)), (slice(0, 2), slice(1, 2)),
                        (slice(2, 4), slice(0, 1)), (slice(2, 4), slice(1, 2))]),
    ((1, 3, 5, 1), 10**6, [(slice(0, 1), slice(0, 10**6 // 5))]),
])
def test_blocks_are_exact_slices(shape, block, want, monkeypatch):
    monkeypatch.setattr(numpy_engine, "NUMPY_BLOCK", block)
    assert list(numpy_engine.blocks(shape)) == want


def test_numpy_engine_nan_and_inf_like_the_kernels(rng):
    x = rng.standard_normal((8, 4, 5))
    x[1, 0, 2] = np.nan
    x[:, 1, :] = np.nan  # a unit with no value at all
    x[2, 2, 0] = np.inf
    x[3, 3, 1] = np.inf
    x[4, 3, 1] = -np.inf
    with pytest.warns(bnstat.errors.BnstatWarning, match="NaN"):
        a = only(bnstat.moments(x, layout="NCL", engine="numpy"))
    with pytest.warns(bnstat.errors.BnstatWarning, match="NaN"):
        b = only(bnstat.moments(x, layout="NCL", engine="numba"))
    for name in ("count", "nan_count", "mean", "var", "min", "max"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, err_msg=name)
    assert a.count.tolist() == [39, 0, 40, 40] and a.nan_count.tolist() == [1, 40, 0, 0]
    assert a.mean[2] == np.inf and np.isnan(a.mean[3]) and np.isnan(a.var[2])
    assert np.isnan(a.mean[1]) and np.isnan(a.min[1])


def test_numpy_engine_numerics_of_the_statistics_issue():
    x = (1e4 + 1e-2 * np.random.default_rng(3).standard_normal(10**6)).astype(np.float32)
    got = only(bnstat.moments(x.reshape(-1, 1), layout="NC", engine="numpy"))
    want = np.var(x.astype(np.float64))
    assert abs(got.var[0] - want) <= 1e-6 * want
    const = only(bnstat.moments(np.full((1000, 2), 271.46, np.float32), layout="NC", engine="numpy"))
    assert const.var.tolist() == [0.0, 0.0]
    seed = np.repeat(np.arange(1, 25), 5).reshape(2, 3, 4, 5).astype(np.float32)
    assert only(bnstat.moments(seed, layout="NCHW", engine="numpy")).mean.tolist() == [8.5, 12.5, 16.5]


@pytest.mark.parametrize("norm,groups,per_batch", [("batch", None, None), ("batch", None, 2),
                                                   ("instance", None, None), ("group", 2, None)])
def test_normalize_numpy_engine_equals_numba(norm, groups, per_batch, rng):
    x = (rng.standard_normal((6, 4, 5, 3)) * 3 + 2).astype(np.float32)
    kw = dict(layout="NCHW", norm=norm, groups=groups, per_batch=per_batch)
    a = bnstat.normalize(x, engine="numpy", **kw)
    b = bnstat.normalize(x, engine="numba", **kw)
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _probe(code: str, engine: str | None):
    env = dict(os.environ)
    env.pop("BNSTAT_ENGINE")
    if engine is not None:
        env["BNSTAT_ENGINE"] = engine
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    return proc


def test_auto_engine_uses_numpy_below_the_threshold_and_numba_above(tmp_path):
    """Observable choice: whether bnstat's Numba kernels module was loaded at all."""
    small, big = tmp_path / "small.npy", tmp_path / "big.npy"
    np.save(small, np.ones((64, 8), np.float32))
    rows = stream.SMALL_INPUT // (4 * 256) + 1
    np.save(big, np.lib.format.open_memmap(tmp_path / "tmp.npy", "w+", np.float32, (rows, 256)))
    code = ("import sys, json, bnstat; s = bnstat.moments(sys.argv[1], layout='NC')['{}'];"
            "print(json.dumps([float(s.mean[0]), 'bnstat.kernels.moments' in sys.modules]))")
    for path, engine, kernels in [(small, None, False), (big, None, True), (small, "numba", True),
                                  (big, "numpy", False)]:
        proc = _probe(code.format(path.stem).replace("sys.argv[1]", repr(str(path))), engine)
        assert proc.returncode == 0, proc.stderr
        mean, loaded = json.loads(proc.stdout)
        assert loaded is kernels, (path.name, engine)
        assert mean == (1.0 if path == small else 0.0)


def test_bad_engine_variable_is_a_usage_error(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 2)))
    env = dict(os.environ, BNSTAT_ENGINE="gpu")
    proc = subprocess.run([sys.executable, "-m", "bnstat", "moments", str(tmp_path / "a.npy")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "BNSTAT_ENGINE=gpu" in proc.stderr and "Traceback" not in proc.stderr


# ---- moved from the acceptance audit --------------------------------------------------


@pytest.mark.parametrize("layout,shape", [("NCHW", (50, 4, 16, 16)), ("NHWC", (50, 16, 16, 4)),
                                          ("NLC", (200, 512, 4))])
@pytest.mark.parametrize("rows", [None, 7])
def test_numerics_of_the_statistics_issue_on_the_numpy_engine_by_layout(layout, shape, rows):
    """The rest of the suite runs acceptance 3 on the Numba kernels (and on NC alone for the
    numpy engine); inputs under 32 MiB, the sample data included, use the numpy engine."""
    rng = np.random.default_rng(6)
    x = (1e4 + 1e-2 * rng.standard_normal(shape)).astype(np.float32)
    chunk = rows and rows * x.nbytes // x.shape[0]
    (got,) = bnstat.moments(x, layout=layout, chunk_size=chunk, engine="numpy").values()
    ref = ref_moments(x, layout)
    assert np.all(got.var > 0)
    np.testing.assert_allclose(got.var, ref.var, rtol=1e-6)
    c = np.full(shape, 271.46, np.float32)
    (got,) = bnstat.moments(c, layout=layout, chunk_size=chunk, engine="numpy", ddof=1).values()
    assert got.var.tolist() == [0.0] * got.var.size
    assert got.mean.tolist() == [float(np.float32(271.46))] * got.mean.size
