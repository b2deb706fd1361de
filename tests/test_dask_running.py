"""bnstat running --scheduler: the per-batch moments on real Dask worker processes.

The reference is the local run (``bnstat.running_stats.running``, itself tested
against PyTorch's and Keras's own BatchNorm in tests/test_running.py): the
batches, their sizes and counts, min and max agree exactly; the running mean
and var to 1e-15 relative (a task's batches are cut where the local run's
chunks are not, which moves the last bit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from test_dask import truncated_shards

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")

from bnstat.dask_batches import plan_batch_tasks  # noqa: E402
from bnstat.io import open_sources  # noqa: E402
from bnstat.running_stats import running  # noqa: E402
from bnstat.stream import group_sources  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning")


def _local_cluster(n):
    from distributed import LocalCluster

    return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                        scheduler_port=0, silence_logs=50)


@pytest.fixture(scope="module")
def cluster():
    with _local_cluster(2) as c:
        yield c


def _files(tmp_path, rng):
    """53 samples (B=8: 6 full batches and one of 5), whole and split in three files."""
    import h5py

    x = (rng.standard_normal((53, 3, 4)) * 2 + 1).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("acts", data=x, chunks=(5, 3, 4), compression="gzip")
    with h5py.File(tmp_path / "s1.h5", "w") as f:  # 21 rows: batch 2 spans s1 and s2
        f.create_dataset("acts", data=x[:21], chunks=(4, 3, 4))
    np.savez(tmp_path / "s2.npz", acts=x[21:23])  # 2 rows: inside batch 2, which goes on into s3
    np.savez_compressed(tmp_path / "s3.npz", acts=x[23:])  # deflated: one whole-file task
    return x


def _same(got, want):
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert (g.batches, g.num_batches_tracked) == (w.batches, w.num_batches_tracked)
        for f in ("count", "min", "max"):
            np.testing.assert_array_equal(getattr(g.stats, f), getattr(w.stats, f))
        np.testing.assert_allclose(g.running_mean, w.running_mean, rtol=1e-15, atol=0)
        np.testing.assert_allclose(g.running_var, w.running_var, rtol=1e-15, atol=0)
        np.testing.assert_allclose(g.var, w.var, rtol=1e-15, atol=0)


def test_tasks_are_whole_batches_of_each_file(tmp_path, rng):
    _files(tmp_path, rng)
    srcs = open_sources([str(tmp_path / f) for f in ("s1.h5", "s2.npz", "s3.npz")])
    tasks, starts = plan_batch_tasks(group_sources(srcs), 8, chunk_size=16 * 48)
    got = [(os.path.basename(t.path), t.rows, s) for t, s in zip(tasks, starts)]
    # s1: slabs of 16 rows (2 batches); its rows 16:21 start batch 2, s2's 2 rows go on
    # with it (rows 21:23, 5 rows in), s3's first task is the whole deflated member
    assert got == [("s1.h5", (0, 16), 0), ("s1.h5", (16, 21), 0), ("s2.npz", (0, 2), 5),
                   ("s3.npz", None, 7)]
    tasks, starts = plan_batch_tasks(group_sources(srcs[:1]), 8, chunk_size=10 * 48)
    assert [t.rows for t in tasks] == [(0, 8), (8, 16), (16, 21)]  # at least one batch per task


@pytest.mark.slow
@pytest.mark.parametrize("files", [["a.npy"], ["a.h5"], ["s1.h5", "s2.npz", "s3.npz"]])
@pytest.mark.parametrize("batch_size", [8, 5, 53])
def test_equal_to_local_run(cluster, tmp_path, rng, files, batch_size):
    _files(tmp_path, rng)
    paths = [str(tmp_path / f) for f in files]
    kw = dict(batch_size=batch_size, layout="NCL", chunk_size=200, epochs=2)
    want = running(paths, **kw)
    got = running(paths, scheduler=cluster.scheduler_address, **kw)
    _same(got, want)
    assert [r.batches for r in got.values()] == [-(-53 // batch_size)]


@pytest.mark.slow
def test_short_last_batch_dropped_and_frameworks(cluster, tmp_path, rng):
    _files(tmp_path, rng)
    paths = [str(tmp_path / f) for f in ("s1.h5", "s2.npz", "s3.npz")]
    for kw in (dict(drop_last=True), dict(framework="keras"), dict(cumulative=True)):
        kw.update(batch_size=8, layout="NCL", chunk_size=400)
        want = running(paths, **kw)
        _same(running(paths, scheduler=cluster.scheduler_address, **kw), want)
    assert want["acts"].batches == 7


@pytest.mark.slow
def test_bit_identical_for_one_and_two_workers(cluster, tmp_path, rng):
    _files(tmp_path, rng)
    paths = [str(tmp_path / f) for f in ("s1.h5", "s2.npz", "s3.npz", "a.h5")]
    kw = dict(batch_size=8, layout="NCL", chunk_size=200)
    first = running(paths, scheduler=cluster.scheduler_address, **kw)
    with _local_cluster(1) as c:
        other = running(paths, scheduler=c.scheduler_address, **kw)
    for name, r in first.items():
        for f in ("running_mean", "running_var", "mean", "var"):
            np.testing.assert_array_equal(getattr(r, f), getattr(other[name], f))


def _cli(*args, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "bnstat", *map(str, args)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.slow
def test_cli_local_cluster_matches_local_run(tmp_path, rng):
    _files(tmp_path, rng)
    args = ("running", tmp_path / "s1.h5", tmp_path / "s2.npz", tmp_path / "s3.npz", "--layout",
            "NCL", "-b", "8", "--format", "json", "--chunk-size", "256", "-q")
    code, out, err = _cli(*args, "--scheduler", "local:2")
    assert code == 0, err
    code, local, err = _cli(*args)
    assert code == 0, err
    got, want = json.loads(out)["arrays"][0], json.loads(local)["arrays"][0]
    assert got["batches"] == want["batches"] == 7
    np.testing.assert_allclose(got["running_mean"], want["running_mean"], rtol=1e-15, atol=0)
    np.testing.assert_allclose(got["running_var"], want["running_var"], rtol=1e-15, atol=0)


@pytest.mark.slow
def test_truncated_shard_fails_the_run_with_its_name(cluster, tmp_path, rng):
    out = tmp_path / "out.json"
    code, _, err = _cli("running", *truncated_shards(tmp_path, rng), "--layout", "NCL",
                        "-b", "8", "--scheduler", cluster.scheduler_address, "-o", out)
    assert code == 1, err
    assert err.startswith("bnstat: error: ") and "s1.h5" in err and "Traceback" not in err
    assert not out.exists()


def test_bad_scheduler_address_is_a_usage_error(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((8, 3), np.float32))
    code, _, err = _cli("running", tmp_path / "a.npy", "-b", "4", "--scheduler", "local:0")
    assert code == 2 and "local:N" in err and "Traceback" not in err


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((8, 3), np.float32))
    code, _, err = _cli("running", tmp_path / "a.npy", "-b", "4", "--scheduler",
                        "tcp://127.0.0.1:1", timeout=60)
    assert code == 1 and "cannot reach the Dask scheduler" in err and "Traceback" not in err


def test_fortran_order_is_refused_before_the_cluster(tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((8, 3), np.float32)))
    code, _, err = _cli("running", tmp_path / "f.npy", "-b", "4", "--scheduler", "tcp://127.0.0.1:1")
    assert code == 2 and "Fortran-ordered" in err and "f.npy" in err and "Traceback" not in err
