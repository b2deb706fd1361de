"""bnstat fold (commands/fold.py) from the command line: ambiguous BNs settled by --pair,
the sample model's plan, errors and folded values against SPEC 3's formula, refusals."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from conftest import run_inproc
from helpers import SAMPLE, assert_fails, torch_bn


def _folded(w, b, bn, eps):
    """SPEC 3: W' = W * s along the output axis 0, b' = (b - mean) * s + beta, in float64."""
    s = bn["weight"].astype(np.float64) / np.sqrt(bn["running_var"].astype(np.float64) + eps)
    w2 = w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
    b0 = np.zeros_like(s) if b is None else b.astype(np.float64)
    return w2, (b0 - bn["running_mean"]) * s + bn["bias"]


def test_ambiguous_bn_is_reported_until_pair_settles_it(tmp_path):
    rng = np.random.default_rng(11)
    # the layer directly before a BN in file order is its candidate, so the BN here follows
    # a weighted layer that is no conv (a PReLU's weight): stem or head, nothing tells
    d = {"stem.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
         "head.weight": rng.normal(size=(8, 8, 1, 1)).astype(np.float32),
         "mid.weight": np.ones(8, np.float32),
         **torch_bn(rng, "norm", 8)}
    src = tmp_path / "amb.npz"
    np.savez(src, **d)
    rc, out, err = run_inproc("fold", src, "-o", tmp_path / "a.npz")
    assert rc == 0, err
    assert "Traceback" not in err
    assert "1 BatchNorm layer(s) left unfolded (norm)" in err and "--pair" in err
    assert re.search(r"norm +│ +8 +│ ambiguous.*│ stem, head", out), out
    with np.load(tmp_path / "a.npz") as z:
        assert sorted(z.files) == sorted(d)  # nothing folded, nothing guessed
        for k in d:
            np.testing.assert_array_equal(z[k], d[k])
    rc, out, err = run_inproc("fold", src, "-o", tmp_path / "b.npz", "--pair", "head=norm", "--check")
    assert rc == 0, err
    assert re.search(r"head +│ norm +│ conv +│ OIHW +│ +8 +│ 1e-05 +│ --pair", out), out
    with np.load(tmp_path / "b.npz") as z:
        assert sorted(z.files) == ["head.bias", "head.weight", "mid.weight", "stem.weight"]
        bn = {k: d[f"norm.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        w, b = _folded(d["head.weight"], None, bn, 1e-5)
        np.testing.assert_allclose(z["head.weight"], w, rtol=2e-7, atol=1e-7)
        np.testing.assert_allclose(z["head.bias"], b, rtol=2e-7, atol=1e-7)
        np.testing.assert_array_equal(z["stem.weight"], d["stem.weight"])


def test_sample_model_plan_errors_and_folded_values(tmp_path):
    """`bnstat fold sample_data/model.npz -o folded.npz --check`: the printed plan has the
    columns of issue 4 and every max relative error <= 1e-5; the folded arrays are SPEC 3's
    formula computed here in float64 (then float32)."""
    sample = os.path.join(SAMPLE, "model.npz")
    out_path = tmp_path / "folded.npz"
    rc, out, err = run_inproc("fold", sample, "-o", out_path, "--check")
    assert rc == 0 and "Traceback" not in err, err
    lines = out.splitlines()
    head = next(ln for ln in lines if ln.startswith("conv"))
    cols = [c.strip() for c in re.split(r"[┃│]", head)]
    for want in ("conv", "bn", "kind", "layout", "channels", "eps", "max abs err", "max rel err"):
        assert want in cols, cols
    rows = [[c.strip() for c in ln.split("│")] for ln in lines if "│" in ln]
    with np.load(sample) as z:
        d = {k: z[k] for k in z.files}
    bns = sorted(k[: -len(".running_mean")] for k in d if k.endswith(".running_mean"))
    assert sorted(r[cols.index("bn")] for r in rows) == bns
    for r in rows:
        assert float(r[cols.index("max rel err")]) <= 1e-5, r
        assert r[cols.index("eps")] == "1e-05"
    with np.load(out_path) as z:
        folded = {k: z[k] for k in z.files}
    for r in rows:
        conv, bn_name = r[cols.index("conv")], r[cols.index("bn")]
        bn = {k: d[f"{bn_name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
        w, b = _folded(d[f"{conv}.weight"], d.get(f"{conv}.bias"), bn, 1e-5)
        np.testing.assert_allclose(folded[f"{conv}.weight"], w.astype(np.float32), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(folded[f"{conv}.bias"], b.astype(np.float32), rtol=1e-6, atol=1e-6)
        assert not [k for k in folded if k.startswith(bn_name + ".")]


def _nan_models(rng):
    base = {"features.0.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
            "features.0.bias": rng.normal(size=8).astype(np.float32), **torch_bn(rng, "features.1", 8)}

    def changed(key, index, value):
        d = {k: v.copy() for k, v in base.items()}
        d[key][index] = value
        return d

    keras = {"conv/kernel:0": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
             "bn/gamma:0": np.ones(4, np.float32), "bn/beta:0": np.zeros(4, np.float32),
             "bn/moving_mean:0": np.zeros(4, np.float32),
             "bn/moving_variance:0": np.array([1, 1, -0.5, 1], np.float32)}
    return {
        "nan-running-mean": (changed("features.1.running_mean", 4, np.nan),
                             r"features\.1: features\.1\.running_mean: 1 NaN"),
        "nan-conv-bias": (changed("features.0.bias", 1, np.nan), r"features\.0: features\.0\.bias: 1 NaN"),
        "inf-gamma": (changed("features.1.weight", 2, np.inf),
                      r"features\.1: features\.1\.weight: 1 infinite"),
        "keras-negative-variance": (keras, r"bn: .*moving_variance.* negative at channel 2"),
    }


@pytest.mark.parametrize("which", ["nan-running-mean", "nan-conv-bias", "inf-gamma",
                                   "keras-negative-variance"])
def test_more_refusals(which, tmp_path):
    """Refusals the suite did not cover: NaN running mean, NaN conv bias, infinite gamma, and
    a Keras-named negative moving variance: exit 1, the layer named, nothing written."""
    d, pattern = _nan_models(np.random.default_rng(12))[which]
    np.savez(tmp_path / "m.npz", **d)
    assert_fails(run_inproc("fold", tmp_path / "m.npz", "-o", tmp_path / "o.npz"), 1,
                 pattern + r".*nothing written")
    assert os.listdir(tmp_path) == ["m.npz"]
