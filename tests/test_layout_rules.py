"""A layout per pattern or per rank, and HDF5 `layout` attributes (issue 17, "What a new
user tripped over"): files mixing conv and fc activations in one run, each array against
its own numpy float64 reference."""

from __future__ import annotations

import json
import os
import re

import h5py
import numpy as np
import pytest
from conftest import run_inproc
from helpers import SAMPLE

import bnstat
from bnstat.errors import UsageProblem
from bnstat.layout import layout_rules


@pytest.fixture
def mixed(tmp_path):
    """fc1, fc2 (N, C); conv (N, H, W, C) stored channels-last; seq (N, C, L)."""
    rng = np.random.default_rng(11)
    arrays = {"fc1": rng.normal(1, 2, (40, 6)).astype(np.float32),
              "fc2": rng.normal(-1, 1, (40, 3)).astype(np.float32),
              "conv": rng.normal(0, 3, (5, 4, 4, 7)).astype(np.float32),
              "seq": rng.normal(0, 1, (6, 3, 9)).astype(np.float32)}
    with h5py.File(tmp_path / "m.h5", "w") as f:
        for k, v in arrays.items():
            f[k] = v
    np.savez(tmp_path / "m.npz", **arrays)
    return tmp_path, {k: v.astype(np.float64) for k, v in arrays.items()}


REDUCE = {"fc1": (0,), "fc2": (0,), "conv": (0, 1, 2), "seq": (0, 2)}  # NC, NC, NHWC, NCL


def _check(arrays, x, names):
    assert sorted(arrays) == sorted(names)
    for name in names:
        axes = REDUCE[name]
        np.testing.assert_allclose(arrays[name]["mean"], x[name].mean(axis=axes), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(arrays[name]["var"], x[name].var(axis=axes), rtol=1e-12)


def _json(*args):
    rc, out, err = run_inproc(*map(str, args), "--format", "json")
    assert rc == 0 and "Traceback" not in err, err
    assert "assuming" not in err, err  # every array had its layout
    return {a["name"]: a for a in json.loads(out)["arrays"]}


@pytest.mark.parametrize("ext", ["h5", "npz"])
@pytest.mark.parametrize("layouts", [
    ["fc*=NC", "seq=NCL", "NHWC"],       # patterns, then a default
    ["NC", "NHWC", "NCL"],               # by rank
    ["conv=NHWC", "NC", "NCL"],          # a pattern and ranks
    ["seq=NCL", "s*=NC", "NC", "NHWC"],  # first match wins: seq is NCL, not NC
])
def test_moments_in_one_run_equal_each_arrays_reference(mixed, ext, layouts):
    tmp, x = mixed
    flags = [a for lay in layouts for a in ("--layout", lay)]
    got = _json("moments", tmp / f"m.{ext}", *flags)
    _check(got, x, x)
    assert got["conv"]["layout"] == "NHWC" and got["fc2"]["layout"] == "NC" and got["seq"]["layout"] == "NCL"


def test_hist_normalize_running_take_the_rules(mixed):
    tmp, x = mixed
    flags = ["--layout", "fc*=NC", "--layout", "NHWC", "--layout", "NCL"]
    got = _json("hist", tmp / "m.h5", *flags, "--range", "-10:10", "--bins", "5")
    _check(got, x, x)
    conv = x["conv"].reshape(-1, 7)
    for c in range(7):
        want, _ = np.histogram(conv[:, c], bins=np.linspace(-10, 10, 6))
        assert got["conv"]["counts"][c] == list(want)
    rc, _, err = run_inproc("normalize", str(tmp / "m.h5"), *flags, "-o", str(tmp / "n.h5"))
    assert rc == 0, err
    with h5py.File(tmp / "n.h5") as f:
        for name, v in x.items():
            axes = REDUCE[name]
            want = (v - v.mean(axis=axes, keepdims=True)) / np.sqrt(v.var(axis=axes, keepdims=True) + 1e-5)
            np.testing.assert_allclose(f[name][()], want, rtol=1e-5, atol=1e-5)
    got = _json("running", tmp / "m.h5", *flags, "-b", "5")
    for name, v in x.items():
        np.testing.assert_allclose(got[name]["mean"], v.mean(axis=REDUCE[name]), rtol=1e-12, atol=1e-15)


def test_api_takes_a_list_of_layouts(mixed):
    tmp, x = mixed
    stats = bnstat.moments(tmp / "m.npz", layout=["fc*=NC", "NHWC", "NCL"])
    for name, s in stats.items():
        np.testing.assert_allclose(s.var, x[name].var(axis=REDUCE[name]), rtol=1e-12)


@pytest.mark.parametrize("layouts, message", [
    (["NCHW", "NHWC"], r"--layout NCHW and --layout NHWC: both given for 4-D arrays"),
    (["fc*=NC", "fc*=CN"], r"--layout NC and --layout CN: both given for the pattern 'fc\*'"),
    (["=NC"], r"PATTERN=LAYOUT needs a pattern"),
    (["fc*=NCHH"], r"'fc\*=NCHH': each axis letter may appear once"),
    (["fc*=NH"], r"'fc\*=NH': a layout needs exactly one C"),
    (["NC", "NHWC"], r"m\.h5:seq: no --layout for a 3-D array: NC is 2-D, NHWC is 4-D"),
    (["*=NC"], r"m\.h5:conv: --layout NC has 2 letters but the array has 4 dimensions"),
])
def test_conflicting_or_unfit_layouts_are_exit_2(mixed, layouts, message):
    tmp, _ = mixed
    flags = [a for lay in layouts for a in ("--layout", lay)]
    rc, out, err = run_inproc("moments", str(tmp / "m.h5"), *flags, "--format", "json")
    assert rc == 2 and out == "" and "Traceback" not in err
    assert re.search(message, err), err


def test_layout_rules_unit():
    rules = layout_rules(["fc*=NC", "f*=CN", "NCHW", "NCL"])
    assert rules.pick(("fc1",), 2, "w") == "NC"       # the first matching pattern
    assert rules.pick(("f2",), 2, "w") == "CN"
    assert rules.pick(("conv",), 4, "w") == "NCHW"    # by rank
    assert rules.pick(("x", "stem"), 3, "w") == "NCL"
    assert layout_rules(["fc*=NC"]).pick(("conv",), 4, "w") is None   # no rule: the default
    assert layout_rules("NCHW").pick(("fc",), 2, "w") == "NCHW"       # one layout: for all
    assert layout_rules(None) is None and layout_rules([]) is None
    with pytest.raises(UsageProblem, match="both given for 2-D arrays"):
        layout_rules(["NC", "CN"])
    with pytest.raises(UsageProblem, match="no --layout for a 3-D array"):
        rules = layout_rules(["NC", "NCHW"])
        rules.pick(("a",), 3, "w")


# ---- HDF5 layout attributes ----------------------------------------------------------------

def test_the_sample_file_uses_its_layout_attributes():
    with h5py.File(os.path.join(SAMPLE, "acts.h5")) as f:
        attrs = {}
        f.visititems(lambda n, o: attrs.update({n: (o.attrs["layout"], o[()].astype(np.float64))})
                     if isinstance(o, h5py.Dataset) else None)
    assert attrs and all(a == "NCHW" for a, _ in attrs.values())
    rc, out, err = run_inproc("moments", str(os.path.join(SAMPLE, "acts.h5")), "--format", "json")
    assert rc == 0 and "assuming" not in err, err
    for arr in json.loads(out)["arrays"]:
        layout, x = attrs[arr["name"]]
        assert arr["layout"] == layout and arr["layout_assumed"] is False
        np.testing.assert_allclose(arr["var"], x.var(axis=(0, 2, 3)), rtol=1e-12)


def _nhwc_file(tmp_path, attr="NHWC"):
    x = np.random.default_rng(5).normal(0, 2, (6, 3, 4, 5)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["acts"] = x
        f["acts"].attrs["layout"] = attr
        f["fc"] = x.reshape(6, -1)[:, :10]
        f["fc"].attrs["layout"] = np.bytes_(b"NC")
    return x.astype(np.float64)


def test_an_nhwc_attribute_is_honoured_and_an_explicit_layout_wins(tmp_path):
    x = _nhwc_file(tmp_path)
    got = _json("moments", tmp_path / "a.h5")
    np.testing.assert_allclose(got["acts"]["var"], x.var(axis=(0, 1, 2)), rtol=1e-12)   # NHWC
    assert got["fc"]["layout"] == "NC"
    got = _json("moments", tmp_path / "a.h5", "--layout", "acts=NCHW", "--layout", "NC")
    np.testing.assert_allclose(got["acts"]["var"], x.var(axis=(0, 2, 3)), rtol=1e-12)   # NCHW wins
    rc, out, err = run_inproc("moments", str(tmp_path / "a.h5"), "-d", "acts", "--channel-axis", "1",
                              "--format", "json")
    assert rc == 0, err
    np.testing.assert_allclose(json.loads(out)["arrays"][0]["var"], x.var(axis=(0, 2, 3)), rtol=1e-12)
    # a pattern for one array leaves the others to their attribute
    got = _json("moments", tmp_path / "a.h5", "--layout", "fc=CN")
    np.testing.assert_allclose(got["acts"]["var"], x.var(axis=(0, 1, 2)), rtol=1e-12)
    assert got["fc"]["layout"] == "CN"
    rc, _, err = run_inproc("normalize", str(tmp_path / "a.h5"), "-d", "acts", "-o", str(tmp_path / "n.h5"))
    assert rc == 0, err
    want = (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + 1e-5)
    with h5py.File(tmp_path / "n.h5") as f:
        np.testing.assert_allclose(f["acts"][()], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attr", ["NCL", "NCCW", "XYZW", "N1HW"])
def test_an_attribute_that_does_not_fit_is_exit_1_and_layout_overrides_it(tmp_path, attr):
    x = _nhwc_file(tmp_path, attr)
    rc, out, err = run_inproc("moments", str(tmp_path / "a.h5"), "--format", "json")
    assert rc == 1 and out == "" and "Traceback" not in err
    assert re.search(rf"a\.h5:acts: its layout attribute '{attr}' does not fit the 4-D shape", err), err
    got = _json("moments", tmp_path / "a.h5", "--layout", "NHWC", "--layout", "NC")
    np.testing.assert_allclose(got["acts"]["var"], x.var(axis=(0, 1, 2)), rtol=1e-12)


def test_accumulator_takes_rules_by_its_name():
    x = np.random.default_rng(2).normal(size=(6, 3, 4))
    acc = bnstat.Accumulator(layout=["fc*=NC", "NLC"], name="attn")
    acc.update(x)
    assert acc.stats.layout == "NLC"
    np.testing.assert_allclose(acc.stats.var, x.var(axis=(0, 1)), rtol=1e-12)
    acc = bnstat.Accumulator(layout=["fc*=NC", "NLC"], name="fc1")
    acc.update(x[:, :, 0])
    np.testing.assert_allclose(acc.stats.var, x[:, :, 0].var(axis=0), rtol=1e-12)
