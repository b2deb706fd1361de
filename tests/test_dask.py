"""bnstat on Dask: --scheduler on real worker processes, and bnstat.dask.moments.

The reference everywhere is the local run (``bnstat.moments``), itself tested
against numpy float64 elsewhere; count, min and max must agree exactly, mean
and var to 1e-15 relative (the partials of a task are merged in another tree
than a local run's chunks, which moves the last bit).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
da = pytest.importorskip("dask.array", reason="the dask extra is not installed")

import bnstat  # noqa: E402
from bnstat.dask import compute_stats_distributed, tree_merge  # noqa: E402
from bnstat.dask_array import layout_from_dims  # noqa: E402
from bnstat.errors import BnstatError  # noqa: E402
from bnstat.io import open_sources  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning",
                                        "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def cluster():
    """Two real worker processes over loopback TCP, shared by the module's tests."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      scheduler_port=0, silence_logs=50) as c:
        yield c


def _close(a, b, what=""):
    for f in ("count", "nan_count", "min", "max"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{what} {f}")
    scale = np.maximum(np.abs(a.mean), a.std)
    assert np.all(np.abs(a.mean - b.mean) <= 1e-15 * scale + 1e-300), what
    np.testing.assert_allclose(a.var, b.var, rtol=1e-15, atol=0, err_msg=what)


def _files(tmp_path, rng):
    import h5py

    x = rng.standard_normal((48, 6, 8, 8)).astype(np.float32) * 3 + 1
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "a.npz", acts=x, other=x[:, :3] * 2)
    np.savez_compressed(tmp_path / "z.npz", acts=x)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("g/acts", data=x, chunks=(5, 6, 8, 8), compression="gzip")
        f.create_dataset("plain", data=x.astype(np.float64), chunks=(7, 6, 8, 8))
    np.save(tmp_path / "s1.npy", x[:20])
    np.save(tmp_path / "s2.npy", x[20:])
    return x


def _distributed(address, paths, **kw):
    kw.setdefault("chunk_size", 8192)
    return compute_stats_distributed(address, open_sources([str(p) for p in paths]), **kw)


@pytest.mark.slow
@pytest.mark.parametrize("files", [["a.npy"], ["a.npz"], ["z.npz"], ["a.h5"], ["s1.npy", "s2.npy"]])
def test_equal_to_local_run(cluster, tmp_path, rng, files):
    _files(tmp_path, rng)
    paths = [tmp_path / f for f in files]
    got = _distributed(cluster.scheduler_address, paths, layout="NCHW")
    want = bnstat.moments([str(p) for p in paths], layout="NCHW")
    assert got.keys() == want.keys()
    for name in want:
        _close(got[name], want[name], name)
        assert got[name].shape == want[name].shape


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["layer", "instance", "group"])
def test_kept_n_norms_join_tasks_in_order(cluster, tmp_path, rng, norm):
    _files(tmp_path, rng)
    kw = dict(layout="NCHW", norm=norm, groups=3 if norm == "group" else None)
    got = _distributed(cluster.scheduler_address, [tmp_path / "a.h5"], **kw)
    want = bnstat.moments(str(tmp_path / "a.h5"), **kw)
    for name in want:
        assert got[name].unit_shape == want[name].unit_shape
        _close(got[name], want[name], name)


@pytest.mark.slow
def test_bit_identical_for_any_worker_count_and_run(cluster, tmp_path, rng):
    from distributed import LocalCluster

    _files(tmp_path, rng)
    paths = [tmp_path / "a.h5", tmp_path / "a.npy"]
    results = [_distributed(cluster.scheduler_address, paths, layout="NCHW", higher=True)]
    for n in (1, 3):  # and the module's cluster of 2 workers above
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=":0", scheduler_port=0, silence_logs=50) as c:
            for _ in range(2):  # and two runs on one cluster
                results.append(_distributed(c.scheduler_address, paths, layout="NCHW",
                                            higher=True))
    for other in results[1:]:
        for name, s in results[0].items():
            for f in ("count", "mean", "m2", "min", "max", "nan_count", "skew", "kurtosis"):
                np.testing.assert_array_equal(getattr(s, f), getattr(other[name], f))


@pytest.mark.slow
def test_a_killed_worker_changes_nothing(tmp_path, rng):
    from distributed import LocalCluster

    _files(tmp_path, rng)
    paths = [tmp_path / "a.h5"]
    want = bnstat.moments(str(paths[0]), layout="NCHW")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      scheduler_port=0, silence_logs=50) as c:
        pids = [nanny.pid for nanny in c.workers.values()]  # the worker processes
        assert len(pids) == 2 and all(pids)
        killed = []

        def progress(nbytes):
            if not killed:  # the first task is done, the others are queued or running
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

        got = _distributed(c.scheduler_address, paths, layout="NCHW", chunk_size=4096,
                           progress=progress)
        assert killed
    for name in want:
        _close(got[name], want[name], name)


def truncated_shards(tmp_path, rng) -> list:
    """Three HDF5 shards of "acts" (40, 4, 6), the second cut short: it opens, its chunk
    data cannot be read."""
    import h5py

    x = rng.standard_normal((40, 4, 6)).astype(np.float32)
    for i in range(3):
        with h5py.File(tmp_path / f"s{i}.h5", "w") as f:
            f.create_dataset("acts", data=x, chunks=(4, 4, 6))
    bad = tmp_path / "s1.h5"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 2000])
    return [tmp_path / f"s{i}.h5" for i in range(3)]


@pytest.mark.slow
def test_truncated_shard_fails_the_run_with_its_name(cluster, tmp_path, rng):
    out = tmp_path / "out.json"
    code, stdout, err = _cli("moments", *truncated_shards(tmp_path, rng), "--layout",
                             "NCL", "--scheduler", cluster.scheduler_address, "-o", out)
    assert code == 1, err
    assert "s1.h5" in err and "Traceback" not in err
    assert err.startswith("bnstat: error: ")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".bnstat-tmp")]


def _cli(*args, env=None, timeout=120):
    e = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "bnstat", *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
def test_cli_local_cluster_matches_local_run(tmp_path, rng):
    import json

    _files(tmp_path, rng)
    code, out, err = _cli("moments", tmp_path / "a.npy", "--layout", "NCHW", "--format", "json",
                          "--scheduler", "local:2", "--chunk-size", "16KiB", "-q")
    assert code == 0, err
    got = json.loads(out)["arrays"][0]
    want = bnstat.moments(str(tmp_path / "a.npy"), layout="NCHW")["a"]
    np.testing.assert_array_equal(got["count"], want.count)
    np.testing.assert_array_equal(got["min"], want.min)
    np.testing.assert_allclose(got["var"], want.var, rtol=1e-15)


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    code, out, err = _cli("moments", tmp_path / "a.npy", "--scheduler", "tcp://127.0.0.1:1",
                          timeout=60)
    assert code == 1
    assert "cannot reach the Dask scheduler" in err and "tcp://127.0.0.1:1" in err
    assert "Traceback" not in err


def test_bad_scheduler_address_is_a_usage_error(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    code, out, err = _cli("moments", tmp_path / "a.npy", "--scheduler", "local:zero")
    assert code == 2
    assert "local:N" in err


def test_without_the_extra_the_error_names_it(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    code = (
        "import sys; sys.modules['dask'] = None; sys.modules['distributed'] = None\n"
        "from bnstat.cli import main\n"
        f"main(['moments', {str(tmp_path / 'a.npy')!r}, '--scheduler', 'local'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert proc.returncode == 1
    assert "pip install 'bnstat[dask]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_core_never_imports_dask(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    code = (
        "import sys\nfrom bnstat.cli import main\n"
        f"try:\n    main(['moments', {str(tmp_path / 'a.npy')!r}, '--format', 'json', '-q'])\n"
        "except SystemExit:\n    pass\n"
        "assert 'dask' not in sys.modules and 'distributed' not in sys.modules, 'dask imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert proc.returncode == 0, proc.stderr


# ---- bnstat.dask.moments ------------------------------------------------------------

@pytest.mark.parametrize("chunks", [(7, 2, 8, 8), (48, 6, 8, 8), (5, 6, 3, 8), (9, 4, 5, 2)])
@pytest.mark.parametrize("norm", ["batch", "layer", "instance", "group"])
def test_dask_array_equals_the_file(tmp_path, rng, chunks, norm):
    import bnstat.dask

    x = rng.standard_normal((48, 6, 8, 8)).astype(np.float32) * 2 - 1
    np.save(tmp_path / "x.npy", x)
    kw = dict(layout="NCHW", norm=norm, groups=3 if norm == "group" else None)
    got = bnstat.dask.moments(da.from_array(x, chunks=chunks), **kw)
    want = bnstat.moments(str(tmp_path / "x.npy"), **kw)["x"]
    assert got.unit_shape == want.unit_shape
    np.testing.assert_array_equal(got.count, want.count)
    np.testing.assert_array_equal(got.min, want.min)
    np.testing.assert_array_equal(got.max, want.max)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.var, want.var, rtol=1e-12)


def test_dask_array_vs_dask_own_reductions(rng):
    import bnstat.dask

    x = da.from_array(rng.standard_normal((64, 5, 16)).astype(np.float32) + 100, chunks=(16, 5, 8))
    s = bnstat.dask.moments(x, layout="NCL")
    axes = (0, 2)
    mean, var = da.compute(x.mean(axis=axes), x.var(axis=axes))
    # dask accumulates float32 data in float32: its error is float32's, not bnstat's
    np.testing.assert_allclose(s.mean, mean, rtol=1e-5)
    np.testing.assert_allclose(s.var, var, rtol=1e-3)
    xx = np.asarray(x).astype(np.float64)
    np.testing.assert_allclose(s.var, xx.var(axis=axes), rtol=1e-12)


@pytest.mark.filterwarnings("ignore:array. 1 NaN value")
def test_dask_array_higher_nan_and_ints(rng):
    import bnstat.dask

    x = rng.integers(-50, 50, (20, 3, 10)).astype(np.float64)
    x[3, 1, 4] = np.nan
    s = bnstat.dask.moments(da.from_array(x, chunks=(6, 2, 4)), layout="NCL", higher=True)
    ref = bnstat.moments(x, layout="NCL", higher=True)["array"]
    np.testing.assert_array_equal(s.nan_count, [0, 1, 0])
    np.testing.assert_allclose(s.skew, ref.skew, rtol=1e-12)
    np.testing.assert_allclose(s.kurtosis, ref.kurtosis, rtol=1e-12)
    xi = da.from_array(rng.integers(0, 255, (10, 4, 3), dtype=np.uint8), chunks=(3, 4, 3))
    si = bnstat.dask.moments(xi, layout="NCL")
    np.testing.assert_allclose(si.mean, np.asarray(xi).astype(float).mean(axis=(0, 2)), rtol=1e-14)


def test_xarray_dims_give_the_layout(rng):
    xr = pytest.importorskip("xarray", reason="xarray is not installed")
    import bnstat.dask

    x = rng.standard_normal((6, 4, 5, 3))  # N H W C
    arr = xr.DataArray(da.from_array(x, chunks=(2, 4, 5, 3)), dims=("batch", "height", "width",
                                                                     "channel"), name="acts")
    s = bnstat.dask.moments(arr)
    assert s.layout == "NHWC" and s.name == "acts"
    np.testing.assert_allclose(s.mean, x.mean(axis=(0, 1, 2)), rtol=1e-13)
    assert layout_from_dims(("n", "c")) == "NC"
    assert layout_from_dims(("foo", "c")) is None
    numpy_backed = xr.DataArray(x, dims=("N", "H", "W", "C"))
    np.testing.assert_allclose(bnstat.dask.moments(numpy_backed).var, x.var(axis=(0, 1, 2)),
                               rtol=1e-13)


def test_tree_merge_is_a_fixed_pairwise_tree():
    class P:
        def __init__(self, s):
            self.s = s

        def merge(self, o):
            return P(f"({self.s}+{o.s})")

    assert tree_merge([P(c) for c in "abcde"]).s == "(((a+b)+(c+d))+e)"
    assert tree_merge([P("a")]).s == "a"


def test_bad_input_in_a_dask_array_is_a_bnstat_error():
    import bnstat.dask

    with pytest.raises(BnstatError, match="at least 2"):
        bnstat.dask.moments(da.ones((5,), chunks=2))
    with pytest.raises(BnstatError):
        bnstat.dask.moments(da.ones((5, 3), chunks=2), layout="NCHW")


def test_local_workers_are_forked_only_before_numba_threads_run():
    """GNU OpenMP aborts a child forked after its threads started: then spawn."""
    code = ("from bnstat.dask import start_method\nbefore = start_method()\n"
            "from bnstat.stream import set_threads\nset_threads(1)\nprint(before, start_method())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["fork", "spawn"]


@pytest.mark.slow
def test_a_killed_forked_worker_changes_nothing(tmp_path, rng):
    """``local:2`` forks its workers from the client (start_method): one is killed by its pid
    after the first task; its tasks run again on the other (or its restarted self)."""
    _files(tmp_path, rng)
    path = tmp_path / "a.h5"
    out = tmp_path / "got.npz"
    code = f"""
import multiprocessing, os, signal
import numpy as np
from bnstat.dask import compute_stats_distributed, start_method
from bnstat.io import open_sources
assert start_method() == "fork"
killed = []
def progress(nbytes):
    if not killed:
        workers = multiprocessing.active_children()
        assert len(workers) == 2, workers
        os.kill(workers[0].pid, signal.SIGKILL)
        killed.append(workers[0].pid)
stats = compute_stats_distributed("local:2", open_sources([{str(path)!r}]), layout="NCHW",
                                  chunk_size=4096, progress=progress)
assert killed
np.savez({str(out)!r}, **{{f"{{n}}/{{f}}": getattr(s, f) for n, s in stats.items()
                           for f in ("count", "mean", "var", "min", "max")}})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = bnstat.moments(str(path), layout="NCHW")
    with np.load(out) as got:
        for name, w in want.items():
            for f in ("count", "min", "max"):
                np.testing.assert_array_equal(got[f"{name}/{f}"], getattr(w, f))
            np.testing.assert_allclose(got[f"{name}/var"], w.var, rtol=1e-15, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("command", [["moments"], ["hist", "--bins", "16"],
                                     ["running", "-b", "8"]])
def test_a_damaged_stored_npz_member_fails_under_the_scheduler(cluster, tmp_path, rng, command):
    """The workers read slabs of a stored member and none sees it whole: the client checks its
    CRC-32 while they compute, so a damaged byte fails the run (exit 1, nothing written) as a
    local run does; --skip-crc computes it."""
    x = rng.standard_normal((64, 4, 6)).astype(np.float32)
    np.savez(tmp_path / "a.npz", acts=x)
    data = bytearray((tmp_path / "a.npz").read_bytes())
    at = data.find(x[40].tobytes())
    assert at > 0
    data[at + 5] ^= 0x10  # one bit of sample 40: the values change, the header does not
    (tmp_path / "a.npz").write_bytes(bytes(data))
    out = tmp_path / "out.json"
    args = [*command, tmp_path / "a.npz", "--layout", "NCL", "--chunk-size", "1KiB",
            "--format", "json", "--scheduler", cluster.scheduler_address]
    code, _, err = _cli(*args, "-o", out)
    assert code == 1, err
    assert "bad CRC-32" in err and "a.npz:acts" in err and "Traceback" not in err
    assert not out.exists()
    code, _, err = _cli(*args, "--skip-crc", "-o", out)
    assert code == 0, err
