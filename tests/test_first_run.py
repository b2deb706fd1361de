"""The first run never waits for the compiler; cached kernels load without numba's whole target.

Each probe runs in a fresh interpreter with a NUMBA_CACHE_DIR of its own (numba's cache is what
"first run" means); the suite's BNSTAT_ENGINE=numba is removed where the engine is chosen by
size, as a user's run does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import _env

from bnstat.kernels import loader

BIG = (40, 4, 256, 256)  # float32, 42 MB: over stream.SMALL_INPUT, so "auto" picks the kernels


def run(args, cache, *, engine=None, timeout=600):
    env = _env()
    env["NUMBA_CACHE_DIR"] = str(cache)
    env.pop("BNSTAT_ENGINE", None)
    if engine:
        env["BNSTAT_ENGINE"] = engine
    return subprocess.run([sys.executable, "-m", "bnstat", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def cached(cache, spec: loader.Spec) -> bool:
    """Whether numba's cache under ``cache`` holds ``spec`` (asked in a fresh interpreter)."""
    code = ("import sys; from bnstat.kernels import loader\n"
            f"s = loader.Spec.parse({spec.text()!r})\n"
            "print(loader.in_cache(s.entry(), s.args()))\n")
    env = dict(_env(), NUMBA_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


def wait_cached(cache, spec, limit=300):
    """The detached compiler's work: poll numba's cache until it holds ``spec``."""
    t0 = time.monotonic()
    while not cached(cache, spec):
        assert time.monotonic() - t0 < limit, f"{spec.text()} never reached the cache"
        time.sleep(2)


def reference(x):
    x = x.astype(np.float64)
    return x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)), x.min(axis=(0, 2, 3)), x.max(axis=(0, 2, 3))


def moments_json(proc):
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    arr = doc["arrays"][0] if isinstance(doc, dict) and "arrays" in doc else doc[0]
    return arr


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("first") / "big.npy"
    x = np.random.default_rng(7).standard_normal(BIG, dtype=np.float32) * 3 + 1
    np.save(path, x)
    return path, x


@pytest.mark.parametrize("kernel", sorted(loader.KERNELS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "uint8"])
@pytest.mark.parametrize("readonly", [False, True])
def test_spec_args_have_the_signature_of_a_real_chunk(kernel, dtype, readonly):
    """The one-element arguments the loader compiles with type as a real chunk's kernel view
    does (numba's signature: dtype, 4-D C layout, writability), and Spec round-trips as text."""
    numba = pytest.importorskip("numba")
    chunk = np.arange(2 * 3 * 4 * 5).astype(dtype).reshape(2, 3, 4, 5)
    if readonly:
        chunk.setflags(write=False)
    out = np.empty(chunk.shape, np.float32) if kernel == "normalize4" else None
    spec = loader.Spec.of(kernel, chunk, out)
    assert loader.Spec.parse(spec.text()) == spec
    real = [chunk, 1, 1] if kernel != "normalize4" else [chunk]
    got = [numba.typeof(a) for a in spec.args()]
    assert got[0] == numba.typeof(chunk)
    if kernel == "moments4_units":
        assert spec.args()[0].shape[3] > 1  # the view this kernel is for
    if kernel == "normalize4":
        assert got[-1] == numba.typeof(out)
    else:
        assert got[1:3] == [numba.typeof(v) for v in real[1:3]]


def test_spec_parse_refuses_an_unknown_kernel():
    with pytest.raises(ValueError, match="no such kernel"):
        loader.Spec.parse("nope:float32:rw:")


def test_a_cached_kernel_loads_without_numbas_whole_target():
    """Second process, kernel in the cache: numba's numpy implementations (numba.np.arraymath)
    are never imported, and the kernel computes what numpy computes."""
    code = ("import sys, numpy as np\n"
            "from bnstat.kernels import _jit; _jit.setup(cli=True)\n"
            "from bnstat.stream import view_moments\n"
            "x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)\n"
            "m = view_moments(x, engine='numba')\n"
            "ref = x.astype(np.float64).transpose(0, 2, 1, 3).reshape(3, -1)\n"
            "assert np.allclose(m.mean, ref.mean(axis=1), rtol=1e-15), m.mean\n"
            "assert np.allclose(m.m2, ((ref - ref.mean(axis=1, keepdims=True))**2).sum(1))\n"
            "print('arraymath' if 'numba.np.arraymath' in sys.modules else 'light')\n")
    env = _env()  # the suite's cache: the first process compiles only if no test did before
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=600)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "light"


@pytest.mark.slow
def test_first_run_computes_with_numpy_while_the_kernel_compiles_apart(tmp_path, big):
    """Empty cache: the note (with -v), the right result, and the kernel compiled by the
    detached process into the cache; the next run finds it, says nothing, agrees."""
    path, x = big
    args = ["moments", str(path), "--layout", "NCHW", "--format", "json", "-v"]
    first = run(args, tmp_path)
    assert "compiling the moments4_units kernel for float32 for the first time" in first.stderr
    assert first.stderr.count("compiling") == 1  # one note, not one per chunk
    mean, var, mn, mx = reference(x)
    a = moments_json(first)
    np.testing.assert_allclose(a["mean"], mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a["var"], var, rtol=1e-12)
    assert a["min"] == mn.tolist() and a["max"] == mx.tolist()
    spec = loader.Spec("moments4_units", "float32", True)
    wait_cached(tmp_path, spec)
    second = run(args, tmp_path)
    assert "compiling" not in second.stderr
    b = moments_json(second)
    np.testing.assert_allclose(b["mean"], mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b["var"], var, rtol=1e-12)
    # a cached install gives the same bits run after run (every chunk by the kernels)
    assert moments_json(run(args, tmp_path))["mean"] == b["mean"]


@pytest.mark.slow
def test_the_note_needs_a_terminal_or_verbose_and_quiet_silences_it(tmp_path, big):
    path, _ = big
    base = ["moments", str(path), "--layout", "NCHW", "--format", "json"]
    proc = run(base, tmp_path)  # stderr is a pipe here, no -v
    assert proc.returncode == 0 and "note" not in proc.stderr
    proc = run(base + ["-v", "-q"], tmp_path / "other")
    assert proc.returncode == 0 and proc.stderr == ""


@pytest.mark.slow
def test_normalize_switching_engines_writes_the_same_bytes(tmp_path, big):
    """normalize's arithmetic is the same float64 expression in numpy and in the kernel: a first
    run (numpy, then the kernel) writes the file a cached run writes."""
    path, x = big
    stats = tmp_path / "s.npz"
    assert run(["moments", str(path), "--layout", "NCHW", "-o", str(stats)], tmp_path / "c0",
               engine="numpy").returncode == 0
    out1, out2 = tmp_path / "y1.npy", tmp_path / "y2.npy"
    first = run(["normalize", str(path), "--layout", "NCHW", "--stats", str(stats), "-o",
                 str(out1), "-v"], tmp_path / "c1")
    assert first.returncode == 0, first.stderr
    assert "compiling the normalize4 kernel" in first.stderr
    forced = run(["normalize", str(path), "--layout", "NCHW", "--stats", str(stats), "-o",
                  str(out2)], tmp_path / "c2", engine="numba")
    assert forced.returncode == 0, forced.stderr
    assert out1.read_bytes() == out2.read_bytes()
    y = np.load(out1)
    s = np.load(stats)
    key = [k for k in s.files if k.endswith("mean")][0]
    m = s[key].astype(np.float64)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    assert m.shape == (BIG[1],)


@pytest.mark.slow
def test_warm_up_fills_the_cache_with_what_the_runs_use(tmp_path):
    """warm_up compiles the read-only variant, the one every run uses (stream.read_only): a
    run on an in-memory (writable) array afterwards compiles nothing."""
    code = ("import bnstat\n"
            "took = bnstat.warm_up(kernels=('moments',), dtypes=('float64',))\n"
            "print(sorted(took))\n")
    env = dict(_env(), NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(["moments4_rows:float64:ro:", "moments4_units:float64:ro:"])
    for kernel in ("moments4_rows", "moments4_units"):
        assert cached(tmp_path, loader.Spec(kernel, "float64", True))
        assert not cached(tmp_path, loader.Spec(kernel, "float32", True))
    code = ("import numpy as np, bnstat, numba\n"
            "from bnstat.kernels import moments\n"
            "x = np.random.default_rng(0).standard_normal((64, 3, 8, 8))\n"
            "assert x.flags.writeable\n"
            "(s,) = bnstat.moments(x, layout='NCHW', engine='numba').values()\n"
            "np.testing.assert_allclose(s.mean, x.mean(axis=(0, 2, 3)), rtol=1e-13)\n"
            "d = moments.moments4_units.kernel\n"
            "print(sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "0"]  # loaded from the cache, nothing compiled


def test_warm_up_refuses_an_unknown_kernel():
    import bnstat

    with pytest.raises(ValueError, match="no such kernel"):
        bnstat.warm_up(kernels=("nope",))


def test_api_notes_go_to_the_logger(caplog):
    """A library caller sees no warning for a note; the "bnstat" logger has it at INFO."""
    import logging

    from bnstat import errors

    with caplog.at_level(logging.INFO, logger="bnstat"):
        errors.note("compiling something")
    assert [r.getMessage() for r in caplog.records] == ["compiling something"]


def test_planned_threads_is_what_numba_sets(monkeypatch):
    from bnstat.kernels import _jit

    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    got = [_jit.planned_threads(t) for t in (None, 1, 10_000)]
    assert got == [_jit.set_threads(t) for t in (None, 1, 10_000)]
    _jit.set_threads(None)
    assert os.environ.get("NUMBA_NUM_THREADS") is None


@pytest.mark.parametrize("user_dir", [False, True])
def test_index_may_exist_looks_where_numba_writes(tmp_path, user_dir, monkeypatch):
    """index_may_exist (no numba) finds the index file numba's own locator names, and is False
    in an empty NUMBA_CACHE_DIR."""
    code = ("import json, os\n"
            "from bnstat.kernels import loader\n"
            "out = {}\n"
            "for k in sorted(loader.KERNELS):\n"
            "    s = loader.Spec(k, 'float32', True, 'float32' if k == 'normalize4' else '')\n"
            "    before = loader.index_may_exist(s)\n"
            "    path = s.entry().kernel._cache._cache_file._index_path\n"
            "    out[k] = [before, path, os.path.exists(path)]\n"
            "print(json.dumps(out))\n")
    env = _env()
    if user_dir:
        env["NUMBA_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for kernel, (before, path, exists) in json.loads(proc.stdout).items():
        if user_dir:
            assert before is False and path.startswith(str(tmp_path)), kernel
        elif exists:
            assert before is True, (kernel, path)
        if user_dir:  # the file numba would write there: index_may_exist sees it
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()
            monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
            assert loader.index_may_exist(loader.Spec(kernel, "float32", True))


@pytest.mark.slow
def test_hist_first_run_counts_with_numpy_while_its_kernel_compiles(tmp_path, big):
    """hist with an empty cache: the counting kernel is compiled apart (a note), the counts
    are np.histogram's all the same."""
    path, x = big
    out = tmp_path / "h.npz"
    proc = run(["hist", str(path), "--layout", "NCHW", "--bins", "64", "--range", "-4:8", "-o",
                str(out), "-v"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "compiling the hist4_units kernel for float32" in proc.stderr
    from bnstat.histogram import load_hist

    (h,) = load_hist(str(out)).values()
    edges = np.linspace(-4.0, 8.0, 65)
    for c in range(BIG[1]):
        v = x[:, c].astype(np.float64).ravel()
        assert h.counts[c].tolist() == np.histogram(v[(v >= -4) & (v <= 8)], bins=edges)[0].tolist()
