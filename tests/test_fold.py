"""bnstat fold: pairing, the folding math for every layout, --bn drop/identity, --check,
refusals, model files (npz, HDF5, safetensors) and the CLI.

The references here are written from the frameworks' definitions, not from
bnstat.folding: convolutions as loops over output (or input) positions in the
layer's own layout (channels-first for PyTorch, channels-last with the Keras
kernel layouts), BatchNorm in inference mode as (y - mean) / sqrt(var + eps)
* gamma + beta. A folded layer must equal layer-then-BN within float32
rounding.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from bnstat.errors import BnstatWarning, DataError

RTOL32 = 2e-5
BN_TORCH = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ---- independent references ------------------------------------------------------

def ref_conv(x, w, groups=1):
    """PyTorch ConvNd (stride 1, no padding): x (N, Cin, *S), w (Cout, Cin/g, *K); loops."""
    n, cin = x.shape[:2]
    k = w.shape[2:]
    cout = w.shape[0]
    cg, og = cin // groups, cout // groups
    osz = tuple(s - kk + 1 for s, kk in zip(x.shape[2:], k, strict=True))
    out = np.zeros((n, cout) + osz)
    for g in range(groups):
        xi = x[:, g * cg:(g + 1) * cg]
        wo = w[g * og:(g + 1) * og]
        for pos in itertools.product(*map(range, osz)):
            patch = xi[(slice(None), slice(None)) + tuple(slice(p, p + kk) for p, kk in zip(pos, k, strict=True))]
            out[(slice(None), slice(g * og, (g + 1) * og)) + pos] = np.tensordot(
                patch, wo, axes=(list(range(1, patch.ndim)), list(range(1, wo.ndim))))
    return out


def ref_conv_transpose(x, w, groups=1):
    """PyTorch ConvTransposeNd (stride 1, no padding): w (Cin, Cout/g, *K); a scatter loop
    over input positions: input channel c of group g adds x * w[c, j] to output g*Cout/g + j."""
    n, cin = x.shape[:2]
    k = w.shape[2:]
    og = w.shape[1]
    cg = cin // groups
    osz = tuple(s + kk - 1 for s, kk in zip(x.shape[2:], k, strict=True))
    out = np.zeros((n, og * groups) + osz)
    for c in range(cin):
        g = c // cg
        for pos in itertools.product(*map(range, x.shape[2:])):
            v = x[(slice(None), c) + pos]  # (N,)
            region = (slice(None), slice(g * og, (g + 1) * og)) + tuple(
                slice(p, p + kk) for p, kk in zip(pos, k, strict=True))
            out[region] += v.reshape((n,) + (1,) * (1 + len(k))) * w[c][None]
    return out


def keras_conv(x, kern, groups=1):
    """Keras ConvND, channels last: x (N, *S, Cin), kernel (*K, Cin/g, Cout)."""
    k = kern.shape[:-2]
    cing, cout = kern.shape[-2:]
    og = cout // groups
    osz = tuple(s - kk + 1 for s, kk in zip(x.shape[1:-1], k, strict=True))
    out = np.zeros((x.shape[0],) + osz + (cout,))
    for pos in itertools.product(*map(range, osz)):
        patch = x[(slice(None),) + tuple(slice(p, p + kk) for p, kk in zip(pos, k, strict=True))]
        for g in range(groups):
            pg = patch[..., g * cing:(g + 1) * cing]
            kg = kern[..., g * og:(g + 1) * og]
            out[(slice(None),) + pos + (slice(g * og, (g + 1) * og),)] = np.tensordot(
                pg, kg, axes=(list(range(1, pg.ndim)), list(range(kg.ndim - 1))))
    return out


def keras_depthwise(x, kern):
    """Keras DepthwiseConv: kernel (*K, C, M); output channel c*M + m."""
    k = kern.shape[:-2]
    c, m = kern.shape[-2:]
    osz = tuple(s - kk + 1 for s, kk in zip(x.shape[1:-1], k, strict=True))
    out = np.zeros((x.shape[0],) + osz + (c * m,))
    for pos in itertools.product(*map(range, osz)):
        patch = x[(slice(None),) + tuple(slice(p, p + kk) for p, kk in zip(pos, k, strict=True))]
        for ci in range(c):
            for mi in range(m):
                out[(slice(None),) + pos + (ci * m + mi,)] = np.sum(
                    patch[..., ci] * kern[..., ci, mi], axis=tuple(range(1, len(k) + 1)))
    return out


def keras_conv_transpose(x, kern):
    """Keras Conv2DTranspose (stride 1, 'valid'): kernel (kh, kw, out, in)."""
    k = kern.shape[:-2]
    osz = tuple(s + kk - 1 for s, kk in zip(x.shape[1:-1], k, strict=True))
    out = np.zeros((x.shape[0],) + osz + (kern.shape[-2],))
    for pos in itertools.product(*map(range, x.shape[1:-1])):
        v = x[(slice(None),) + pos]  # (N, in)
        region = (slice(None),) + tuple(slice(p, p + kk) for p, kk in zip(pos, k, strict=True))
        out[region] += np.einsum("ni,...oi->n...o", v, kern)
    return out


def bn_eval(y, mean, var, gamma, beta, eps, axis=1):
    shape = [1] * y.ndim
    shape[axis] = -1
    r = lambda a: np.asarray(a, np.float64).reshape(shape)  # noqa: E731
    return (y - r(mean)) / np.sqrt(r(var) + eps) * r(gamma) + r(beta)


def add_bias(y, b, axis=1):
    if b is None:
        return y
    shape = [1] * y.ndim
    shape[axis] = -1
    return y + np.asarray(b, np.float64).reshape(shape)


# ---- model builders ----------------------------------------------------------------

def torch_bn(rng, name, c, dtype=np.float32, affine=True):
    d = {f"{name}.running_mean": rng.normal(0, 1, c).astype(dtype),
         f"{name}.running_var": rng.uniform(0.3, 2.0, c).astype(dtype)}
    if affine:
        d = {f"{name}.weight": rng.uniform(0.5, 1.5, c).astype(dtype) * rng.choice([-1, 1], c).astype(dtype),
             f"{name}.bias": rng.normal(0, 1, c).astype(dtype), **d}
    d[f"{name}.num_batches_tracked"] = np.array(100, np.int64)
    return d


def keras_bn(rng, name, c, dtype=np.float32, suffix=":0"):
    return {f"{name}/gamma{suffix}": rng.uniform(0.5, 1.5, c).astype(dtype),
            f"{name}/beta{suffix}": rng.normal(0, 1, c).astype(dtype),
            f"{name}/moving_mean{suffix}": rng.normal(0, 1, c).astype(dtype),
            f"{name}/moving_variance{suffix}": rng.uniform(0.3, 2.0, c).astype(dtype)}


def f64(d, k):
    return None if k not in d else np.asarray(d[k], np.float64)


def torch_bn_apply(d, name, y, eps=1e-5):
    c = d[f"{name}.running_mean"].shape[0]
    g = f64(d, f"{name}.weight")
    b = f64(d, f"{name}.bias")
    return bn_eval(y, d[f"{name}.running_mean"], d[f"{name}.running_var"],
                   np.ones(c) if g is None else g, np.zeros(c) if b is None else b, eps)


# PyTorch layouts: (id, weight shape, groups, kind, input spatial)
TORCH_CASES = [
    ("linear", (6, 5), 1, "linear", None),
    ("conv1d", (6, 4, 3), 1, "conv", (5,)),
    ("conv2d", (6, 4, 3, 2), 1, "conv", (4, 5)),
    ("conv3d", (4, 3, 2, 2, 3), 1, "conv", (3, 3, 4)),
    ("conv2d-grouped", (6, 2, 3, 3), 3, "conv", (4, 4)),
    ("conv2d-depthwise", (8, 1, 3, 3), 8, "conv", (4, 4)),
    ("convT1d", (3, 5, 3), 1, "conv_transpose", (3,)),
    ("convT2d-grouped", (6, 4, 3, 2), 2, "conv_transpose", (2, 3)),
    ("convT3d-grouped", (6, 3, 2, 2, 2), 3, "conv_transpose", (2, 2, 2)),
    # (4, 1, 3, 3) also reads as a conv with 4 outputs, which wins: the plan says otherwise
    ("convT2d-depthwise", (4, 1, 3, 3), 4, "conv_transpose", (3, 3)),
]


def torch_layer_out(kind, w, b, x, groups):
    if kind == "linear":
        y = x @ w.T
    elif kind == "conv":
        y = ref_conv(x, w, groups)
    else:
        y = ref_conv_transpose(x, w, groups)
    return add_bias(y, b)


def torch_case(rng, shape, groups, kind, bias=True, dtype=np.float32):
    w = rng.normal(0, 0.5, shape).astype(dtype)
    cout = shape[0] if kind in ("conv", "linear") else shape[1] * groups
    d = {"block.conv.weight": w}
    if bias:
        d["block.conv.bias"] = rng.normal(0, 1, cout).astype(dtype)
    d.update(torch_bn(rng, "block.bn", cout, dtype))
    return d, cout


def _plan_for(shape, groups, kind):
    """Groups are not stored in a state_dict: a plan says them for grouped convs (the check
    then runs the grouped conv); a conv-transpose is read as one only on evidence (issue 11:
    never because the ordinary reading does not fit), here a plan entry."""
    if kind == "conv" and groups > 1:
        return {"pairs": [{"conv": "block.conv", "bn": "block.bn", "groups": groups}]}
    if kind == "conv_transpose":
        return {"pairs": [{"conv": "block.conv", "bn": "block.bn", "kind": "conv_transpose",
                           "groups": groups}]}
    return None


def torch_input(rng, kind, shape, groups, spatial):
    if kind == "linear":
        return rng.normal(size=(3, shape[1]))
    cin = shape[1] * groups if kind == "conv" else shape[0]
    return rng.normal(size=(2, cin) + spatial)


# ---- the math, every layout --------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_pytorch_layouts_drop(case, bias, rng):
    from bnstat.folding import fold

    _, shape, groups, kind, spatial = case
    d, cout = torch_case(rng, shape, groups, kind, bias)
    res = fold(d, plan=_plan_for(shape, groups, kind), check=True)
    assert len(res.pairs) == 1 and not res.unpaired
    p = res.pairs[0]
    assert p.reading.kind == kind
    assert p.reading.channels == cout
    assert p.check_rel <= 1e-6
    out = res.arrays
    assert not [k for k in out if k.startswith("block.bn.")]
    assert "block.conv.bias" in out and out["block.conv.bias"].dtype == np.float32
    assert out["block.conv.weight"].dtype == np.float32
    x = torch_input(rng, kind, shape, groups, spatial)
    want = torch_bn_apply(d, "block.bn", torch_layer_out(kind, d["block.conv.weight"].astype(np.float64),
                                                         f64(d, "block.conv.bias"), x, groups))
    got = torch_layer_out(kind, out["block.conv.weight"].astype(np.float64),
                          out["block.conv.bias"], x, groups)
    np.testing.assert_allclose(got, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max())


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_pytorch_layouts_identity(case, rng):
    from bnstat.folding import fold

    _, shape, groups, kind, spatial = case
    d, cout = torch_case(rng, shape, groups, kind, bias=True)
    res = fold(d, bn="identity", plan=_plan_for(shape, groups, kind), check=True)
    _same_from_written_plan(d, res)
    out = res.arrays
    assert list(out) == list(d)  # exactly the original keys, in order
    assert all(out[k].shape == d[k].shape and out[k].dtype == d[k].dtype for k in d)
    np.testing.assert_array_equal(out["block.bn.running_mean"], 0)
    np.testing.assert_allclose(out["block.bn.running_var"], 1 - 1e-5)
    np.testing.assert_array_equal(out["block.bn.weight"], 1)
    np.testing.assert_array_equal(out["block.conv.bias"], 0)
    x = torch_input(rng, kind, shape, groups, spatial)
    want = torch_bn_apply(d, "block.bn", torch_layer_out(kind, f64(d, "block.conv.weight"),
                                                         f64(d, "block.conv.bias"), x, groups))
    got = torch_bn_apply(out, "block.bn", torch_layer_out(kind, f64(out, "block.conv.weight"),
                                                          f64(out, "block.conv.bias"), x, groups))
    np.testing.assert_allclose(got, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max())


def _same_from_written_plan(d, res):
    """The plan --dry-run --plan writes, fed back, folds the same way."""
    from bnstat.folding import fold

    doc = json.loads(res.plan_json())
    again = fold(d, plan=doc, bn=res.bn_mode, check=True)
    assert [p.record()["kind"] for p in again.pairs] == [p.record()["kind"] for p in res.pairs]
    assert [p.by for p in again.pairs] == ["plan"] * len(res.pairs)
    assert list(again.arrays) == list(res.arrays)
    for k, v in res.arrays.items():
        np.testing.assert_array_equal(again.arrays[k], v)


def _keras_model(rng, kind, dtype=np.float32):
    """A Keras-named conv + BN; returns (arrays, apply(x, arrays, bn_too))."""
    if kind == "dense":
        kern, cout, xs = rng.normal(0, 0.5, (5, 6)), 6, (3, 5)
        run = lambda x, k: x @ k  # noqa: E731
    elif kind == "conv1d":
        kern, cout, xs = rng.normal(0, 0.5, (3, 4, 6)), 6, (2, 5, 4)
        run = keras_conv
    elif kind == "conv2d":
        kern, cout, xs = rng.normal(0, 0.5, (3, 2, 4, 6)), 6, (2, 4, 5, 4)
        run = keras_conv
    elif kind == "conv2d-grouped":
        kern, cout, xs = rng.normal(0, 0.5, (3, 3, 2, 6)), 6, (2, 4, 4, 4)
        run = lambda x, k: keras_conv(x, k, groups=2)  # noqa: E731
    elif kind == "depthwise":
        kern, cout, xs = rng.normal(0, 0.5, (3, 3, 3, 2)), 6, (2, 4, 4, 3)
        run = keras_depthwise
    elif kind == "conv2d_transpose":
        kern, cout, xs = rng.normal(0, 0.5, (3, 2, 5, 4)), 5, (2, 3, 3, 4)
        run = keras_conv_transpose
    else:
        raise AssertionError(kind)
    pname = "depthwise_kernel" if kind == "depthwise" else "kernel"
    d = {f"block1_conv/{pname}:0": kern.astype(dtype),
         "block1_conv/bias:0": rng.normal(0, 1, cout).astype(dtype)}
    d.update(keras_bn(rng, "block1_bn", cout, dtype))
    return d, run, xs, pname


def keras_apply(d, run, x, pname, with_bn, eps=1e-3):
    y = run(x, np.asarray(d[f"block1_conv/{pname}:0"], np.float64))
    if "block1_conv/bias:0" in d:
        y = y + np.asarray(d["block1_conv/bias:0"], np.float64)
    if with_bn:
        y = bn_eval(y, d["block1_bn/moving_mean:0"], d["block1_bn/moving_variance:0"],
                    d["block1_bn/gamma:0"], d["block1_bn/beta:0"], eps, axis=-1)
    return y


KERAS_KINDS = ["dense", "conv1d", "conv2d", "conv2d-grouped", "depthwise", "conv2d_transpose"]


@pytest.mark.parametrize("kind", KERAS_KINDS)
@pytest.mark.parametrize("mode", ["drop", "identity"])
def test_keras_layouts(kind, mode, rng):
    from bnstat.folding import fold

    d, run, xs, pname = _keras_model(rng, kind)
    plan = None
    if kind == "conv2d-grouped":
        plan = {"pairs": [{"conv": "block1_conv", "bn": "block1_bn", "groups": 2}]}
    if kind == "conv2d_transpose":  # (3, 2, 5, 4): transposed only on evidence (issue 11)
        plan = {"pairs": [{"conv": "block1_conv", "bn": "block1_bn", "kind": "conv_transpose"}]}
    res = fold(d, bn=mode, plan=plan, check=True)
    assert [p.by for p in res.pairs] == (["plan"] if plan else ["name"])
    _same_from_written_plan(d, res)
    p = res.pairs[0]
    assert p.eps == 1e-3 and p.eps_source == "Keras default"
    assert p.check_rel <= 1e-6
    x = rng.normal(size=xs)
    want = keras_apply(d, run, x, pname, with_bn=True)
    out = res.arrays
    if mode == "drop":
        assert sorted(out) == sorted(k for k in d if not k.startswith("block1_bn/"))
        got = keras_apply(out, run, x, pname, with_bn=False)
    else:
        assert list(out) == list(d)
        got = keras_apply(out, run, x, pname, with_bn=True)
    np.testing.assert_allclose(got, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max())


def test_keras_conv_without_bias_gets_one_with_suffix(rng):
    from bnstat.folding import fold

    d, run, xs, pname = _keras_model(rng, "conv2d")
    del d["block1_conv/bias:0"]
    res = fold(d)
    assert list(res.arrays)[:2] == ["block1_conv/kernel:0", "block1_conv/bias:0"]
    x = rng.normal(size=xs)
    want = keras_apply(d, run, x, pname, True)
    got = keras_apply(res.arrays, run, x, pname, False)
    np.testing.assert_allclose(got, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max())


def test_keras_separable_folds_into_pointwise(rng):
    from bnstat.folding import fold

    dw = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)
    pw = rng.normal(size=(1, 1, 8, 5)).astype(np.float32)
    d = {"sep/depthwise_kernel:0": dw, "sep/pointwise_kernel:0": pw,
         **keras_bn(rng, "sep_bn", 5)}
    res = fold(d, check=True)
    assert res.pairs[0].reading.kind == "separable"
    np.testing.assert_array_equal(res.arrays["sep/depthwise_kernel:0"], dw)
    x = rng.normal(size=(2, 4, 4, 4))
    mid = keras_depthwise(x, dw.astype(np.float64))
    want = bn_eval(keras_conv(mid, pw.astype(np.float64)), d["sep_bn/moving_mean:0"],
                   d["sep_bn/moving_variance:0"], d["sep_bn/gamma:0"], d["sep_bn/beta:0"], 1e-3, -1)
    got = keras_conv(mid, res.arrays["sep/pointwise_kernel:0"].astype(np.float64)) \
        + res.arrays["sep/bias:0"]
    np.testing.assert_allclose(got, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max())


def test_conv_transpose_square_weight_reads_as_conv_unless_the_plan_says(rng):
    from bnstat.folding import fold

    d, _ = torch_case(rng, (4, 4, 3, 3), 1, "conv_transpose")
    assert fold(d).pairs[0].reading.kind == "conv"  # SPEC 3: the ordinary reading wins
    res = fold(d, plan={"pairs": [{"conv": "block.conv", "bn": "block.bn",
                                   "kind": "conv_transpose"}]}, check=True)
    assert res.pairs[0].reading.layout == "IOHW"
    x = rng.normal(size=(2, 4, 3, 3))
    want = torch_bn_apply(d, "block.bn", add_bias(ref_conv_transpose(x, f64(d, "block.conv.weight")),
                                                  d["block.conv.bias"]))
    got = add_bias(ref_conv_transpose(x, f64(res.arrays, "block.conv.weight")),
                   res.arrays["block.conv.bias"])
    np.testing.assert_allclose(got, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max())


def test_bn_without_affine_folds_with_gamma_1_beta_0(rng):
    from bnstat.folding import fold

    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    d = {"conv.weight": w, **torch_bn(rng, "bn", 5, affine=False)}
    x = rng.normal(size=(2, 3, 4, 4))
    want = bn_eval(ref_conv(x, f64(d, "conv.weight")), d["bn.running_mean"], d["bn.running_var"],
                   np.ones(5), np.zeros(5), 1e-5)
    drop = fold(d).arrays
    np.testing.assert_allclose(add_bias(ref_conv(x, f64(drop, "conv.weight")), drop["conv.bias"]),
                               want, rtol=RTOL32, atol=1e-5)
    # identity without a beta or a conv bias: the shift rides on the running mean
    res = fold(d, bn="identity", check=True)
    ident = res.arrays
    assert list(ident) == list(d)
    assert "running mean" in res.pairs[0].note
    got = bn_eval(ref_conv(x, f64(ident, "conv.weight")), ident["bn.running_mean"],
                  ident["bn.running_var"], np.ones(5), np.zeros(5), 1e-5)
    np.testing.assert_allclose(got, want, rtol=RTOL32, atol=1e-5)


def test_float64_stays_float64_and_exact(rng):
    from bnstat.folding import fold

    d, _ = torch_case(rng, (6, 4, 3, 3), 1, "conv", dtype=np.float64)
    res = fold(d, check=True)
    assert res.arrays["block.conv.weight"].dtype == np.float64
    assert res.pairs[0].check_rel < 1e-13


def test_float16_overflow_and_subnormal_warn(rng):
    from bnstat.folding import fold

    w = np.full((2, 1, 1, 1), 1000.0, np.float16)
    d = {"conv.weight": w, "bn.running_mean": np.zeros(2, np.float16),
         "bn.running_var": np.array([1e-4, 1.0], np.float16),
         "bn.weight": np.array([100.0, 1e-5], np.float16), "bn.bias": np.zeros(2, np.float16)}
    with pytest.warns(BnstatWarning, match="overflow float16"):
        res = fold(d, eps=0.0)
    assert np.isinf(res.arrays["conv.weight"][0]).all()
    with pytest.warns(BnstatWarning, match="subnormal"):
        fold({**d, "conv.weight": np.full((2, 1, 1, 1), 1e-3, np.float16),
              "bn.weight": np.array([1.0, 1e-3], np.float16)}, eps=0.0)
    # and the check catches the broken layer: exit 1, nothing written
    from bnstat.folding import FoldCheckError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        with pytest.raises(FoldCheckError, match="check failed"):
            fold(d, eps=0.0, check=True)


# ---- pairing -----------------------------------------------------------------------

def conv_w(rng, cout, cin, k=3):
    return rng.normal(size=(cout, cin, k, k)).astype(np.float32)


def resnet_block(rng, prefix="layer1.0.", cin=8, cout=16):
    d = {f"{prefix}conv1.weight": conv_w(rng, cout, cin)}
    d.update(torch_bn(rng, f"{prefix}bn1", cout))
    d[f"{prefix}conv2.weight"] = conv_w(rng, cout, cout)
    d.update(torch_bn(rng, f"{prefix}bn2", cout))
    d[f"{prefix}downsample.0.weight"] = conv_w(rng, cout, cin, 1)
    d.update(torch_bn(rng, f"{prefix}downsample.1", cout))
    return d


def small_net(rng):
    d = {"features.0.weight": conv_w(rng, 8, 3), "features.0.bias": np.zeros(8, np.float32)}
    d.update(torch_bn(rng, "features.1", 8))
    d.update(resnet_block(rng))
    d["fc.weight"] = rng.normal(size=(10, 16)).astype(np.float32)
    d["fc.bias"] = rng.normal(size=10).astype(np.float32)
    d.update(torch_bn(rng, "bn_fc", 10))
    return d


def test_resnet_block_with_downsample(rng):
    from bnstat.folding import fold

    d = small_net(rng)
    res = fold(d, check=True)
    assert [(p.conv.display, p.bn.display, p.by) for p in res.pairs] == [
        ("features.0", "features.1", "sequence"),
        ("layer1.0.conv1", "layer1.0.bn1", "name"),
        ("layer1.0.conv2", "layer1.0.bn2", "name"),
        ("layer1.0.downsample.0", "layer1.0.downsample.1", "sequence"),
        ("fc", "bn_fc", "name")]
    assert not res.unpaired
    out = res.arrays
    bns = ("features.1", "layer1.0.bn1", "layer1.0.bn2", "layer1.0.downsample.1", "bn_fc")
    assert not [k for k in out if k.rsplit(".", 1)[0] in bns]  # num_batches_tracked included
    for conv in ("features.0", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.downsample.0", "fc"):
        assert f"{conv}.bias" in out
    # the block's output: relu(bn2(conv2(relu(bn1(conv1 x))))) + bn_ds(conv_ds(x)), stride 1
    x = rng.normal(size=(2, 8, 7, 7))
    p = "layer1.0."

    def block(a, folded):
        relu = lambda t: np.maximum(t, 0)  # noqa: E731
        if folded:
            h = relu(add_bias(ref_conv(x, f64(a, p + "conv1.weight")), a[p + "conv1.bias"]))
            h = add_bias(ref_conv(h, f64(a, p + "conv2.weight")), a[p + "conv2.bias"])
            s = add_bias(ref_conv(x, f64(a, p + "downsample.0.weight")), a[p + "downsample.0.bias"])
        else:
            h = relu(torch_bn_apply(a, p + "bn1", ref_conv(x, f64(a, p + "conv1.weight"))))
            h = torch_bn_apply(a, p + "bn2", ref_conv(h, f64(a, p + "conv2.weight")))
            s = torch_bn_apply(a, p + "downsample.1", ref_conv(x, f64(a, p + "downsample.0.weight")))
        return relu(h[:, :, 1:-1, 1:-1] + s[:, :, 2:-2, 2:-2])

    want = block(d, False)
    np.testing.assert_allclose(block(out, True), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def ambiguous_model(rng):
    """norm follows mid, a weighted layer that is no conv (a PReLU's weight): stem or head?"""
    return {"stem.weight": conv_w(rng, 8, 3), "head.weight": conv_w(rng, 8, 8, 1),
            "mid.weight": np.ones(8, np.float32), **torch_bn(rng, "norm", 8), "tail.weight": conv_w(rng, 4, 8, 1),
            **torch_bn(rng, "post", 4)}


def test_ambiguous_bn_is_reported_not_folded_until_pair(rng):
    from bnstat.folding import fold

    d = ambiguous_model(rng)
    with pytest.warns(BnstatWarning, match="left unfolded"):
        res = fold(d)
    assert [u.bn.display for u in res.unpaired] == ["norm"]
    assert "ambiguous" in res.unpaired[0].reason
    assert res.unpaired[0].candidates == ["stem", "head"]
    assert "norm.running_mean" in res.arrays
    np.testing.assert_array_equal(res.arrays["stem.weight"], d["stem.weight"])
    np.testing.assert_array_equal(res.arrays["head.weight"], d["head.weight"])
    assert [(p.conv.display, p.bn.display) for p in res.pairs] == [("tail", "post")]
    settled = fold(d, pairs=["head=norm"], check=True)
    assert [(p.conv.display, p.bn.display, p.by) for p in settled.pairs] == [
        ("head", "norm", "--pair"), ("tail", "post", "shape")]
    assert not settled.unpaired


def test_pre_activation_and_sequential_gaps_are_not_folded(rng):
    from bnstat.folding import fold

    d = {"features.0.weight": conv_w(rng, 8, 3), **torch_bn(rng, "features.2", 8),  # ReLU at 1
         **torch_bn(rng, "block.bn1", 8), "block.conv1.weight": conv_w(rng, 8, 8)}  # BN -> conv
    with pytest.warns(BnstatWarning):
        res = fold(d)
    assert not res.pairs
    why = {u.bn.display: u.reason for u in res.unpaired}
    assert "features.1, has no weights" in why["features.2"]
    assert "pre-activation" in why["block.bn1"]
    assert list(res.arrays) == list(d)


def test_keras_hdf5_order_and_auto_names(tmp_path, rng, cli):
    """A Keras weight file: nested groups, ':0' suffixes, auto names, layer_names order."""
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "weights.h5"
    layers = []  # model order: conv2d, bn, relu, conv2d_1, bn_1, flatten, dense, bn_2
    k0 = rng.normal(size=(3, 3, 3, 8)).astype(np.float32)
    k1 = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    kd = rng.normal(size=(8, 8)).astype(np.float32)
    with h5py.File(path, "w") as f:
        mw = f.create_group("model_weights")

        def layer(name, weights):
            g = mw.create_group(name)
            g.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w in weights])
            layers.append(name)
            return g

        def bn(name):
            g = layer(name, ["gamma", "beta", "moving_mean", "moving_variance"])
            for k, v in keras_bn(rng, "x", 8, suffix="").items():
                g.create_dataset(f"{name}/{k.split('/')[1]}:0", data=v)

        layer("conv2d", ["kernel"]).create_dataset("conv2d/kernel:0", data=k0)
        bn("batch_normalization")
        layer("re_lu", [])
        g = layer("conv2d_1", ["kernel", "bias"])
        g.create_dataset("conv2d_1/kernel:0", data=k1)
        g.create_dataset("conv2d_1/bias:0", data=np.ones(8, np.float32))
        bn("batch_normalization_1")
        g = layer("dense", ["kernel", "bias"])
        g.create_dataset("dense/kernel:0", data=kd)
        g.create_dataset("dense/bias:0", data=np.zeros(8, np.float32))
        layer("dropout", [])  # dense -> dropout -> BN: directly after no conv, not folded
        bn("batch_normalization_2")
        mw.attrs["layer_names"] = np.array([n.encode() for n in layers])
        f.attrs["keras_version"] = b"2.15.0"
    out = tmp_path / "folded.h5"
    code, stdout, stderr = cli("fold", path, "-o", out, "--check")
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "Keras default 0.001" in stdout
    assert "1 BatchNorm layer(s) left unfolded (batch_normalization_2)" in stderr
    with h5py.File(path) as f:
        orig = {n: f["model_weights/" + n][()] for n in
                ("conv2d/conv2d/kernel:0", "batch_normalization/batch_normalization/gamma:0",
                 "batch_normalization/batch_normalization/beta:0",
                 "batch_normalization/batch_normalization/moving_mean:0",
                 "batch_normalization/batch_normalization/moving_variance:0")}
    with h5py.File(out) as f:
        mw = f["model_weights"]
        assert [n.decode() for n in mw.attrs["layer_names"]] == [
            "conv2d", "re_lu", "conv2d_1", "dense", "dropout", "batch_normalization_2"]
        assert "batch_normalization" not in mw
        assert [n.decode() for n in mw["conv2d"].attrs["weight_names"]] == [
            "conv2d/kernel:0", "conv2d/bias:0"]
        assert f.attrs["keras_version"] in (b"2.15.0", "2.15.0")
        kern = mw["conv2d/conv2d/kernel:0"][()]
        bias = mw["conv2d/conv2d/bias:0"][()]
    x = rng.normal(size=(2, 5, 5, 3))
    bnp = "batch_normalization/batch_normalization/"
    want = bn_eval(keras_conv(x, orig["conv2d/conv2d/kernel:0"].astype(np.float64)),
                   orig[bnp + "moving_mean:0"], orig[bnp + "moving_variance:0"],
                   orig[bnp + "gamma:0"], orig[bnp + "beta:0"], 1e-3, axis=-1)
    got = keras_conv(x, kern.astype(np.float64)) + bias
    np.testing.assert_allclose(got, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max())
    # identity keeps every dataset and the attributes as they were
    ident = tmp_path / "ident.h5"
    code, stdout, stderr = cli("fold", path, "-o", ident, "--bn", "identity")
    assert code == 0, stderr
    with h5py.File(path) as a, h5py.File(ident) as b:
        names = lambda f: sorted(n for n in _walk(f))  # noqa: E731
        assert names(a) == names(b)
        assert list(b["model_weights"].attrs["layer_names"]) == list(a["model_weights"].attrs["layer_names"])


def _walk(f):
    out = []
    f.visititems(lambda n, o: out.append(n) if hasattr(o, "shape") else None)
    return out


def test_describe_model(tmp_path, rng):
    from bnstat.folding import describe_model

    p = tmp_path / "m.npz"
    np.savez(p, **small_net(rng))
    lines = describe_model(str(p))
    assert "PyTorch naming" in lines[0] and "5 BatchNorm layers (5 pairable)" in lines[0]
    assert any("layer1.0.downsample.0 <- layer1.0.downsample.1" in ln for ln in lines)
    acts = tmp_path / "acts.npz"
    np.savez(acts, x=np.zeros((4, 3)))
    assert describe_model(str(acts)) == []


# ---- refusals ------------------------------------------------------------------------

def _refusal_models(rng):
    base = {"features.0.weight": conv_w(rng, 8, 3), **torch_bn(rng, "features.1", 8)}
    neg = dict(base)
    neg["features.1.running_var"] = base["features.1.running_var"].copy()
    neg["features.1.running_var"][3] = -0.5
    nanvar = dict(base)
    nanvar["features.1.running_var"] = base["features.1.running_var"].copy()
    nanvar["features.1.running_var"][2] = np.nan
    nangamma = dict(base)
    nangamma["features.1.weight"] = base["features.1.weight"].copy()
    nangamma["features.1.weight"][0] = np.nan
    nanw = dict(base)
    nanw["features.0.weight"] = base["features.0.weight"].copy()
    nanw["features.0.weight"][1, 0, 0, 0] = np.nan
    shortvar = dict(base)
    shortvar["features.1.running_var"] = base["features.1.running_var"][:7]
    return {
        "negative-var": (neg, [], "features.1: the running variance features.1.running_var is negative at channel 3"),
        "nan-var": (nanvar, [], "features.1: the running variance features.1.running_var is NaN at channel 2"),
        "nan-gamma": (nangamma, [], "features.1: features.1.weight: 1 NaN"),
        "nan-weight": (nanw, [], "features.0: features.0.weight: 1 NaN"),
        "bn-shapes": (shortvar, [], "features.1: channel-count mismatch: features.1.running_var has shape"),
        "pair-mismatch": ({**base, "other.weight": conv_w(rng, 16, 3)}, ["--pair", "other=features.1"],
                          "features.1: channel-count mismatch: the BN has 8 channels but other.weight"),
    }


REFUSALS = ["negative-var", "nan-var", "nan-gamma", "nan-weight", "bn-shapes", "pair-mismatch"]


@pytest.mark.parametrize("which", REFUSALS)
def test_refusals_cli(which, tmp_path, rng, cli):
    d, extra, message = _refusal_models(rng)[which]
    src = tmp_path / "model.npz"
    np.savez(src, **d)
    out = tmp_path / "folded.npz"
    code, stdout, stderr = cli("fold", src, "-o", out, *extra)
    assert code == 1
    assert message in stderr
    assert "nothing written" in stderr
    assert "Traceback" not in stderr + stdout
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]  # no temporary file either


@pytest.mark.parametrize("which", REFUSALS)
def test_refusals_api(which, rng):
    from bnstat.folding import fold

    d, extra, message = _refusal_models(rng)[which]
    with pytest.raises(DataError, match=message.split(":")[0]):
        fold(d, pairs=[extra[1]] if extra else ())


def test_check_failure_exits_1_and_writes_nothing(tmp_path, cli):
    d = {"conv.weight": np.full((2, 1, 1, 1), 1000.0, np.float16),
         "bn.running_mean": np.zeros(2, np.float16), "bn.running_var": np.array([1e-4, 1], np.float16),
         "bn.weight": np.array([100.0, 1.0], np.float16), "bn.bias": np.zeros(2, np.float16)}
    src = tmp_path / "m.npz"
    np.savez(src, **d)
    out = tmp_path / "o.npz"
    code, stdout, stderr = cli("fold", src, "-o", out, "--check", "--eps", "0")
    assert code == 1
    assert "check failed for 1 pair(s) (conv+bn)" in stderr
    assert "overflow float16" in stderr
    assert "FAIL" in stdout and "inf" in stdout
    assert not out.exists()
    assert "Traceback" not in stderr


def test_usage_errors(tmp_path, rng, cli):
    src = tmp_path / "m.npz"
    np.savez(src, **small_net(rng))
    code, _, err = cli("fold", src)
    assert code == 2 and "fold needs -o OUTPUT" in err
    code, _, err = cli("fold", src, "-o", tmp_path / "o.npz", "--pair", "nonsense")
    assert code == 2 and "write CONV=BN" in err
    code, _, err = cli("fold", src, "-o", tmp_path / "o.npz", "--pair", "conv9=bn_fc")
    assert code == 2 and "no layer 'conv9'" in err
    code, _, err = cli("fold", src, "-o", tmp_path / "o.npz", "--pair", "bn_fc=fc")
    assert code == 2 and "fc is not a BatchNorm layer" in err
    code, _, err = cli("fold", src, "-o", tmp_path / "o.npz", "--pair", "bn_fc=features.1")
    assert code == 2 and "bn_fc is not a conv, conv-transpose or linear layer" in err
    code, _, err = cli("fold", src, "-o", tmp_path / "o.npz", "--bn", "keep")
    assert code == 2
    code, _, err = cli("fold", src, "-o", src, "--force")
    assert code == 1 and "one of the inputs" in err
    assert not (tmp_path / "o.npz").exists()


def test_corrupt_and_non_model_inputs(tmp_path, cli):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    code, _, err = cli("fold", bad, "-o", tmp_path / "o.npz")
    assert code == 1 and "bad.npz: not a valid .npz" in err and "Traceback" not in err
    st = tmp_path / "bad.safetensors"
    st.write_bytes((10**6).to_bytes(8, "little") + b'{"a":')
    code, _, err = cli("fold", st, "-o", tmp_path / "o.safetensors")
    assert code == 1 and "bad.safetensors: corrupt .safetensors" in err
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    code, _, err = cli("fold", txt, "-o", tmp_path / "o.npz")
    assert code == 1 and "notes.txt: unknown model file format" in err
    acts = tmp_path / "acts.npz"
    np.savez(acts, x=np.zeros((4, 3)))
    code, _, err = cli("fold", acts, "-o", tmp_path / "o.npz")
    assert code == 1 and "no layer weights found" in err
    code, _, err = cli("fold", tmp_path / "missing.npz", "-o", tmp_path / "o.npz")
    assert code == 1 and "missing.npz: no such file" in err
    assert sorted(os.listdir(tmp_path)) == ["acts.npz", "bad.npz", "bad.safetensors", "notes.txt"]


# ---- CLI: plan, dry run, formats ---------------------------------------------------------

def test_dry_run_and_plan_round_trip(tmp_path, rng, cli):
    src = tmp_path / "m.npz"
    d = ambiguous_model(rng)
    np.savez(src, **d)
    code, out, err = cli("fold", src, "--dry-run")
    assert code == 0, err
    assert "dry run: no model written" in out
    assert "ambiguous" in out and "stem, head" in out
    assert "left unfolded" in err  # the warning
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]
    code, out, err = cli("fold", src, "--dry-run", "-o", tmp_path / "o.npz")
    assert code == 0 and "(-o " in out and "ignored)" in out
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]
    plan = tmp_path / "plan.json"
    code, out, err = cli("fold", src, "--dry-run", "--plan", plan)
    assert code == 0, err
    doc = json.loads(plan.read_text())
    assert doc["pairs"][0]["conv"] == "tail" and doc["unfolded"][0]["bn"] == "norm"
    # settle the ambiguous BN in the plan and feed it back
    doc["pairs"].append({"conv": "stem", "bn": "norm"})
    doc["unfolded"] = []
    plan.write_text(json.dumps(doc))
    folded = tmp_path / "f.npz"
    code, out, err = cli("fold", src, "-o", folded, "--plan", plan, "--check")
    assert code == 0, err
    assert "stem" in out and "plan" in out and "ok" in out
    with np.load(folded) as z:
        assert "norm.running_mean" not in z.files and "stem.bias" in z.files
    # a plan can also keep a BN unfolded
    doc["pairs"] = [{"conv": None, "bn": "post"}]
    plan.write_text(json.dumps(doc))
    code, out, err = cli("fold", src, "-o", tmp_path / "g.npz", "--plan", plan)
    assert code == 0
    with np.load(tmp_path / "g.npz") as z:
        assert "post.running_mean" in z.files


def test_plan_errors(tmp_path, rng, cli):
    src = tmp_path / "m.npz"
    np.savez(src, **ambiguous_model(rng))
    plan = tmp_path / "plan.json"
    plan.write_text("{not json")
    code, _, err = cli("fold", src, "-o", tmp_path / "o.npz", "--plan", plan)
    assert code == 1 and "plan.json: not a JSON plan" in err
    plan.write_text(json.dumps({"pairs": [{"conv": "stem", "bn": "norm", "kind": "conv_transpose"}]}))
    code, _, err = cli("fold", src, "-o", tmp_path / "o.npz", "--plan", plan)
    assert code == 1 and "channel-count mismatch" in err and "as conv-transpose" in err
    plan.write_text(json.dumps({"pairs": [{"conv": "head", "bn": "norm", "kind": "blob"}]}))
    code, _, err = cli("fold", src, "-o", tmp_path / "o.npz", "--plan", plan)
    assert code == 1 and "unknown kind 'blob'" in err
    assert not (tmp_path / "o.npz").exists()


def test_eps_default_printed_and_override(tmp_path, rng, cli):
    src = tmp_path / "m.npz"
    np.savez(src, **small_net(rng))
    code, out, _ = cli("fold", src, "--dry-run")
    assert "PyTorch default 1e-05" in out
    code, out, _ = cli("fold", src, "--dry-run", "--eps", "0.001")
    assert "eps 0.001 (--eps)" in out
    from bnstat.folding import fold

    d = small_net(rng)
    res = fold(d, eps=1e-3)
    w = d["fc.weight"].astype(np.float64) * (d["bn_fc.weight"] / np.sqrt(
        d["bn_fc.running_var"].astype(np.float64) + 1e-3))[:, None]
    np.testing.assert_allclose(res.arrays["fc.weight"], w, rtol=1e-6)


def test_existing_output_needs_force(tmp_path, rng, cli):
    src = tmp_path / "m.npz"
    np.savez(src, **small_net(rng))
    out = tmp_path / "o.npz"
    out.write_bytes(b"keep me")
    code, _, err = cli("fold", src, "-o", out)
    assert code == 1 and "exists" in err
    assert out.read_bytes() == b"keep me"
    code, _, err = cli("fold", src, "-o", out, "--force")
    assert code == 0, err
    with np.load(out) as z:
        assert "fc.bias" in z.files


@pytest.mark.parametrize("fmt", ["npz", "npz-compressed", "h5", "safetensors"])
def test_formats_round_trip(fmt, tmp_path, rng):
    from bnstat.folding import fold
    from bnstat.io.models import read_model

    d = small_net(rng)
    ext = "npz" if fmt.startswith("npz") else fmt
    src = tmp_path / f"m.{ext}"
    if fmt == "npz":
        np.savez(src, **d)
    elif fmt == "npz-compressed":
        np.savez_compressed(src, **d)
    elif fmt == "h5":
        import h5py

        with h5py.File(src, "w") as f:
            for k, v in d.items():
                f.create_dataset(k.replace(".", "/"), data=v)
    else:
        from bnstat.io.models import write_model

        write_model(str(src), d, fmt="safetensors")
    m = read_model(str(src))
    assert m.format == {"npz-compressed": "npz", "h5": "hdf5"}.get(fmt, fmt)
    assert sorted(m.arrays) == sorted(k.replace(".", "/") if fmt == "h5" else k for k in d)
    out = tmp_path / f"o.{ext}"
    if fmt in ("h5", "safetensors"):  # no file order: bn2 after the square conv2 is assumed
        with pytest.warns(BnstatWarning, match="could come before it"):
            res = fold(str(src), output=str(out), check=True)
        assert [p.bn.display.replace("/", ".") for p in res.assumed] == ["layer1.0.bn2"]
    else:
        res = fold(str(src), output=str(out), check=True)
        assert not res.assumed
    assert len(res.pairs) == 5 and not res.unpaired
    back = read_model(str(out))
    assert sorted(back.arrays) == sorted(res.arrays)
    for k, v in res.arrays.items():
        np.testing.assert_array_equal(back.arrays[k], v)
        assert back.arrays[k].dtype == v.dtype
    if fmt == "npz-compressed":
        assert back.compressed


def test_safetensors_bf16_and_metadata(tmp_path, rng):
    import struct

    from bnstat.folding import fold
    from bnstat.io.models import read_model

    w = rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype("<u2")  # truncated to bfloat16
    tensors = {"conv.weight": ("BF16", w.shape, bits.tobytes())}
    for k, v in torch_bn(rng, "bn", 4).items():
        if v.ndim:
            tensors[k] = ("F32", v.shape, v.astype("<f4").tobytes())
    header, blob, off = {"__metadata__": {"format": "pt"}}, b"", 0
    for k, (code, shape, raw) in tensors.items():
        header[k] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        blob += raw
        off += len(raw)
    text = json.dumps(header).encode()
    src = tmp_path / "m.safetensors"
    src.write_bytes(struct.pack("<Q", len(text)) + text + blob)
    m = read_model(str(src))
    np.testing.assert_array_equal(m.arrays["conv.weight"].view(np.uint32) & 0xFFFF, 0)
    out = tmp_path / "o.safetensors"
    res = fold(str(src), output=str(out), check=True)
    assert res.pairs[0].check_rel < 2 ** -7
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = json.loads(raw[8:8 + n])
    assert head["__metadata__"] == {"format": "pt"}
    assert head["conv.weight"]["dtype"] == "BF16" and head["conv.bias"]["dtype"] == "BF16"
    assert (8 + n) % 8 == 0


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from bnstat.cli import main\n"
            "try:\n    main(['fold', '--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('numba', 'h5py', 'rich', 'bnstat.folding') if m in sys.modules]\n"
            "print(bad)")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "--bn [drop|identity]" in out.stdout


def test_sample_model_acceptance(tmp_path, cli):
    """Issue 4, acceptance 4: the sample model folds with every error <= 1e-5 relative."""
    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "sample_data", "model.npz")
    from bnstat.folding import fold

    res = fold(sample, output=str(tmp_path / "folded.npz"), check=True)
    assert res.pairs and all(p.check_rel <= 1e-5 for p in res.pairs)
    code, out, err = cli("fold", sample, "-o", tmp_path / "folded2.npz", "--check")
    assert code == 0, err
    assert "ok" in out and "FAIL" not in out


# ---- against torch itself, when installed -------------------------------------------------

def _torch_models(torch):
    nn = torch.nn
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.downsample = nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8))
            self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, groups=2)
            self.up_bn = nn.BatchNorm2d(6)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 9 * 9, 10), nn.BatchNorm1d(10))

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h)) + self.downsample(x)
            h = self.up_bn(self.up(torch.relu(h)))
            return self.head(h)

    m = Block()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.3, 2)
            mod.weight.data.uniform_(-1.5, 1.5)
            mod.bias.data.uniform_(-1, 1)
    return m.eval()


def test_against_torch_drop_and_identity(tmp_path, cli):
    torch = pytest.importorskip("torch")
    m = _torch_models(torch)
    src = tmp_path / "m.npz"
    np.savez(src, **{k: v.numpy() for k, v in m.state_dict().items()})
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"pairs": [{"conv": "conv2", "bn": "bn2", "groups": 2}]}))
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        want = m(x).numpy()
    # identity: loads strictly into the same architecture, same outputs
    ident = tmp_path / "ident.npz"
    code, out, err = cli("fold", src, "-o", ident, "--bn", "identity", "--check", "--plan", plan)
    assert code == 0, err
    assert "up" in out and "conv-transpose" in out
    with np.load(ident) as z:
        sd = {k: torch.from_numpy(z[k]) for k in z.files}
    m2 = _torch_models(torch)
    m2.load_state_dict(sd, strict=True)
    with torch.no_grad():
        got = m2.eval()(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # drop: the same architecture with every folded BN an Identity and biased convs
    drop = tmp_path / "drop.npz"
    code, out, err = cli("fold", src, "-o", drop, "--check", "--plan", plan)
    assert code == 0, err
    with np.load(drop) as z:
        sd = {k: torch.from_numpy(z[k]) for k in z.files}
    nn = torch.nn
    m3 = _torch_models(torch)
    for name in ("conv1", "conv2"):
        conv = getattr(m3, name)
        conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
    m3.downsample[0].bias = nn.Parameter(torch.zeros(8))
    m3.bn1 = m3.bn2 = m3.up_bn = nn.Identity()
    m3.downsample[1] = nn.Identity()
    m3.head[2] = nn.Identity()
    m3.load_state_dict(sd, strict=True)
    with torch.no_grad():
        got = m3.eval()(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _keras_h5(path, spec, rng, sequential=False):
    """A Keras 2 style full-model HDF5: model_config JSON, layer_names, weight_names, nesting.

    ``spec``: (name, class, config, inputs, {weight: array}) in model order.
    """
    import h5py

    layers = []
    for name, cls, cfg, inputs, _ in spec:
        entry = {"class_name": cls, "name": name, "config": {"name": name, **cfg}}
        if not sequential:
            if inputs and inputs[0] == "k3":  # the Keras 3 form of inbound nodes
                entry["inbound_nodes"] = [{"args": [{"class_name": "__keras_tensor__", "config": {
                    "shape": [None, 5, 5, 8], "keras_history": [inputs[1], 0, 0]}}], "kwargs": {}}]
            else:
                entry["inbound_nodes"] = [[[i, 0, 0, {}] for i in inputs]] if inputs else []
        layers.append(entry)
    config = {"class_name": "Sequential" if sequential else "Functional",
              "config": {"name": "model", "layers": layers}}
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config).encode()
        mw = f.create_group("model_weights")
        for name, _, _, _, weights in spec:
            g = mw.create_group(name)
            g.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w in weights],
                                               dtype="S64")
            for w, v in weights.items():
                g.create_dataset(f"{name}/{w}:0", data=v)
        mw.attrs["layer_names"] = np.array([s[0].encode() for s in spec])


def _kbn(rng, c):
    return {k.split("/")[1]: v for k, v in keras_bn(rng, "x", c, suffix="").items()}


def test_keras_model_config_graph_eps_kinds_and_activations(tmp_path, rng, cli):
    k = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    spec = [
        ("input_1", "InputLayer", {}, [], {}),
        ("conv2d", "Conv2D", {"activation": "linear", "use_bias": False}, ["input_1"],
         {"kernel": k(3, 3, 3, 8)}),
        ("bn_a", "BatchNormalization", {"epsilon": 1.001e-5}, ["conv2d"], _kbn(rng, 8)),
        ("conv2d_1", "Conv2D", {"activation": "relu"}, ["bn_a"], {"kernel": k(1, 1, 8, 8),
                                                                  "bias": k(8)}),
        ("bn_b", "BatchNormalization", {"epsilon": 0.001}, ["conv2d_1"], _kbn(rng, 8)),
        ("up", "Conv2DTranspose", {"activation": "linear"}, ["bn_b"], {"kernel": k(3, 3, 8, 8),
                                                                       "bias": k(8)}),
        ("bn_c", "BatchNormalization", {"epsilon": 0.01}, ["k3", "up"], _kbn(rng, 8)),
        ("conv2d_3", "Conv2D", {"activation": "linear"}, ["bn_c"], {"kernel": k(1, 1, 8, 8)}),
        ("bn_d", "BatchNormalization", {}, ["conv2d_3"], _kbn(rng, 8)),
        ("add", "Add", {}, ["conv2d_3", "bn_d"], {}),
        ("pool", "MaxPooling2D", {}, ["add"], {}),
        ("bn_e", "BatchNormalization", {}, ["pool"], _kbn(rng, 8)),
    ]
    path = tmp_path / "model.h5"
    _keras_h5(path, spec, rng)
    from bnstat.folding import fold

    with pytest.warns(BnstatWarning, match="3 BatchNorm layer"):
        res = fold(str(path), check=True)
    got = {p.bn.display: (p.conv.display, p.reading.kind, p.eps, p.by) for p in res.pairs}
    assert got == {"bn_a": ("conv2d", "conv", 1.001e-5, "model graph"),
                   "bn_c": ("up", "conv_transpose", 0.01, "model graph")}
    why = {u.bn.display: u.reason for u in res.unpaired}
    assert "conv2d_1 applies its activation (relu) before the BN" in why["bn_b"]
    assert "conv2d_3 also feeds add" in why["bn_d"]
    assert "from pool (MaxPooling2D)" in why["bn_e"]
    assert all(p.check_rel < 1e-6 for p in res.pairs)
    # the transposed reading, checked against the Keras Conv2DTranspose reference
    with pytest.warns(BnstatWarning):
        ident = fold(str(path), bn="identity")
    import h5py

    with h5py.File(path) as f:
        kern = f["model_weights/up/up/kernel:0"][()].astype(np.float64)
        bias = f["model_weights/up/up/bias:0"][()]
        bnv = {w: f[f"model_weights/bn_c/bn_c/{w}:0"][()] for w in
               ("gamma", "beta", "moving_mean", "moving_variance")}
    x = rng.normal(size=(2, 3, 3, 8))
    want = bn_eval(keras_conv_transpose(x, kern) + bias, bnv["moving_mean"],
                   bnv["moving_variance"], bnv["gamma"], bnv["beta"], 0.01, axis=-1)
    a = ident.arrays
    out = bn_eval(keras_conv_transpose(x, a["model_weights/up/up/kernel:0"].astype(np.float64))
                  + a["model_weights/up/up/bias:0"], a["model_weights/bn_c/bn_c/moving_mean:0"],
                  a["model_weights/bn_c/bn_c/moving_variance:0"], a["model_weights/bn_c/bn_c/gamma:0"],
                  a["model_weights/bn_c/bn_c/beta:0"], 0.01, axis=-1)
    np.testing.assert_allclose(out, want, rtol=RTOL32, atol=RTOL32 * np.abs(want).max())
    # the CLI prints where the eps came from
    code, stdout, stderr = cli("fold", path, "--dry-run")
    assert code == 0, stderr
    assert "model graph" in stdout and "1.001e-05" in stdout


def test_keras_sequential_config(tmp_path, rng):
    from bnstat.folding import fold

    k = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    spec = [("dense", "Dense", {"activation": "linear"}, [], {"kernel": k(4, 6), "bias": k(6)}),
            ("batch_normalization", "BatchNormalization", {"epsilon": 1e-5}, [], _kbn(rng, 6)),
            ("dropout", "Dropout", {}, [], {}),
            ("batch_normalization_1", "BatchNormalization", {}, [], _kbn(rng, 6))]
    path = tmp_path / "seq.h5"
    _keras_h5(path, spec, rng, sequential=True)
    with pytest.warns(BnstatWarning, match="left unfolded"):
        res = fold(str(path), check=True)
    assert [(p.conv.display, p.bn.display, p.eps) for p in res.pairs] == [
        ("dense", "batch_normalization", 1e-5)]
    assert "from dropout (Dropout)" in res.unpaired[0].reason


def test_square_transpose_named_weight_folds_as_transposed(rng):
    """Issue 11: a name that says transposed is evidence; a square such layer is a conv-transpose."""
    from bnstat.folding import fold

    d = {"decoder.up.weight": conv_w(rng, 8, 8), **torch_bn(rng, "decoder.up_bn", 8)}
    res = fold(d, check=True)
    p = res.pairs[0]
    assert (p.reading.kind, p.reading.layout, p.certain) == ("conv_transpose", "IOHW", True)
    assert "names" in p.evidence


def test_keras_names_without_suffix_in_npz(tmp_path, rng):
    from bnstat.folding import fold

    d = {"conv1_conv/kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
         "conv1_conv/bias": np.zeros(4, np.float32),
         **keras_bn(rng, "conv1_bn", 4, suffix=""),
         "fc/kernel": rng.normal(size=(4, 2)).astype(np.float32),
         **keras_bn(rng, "batch_normalization", 2, suffix="")}
    src = tmp_path / "k.npz"
    np.savez(src, **d)
    res = fold(str(src), check=True)
    assert [(p.conv.display, p.bn.display, p.by, p.eps) for p in res.pairs] == [
        ("conv1_conv", "conv1_bn", "name", 1e-3), ("fc", "batch_normalization", "layer order", 1e-3)]
    assert res.convention == "keras"
    assert "fc/bias" in res.arrays


def test_densenet_like_pre_activation_and_name_mismatch(rng):
    """norm1 precedes conv1 (pre-activation): not folded; norm2 is named like conv2 but fed by
    conv1, the only unpaired 128-output layer directly before it: folded into conv1."""
    from bnstat.folding import fold

    p = "features.denseblock1.denselayer1."
    d = {"features.conv0.weight": conv_w(rng, 64, 3), **torch_bn(rng, "features.norm0", 64),
         **torch_bn(rng, p + "norm1", 64), p + "conv1.weight": conv_w(rng, 128, 64, 1),
         **torch_bn(rng, p + "norm2", 128), p + "conv2.weight": conv_w(rng, 32, 128)}
    with pytest.warns(BnstatWarning, match="1 BatchNorm layer"):
        res = fold(d, check=True)
    assert [(q.conv.display, q.bn.display, q.by) for q in res.pairs] == [
        ("features.conv0", "features.norm0", "name"), (p + "conv1", p + "norm2", "shape")]
    assert [u.bn.display for u in res.unpaired] == [p + "norm1"]
    assert "conv1 matches it by name but" in res.unpaired[0].reason


def test_one_layer_named_for_two_bns_is_ambiguous(rng):
    from bnstat.folding import fold

    d = {"conv.weight": conv_w(rng, 8, 3), **torch_bn(rng, "bn", 8), **torch_bn(rng, "norm", 8)}
    with pytest.warns(BnstatWarning, match="2 BatchNorm layer"):
        res = fold(d)
    assert not res.pairs
    assert all("matches the names of several BNs" in u.reason for u in res.unpaired)


def test_dry_run_plan_file_exists(tmp_path, rng, cli):
    src = tmp_path / "m.npz"
    np.savez(src, **small_net(rng))
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    code, _, err = cli("fold", src, "--dry-run", "--plan", plan)
    assert code == 1 and "the plan file exists" in err and "drop --dry-run" in err
    assert plan.read_text() == "{}"
    code, _, err = cli("fold", src, "--dry-run", "--plan", plan, "--force")
    assert code == 0 and json.loads(plan.read_text())["pairs"]


def test_bnstat_fold_is_callable_after_the_package_is_imported(rng):
    import bnstat
    import bnstat.folding  # noqa: F401  (the package is bnstat.folding: bnstat.fold stays the function)

    res = bnstat.fold(small_net(rng))
    assert len(res.pairs) == 5
