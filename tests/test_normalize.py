"""Tests of `bnstat normalize` (issue 3): library and CLI against a float64 numpy reference.

The reference below is deliberately independent of tests/reference.py and of
bnstat: plain numpy, float64, nanmean/nanvar (two passes), one statistics unit
per combination of the kept axes (SPEC 1).
"""

from __future__ import annotations

import gc
import glob
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile

import h5py
import numpy as np
import pytest
from conftest import _env, run_inproc
from helpers import SAMPLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnstat
from bnstat.errors import BnstatError, BnstatWarning, DataError, UsageProblem
from conftest import _env

# ---- the reference ---------------------------------------------------------------------

KEEP = {"batch": "C", "layer": "N", "instance": "NC", "group": "NG"}


def ref_stats_axes(layout, norm, reduce):
    """(letters of the worked array, reduced axes); group norm splits C into G (kept) and c."""
    letters = layout.replace("C", "Gc") if norm == "group" else layout
    if reduce is not None:
        return letters, tuple(letters.index(ch) for ch in reduce)
    return letters, tuple(i for i, ch in enumerate(letters) if ch not in KEEP[norm])


def ref_normalize(x, layout, norm="batch", groups=None, reduce=None, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) with the biased variance, NaNs left out, in float64."""
    x = np.asarray(x, np.float64)
    shape = x.shape
    c = layout.index("C")
    xs = x.reshape(shape[:c] + (groups, shape[c] // groups) + shape[c + 1:]) if norm == "group" else x
    _, axes = ref_stats_axes(layout, norm, reduce)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN units
        mean = np.nanmean(xs, axis=axes, keepdims=True)
        var = np.nanvar(xs, axis=axes, keepdims=True)
        y = (xs - mean) / np.sqrt(var + eps)
    return y.reshape(shape)


def ref_per_batch(x, layout, b, eps=1e-5):
    """BatchNorm in training: every run of b samples along N (axis 0) with its own statistics."""
    return np.concatenate([ref_normalize(x[i:i + b], layout, eps=eps) for i in range(0, len(x), b)])


def ref_affine(x, layout, mean, var, eps, gamma=None, beta=None):
    """Inference-mode BN with per-channel vectors."""
    x = np.asarray(x, np.float64)
    c = layout.index("C")
    shape = [1] * x.ndim
    shape[c] = x.shape[c]

    def vec(v, default):
        return np.full(shape, default) if v is None else np.asarray(v, np.float64).reshape(shape)

    return (x - vec(mean, 0)) / np.sqrt(vec(var, 1) + eps) * vec(gamma, 1) + vec(beta, 0)


SHAPES = {
    "NC": (37, 6),
    "NCL": (7, 6, 9),
    "NLC": (7, 9, 6),
    "NCHW": (5, 6, 4, 3),
    "NHWC": (5, 4, 3, 6),
    "NCDHW": (3, 6, 2, 3, 4),
    "NDHWC": (3, 2, 3, 4, 6),
}
NORMS = [("batch", None), ("layer", None), ("instance", None), ("group", 3)]


def data(shape, dtype=np.float64, seed=0, offset=3.0, scale=2.0):
    """Random data whose channels / positions have different means and spreads."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        lo = 0 if np.dtype(dtype).kind == "u" else -60
        return rng.integers(lo, 60, size=shape).astype(dtype)
    x = rng.normal(size=shape) * scale * rng.uniform(0.5, 2.0, size=shape[-1]) + offset
    x += np.linspace(-1, 1, shape[1]).reshape((1, shape[1]) + (1,) * (len(shape) - 2))
    return x.astype(dtype)


def check_f64(y, ref):
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)


def no_temporaries(folder):
    return glob.glob(os.path.join(str(folder), ".*.bnstat-tmp"))


# ---- the CLI ---------------------------------------------------------------------------

def cli(*args, stdin=None, cwd=None, timeout=120):
    """Run `python -m bnstat ARGS`; no traceback, ever, without --debug."""
    proc = subprocess.run([sys.executable, "-m", "bnstat", *map(str, args)], input=stdin,
                          capture_output=True, cwd=cwd, timeout=timeout, env=_env())
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()
    return proc


def err(proc) -> str:
    return proc.stderr.decode()


def npy_bytes(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


# ---- every layout and norm kind, the input's own statistics -----------------------------

@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("norm,groups", NORMS)
def test_own_statistics_every_layout_and_norm(layout, norm, groups):
    x = data(SHAPES[layout])
    keep = x.copy()
    y = bnstat.normalize(x, layout=layout, norm=norm, groups=groups, chunk_size=1000)
    check_f64(y, ref_normalize(x, layout, norm, groups))
    np.testing.assert_array_equal(x, keep)  # the input is left unmodified


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("norm,groups", NORMS)
def test_fortran_and_c_order_npy_files(tmp_path, layout, norm, groups):
    x = data(SHAPES[layout], seed=1)
    for order in ("C", "F"):
        src = tmp_path / f"acts_{order}.npy"
        out = tmp_path / f"out_{order}.npy"
        np.save(src, np.asarray(x, order=order))
        before = src.read_bytes()
        bnstat.normalize(str(src), str(out), layout=layout, norm=norm, groups=groups,
                         chunk_size=1000)
        y = np.load(out)
        assert y.flags.f_contiguous == (order == "F" and x.ndim > 1)
        check_f64(y, ref_normalize(x, layout, norm, groups))
        assert src.read_bytes() == before
    assert not no_temporaries(tmp_path)


def test_reduce_C_with_NLC_is_the_per_token_layer_norm():
    x = data((4, 10, 8), seed=2)
    y = bnstat.normalize(x, layout="NLC", reduce="C", chunk_size=1000)
    check_f64(y, ref_normalize(x, "NLC", reduce="C"))
    # per token: mean 0 over the channels of every (n, l)
    assert np.abs(y.mean(axis=2)).max() < 1e-12
    y2 = bnstat.normalize(x, layout="NLC", reduce="LC", chunk_size=1000)
    check_f64(y2, ref_normalize(x, "NLC", norm="layer"))


@pytest.mark.parametrize("layout,norm,groups", [("CN", "batch", None), ("CN", "group", 2),
                                                ("HWCN", "instance", None), ("HWCN", "layer", None),
                                                ("CHWN", "group", 3)])
def test_layouts_with_N_not_first(layout, norm, groups):
    shape = tuple({"C": 6, "N": 5, "H": 3, "W": 4}[ch] for ch in layout)
    x = data(shape, seed=3) if layout.index("C") == 1 else np.random.default_rng(3).normal(2, 3, shape)
    y = bnstat.normalize(x, layout=layout, norm=norm, groups=groups, chunk_size=200)
    check_f64(y, ref_normalize(x, layout, norm, groups))


@pytest.mark.parametrize("view", ["strided", "reversed", "fortran", "broadcast"])
def test_non_contiguous_inputs(view):
    base = data((10, 6, 5, 4), seed=4)
    x = {"strided": base[::2, :, ::2], "reversed": base[::-1, ::-1],
         "fortran": np.asfortranarray(base),
         "broadcast": np.broadcast_to(base[:1], (10, 6, 5, 4))}[view]
    for norm, groups in NORMS:
        y = bnstat.normalize(x, layout="NCHW", norm=norm, groups=groups, chunk_size=500)
        check_f64(y, ref_normalize(x, "NCHW", norm, groups))


def test_threads_do_not_change_the_result():
    x = data((16, 6, 9, 7), seed=5)
    ys = [bnstat.normalize(x, layout="NCHW", chunk_size=4000, threads=t) for t in (1, 2)]
    np.testing.assert_allclose(ys[0], ys[1], rtol=0, atol=1e-14)


# ---- dtypes ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("norm,groups", NORMS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "int32", "uint16"])
def test_dtypes(layout, norm, groups, dtype):
    x = data(SHAPES[layout], dtype, seed=6)
    y = bnstat.normalize(x, layout=layout, norm=norm, groups=groups, chunk_size=1000)
    ref = ref_normalize(x, layout, norm, groups)  # statistics of the values as stored
    if dtype == "float64":
        check_f64(y, ref)
    elif dtype == "float16":
        assert y.dtype == np.float16
        # float16 rounding of the exact result (one ulp: the store may round twice)
        r16 = ref.astype(np.float16)
        assert np.all(np.abs(y.astype(np.float64) - r16) <= np.spacing(np.abs(r16)))
    else:
        assert y.dtype == np.float32  # float32 stays, integers become float32
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)


# ---- numerical regressions (STYLE 10) ---------------------------------------------------------

@pytest.mark.parametrize("offset,spread", [(1e4, 1e-2), (2.0**20, 1.0), (271.46, 0.0)])
def test_float32_offsets_with_tiny_spread(offset, spread):
    rng = np.random.default_rng(7)
    x = (offset + spread * rng.normal(size=(64, 3, 50))).astype(np.float32)
    y = bnstat.normalize(x, layout="NCL", chunk_size=2000, eps=0.0 if spread else 1e-5)
    assert y.dtype == np.float32
    ref = ref_normalize(x, "NCL", eps=0.0 if spread else 1e-5)
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6)
    if spread:
        # unit variance per channel, not a variance ruined by cancellation
        np.testing.assert_allclose(y.astype(np.float64).var(axis=(0, 2)), 1.0, rtol=1e-5)
    else:
        assert np.all(y == 0)  # a constant channel: x - mean is exactly 0


@pytest.mark.parametrize("exponent", [100, -100])
def test_huge_and_tiny_scales(exponent):
    z = data((12, 4, 30), seed=8, offset=0.0, scale=1.0)
    y = bnstat.normalize(z * 2.0**exponent, layout="NCL", eps=0.0, chunk_size=1000)
    check_f64(y, ref_normalize(z, "NCL", eps=0.0))


# ---- --per-batch ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NC", "NCL", "NLC", "NCHW", "NHWC", "NDHWC"])
@pytest.mark.parametrize("b", [1, 3, 4])
def test_per_batch(layout, b):
    shape = (11,) + SHAPES[layout][1:]  # 11 samples: the last run is shorter unless b is 1
    x = data(shape, seed=9)
    ref = ref_per_batch(x, layout, b)
    for chunk_size in (100, 1000, 10**6):  # one row larger than a chunk, a few batches, all
        y = bnstat.normalize(x, layout=layout, per_batch=b, chunk_size=chunk_size)
        check_f64(y, ref)


def test_per_batch_file_float32_and_last_run_shorter(tmp_path):
    x = data((10, 3, 4, 4), np.float32, seed=10)
    np.save(tmp_path / "a.npy", x)
    bnstat.normalize(str(tmp_path / "a.npy"), str(tmp_path / "o.npy"), layout="NCHW", per_batch=4,
                     chunk_size=1000)
    y = np.load(tmp_path / "o.npy")
    assert y.dtype == np.float32
    for i in range(0, 10, 4):  # the same as normalizing each slice of 4 on its own
        alone = bnstat.normalize(x[i:i + 4], layout="NCHW")
        np.testing.assert_allclose(y[i:i + 4], alone, rtol=0, atol=1e-6)
    np.testing.assert_allclose(y, ref_per_batch(x, "NCHW", 4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunks", [(3, 3, 50), (5, 3, 50), None])
def test_per_batch_of_hdf5_whose_chunks_are_not_multiples_of_B(tmp_path, chunks):
    x = data((23, 3, 50), seed=35)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("a", data=x, chunks=chunks)
    bnstat.normalize(str(tmp_path / "a.h5"), str(tmp_path / "o.h5"), layout="NCL", per_batch=4,
                     chunk_size=5000)
    with h5py.File(tmp_path / "o.h5") as f:
        check_f64(f["a"][()], ref_per_batch(x, "NCL", 4))


def test_per_batch_of_a_fortran_array_is_refused():
    x = np.asfortranarray(data((8, 3, 5)))
    with pytest.raises(UsageProblem, match="per-batch"):
        bnstat.normalize(x, layout="NCL", per_batch=2)


# ---- --stats ----------------------------------------------------------------------------------------

def moments_file(path, source, **kw):
    stats = bnstat.moments(source, **kw)
    bnstat.save_stats(stats, str(path))
    return stats


@pytest.mark.parametrize("layout,norm,groups", [("NCHW", "batch", None), ("NHWC", "batch", None),
                                                ("NCL", "layer", None), ("NDHWC", "instance", None),
                                                ("NCDHW", "group", 2), ("NLC", None, None)])
def test_stats_file_equals_own_statistics(tmp_path, layout, norm, groups):
    x = data(SHAPES[layout], seed=11)
    np.save(tmp_path / "acts.npy", x)
    reduce = "C" if norm is None else None
    kw = dict(layout=layout, norm=norm or "batch", groups=groups, reduce=reduce)
    moments_file(tmp_path / "stats.npz", str(tmp_path / "acts.npy"), chunk_size=1000, **kw)
    bnstat.normalize(str(tmp_path / "acts.npy"), str(tmp_path / "own.npy"), chunk_size=1000,
                     **{k: v for k, v in kw.items() if k != "norm" or reduce is None})
    # the stats file carries its layout and norm: none given here
    bnstat.normalize(str(tmp_path / "acts.npy"), str(tmp_path / "saved.npy"),
                     stats=str(tmp_path / "stats.npz"), chunk_size=1000)
    own, saved = np.load(tmp_path / "own.npy"), np.load(tmp_path / "saved.npy")
    ref = ref_normalize(x, layout, norm or "batch", groups, reduce)
    check_f64(own, ref)
    check_f64(saved, ref)


@pytest.mark.parametrize("norm", ["batch", "layer", "instance"])
def test_stats_applied_to_a_fortran_file(tmp_path, norm):
    x = data((6, 4, 5, 3), seed=36)
    moments_file(tmp_path / "s.npz", x, layout="NCHW", norm=norm)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    bnstat.normalize(str(tmp_path / "f.npy"), str(tmp_path / "o.npy"), stats=str(tmp_path / "s.npz"),
                     chunk_size=500)
    y = np.load(tmp_path / "o.npy")
    assert y.flags.f_contiguous
    check_f64(y, ref_normalize(x, "NCHW", norm))


def test_stats_saved_with_ddof_1_normalize_with_the_biased_variance(tmp_path):
    x = data((6, 3, 2), seed=12)  # 12 values per channel: ddof 1 would differ by 10/11 ≈ 9%
    moments_file(tmp_path / "s.npz", x, layout="NCL", ddof=1)
    assert json.loads(str(np.load(tmp_path / "s.npz")["__bnstat__"]))  # a real stats file
    y = bnstat.normalize(x, stats=str(tmp_path / "s.npz"))
    check_f64(y, ref_normalize(x, "NCL"))


def test_a_stats_file_of_one_array_applies_to_an_array_of_another_name(tmp_path):
    train = data((20, 4, 5), seed=13)
    other = data((7, 4, 5), seed=14, offset=-1.0)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "other.npy", other)
    stats = moments_file(tmp_path / "s.npz", str(tmp_path / "train.npy"), layout="NCL")
    assert list(stats) == ["train"]
    bnstat.normalize(str(tmp_path / "other.npy"), str(tmp_path / "o.npy"),
                     stats=str(tmp_path / "s.npz"), chunk_size=300)
    m, v = train.mean(axis=(0, 2)), train.var(axis=(0, 2))
    check_f64(np.load(tmp_path / "o.npy"), ref_affine(other, "NCL", m, v, 1e-5))


def test_stats_matched_by_name_in_an_npz(tmp_path):
    a1, b1 = data((9, 3, 4), seed=15), data((9, 5), seed=16, offset=10.0)
    a2, b2 = data((4, 3, 4), seed=17, offset=-3.0), data((6, 5), seed=18)
    np.savez(tmp_path / "train.npz", b=b1, a=a1)
    np.savez(tmp_path / "test.npz", a=a2, b=b2)
    with pytest.warns(BnstatWarning, match="assuming the PyTorch layout"):  # no --layout given
        moments_file(tmp_path / "s.npz", str(tmp_path / "train.npz"))
    bnstat.normalize(str(tmp_path / "test.npz"), str(tmp_path / "o.npz"),
                     stats=str(tmp_path / "s.npz"), chunk_size=100)
    with np.load(tmp_path / "o.npz") as z:
        assert sorted(z.files) == ["a", "b"]
        check_f64(z["a"], ref_affine(a2, "NCL", a1.mean(axis=(0, 2)), a1.var(axis=(0, 2)), 1e-5))
        check_f64(z["b"], ref_affine(b2, "NC", b1.mean(axis=0), b1.var(axis=0), 1e-5))


def test_stats_for_a_missing_name_or_of_another_shape_are_refused(tmp_path):
    np.savez(tmp_path / "in.npz", a=data((4, 3, 2)), b=data((4, 3, 2)))
    bnstat.save_stats(bnstat.moments({"x": data((4, 3, 2)), "y": data((4, 3, 2))}, layout="NCL"),
                      str(tmp_path / "xy.npz"))
    with pytest.raises(DataError, match="no statistics for 'a'"):
        bnstat.normalize(str(tmp_path / "in.npz"), str(tmp_path / "o.npz"),
                         stats=str(tmp_path / "xy.npz"))
    bnstat.save_stats(bnstat.moments(data((4, 5, 2)), layout="NCL"), str(tmp_path / "c5.npz"))
    with pytest.raises(DataError, match="do not fit"):
        bnstat.normalize(data((4, 3, 2)), stats=str(tmp_path / "c5.npz"))
    assert not (tmp_path / "o.npz").exists() and not no_temporaries(tmp_path)


# ---- --model --bn --------------------------------------------------------------------------------------

def bn_params(c, seed=20):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=c), rng.uniform(0.2, 3.0, size=c), rng.uniform(0.5, 2.0, size=c),
            rng.normal(size=c))  # mean, var, gamma, beta


def pytorch_model(c, affine=True, prefix="features.1"):
    mean, var, gamma, beta = bn_params(c)
    arrays = {"features.0.weight": np.ones((c, 2, 3, 3), np.float32),
              f"{prefix}.running_mean": mean.astype(np.float32),
              f"{prefix}.running_var": var.astype(np.float32),
              f"{prefix}.num_batches_tracked": np.array(7, np.int64)}
    if affine:
        arrays[f"{prefix}.weight"] = gamma.astype(np.float32)
        arrays[f"{prefix}.bias"] = beta.astype(np.float32)
    return arrays


def keras_model(c, suffix=":0", layer="batch_normalization", nested=""):
    mean, var, gamma, beta = bn_params(c, seed=21)
    p = f"{nested}{layer}/"
    return {f"{nested}conv2d/kernel{suffix}": np.ones((3, 3, 2, c), np.float32),
            f"{p}gamma{suffix}": gamma.astype(np.float32), f"{p}beta{suffix}": beta.astype(np.float32),
            f"{p}moving_mean{suffix}": mean.astype(np.float32),
            f"{p}moving_variance{suffix}": var.astype(np.float32)}


def save_h5(path, arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)


def f32(v):
    return np.asarray(v, np.float32).astype(np.float64)  # the values as the model file holds them


@pytest.mark.parametrize("affine", [True, False])
def test_model_pytorch_naming(tmp_path, affine):
    c = 6
    model = pytorch_model(c, affine)
    np.savez(tmp_path / "model.npz", **model)
    x = data(SHAPES["NCHW"], seed=22)
    y = bnstat.normalize(x, model=str(tmp_path / "model.npz"), bn="features.1", layout="NCHW",
                         chunk_size=1000)
    mean, var = f32(model["features.1.running_mean"]), f32(model["features.1.running_var"])
    gamma = f32(model["features.1.weight"]) if affine else None
    beta = f32(model["features.1.bias"]) if affine else None
    check_f64(y, ref_affine(x, "NCHW", mean, var, 1e-5, gamma, beta))  # PyTorch eps 1e-5
    y = bnstat.normalize(x, model=str(tmp_path / "model.npz"), bn="features.1", layout="NCHW",
                         eps=0.25)
    check_f64(y, ref_affine(x, "NCHW", mean, var, 0.25, gamma, beta))


@pytest.mark.parametrize("container", ["npz", "h5"])
@pytest.mark.parametrize("suffix", [":0", ""])
def test_model_keras_naming(tmp_path, container, suffix):
    c = 6
    nested = "model_weights/batch_normalization/" if container == "h5" else ""
    model = keras_model(c, suffix, nested=nested)
    path = tmp_path / f"model.{container}"
    if container == "npz":
        np.savez(path, **model)
    else:
        save_h5(path, model)
    x = data(SHAPES["NHWC"], np.float32, seed=23)
    y = bnstat.normalize(x, model=str(path), bn="batch_normalization", layout="NHWC",
                         chunk_size=1000)
    p = f"{nested}batch_normalization/"
    ref = ref_affine(x, "NHWC", f32(model[f"{p}moving_mean{suffix}"]),
                     f32(model[f"{p}moving_variance{suffix}"]), 1e-3,  # Keras eps 1e-3
                     f32(model[f"{p}gamma{suffix}"]), f32(model[f"{p}beta{suffix}"]))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=0, atol=4e-6)


def test_model_errors(tmp_path):
    np.savez(tmp_path / "pt.npz", **pytorch_model(6))
    with pytest.raises(DataError, match="has 6 channels, the array has 4"):
        bnstat.normalize(data((3, 4, 5)), model=str(tmp_path / "pt.npz"), bn="features.1",
                         layout="NCL")
    bad = pytorch_model(3)
    bad["features.1.running_var"][1] = -1.0
    np.savez(tmp_path / "neg.npz", **bad)
    with pytest.raises(DataError, match="features.1.*negative"):
        bnstat.normalize(data((3, 3, 5)), model=str(tmp_path / "neg.npz"), bn="features.1",
                         layout="NCL")
    with pytest.raises(UsageProblem, match="not both"):
        bnstat.normalize(data((3, 6, 5)), model=str(tmp_path / "pt.npz"), bn="features.1",
                         stats=str(tmp_path / "pt.npz"))


def test_cli_model_unknown_and_ambiguous_names_list_the_bn_layers(tmp_path):
    np.save(tmp_path / "x.npy", data((3, 6, 4, 4), np.float32))
    model = {**keras_model(6, layer="block1/bn"), **keras_model(6, layer="block2/bn")}
    np.savez(tmp_path / "k.npz", **model)
    np.savez(tmp_path / "pt.npz", **pytorch_model(6))
    procs = [subprocess.Popen([sys.executable, "-m", "bnstat", "normalize", "x.npy", "-o", f"o{i}.npy",
                               "--model", m, "--bn", bn], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=_env())
             for i, (m, bn) in enumerate([("k.npz", "bn"), ("pt.npz", "features.9")])]
    (out0, err0), (out1, err1) = (p.communicate(timeout=120) for p in procs)
    for p, e in zip(procs, (err0, err1), strict=True):
        assert b"Traceback" not in e
        assert p.returncode == 1, e.decode()
    assert "ambiguous BatchNorm layer 'bn'" in err0.decode()
    assert "block1/bn" in err0.decode() and "block2/bn" in err0.decode()
    assert "unknown BatchNorm layer 'features.9'" in err1.decode()
    assert "features.1" in err1.decode()
    assert not list(tmp_path.glob("o*.npy")) and not no_temporaries(tmp_path)


# ---- output formats ------------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_members_keep_their_names_and_compression(tmp_path, compression):
    arrays = {"conv1": data((9, 4, 3, 3), np.float32, seed=24), "fc": data((33, 5), np.float64, seed=25),
              "half": data((8, 6, 5), np.float16, seed=26),
              "fortran": np.asfortranarray(data((6, 4, 3, 2), seed=34))}
    (np.savez_compressed if compression == zipfile.ZIP_DEFLATED else np.savez)(tmp_path / "a.npz", **arrays)
    bnstat.normalize(str(tmp_path / "a.npz"), str(tmp_path / "o.npz"), norm="layer", chunk_size=1000)
    with zipfile.ZipFile(tmp_path / "o.npz") as zf:
        assert sorted(i.filename for i in zf.infolist()) == ["conv1.npy", "fc.npy", "fortran.npy",
                                                             "half.npy"]
        assert {i.compress_type for i in zf.infolist()} == {compression}
    with np.load(tmp_path / "o.npz") as z:
        for name, x in arrays.items():
            assert z[name].dtype == x.dtype
            assert z[name].flags.f_contiguous == (name == "fortran")
            ref = ref_normalize(x, "NCHW"[:x.ndim] if x.ndim != 3 else "NCL", "layer")
            tol = {np.float16: 2e-3, np.float32: 1e-6, np.float64: 1e-12}[x.dtype.type]
            np.testing.assert_allclose(z[name].astype(np.float64), ref, rtol=0 if tol < 1e-3 else tol,
                                       atol=tol)


def test_hdf5_keeps_dataset_paths_chunking_and_compression(tmp_path):
    a = data((10, 6, 4, 5), np.float32, seed=27)
    b = data((25, 6), np.float64, seed=28)
    h = data((7, 6, 3), np.float16, seed=29)
    with h5py.File(tmp_path / "acts.h5", "w") as f:
        f.create_dataset("features/block1/conv", data=a, chunks=(3, 6, 4, 5), compression="gzip",
                         compression_opts=4, shuffle=True)
        f.create_dataset("head/fc", data=b)  # contiguous
        f.create_dataset("half", data=h, chunks=(2, 3, 3), compression="lzf")
    bnstat.normalize(str(tmp_path / "acts.h5"), str(tmp_path / "out.h5"), norm="group", groups=2,
                     chunk_size=1000)
    with h5py.File(tmp_path / "acts.h5") as fi, h5py.File(tmp_path / "out.h5") as fo:
        names = []
        fo.visit(lambda n: names.append(n) if isinstance(fo[n], h5py.Dataset) else None)
        assert sorted(names) == ["features/block1/conv", "half", "head/fc"]
        for n in names:
            for attr in ("shape", "dtype", "chunks", "compression", "compression_opts", "shuffle"):
                assert getattr(fo[n], attr) == getattr(fi[n], attr), (n, attr)
        np.testing.assert_allclose(fo["features/block1/conv"][()],
                                   ref_normalize(a, "NCHW", "group", 2), rtol=0, atol=1e-6)
        check_f64(fo["head/fc"][()], ref_normalize(b, "NC", "group", 2))
        r16 = ref_normalize(h, "NCL", "group", 2).astype(np.float16)
        assert np.all(np.abs(fo["half"][()].astype(np.float64) - r16) <= np.spacing(np.abs(r16)))


def test_dataset_selection_and_output_extension(tmp_path):
    np.savez(tmp_path / "a.npz", x=data((4, 3, 2)), y=data((5, 3)))
    bnstat.normalize(str(tmp_path / "a.npz"), str(tmp_path / "o.npz"), dataset="x")
    with np.load(tmp_path / "o.npz") as z:
        assert z.files == ["x"]
    with pytest.raises(UsageProblem, match="input's format"):
        bnstat.normalize(str(tmp_path / "a.npz"), str(tmp_path / "o.h5"))
    assert not (tmp_path / "o.h5").exists()


def test_npz_inputs_are_closed(tmp_path):
    """Reading a .npz closes every file it opened (a ResourceWarning fails pytest -W error)."""
    np.savez(tmp_path / "stored.npz", a=data((6, 3, 4)))
    np.savez_compressed(tmp_path / "deflated.npz", a=data((6, 3, 4)))
    for name in ("stored", "deflated"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            bnstat.normalize(str(tmp_path / f"{name}.npz"), str(tmp_path / f"o_{name}.npz"),
                             layout="NCL", norm="instance", chunk_size=100)
            gc.collect()
        leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        assert leaks == [], name


# ---- the CLI: stdout, stdin --------------------------------------------------------------------------

def test_cli_writes_a_npy_stream_to_stdout(tmp_path):
    x = data((9, 3, 4, 5), np.float32, seed=30)
    np.save(tmp_path / "a.npy", x)
    p = cli("normalize", "a.npy", "-o", "-", "--layout", "NHWC", "--norm", "instance",
            "--chunk-size", "1000", cwd=tmp_path)
    assert p.returncode == 0, err(p)
    y = np.load(io.BytesIO(p.stdout))
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, ref_normalize(x, "NHWC", "instance"), rtol=0, atol=1e-6)
    assert os.listdir(tmp_path) == ["a.npy"]


def test_cli_stdin_with_per_batch_stats_or_layer_norm(tmp_path):
    x = data((10, 4, 6), np.float64, seed=31)
    np.save(tmp_path / "train.npy", x)
    moments_file(tmp_path / "s.npz", str(tmp_path / "train.npy"), layout="NCL")
    runs = {
        "per_batch": (["--per-batch", "3", "--layout", "NCL", "-o", "-"], ref_per_batch(x, "NCL", 3)),
        "stats": (["--stats", "s.npz", "-o", "o.npy"], ref_normalize(x, "NCL")),
        "layer": (["--norm", "layer", "--layout", "NCL", "-o", "-"], ref_normalize(x, "NCL", "layer")),
    }
    procs = {k: subprocess.Popen([sys.executable, "-m", "bnstat", "normalize", "-", *a,
                                  "--chunk-size", "500"], cwd=tmp_path, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
             for k, (a, _) in runs.items()}
    outs = {k: p.communicate(npy_bytes(x), timeout=120) for k, p in procs.items()}
    for k, (out, e) in outs.items():
        assert procs[k].returncode == 0, (k, e.decode())
        assert b"Traceback" not in e
        y = np.load(tmp_path / "o.npy") if k == "stats" else np.load(io.BytesIO(out))
        check_f64(y, runs[k][1])


def test_cli_batch_norm_of_stdin_without_stats_is_a_usage_error(tmp_path):
    p = cli("normalize", "-", "-o", "o.npy", "--layout", "NCL", stdin=npy_bytes(data((4, 3, 5))),
            cwd=tmp_path)
    assert p.returncode == 2
    assert "standard input need two passes" in err(p)
    assert "--stats, --per-batch or --model" in err(p)
    assert os.listdir(tmp_path) == []


# ---- moments and normalize together ---------------------------------------------------------------------

def test_cli_moments_stats_then_normalize_then_moments(tmp_path):
    """--stats saved by `moments -o` equals the input's own statistics; the result has mean 0 and
    variance var/(var+eps) per channel."""
    x = data((40, 5, 6), np.float64, seed=32, scale=0.6)
    np.save(tmp_path / "acts.npy", x)
    eps = 0.3  # large enough for var/(var+eps) to differ from 1
    p = cli("moments", "acts.npy", "--layout", "NCL", "--ddof", "1", "-o", "stats.npz", cwd=tmp_path)
    assert p.returncode == 0, err(p)
    p = cli("normalize", "acts.npy", "-o", "saved.npy", "--eps", eps, "--stats", "stats.npz",
            "--chunk-size", "1000", cwd=tmp_path)
    assert p.returncode == 0, err(p)
    # the same engine in process, to keep the CLI launches (1.5 s each) few
    bnstat.normalize(str(tmp_path / "acts.npy"), str(tmp_path / "own.npy"), layout="NCL", eps=eps,
                     chunk_size=1000)
    own, saved = np.load(tmp_path / "own.npy"), np.load(tmp_path / "saved.npy")
    np.testing.assert_allclose(saved, own, rtol=0, atol=1e-12)
    check_f64(own, ref_normalize(x, "NCL", eps=eps))
    p = cli("moments", "saved.npy", "--layout", "NCL", "--format", "json", cwd=tmp_path)
    assert p.returncode == 0, err(p)
    (arr,) = json.loads(p.stdout)["arrays"]
    var = x.var(axis=(0, 2))
    np.testing.assert_allclose(arr["mean"], 0.0, atol=1e-12)
    np.testing.assert_allclose(arr["var"], var / (var + eps), rtol=1e-12)
    assert arr["count"] == [240] * 5


# ---- NaN ------------------------------------------------------------------------------------------------

def with_nans(shape, seed=33):
    x = data(shape, seed=seed)
    rng = np.random.default_rng(seed)
    x.ravel()[rng.choice(x.size, size=x.size // 15, replace=False)] = np.nan
    return x


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("norm,groups", NORMS)
def test_nan_omit_keeps_nans_and_normalizes_the_rest(layout, norm, groups):
    x = with_nans(SHAPES[layout])
    with warnings.catch_warnings():
        # whether every statistics source warns is checked on the CLI; here: the numbers
        warnings.simplefilter("ignore", BnstatWarning)
        y = bnstat.normalize(x, layout=layout, norm=norm, groups=groups, chunk_size=1000)
    assert np.array_equal(np.isnan(y), np.isnan(x))
    check_f64(y, ref_normalize(x, layout, norm, groups))


def test_nan_omit_batch_norm_warns_and_per_batch_is_nan_free():
    x = with_nans((10, 3, 8))
    with pytest.warns(BnstatWarning, match="NaN value"):
        y = bnstat.normalize(x, layout="NCL", chunk_size=500)
    check_f64(y, ref_normalize(x, "NCL"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        y = bnstat.normalize(x, layout="NCL", per_batch=4, chunk_size=500)
    assert np.array_equal(np.isnan(y), np.isnan(x))
    check_f64(y, ref_per_batch(x, "NCL", 4))


def test_nan_propagate_makes_the_units_with_a_nan_nan():
    x = data((6, 4, 5))
    x[2, 1, 3] = np.nan
    with pytest.warns(BnstatWarning, match="NaN"):
        y = bnstat.normalize(x, layout="NCL", nan="propagate")
    assert np.isnan(y[:, 1]).all()
    keep = [0, 2, 3]
    check_f64(y[:, keep], ref_normalize(x[:, keep], "NCL"))


@pytest.mark.parametrize("kw", [dict(), dict(norm="layer"), dict(per_batch=2), dict(stats=True)])
def test_nan_raise(tmp_path, kw):
    x = data((12, 3, 10))
    np.save(tmp_path / "clean.npy", x)
    x[11, 2, 9] = np.nan  # in the last chunk
    np.save(tmp_path / "a.npy", x)
    if kw.get("stats"):
        moments_file(tmp_path / "s.npz", str(tmp_path / "clean.npy"), layout="NCL")
        kw = dict(stats=str(tmp_path / "s.npz"))
    with pytest.raises(DataError, match="NaN"):
        bnstat.normalize(str(tmp_path / "a.npy"), str(tmp_path / "o.npy"), layout="NCL", nan="raise",
                         chunk_size=300, **kw)
    assert not (tmp_path / "o.npy").exists()
    assert not no_temporaries(tmp_path)


# ---- nothing lost (SPEC 5) ---------------------------------------------------------------------------

def test_cli_existing_output_and_output_equal_to_input(tmp_path):
    x = data((4, 3, 5))
    np.save(tmp_path / "a.npy", x)
    (tmp_path / "o.npy").write_bytes(b"precious")
    before = (tmp_path / "a.npy").read_bytes()
    cmds = [["a.npy", "-o", "o.npy"], ["a.npy", "-o", "a.npy", "--force"],
            ["a.npy", "-o", "./sub/../a.npy", "--force"]]
    (tmp_path / "sub").mkdir()
    procs = [subprocess.Popen([sys.executable, "-m", "bnstat", "normalize", *c, "--layout", "NCL"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_env()) for c in cmds]
    res = [p.communicate(timeout=120) for p in procs]
    for p, (_, e) in zip(procs, res, strict=True):
        assert p.returncode == 1 and b"Traceback" not in e, e.decode()
    assert "o.npy: the output exists; nothing was written" in res[0][1].decode()
    assert "--force" in res[0][1].decode()
    for _, e in res[1:]:
        assert "the output is one of the inputs" in e.decode()
    assert (tmp_path / "o.npy").read_bytes() == b"precious"
    assert (tmp_path / "a.npy").read_bytes() == before
    assert not no_temporaries(tmp_path)


def test_cli_failure_in_the_middle_leaves_nothing(tmp_path):
    """A NaN in a late chunk under --nan raise over an existing output with --force; a .npy stream
    that ends early after the output was started; a truncated .npy file."""
    x = data((40, 3, 10), np.float32)
    np.save(tmp_path / "clean.npy", x)
    moments_file(tmp_path / "s.npz", str(tmp_path / "clean.npy"), layout="NCL")
    x[38, 1, 4] = np.nan
    np.save(tmp_path / "nan.npy", x)
    whole = npy_bytes(x[:30])
    (tmp_path / "trunc.npy").write_bytes(whole[:len(whole) * 2 // 3])
    for name in ("o1.npy", "o2.npy", "o3.npy"):
        (tmp_path / name).write_bytes(b"precious")
    runs = [
        (["nan.npy", "-o", "o1.npy", "--force", "--stats", "s.npz", "--nan", "raise"], None),
        (["-", "-o", "o2.npy", "--force", "--per-batch", "4", "--layout", "NCL"], whole[:len(whole) * 2 // 3]),
        (["trunc.npy", "-o", "o3.npy", "--force", "--norm", "layer", "--layout", "NCL"], None),
        (["trunc.npy", "-o", "new.npy", "--per-batch", "2", "--layout", "NCL"], None),
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "bnstat", "normalize", *a, "--chunk-size", "1000"],
                              cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=_env()) for a, _ in runs]
    res = [p.communicate(stdin or b"", timeout=120) for p, (_, stdin) in zip(procs, runs, strict=True)]
    for p, (_, e) in zip(procs, res, strict=True):
        assert p.returncode == 1 and b"Traceback" not in e, e.decode()
    assert "NaN" in res[0][1].decode()
    for _, e in res[1:]:
        assert "truncated" in e.decode()
    for name in ("o1.npy", "o2.npy", "o3.npy"):
        assert (tmp_path / name).read_bytes() == b"precious"
    assert not (tmp_path / "new.npy").exists()
    assert not no_temporaries(tmp_path)


def test_cli_sigint_half_way_leaves_no_output_and_no_temporary(tmp_path):
    """The output is started from a stdin stream, the stream stalls half way, SIGINT: exit 130."""
    x = data((64, 4, 32), np.float32)
    payload = npy_bytes(x)
    proc = subprocess.Popen([sys.executable, "-m", "bnstat", "normalize", "-", "-o", "o.npy", "--per-batch",
                             "4", "--layout", "NCL", "--chunk-size", "1000"], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        proc.stdin.write(payload[:len(payload) // 2])
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not no_temporaries(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        started = bool(no_temporaries(tmp_path))
        time.sleep(0.3)  # let it consume what it has and block on the rest
        proc.send_signal(signal.SIGINT)
        _, e = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert started, e.decode()
    # 130, or killed by SIGINT (-2): a shell reports 128+2 = 130 for both. Under `python -m`,
    # CPython sometimes re-raises SIGINT at exit although bnstat handled the KeyboardInterrupt.
    assert proc.returncode in (130, -signal.SIGINT), e.decode()
    assert b"Traceback" not in e
    assert not (tmp_path / "o.npy").exists()
    assert not no_temporaries(tmp_path)


def test_library_failure_keeps_an_existing_output(tmp_path):
    x = data((30, 3, 10))
    x[29, 0, 0] = np.nan
    np.savez(tmp_path / "a.npz", first=data((30, 3, 10)), second=x)
    (tmp_path / "o.npz").write_bytes(b"precious")
    with pytest.raises(DataError, match="second"):
        bnstat.normalize(str(tmp_path / "a.npz"), str(tmp_path / "o.npz"), layout="NCL", norm="instance",
                         nan="raise", force=True, chunk_size=1000)
    assert (tmp_path / "o.npz").read_bytes() == b"precious"
    assert not no_temporaries(tmp_path)
    with pytest.raises(BnstatError, match="one of the inputs"):
        bnstat.normalize(str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), force=True)


def test_cli_usage_errors(tmp_path):
    np.save(tmp_path / "a.npy", data((4, 3, 5)))
    runs = [(["a.npy", "-o", "o.npz", "--layout", "NCL"], "input's format"),
            (["a.npy", "-o", "o.npy", "--stats", "s.npz", "--model", "m.npz", "--bn", "x"], "not both"),
            (["a.npy", "-o", "o.npy", "--layout", "NCHW"], "has 4 letters but the array has 3")]
    procs = [subprocess.Popen([sys.executable, "-m", "bnstat", "normalize", *a], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()) for a, _ in runs]
    for p, (_, msg) in zip(procs, runs, strict=True):
        _, e = p.communicate(timeout=120)
        assert p.returncode == 2, e.decode()
        assert msg in e.decode() and b"Traceback" not in e
    assert sorted(os.listdir(tmp_path)) == ["a.npy"]


# ---- properties (STYLE 11) ------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 9), chunk=st.integers(1, 3000), norm=st.sampled_from(NORMS),
       layout=st.sampled_from(["NCL", "NLC"]), b=st.integers(1, 4))
def test_the_result_does_not_depend_on_the_chunk_size(n, chunk, norm, layout, b):
    x = data((n, 6, 5) if layout == "NCL" else (n, 5, 6), seed=n)
    y = bnstat.normalize(x, layout=layout, norm=norm[0], groups=norm[1], chunk_size=chunk)
    check_f64(y, ref_normalize(x, layout, norm[0], norm[1]))
    y = bnstat.normalize(x, layout=layout, per_batch=b, chunk_size=chunk)
    check_f64(y, ref_per_batch(x, layout, b))


@pytest.mark.parametrize("per_batch", [None, 2])
def test_nans_left_out_of_own_statistics_are_warned(per_batch):
    """As moments says so: NaNs omitted from per-sample / per-batch statistics are reported."""
    x = np.arange(4 * 3 * 5, dtype=np.float64).reshape(4, 3, 5) % 7
    x[1, 1, 1] = np.nan
    norm = "batch" if per_batch else "layer"
    with pytest.warns(bnstat.errors.BnstatWarning, match=r"1 NaN value\(s\) counted and left out"):
        y = bnstat.normalize(x, layout="NCL", norm=norm, per_batch=per_batch)
    s = x[1] if per_batch is None else x[0:2]
    axes = None if per_batch is None else (0, 2)
    mean, var = np.nanmean(s, axis=axes), np.nanvar(s, axis=axes)
    if per_batch is None:
        want = (x[1] - mean) / np.sqrt(var + 1e-5)
        got = y[1]
    else:
        want = (x[0:2] - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5)
        got = y[0:2]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.isnan(y[1, 1, 1]) and np.isfinite(np.delete(y.ravel(), 1 * 15 + 1 * 5 + 1)).all()


# ---- moved from the acceptance audit --------------------------------------------------


def _bn_ref(x, mean, var, eps=1e-5, gamma=None, beta=None, axis=1):
    shape = [1] * x.ndim
    shape[axis] = -1
    r = lambda v: np.asarray(v, np.float64).reshape(shape)  # noqa: E731
    y = (x - r(mean)) / np.sqrt(r(var) + eps)
    if gamma is not None:
        y = y * r(gamma) + r(beta)
    return y


def _within_one_f16_ulp(y, ref):
    r16 = ref.astype(np.float16)
    assert y.dtype == np.float16
    assert np.all(np.abs(y.astype(np.float64) - r16) <= np.spacing(np.abs(r16))), \
        np.max(np.abs(y.astype(np.float64) - r16))


def test_float16_with_every_statistics_source(tmp_path):
    """float16 inputs with --per-batch, --stats and --model (the suite had float16 for the
    input's own statistics only): float16 out, within one float16 ulp of the float64 result."""
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(10, 6, 4, 3)) * 2 + 3).astype(np.float16)
    xf = x.astype(np.float64)
    axes = (0, 2, 3)
    # --per-batch 4: runs of 4, 4, 2
    y = bnstat.normalize(x, layout="NCHW", per_batch=4, chunk_size=500)
    ref = np.concatenate([_bn_ref(xf[i:i + 4], xf[i:i + 4].mean(axes), xf[i:i + 4].var(axes))
                          for i in range(0, 10, 4)])
    _within_one_f16_ulp(y, ref)
    # --stats saved by moments
    np.save(tmp_path / "x.npy", x)
    rc, _, err = run_inproc("moments", tmp_path / "x.npy", "--layout", "NCHW", "-o", tmp_path / "s.npz")
    assert rc == 0, err
    rc, _, err = run_inproc("normalize", tmp_path / "x.npy", "--stats", tmp_path / "s.npz",
                            "-o", tmp_path / "y.npy", "--chunk-size", "500")
    assert rc == 0 and "Traceback" not in err, err
    _within_one_f16_ulp(np.load(tmp_path / "y.npy"), _bn_ref(xf, xf.mean(axes), xf.var(axes)))
    # --model, PyTorch naming, float16 parameters
    c = 6
    model = {"features.0.weight": np.ones((c, 2, 3, 3), np.float16),
             "features.1.running_mean": rng.normal(size=c).astype(np.float16),
             "features.1.running_var": rng.uniform(0.5, 2, c).astype(np.float16),
             "features.1.weight": rng.uniform(0.5, 2, c).astype(np.float16),
             "features.1.bias": rng.normal(size=c).astype(np.float16)}
    np.savez(tmp_path / "m.npz", **model)
    y = bnstat.normalize(x, model=str(tmp_path / "m.npz"), bn="features.1", layout="NCHW")
    f = lambda k: model[f"features.1.{k}"].astype(np.float64)  # noqa: E731
    _within_one_f16_ulp(y, _bn_ref(xf, f("running_mean"), f("running_var"), 1e-5, f("weight"),
                                   f("bias")))


def test_cli_model_of_the_sample_file_to_stdout(tmp_path):
    """The README's `normalize ... -o - --model model.npz --bn features.1` on the shipped model:
    inference-mode BN with PyTorch's eps 1e-5."""
    with np.load(os.path.join(SAMPLE, "model.npz")) as z:
        p = {k: z[f"features.1.{k}"].astype(np.float64) for k in ("running_mean", "running_var",
                                                                  "weight", "bias")}
    c = p["running_mean"].shape[0]
    x = np.random.default_rng(9).normal(size=(3, c, 5, 4)).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    rc, out, err = run_inproc("normalize", tmp_path / "acts.npy", "-o", "-", "--model",
                              os.path.join(SAMPLE, "model.npz"), "--bn", "features.1", binary=True)
    assert rc == 0 and "Traceback" not in err, err
    y = np.load(io.BytesIO(out))
    assert y.dtype == np.float32 and y.shape == x.shape
    want = _bn_ref(x.astype(np.float64), p["running_mean"], p["running_var"], 1e-5, p["weight"],
                   p["bias"])
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * max(1.0, np.abs(want).max()))
    assert os.listdir(tmp_path) == ["acts.npy"]


def test_cli_reduce_and_channel_axis(tmp_path):
    x = (np.random.default_rng(10).normal(size=(3, 5, 8)) * 3 + 1).astype(np.float32)
    np.save(tmp_path / "tok.npy", x)
    xf = x.astype(np.float64)
    rc, _, err = run_inproc("normalize", tmp_path / "tok.npy", "--layout", "NLC", "--reduce", "C",
                            "-o", tmp_path / "tok_ln.npy")
    assert rc == 0, err
    want = (xf - xf.mean(2, keepdims=True)) / np.sqrt(xf.var(2, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "tok_ln.npy"), want, rtol=0, atol=1e-6)
    rc, _, err = run_inproc("normalize", tmp_path / "tok.npy", "--channel-axis", "2",
                            "-o", tmp_path / "tok_bn.npy")
    assert rc == 0, err
    want = (xf - xf.mean((0, 1), keepdims=True)) / np.sqrt(xf.var((0, 1), keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "tok_bn.npy"), want, rtol=0, atol=1e-6)
