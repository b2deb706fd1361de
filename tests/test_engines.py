"""The numpy engine (small inputs) against the float64 reference, and the choice of engine.

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
from reference import assert_matches, ref_moments

import bnstat
from bnstat import stream
from bnstat.kernels import numpy_engine

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
