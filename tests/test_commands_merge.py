"""bnstat merge and show (commands/merge.py, commands/show.py, stats.merge_files): inputs
left byte for byte, files saved with different --ddof."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import npy_bytes, run_inproc
from helpers import sha256, torch_bn


def test_inputs_unchanged_by_show_merge_fold_and_normalize_with_stats(tmp_path):
    """Properties bullet: the input is byte-for-byte unchanged after every command (the
    property tests cover moments, normalize and info)."""
    rng = np.random.default_rng(13)
    for i in (0, 1):
        (tmp_path / f"p{i}").mkdir()
        np.save(tmp_path / f"p{i}" / "acts.npy", rng.normal(size=(5, 3, 4)).astype(np.float32))
        rc, _, err = run_inproc("moments", tmp_path / f"p{i}" / "acts.npy", "--layout", "NCL",
                                "-o", tmp_path / f"s{i}.npz")
        assert rc == 0, err
    np.savez(tmp_path / "model.npz", **{"conv.weight": rng.normal(size=(3, 2, 1, 1)).astype(np.float32),
                                        **torch_bn(rng, "bn", 3)})
    inputs = [tmp_path / "p0" / "acts.npy", tmp_path / "s0.npz", tmp_path / "s1.npz",
              tmp_path / "model.npz"]
    before = {p: (sha256(p), os.stat(p).st_mtime_ns) for p in inputs}
    runs = [["show", tmp_path / "s0.npz", "--format", "json"],
            ["merge", tmp_path / "s0.npz", tmp_path / "s1.npz", "-o", tmp_path / "m.npz"],
            ["fold", tmp_path / "model.npz", "-o", tmp_path / "f.npz", "--check"],
            ["fold", tmp_path / "model.npz", "--dry-run"],
            ["normalize", tmp_path / "p0" / "acts.npy", "--stats", tmp_path / "s0.npz",
             "-o", tmp_path / "n.npy"]]
    for args in runs:
        rc, _, err = run_inproc(*args)
        assert rc == 0 and "Traceback" not in err, (args, err)
        assert {p: (sha256(p), os.stat(p).st_mtime_ns) for p in inputs} == before, args
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".bnstat-tmp")]


def test_merge_of_files_saved_with_different_ddof_warns(tmp_path):
    """m2 merges exactly whatever ddof was saved; the merged var uses the first file's ddof,
    and a warning says the files disagreed."""
    rng = np.random.default_rng(21)
    a = rng.normal(size=(30, 3, 4)).astype(np.float64)
    b = rng.normal(size=(20, 3, 4)).astype(np.float64)
    for part, x in (("p1", a), ("p2", b)):
        (tmp_path / part).mkdir()
        np.save(tmp_path / part / "x.npy", x)  # one array name, "x", in both parts
    assert run_inproc("moments", tmp_path / "p1" / "x.npy", "--layout", "NCL",
                      "-o", tmp_path / "a.npz")[0] == 0
    assert run_inproc("moments", tmp_path / "p2" / "x.npy", "--layout", "NCL", "--ddof", "1",
                      "-o", tmp_path / "b.npz")[0] == 0
    rc, out, err = run_inproc("merge", tmp_path / "a.npz", tmp_path / "b.npz", "--format", "json")
    assert rc == 0, err
    assert "different --ddof (0, 1)" in err and "uses --ddof 0" in err and "Traceback" not in err
    both = np.concatenate([a, b]).transpose(1, 0, 2).reshape(3, -1)
    rec = json.loads(out)["arrays"][0]
    np.testing.assert_allclose(rec["var"], both.var(axis=1, ddof=0), rtol=1e-12)
    rc, out, err = run_inproc("merge", tmp_path / "a.npz", tmp_path / "a.npz", "--format", "json",
                              "--allow-duplicates")
    assert rc == 0 and "ddof" not in err


def test_merge_files_is_one_library_call(tmp_path, rng):
    """stats.merge_files: the arrays of every file merged by name, exactly as one run over the
    data; an array missing from one file is a DataError naming that file."""
    from reference import ref_moments

    from bnstat.errors import DataError
    from bnstat.stats import merge_files

    x = rng.normal(size=(10, 3, 4))
    for i, part in enumerate((x[:4], x[4:])):
        rc, _, err = run_inproc("moments", "-", "--layout", "NCL", "-o", tmp_path / f"s{i}.npz",
                                input=npy_bytes(part))
        assert rc == 0, err
    merged = merge_files([tmp_path / "s0.npz", str(tmp_path / "s1.npz")])
    want = ref_moments(x, "NCL")
    (got,) = merged.values()
    assert got.count.tolist() == want.count.tolist()
    np.testing.assert_allclose(got.var, want.var, rtol=1e-12)
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
    rc, _, err = run_inproc("moments", "-", "--layout", "NC", "-o", tmp_path / "nc.npz",
                            input=npy_bytes(np.ones((3, 2))))
    assert rc == 0, err
    with pytest.raises(DataError, match=r"s0\.npz, .*nc\.npz: stdin: cannot merge statistics of "
                                        "layout NCL reducing NL with statistics of layout NC"):
        merge_files([tmp_path / "s0.npz", tmp_path / "nc.npz"])
    np.save(tmp_path / "b.npy", x)
    rc, _, err = run_inproc("moments", tmp_path / "b.npy", "--layout", "NCL", "-o", tmp_path / "b.npz")
    assert rc == 0, err
    with pytest.raises(DataError, match=r"^stdin: in some stats files but not in .*b\.npz\nMerge files that hold"):
        merge_files([tmp_path / "s0.npz", tmp_path / "b.npz"])
