""".npz members moments cannot use (issue 17, "What a new user tripped over"): a string,
object, 0-D or 1-D member never makes the whole file unusable. Unselected members are
not parsed; without -d they are skipped with one warning naming them; `info` lists them."""

from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import pytest
from conftest import run_inproc


class Boom:
    """A pickle that writes a file when loaded: bnstat must never load it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _mixed(tmp_path, compressed=False):
    """x (usable), s (strings), o (objects, a booby-trapped pickle), z (0-D), v (1-D)."""
    x = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    save = np.savez_compressed if compressed else np.savez
    path = tmp_path / ("c.npz" if compressed else "m.npz")
    save(path, x=x, s=np.array(["a", "bc"]), o=np.array([Boom(str(tmp_path / "PWNED")), 1], dtype=object),
         z=np.float64(3.0), v=np.arange(5.0))
    return path, x


def _ok(rc, err):
    assert rc == 0, err
    assert "Traceback" not in err and "internal error" not in err, err


def _ref_stats(x):
    x = x.astype(np.float64)
    return x.mean(axis=0), x.var(axis=0)


@pytest.mark.parametrize("compressed", [False, True])
def test_info_lists_every_member_with_what_moments_would_skip(tmp_path, compressed):
    path, _ = _mixed(tmp_path, compressed)
    rc, out, err = run_inproc("info", path, "--format", "json")
    _ok(rc, err)
    rows = {r["name"]: r for r in json.loads(out)["arrays"]}
    with np.load(path, allow_pickle=False) as ref:  # numpy's own headers, no pickle loaded
        for name in ("x", "s", "z", "v"):
            assert rows[name]["shape"] == list(ref[name].shape)
            assert rows[name]["dtype"] == str(ref[name].dtype)
    assert rows["o"]["shape"] == [2] and rows["o"]["dtype"] == "object"
    assert rows["x"]["skip"] is None
    assert rows["s"]["skip"] == "string dtype <U2"
    assert rows["o"]["skip"].startswith("object dtype")
    assert rows["z"]["skip"] == "0-D" and rows["v"]["skip"] == "1-D"
    rc, out, err = run_inproc("info", path)
    _ok(rc, err)
    for name in "xsozv":
        assert re.search(rf"│ {name} +│", out), out
    note = " ".join(out.split())  # the note may wrap
    assert "moments cannot use" in note and "s (string dtype <U2)" in note and "v (1-D)" in note
    assert not (tmp_path / "PWNED").exists()


def test_moments_without_d_skip_unusable_members_with_one_warning(tmp_path):
    path, x = _mixed(tmp_path)
    rc, out, err = run_inproc("moments", path, "--layout", "NC", "--format", "json")
    _ok(rc, err)
    lines = [ln for ln in err.splitlines() if "skipping" in ln]
    assert len(lines) == 1, err
    for part in ("s (string dtype <U2)", "o (object dtype", "z (0-D)", "v (1-D)"):
        assert part in lines[0]
    (arr,) = json.loads(out)["arrays"]
    mean, var = _ref_stats(x)
    assert arr["name"] == "x"
    np.testing.assert_allclose(arr["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(arr["var"], var, rtol=1e-12)
    assert not (tmp_path / "PWNED").exists()


def test_d_leaves_other_members_unread(tmp_path):
    """A member whose header does not even parse is never looked at when -d selects another."""
    path, x = _mixed(tmp_path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("junk.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': nonsense")
    rc, out, err = run_inproc("moments", path, "-d", "x", "--layout", "NC", "--format", "json")
    _ok(rc, err)
    assert "skipping" not in err and "junk" not in err, err
    mean, var = _ref_stats(x)
    np.testing.assert_allclose(json.loads(out)["arrays"][0]["var"], var, rtol=1e-12)
    rc, out, err = run_inproc("moments", path, "--layout", "NC", "--format", "json")
    assert rc == 1 and re.search(r"m\.npz:junk: corrupt \.npy header", err), err  # damage stays an error


@pytest.mark.parametrize("member, message", [
    ("s", r"m\.npz:s: dtype <U2 \(string\) is not supported"),
    ("o", r"m\.npz:o: dtype object holds Python objects"),
    ("z", r"m\.npz:z: a 0-D array"),
    ("v", r"m\.npz:v: a 1-D array"),
])
def test_a_member_selected_with_d_that_moments_cannot_use_is_an_error(tmp_path, member, message):
    path, _ = _mixed(tmp_path)
    rc, out, err = run_inproc("moments", path, "-d", member, "--format", "json")
    assert rc == 1 and re.search(message, err), err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "PWNED").exists()


def test_nothing_usable_left_is_exit_1_naming_the_skipped(tmp_path):
    np.savez(tmp_path / "bad.npz", s=np.array(["a"]), v=np.arange(3.0))
    rc, out, err = run_inproc("moments", tmp_path / "bad.npz", "--format", "json")
    assert rc == 1 and out == ""
    assert re.search(r"bad\.npz: no numeric array of 2 or more dimensions found; skipped s \(string dtype <U1\), v \(1-D\)", err), err


def test_normalize_d_and_without_d(tmp_path):
    path, x = _mixed(tmp_path)
    mean, var = _ref_stats(x)
    want = ((x - mean) / np.sqrt(var + 1e-5)).astype(np.float32)
    for extra, out_name in ((["-d", "x"], "a.npz"), ([], "b.npz")):
        rc, out, err = run_inproc("normalize", path, *extra, "--layout", "NC", "-o", tmp_path / out_name)
        _ok(rc, err)
        assert ("skipping" in err) == (not extra), err
        with np.load(tmp_path / out_name) as got:
            assert list(got) == ["x"]
            np.testing.assert_allclose(got["x"], want, rtol=1e-5, atol=1e-6)


def test_hist_d(tmp_path):
    path, x = _mixed(tmp_path)
    rc, out, err = run_inproc("hist", path, "-d", "x", "--layout", "NC", "--range", "-3:3", "--bins", "8",
                              "--format", "json")
    _ok(rc, err)
    (arr,) = json.loads(out)["arrays"]
    for c in range(x.shape[1]):
        want, _ = np.histogram(x[:, c].astype(np.float64), bins=np.linspace(-3, 3, 9))
        inside = (x[:, c] >= -3) & (x[:, c] <= 3)
        assert arr["counts"][c] == list(want) and sum(want) == inside.sum()


def test_api_moments_of_a_mixed_npz(tmp_path):
    import bnstat

    path, x = _mixed(tmp_path)
    with pytest.warns(bnstat.errors.BnstatWarning, match="skipping s"):
        stats = bnstat.moments(path, layout="NC")
    assert list(stats) == ["x"]
    np.testing.assert_allclose(stats["x"].var, _ref_stats(x)[1], rtol=1e-12)


def test_info_lists_hdf5_datasets_moments_leave_out(tmp_path):
    """The same for HDF5: 1-D, scalar, string and empty-dataspace datasets are listed with why;
    moments leave them out quietly (README, conventions) and compute the rest."""
    import h5py

    x = np.arange(12.0).reshape(4, 3)
    with h5py.File(tmp_path / "o.h5", "w") as f:
        f["a"] = x
        f["g/v"] = np.arange(4.0)
        f["s"] = np.float32(2)
        f["t"] = np.array([b"x", b"yz"])
        f.create_dataset("n", data=h5py.Empty("f4"))
    rc, out, err = run_inproc("info", tmp_path / "o.h5", "--format", "json")
    _ok(rc, err)
    rows = {r["name"]: r for r in json.loads(out)["arrays"]}
    assert rows["a"]["skip"] is None and rows["a"]["shape"] == [4, 3]
    assert rows["g/v"]["skip"] == "1-D" and rows["g/v"]["shape"] == [4]
    assert rows["s"]["skip"] == "0-D" and rows["t"]["skip"] == "bytes dtype |S2"
    assert rows["n"]["skip"] == "no dataspace"
    rc, out, err = run_inproc("info", tmp_path / "o.h5")
    _ok(rc, err)
    assert "g/v (1-D)" in " ".join(out.split())
    rc, out, err = run_inproc("moments", tmp_path / "o.h5", "--layout", "NC", "--format", "json")
    _ok(rc, err)
    assert "skipping" not in err
    (arr,) = json.loads(out)["arrays"]
    np.testing.assert_allclose(arr["var"], x.var(axis=0), rtol=1e-12)


@pytest.mark.parametrize("bad, reason", [
    (np.ones((3, 2), bool), "bool dtype bool"),
    (np.ones((3, 2), np.complex64), "complex dtype complex64"),
    (np.zeros((3, 2), [("a", "f4"), ("b", "i4")]), "structured/void dtype"),
    (np.array(["2020-01-01"], "datetime64[D]").repeat(6).reshape(3, 2), "datetime dtype datetime64[D]"),
    (np.zeros((0, 3), np.float32), "empty"),
    (np.array([b"ab", b"c"]), "bytes dtype |S2"),
])
@pytest.mark.parametrize("compressed", [False, True])
def test_more_members_moments_skip(tmp_path, bad, reason, compressed):
    x = np.linspace(-1, 1, 24).reshape(8, 3)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "k.npz", bad=bad, good=x)
    rc, out, err = run_inproc("moments", tmp_path / "k.npz", "--layout", "NC", "--format", "json")
    _ok(rc, err)
    assert f"skipping bad ({reason}" in err, err
    (arr,) = json.loads(out)["arrays"]
    np.testing.assert_allclose(arr["var"], x.var(axis=0), rtol=1e-12)
    rc, out, err = run_inproc("info", tmp_path / "k.npz", "--format", "json")
    _ok(rc, err)
    row = next(r for r in json.loads(out)["arrays"] if r["name"] == "bad")
    assert row["skip"].startswith(reason) and row["shape"] == list(bad.shape)
    rc, _, err = run_inproc("moments", tmp_path / "k.npz", "-d", "bad", "--layout", "NC", "--format", "json")
    assert rc == 1 and "k.npz:bad" in err and "Traceback" not in err, err
