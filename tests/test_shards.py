"""Shards of one array (issue 17, "What a new user tripped over"): `--name NAME` / `name=`
makes s1.npy s2.npy (and standard input) one array whose statistics are the exact merge
over all shards, equal to numpy float64 over the concatenation along N; stats files of
shards made with the same --name merge with `bnstat merge`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import npy_bytes, run_inproc

import bnstat


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(7)
    parts = [rng.normal(0, 1, (30, 4, 5)).astype(np.float32),
             rng.normal(2, 3, (20, 4, 5)).astype(np.float32),
             rng.normal(-1, 0.5, (7, 4, 5)).astype(np.float32)]
    paths = []
    for i, p in enumerate(parts, 1):
        paths.append(tmp_path / f"s{i}.npy")
        np.save(paths[-1], p)
    return paths, np.concatenate(parts).astype(np.float64)


def _ref(x):
    """Per channel of an NCL array: numpy float64 over N and L."""
    return {"count": [x.shape[0] * x.shape[2]] * x.shape[1], "mean": x.mean(axis=(0, 2)),
            "var": x.var(axis=(0, 2)), "min": x.min(axis=(0, 2)), "max": x.max(axis=(0, 2))}


def _check(arr, x):
    for key, want in _ref(x).items():
        np.testing.assert_allclose(arr[key], want, rtol=1e-12, err_msg=key)


def _json(*args, stdin=None):
    rc, out, err = run_inproc(*map(str, args), "--format", "json", input=stdin)
    assert rc == 0 and "Traceback" not in err, err
    return {a["name"]: a for a in json.loads(out)["arrays"]}


def test_moments_of_shards_with_one_name_equal_numpy_over_the_concatenation(shards):
    paths, x = shards
    got = _json("moments", *paths, "--name", "act", "--layout", "NCL")
    assert list(got) == ["act"] and got["act"]["shape"] == list(x.shape)
    _check(got["act"], x)


def test_without_name_shards_stay_apart(shards):
    paths, _ = shards
    assert list(_json("moments", *paths[:2], "--layout", "NCL")) == ["s1", "s2"]


def test_a_shard_on_standard_input(shards):
    paths, x = shards
    got = _json("moments", paths[0], "-", paths[2], "--name", "act", "--layout", "NCL",
                stdin=npy_bytes(np.load(paths[1])))
    _check(got["act"], x)


def test_stats_files_of_shards_merge(shards, tmp_path):
    paths, x = shards
    parts = []
    for i, p in enumerate(paths):
        parts.append(tmp_path / f"st{i}.npz")
        rc, _, err = run_inproc("moments", str(p), "--name", "act", "--layout", "NCL", "-o", str(parts[-1]))
        assert rc == 0, err
    got = _json("merge", *parts)
    assert list(got) == ["act"]
    _check(got["act"], x)
    # and normalizing one shard with the merged statistics, found by the name
    rc, _, err = run_inproc("merge", *map(str, parts), "-o", str(tmp_path / "all.npz"))
    assert rc == 0, err
    rc, _, err = run_inproc("normalize", str(paths[1]), "--stats", str(tmp_path / "all.npz"),
                            "--name", "act", "-o", str(tmp_path / "n2.npy"))
    assert rc == 0, err
    r = _ref(x)
    want = (np.load(paths[1]) - r["mean"][None, :, None]) / np.sqrt(r["var"][None, :, None] + 1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "n2.npy"), want, rtol=1e-5, atol=1e-5)


def test_hist_of_shards(shards):
    paths, x = shards
    got = _json("hist", *paths, "--name", "act", "--layout", "NCL", "--range", "-6:8", "--bins", "7")
    edges = np.linspace(-6, 8, 8)
    for c in range(x.shape[1]):
        want, _ = np.histogram(x[:, c, :], bins=edges)
        assert got["act"]["counts"][c] == list(want)


def test_api_name(shards):
    paths, x = shards
    stats = bnstat.moments(paths, name="act", layout="NCL")
    assert list(stats) == ["act"]
    np.testing.assert_allclose(stats["act"].var, _ref(x)["var"], rtol=1e-12)
    assert list(bnstat.moments(np.ones((4, 3)), name="w", layout="NC")) == ["w"]
    h = bnstat.hist(paths, name="act", layout="NCL", range=(-6, 8), bins=7)["act"]
    assert h.counts.sum() + h.underflow.sum() + h.overflow.sum() == x.size
    run = bnstat.running(paths, name="act", layout="NCL", batch_size=10)["act"]
    np.testing.assert_allclose(run.mean, _ref(x)["mean"], rtol=1e-12)
    y = bnstat.normalize(np.ones((4, 3)) * np.arange(3), name="w", layout="NC")
    assert y.shape == (4, 3)


def test_running_command_with_name(shards):
    paths, x = shards
    rc, out, err = run_inproc("running", *map(str, paths), "--name", "act", "--layout", "NCL", "-b", "10",
                              "--format", "json")
    assert rc == 0, err
    (arr,) = json.loads(out)["arrays"]
    assert arr["name"] == "act" and arr["shape"] == list(x.shape)
    np.testing.assert_allclose(arr["mean"], _ref(x)["mean"], rtol=1e-12)


def test_name_refused_on_a_container_of_several_arrays(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.ones((3, 2)), b=np.full((3, 2), 2.0))
    rc, out, err = run_inproc("moments", str(tmp_path / "two.npz"), "--name", "act")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert re.search(r"two\.npz: --name/name= names one array, but 2 are selected \(a, b\)", err), err
    with pytest.raises(bnstat.errors.UsageProblem, match="names one array"):
        bnstat.moments({"a": np.ones((3, 2)), "b": np.ones((3, 2))}, name="act")
    # one array selected with -d: named, and still read from its member
    got = _json("moments", tmp_path / "two.npz", "-d", "b", "--name", "act", "--layout", "NC")
    assert list(got) == ["act"] and got["act"]["mean"] == [2.0, 2.0]


def test_name_keeps_the_duplicate_guard(shards):
    paths, _ = shards
    rc, _, err = run_inproc("moments", str(paths[0]), str(paths[0]), "--name", "act")
    assert rc == 1 and "the same file twice" in err


@pytest.mark.parametrize("bad", ["", "a*", " act", "__bnstat__"])
def test_bad_name_is_a_usage_error(shards, bad):
    paths, _ = shards
    rc, _, err = run_inproc("moments", str(paths[0]), "--name", bad)
    assert rc == 2 and "Invalid value for '--name'" in err, err


@pytest.mark.slow
def test_shards_on_a_local_dask_cluster(shards):
    """The workers reopen each shard by its name in the file (s1, s2...), not by --name."""
    pytest.importorskip("distributed", reason="the dask extra (distributed) is not installed")
    from conftest import run_cli

    paths, x = shards
    rc, out, err = run_cli("moments", *map(str, paths), "--name", "act", "--layout", "NCL", "--format",
                           "json", "--scheduler", "local:1", "--chunk-size", "1KiB", "-q")
    assert rc == 0, err
    (arr,) = json.loads(out)["arrays"]
    assert arr["name"] == "act"
    _check(arr, x)
