"""bnstat hist --scheduler: every pass (moments, range, counts, quantiles) on real Dask workers.

The reference is the local run (``bnstat.histrun.compute_hist``, itself tested
against np.histogram and np.quantile in tests/test_hist.py, and here against
them once more): counts, under/overflow, zeros, edges, quantiles and amax
must be bit-identical, the moments' count, min and max too (mean and var to
1e-15 relative, as for moments --scheduler).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from test_dask import _cli, truncated_shards

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")

from bnstat.dask_hist import _add_into, _dense, _pack, _runs  # noqa: E402
from bnstat.histrun import compute_hist  # noqa: E402
from bnstat.io import open_sources  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::DeprecationWarning",
                                        "ignore:.*NaN value:bnstat.errors.BnstatWarning")


def _local_cluster(n):
    from distributed import LocalCluster

    return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                        scheduler_port=0, silence_logs=50)


@pytest.fixture(scope="module")
def cluster():
    with _local_cluster(2) as c:
        yield c


def _files(tmp_path, rng):
    """48 x 6 x 8 x 8 float32 with an inf (a range pass), a NaN and a dead channel."""
    import h5py

    x = rng.standard_normal((48, 6, 8, 8)).astype(np.float32) * 3 + 1
    x[3, 2, 1, 1] = np.inf
    x[5, 1, 0, 0] = np.nan
    x[:, 4] = 0
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "a.npz", acts=x)
    np.savez_compressed(tmp_path / "z.npz", acts=x)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("acts", data=x, chunks=(5, 6, 8, 8), compression="gzip")
        f.create_dataset("plain", data=x.astype(np.float64), chunks=(7, 6, 8, 8))
    np.save(tmp_path / "s1.npy", x[:20])
    np.save(tmp_path / "s2.npy", x[20:])
    return x


def _hist(paths, scheduler=None, **kw):
    kw.setdefault("chunk_size", 8192)  # several tasks per file
    kw.setdefault("layout", "NCHW")
    return compute_hist(open_sources([str(p) for p in paths]), scheduler=scheduler, **kw)


def _same(got, want):
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        for f in ("edges", "counts", "underflow", "overflow", "zero_count"):
            np.testing.assert_array_equal(getattr(g, f), getattr(w, f), err_msg=f"{name} {f}")
        assert g.quantile_q == w.quantile_q
        if w.quantile_values is not None:
            np.testing.assert_array_equal(g.quantile_values, w.quantile_values, err_msg=name)
        assert g.amax_values.keys() == w.amax_values.keys()
        for m in w.amax_values:
            np.testing.assert_array_equal(g.amax_values[m], w.amax_values[m], err_msg=m)
        for f in ("count", "nan_count", "min", "max"):
            np.testing.assert_array_equal(getattr(g.stats, f), getattr(w.stats, f))
        np.testing.assert_allclose(g.stats.var, w.stats.var, rtol=1e-15, atol=0)


CASES = [dict(quantiles=[0.001, 0.5, 0.999]),
         dict(range=(-2.0, 2.0), bins=16, quantiles=[0.3]),
         dict(range="abs", amax=["max", "percentile:99", "mse", "entropy"]),
         dict(per_tensor=True, quantiles=[0.5], bins=64),
         dict(norm="layer", quantiles=[0.25, 0.75], bins=32),
         dict(norm="group", groups=3, range="abs", bins=32)]


@pytest.mark.slow
@pytest.mark.parametrize("files", [["a.npy"], ["a.npz"], ["z.npz"], ["a.h5"], ["s1.npy", "s2.npy"]])
def test_equal_to_local_run(cluster, tmp_path, rng, files):
    _files(tmp_path, rng)
    paths = [tmp_path / f for f in files]
    for kw in CASES:
        _same(_hist(paths, cluster.scheduler_address, **kw), _hist(paths, **kw))


@pytest.mark.slow
def test_against_numpy(cluster, tmp_path, rng):
    x = _files(tmp_path, rng)
    got = _hist([tmp_path / "a.h5"], cluster.scheduler_address, bins=50, quantiles=[0.1, 0.5, 0.9])
    h = got["plain"]
    for c in (0, 3, 4):  # finite channels (4: all zeros)
        v = x[:, c].astype(np.float64).ravel()
        counts, edges = np.histogram(v, bins=50)
        np.testing.assert_array_equal(h.counts[c], counts)
        np.testing.assert_array_equal(h.edges[c], edges)
        np.testing.assert_array_equal(h.quantile_values[c], np.quantile(v, [0.1, 0.5, 0.9]))


@pytest.mark.slow
def test_counting_passes_of_the_quantiles(cluster, tmp_path, rng, monkeypatch):
    """Small counter bounds (set on the client, which plans the slots): slots are counted
    over several passes before their keys are collected; float64 keys take more passes."""
    import bnstat.quantiles as quantiles

    _files(tmp_path, rng)
    monkeypatch.setattr(quantiles, "COUNTER_BYTES", 4096)
    for kw in (dict(quantiles=[0.001, 0.37, 0.5, 1.0], bins=8),
               dict(quantiles=[0.5], bins=8, per_tensor=True)):
        want = _hist([tmp_path / "a.h5"], **kw)
        got = _hist([tmp_path / "a.h5"], cluster.scheduler_address, **kw)
        _same(got, want)


@pytest.mark.slow
def test_bit_identical_for_one_two_and_three_workers(cluster, tmp_path, rng):
    _files(tmp_path, rng)
    paths = [tmp_path / "a.h5", tmp_path / "a.npy"]
    kw = dict(quantiles=[0.01, 0.5, 0.99], range="abs", amax=["entropy"], bins=256)
    want = _hist(paths, **kw)
    runs = [_hist(paths, cluster.scheduler_address, **kw)]
    for n in (1, 3):
        with _local_cluster(n) as c:
            runs += [_hist(paths, c.scheduler_address, **kw) for _ in range(2)]
    for got in runs:
        _same(got, want)
        for name, h in runs[0].items():  # between runs, the moments too
            for f in ("mean", "m2"):
                np.testing.assert_array_equal(getattr(got[name].stats, f), getattr(h.stats, f))


@pytest.mark.slow
def test_truncated_shard_fails_the_run_with_its_name(cluster, tmp_path, rng):
    out = tmp_path / "out.npz"
    code, stdout, err = _cli("hist", *truncated_shards(tmp_path, rng), "--layout", "NCL",
                             "--quantiles", "0.5", "--scheduler", cluster.scheduler_address,
                             "-o", out)
    assert code == 1, err
    assert "s1.h5" in err and "Traceback" not in err
    assert err.startswith("bnstat: error: ")
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".bnstat-tmp")]


@pytest.mark.slow
def test_cli_local_cluster_matches_local_run(tmp_path, rng):
    _files(tmp_path, rng)
    args = ["hist", tmp_path / "s1.npy", tmp_path / "s2.npy", "--layout", "NCHW", "--format",
            "json", "--bins", "16", "--quantiles", "0.5", "--chunk-size", "16KiB", "-q"]
    code, out, err = _cli(*args, "--scheduler", "local:2")
    assert code == 0, err
    code, want, err = _cli(*args)
    assert code == 0, err
    got, want = json.loads(out)["arrays"], json.loads(want)["arrays"]
    assert len(got) == len(want) == 2
    # the tasks' tree is not the local run's (16 KiB tasks: 5 of 10 samples or fewer); the
    # moments move by a few ulp (1.4e-15 relative seen in var)
    moments = ("mean", "var", "std")
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in moments} == \
            {k: v for k, v in w.items() if k not in moments}
        for k in moments:
            np.testing.assert_allclose(np.array(g[k], float), np.array(w[k], float), rtol=1e-14,
                                       atol=0)  # null (JSON) for the unit holding inf: NaN


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3), np.float32))
    code, out, err = _cli("hist", tmp_path / "a.npy", "--scheduler", "tcp://127.0.0.1:1", timeout=60)
    assert code == 1
    assert "cannot reach the Dask scheduler" in err and "Traceback" not in err


def test_partials_pack_and_place_exactly(rng):
    dense = np.zeros((5, 7), np.int64)
    dense[1, 3], dense[4, 0] = 2, 5
    packed = _pack(dense)
    assert isinstance(packed, tuple)  # mostly zeros: sent sparse
    target = np.ones((5, 7), np.int64)
    _add_into(target, packed)
    np.testing.assert_array_equal(target, dense + 1)
    np.testing.assert_array_equal(_dense(packed, dense.shape), dense)
    full = rng.integers(1, 9, (4, 4))
    assert _pack(full) is full
    # runs 2:5, (none), 9:10, in that order
    np.testing.assert_array_equal(_runs(np.array([2, 7, 9]), np.array([3, 0, 1])), [2, 3, 4, 9])


@pytest.mark.parametrize("command", [["moments"], ["hist", "--range", "-1:2"], ["running", "-b", "2"]])
def test_standard_input_is_refused_before_the_cluster(tmp_path, command):
    import subprocess
    import sys

    from conftest import REPO

    np.save(tmp_path / "a.npy", np.ones((8, 3), np.float32))
    with open(tmp_path / "a.npy", "rb") as fh:
        proc = subprocess.run([sys.executable, "-m", "bnstat", *command, "-", "--scheduler",
                               "local:1"], stdin=fh, capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 2, proc.stderr
    assert "standard input cannot be read by the workers of --scheduler" in proc.stderr
    assert "Traceback" not in proc.stderr
