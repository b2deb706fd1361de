"""`bnstat diff` (issue 13, acceptance 4 and 5): zeros against itself, known shifts
recovered per channel, --fail-over exits 3 above and 0 below, a model against its own
recalibrated copy, the error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bnstat


def data(seed=0, n=40, c=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, c, 3, 3)) * rng.uniform(0.5, 2, c).reshape(1, c, 1, 1) + 1.0


def gaussian_reference(a, b):
    """Shift, log var ratio and KL(a || b) from numpy float64 two-pass statistics."""
    ma, va = a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))
    mb, vb = b.mean(axis=(0, 2, 3)), b.var(axis=(0, 2, 3))
    kl = np.log(np.sqrt(vb) / np.sqrt(va)) + (va + (ma - mb) ** 2) / (2 * vb) - 0.5
    return (mb - ma) / np.sqrt(va), np.log(vb / va), kl


@pytest.fixture
def pair(tmp_path, cli):
    a = data(1)
    scale = np.array([1.0, 2.0, 1.0, 0.5]).reshape(1, 4, 1, 1)
    shift = np.array([0.0, 0.0, 3.0, -1.0]).reshape(1, 4, 1, 1)
    b = a * scale + shift
    np.savez(tmp_path / "a.npz", acts=a)
    np.savez(tmp_path / "b.npz", acts=b)
    for name in ("a", "b"):
        assert cli("moments", tmp_path / f"{name}.npz", "--layout", "NCHW", "-o", tmp_path / f"s{name}.npz")[0] == 0
    return tmp_path, a, b


def test_self_is_zero_and_exit_0(cli, pair):
    d, a, _ = pair
    code, out, err = cli("diff", d / "sa.npz", d / "sa.npz", "--format", "json", "--fail-over", "shift=0",
                         "--fail-over", "kl=0")
    assert code == 0, err
    rec = json.loads(out)["arrays"][0]
    assert rec["shift"] == [0.0] * 4 and rec["log_var_ratio"] == [0.0] * 4 and rec["kl"] == [0.0] * 4
    assert rec["changed"] == [""] * 4
    assert rec["mean_a"] == rec["mean_b"] == pytest.approx(a.mean(axis=(0, 2, 3)), rel=1e-12)
    code, out, err = cli("diff", d / "sa.npz", d / "sa.npz")
    assert code == 0 and "identical in A and B: acts" in out


def test_known_shifts_recovered(cli, pair):
    d, a, b = pair
    shift, logvar, kl = gaussian_reference(a, b)
    np.testing.assert_allclose(shift[2], 3.0 / np.sqrt(a[:, 2].var()), rtol=1e-12)  # the reference itself
    np.testing.assert_allclose(logvar[1], 2 * np.log(2.0), rtol=1e-12)
    for args in (("sa.npz", "sb.npz"), ("a.npz", "b.npz", "--layout", "NCHW"), ("sa.npz", "b.npz", "--layout", "NCHW")):
        code, out, err = cli("diff", *(d / x if x.endswith(".npz") else x for x in args), "--format", "json")
        assert code == 0, err
        doc = json.loads(out)
        rec = doc["arrays"][0]
        np.testing.assert_allclose(rec["shift"], shift, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(rec["log_var_ratio"], logvar, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(rec["kl"], kl, rtol=1e-9, atol=1e-12)
        assert rec["worst"]["shift"][0]["unit"] == 2 and rec["worst"]["log_var_ratio"][0]["unit"] == 1
    assert doc["a"]["kind"] == "stats" and doc["b"]["kind"] == "activations"
    code, out, err = cli("diff", d / "sa.npz", d / "sb.npz", "--format", "csv")
    lines = out.splitlines()
    assert lines[0] == "name,unit,mean_a,std_a,mean_b,std_b,shift,log_var_ratio,kl,changed"
    assert [float(row.split(",")[6]) for row in lines[1:]] == pytest.approx(shift, rel=1e-9, abs=1e-12)
    code, out, err = cli("diff", d / "sa.npz", d / "sb.npz", "--sort", "shift", "--top", "1")
    assert code == 0 and "worst shift" in out and "3 more units not shown" in out


def test_fail_over(cli, pair):
    d, a, b = pair
    shift, _, _ = gaussian_reference(a, b)
    worst = float(np.abs(shift).max())
    code, out, err = cli("diff", d / "sa.npz", d / "sb.npz", "--fail-over", f"shift={worst * 0.99}")
    assert code == 3
    assert "bnstat: drift: acts: 1 unit(s) over --fail-over shift=" in err and "Traceback" not in err
    code, out, err = cli("diff", d / "sa.npz", d / "sb.npz", "--fail-over", f"shift={worst * 1.01}")
    assert code == 0, err
    code, out, err = cli("diff", d / "sa.npz", d / "sb.npz", "--fail-over", "kl=0", "--format", "json")
    assert code == 3 and json.loads(out)["exceeded"][0]["metric"] == "kl"
    code, out, err = cli("diff", d / "sa.npz", d / "sb.npz", "--fail-over", "bogus=1")
    assert code == 2 and "METRIC=X" in err


def test_model_against_its_recalibrated_copy(tmp_path, cli):
    rng = np.random.default_rng(3)
    model = {}
    for name in ("b1", "b2"):
        model.update({f"{name}.running_mean": rng.normal(size=4), f"{name}.running_var": rng.uniform(0.5, 2, 4),
                      f"{name}.weight": np.ones(4), f"{name}.bias": np.zeros(4)})
    np.savez(tmp_path / "m.npz", **model)
    x = data(4)
    np.save(tmp_path / "b1.npy", x)
    assert cli("recalibrate", tmp_path / "m.npz", tmp_path / "b1.npy", "--layout", "NCHW",
               "-o", tmp_path / "r.npz")[0] == 0
    code, out, err = cli("diff", tmp_path / "m.npz", tmp_path / "r.npz", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    recs = {r["name"]: r for r in doc["arrays"]}
    assert doc["a"]["kind"] == doc["b"]["kind"] == "model"
    assert recs["b2"]["shift"] == [0.0] * 4 and recs["b2"]["kl"] == [0.0] * 4
    old_m, old_v = model["b1.running_mean"], model["b1.running_var"]
    new_m, new_v = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(recs["b1"]["shift"], (new_m - old_m) / np.sqrt(old_v), rtol=1e-10)
    np.testing.assert_allclose(recs["b1"]["log_var_ratio"], np.log(new_v / old_v), rtol=1e-10)
    # the data against the model: arrays name the BN layers as in recalibrate
    code, out, err = cli("diff", tmp_path / "r.npz", tmp_path / "b1.npy", "--layout", "NCHW", "--format", "json")
    rec = json.loads(out)["arrays"][0]
    assert code == 0 and rec["name_a"] == "b1" and rec["name_b"] == "b1"
    np.testing.assert_allclose(rec["log_var_ratio"], np.log((len(x) * 9 - 1) / (len(x) * 9)), rtol=1e-9)
    assert json.loads(out)["unmatched_a"] == ["b2"]


def test_changed_flags(tmp_path):
    a = data(5)
    b = a.copy()
    b[:, 3] = 2.0  # a constant channel
    r = bnstat.diff({"x": bnstat.moments(a, layout="NCHW")["array"]},
                    {"x": bnstat.moments(b, layout="NCHW")["array"]}, fail_over=["changed=0"])
    d = r.arrays[0]
    assert d.changes() == ["", "", "", "+const"]
    assert r.exceeded() == [("x", "changed", 0.0, 1, 1.0)]
    assert np.isinf(d.metrics()["kl"][3])


@pytest.mark.parametrize("which,code,message", [
    ("channels", 1, "has 4 units"),
    ("names", 1, "no array of one matches"),
    ("missing", 1, "missing.npz"),
])
def test_errors(cli, pair, which, code, message):
    d, a, _ = pair
    if which == "channels":
        np.savez(d / "c.npz", acts=a[:, :3])
        other = d / "c.npz"
    elif which == "names":
        np.savez(d / "c.npz", other=a)
        other = d / "c.npz"
    else:
        other = d / "missing.npz"
    got, out, err = cli("diff", d / "sa.npz", other, "--layout", "NCHW", "-o", d / "out.json")
    assert got == code, err
    assert message in err and "Traceback" not in err
    assert not (d / "out.json").exists()


def test_layout_of_other_norm_is_an_error(cli, pair):
    d, _, _ = pair
    assert cli("moments", d / "a.npz", "--layout", "NCHW", "--norm", "instance", "-o", d / "inst.npz")[0] == 0
    code, out, err = cli("diff", d / "sa.npz", d / "inst.npz")
    assert code == 1 and "has 4 units" in err
