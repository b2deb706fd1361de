"""Shared fixtures and helpers of the bnstat test suite.

``run_cli(*args, input=None)`` runs ``python -m bnstat`` in a subprocess;
``run_inproc(*args, input=None)`` calls ``bnstat.cli.main`` in this process
(much faster: numba's kernels stay loaded) with its own stdin/stdout/stderr,
so it also works inside hypothesis tests, where function-scoped fixtures such
as capsys cannot be used. Both return ``(returncode, stdout, stderr)`` with
stdout as text, or as bytes with ``binary=True``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Test data is small, and bnstat computes small inputs with numpy (see
# stream.pick_engine): the suite runs the Numba kernels on everything, in this
# process and in the subprocesses it starts; tests/test_engines.py runs the
# numpy engine and the choice between the two.
os.environ["BNSTAT_ENGINE"] = "numba"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/reference.py


def _env():
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args, input: bytes | None = None, binary: bool = False, cwd=None, timeout=120):
    """``python -m bnstat ARGS`` in a subprocess: (returncode, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "bnstat", *map(str, args)], input=input,
                          capture_output=True, cwd=cwd, env=_env(), timeout=timeout)
    out = proc.stdout if binary else proc.stdout.decode("utf-8", "replace")
    return proc.returncode, out, proc.stderr.decode("utf-8", "replace")


class _Stream(io.TextIOWrapper):
    def isatty(self):
        return False


def run_inproc(*args, input: bytes | None = None, binary: bool = False):
    """``bnstat.cli.main([ARGS])`` in this process: (returncode, stdout, stderr)."""
    from bnstat.cli import main

    out_b, err_b = io.BytesIO(), io.BytesIO()
    out = _Stream(out_b, encoding="utf-8", write_through=True)
    err = _Stream(err_b, encoding="utf-8", write_through=True)
    inp = _Stream(io.BufferedReader(io.BytesIO(input or b"")), encoding="utf-8")
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = inp, out, err
    code = None
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        out.flush()
        err.flush()
        sys.stdin, sys.stdout, sys.stderr = saved
    assert code is not None, "bnstat.cli.main returned without sys.exit"
    stdout = out_b.getvalue() if binary else out_b.getvalue().decode("utf-8", "replace")
    return code, stdout, err_b.getvalue().decode("utf-8", "replace")


@pytest.fixture
def cli():
    """The in-process runner (fast)."""
    return run_inproc


@pytest.fixture
def cli_subprocess():
    """The subprocess runner (the real console entry)."""
    return run_cli


def npy_bytes(a: np.ndarray) -> bytes:
    """What ``np.save(sys.stdout.buffer, a)`` writes to a pipe."""
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def parse_json(text: str) -> dict:
    """SPEC 4 JSON: standard JSON, a non-finite value as null (README "Output formats")."""
    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def by_name(doc: dict) -> dict:
    return {a["name"]: a for a in doc["arrays"]}


@pytest.fixture
def small_sample(monkeypatch):
    """Quantile samples of 256 values a unit (bnstat.quantile_probe), so that test-sized
    arrays are sampled with strides > 1."""
    from bnstat import quantile_probe

    monkeypatch.setattr(quantile_probe, "MIN_SAMPLE", 64)
    monkeypatch.setattr(quantile_probe, "MAX_SAMPLE", 256)


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


@pytest.fixture(scope="session", autouse=True)
def _warm_kernels():
    """Compile (or load from numba's cache) the kernels once, outside any test's timing."""
    import warnings

    import bnstat

    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnstat.moments(x, layout="NCL")
        bnstat.moments(x, layout="NCL", higher=True)
    yield


def moments_on_few_threads(source, **kw):
    """bnstat.moments, on one thread unless the chunk size takes the whole array at once.

    Two threads are exercised on every whole-array call (the kernel then splits
    the work into tasks whose partial moments are merged); one thread keeps the
    many-chunk cases fast, as numba's parallel launch costs milliseconds per chunk.
    """
    import bnstat

    if "threads" not in kw:
        size = getattr(source, "nbytes", None)
        whole = kw.get("chunk_size") is None or (size is not None and kw["chunk_size"] >= size)
        kw["threads"] = 2 if whole else 1
    return bnstat.moments(source, **kw)



def import_torchvision():
    """torchvision's model code, or a skip where torch or torchvision is absent.

    torchvision 0.28.0 from PyPI (installed with --no-deps beside the CPU torch) fails to
    import its compiled ops ("operator torchvision::nms does not exist"); the model code does
    not need them, so the module that registers their fake kernels is stubbed out first.
    """
    import types

    pytest.importorskip("torch", reason="torch is not installed (the test-frameworks extra)")
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    return pytest.importorskip("torchvision", reason="torchvision is not installed (.ci/run)")


@pytest.fixture(params=["libdeflate", "zlib"])
def zlib_backend(request, monkeypatch):
    """Both code paths of bnstat.io.zlibx: libdeflate through ctypes, where the system has
    it (else that case is skipped: the zlib case still runs), and Python's zlib module."""
    from bnstat.io import zlibx

    if request.param == "zlib":
        monkeypatch.setattr(zlibx, "_lib", None)
        monkeypatch.setattr(zlibx, "_lib_checked", True)
    elif zlibx.libdeflate() is None:
        pytest.skip("libdeflate is not installed on this system (zlib path tested instead)")
    return request.param
