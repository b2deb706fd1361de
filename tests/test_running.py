"""`bnstat running` (issue 13, acceptance 1, 2, 5): the running statistics a framework's
BatchNorm would hold, against torch.nn.BatchNorm{1,2}d in training mode, Keras' own
BatchNormalization layer, and float64 transcriptions of the update formulas."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import bnstat
from bnstat.errors import DataError, UsageProblem

SHAPES = {"NCHW": ((37, 3, 4, 5), 8), "NC": ((45, 6), 7), "NCL": ((23, 4, 9), 5)}  # last batch short


def data(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    x = rng.normal(size=shape) * rng.uniform(0.5, 2.0, c).reshape(bshape) + rng.uniform(1, 3, c).reshape(bshape)
    return x.astype(dtype)


def batches(x, b, drop_last=False):
    out = [x[i:i + b] for i in range(0, x.shape[0], b)]
    return out[:-1] if drop_last and out[-1].shape[0] < b else out


def reference(x, b, *, momentum, unbiased, new_weight, epochs=1, drop_last=False, mean0=None, var0=None):
    """The update rules of SPEC 6, transcribed in float64 from the frameworks' documentation."""
    axes = tuple(a for a in range(x.ndim) if a != 1)
    rm = np.zeros(x.shape[1]) if mean0 is None else np.array(mean0, np.float64)
    rv = np.ones(x.shape[1]) if var0 is None else np.array(var0, np.float64)
    k = 0
    for _ in range(epochs):
        for xb in batches(x.astype(np.float64), b, drop_last):
            k += 1
            mean, var = xb.mean(axis=axes), xb.var(axis=axes, ddof=1 if unbiased else 0)
            f = 1.0 / k if momentum is None else (momentum if new_weight else 1.0 - momentum)
            rm = rm * (1 - f) + mean * f
            rv = rv * (1 - f) + var * f
    return rm, rv


# ---- acceptance 1: PyTorch ---------------------------------------------------------

@pytest.mark.parametrize("epochs", [1, 3])
@pytest.mark.parametrize("momentum", [0.1, 0.01, None])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_pytorch_equals_torch_batchnorm_in_training(layout, momentum, epochs):
    torch = pytest.importorskip("torch", reason="compared with torch.nn.BatchNorm")
    shape, b = SHAPES[layout]
    x = data(shape, seed=len(layout))
    bn = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(shape[1], momentum=momentum)
    bn.train()
    with torch.no_grad():
        for _ in range(epochs):
            for xb in batches(x, b):
                bn(torch.from_numpy(xb))
    # chunk_size=1000: batches cut by chunk boundaries, merged exactly
    for chunk_size in (None, 1000):
        r = bnstat.running(x, batch_size=b, layout=layout, momentum=momentum, cumulative=momentum is None,
                           epochs=epochs, chunk_size=chunk_size)["array"]
        # torch keeps its running statistics in float32: each update rounds to float32 (about
        # 6e-8 relative), and the batch statistics are float32 reductions; rel 1e-6 is that
        # rounding over up to 15 updates, with room.
        np.testing.assert_allclose(r.running_mean, bn.running_mean.double().numpy(), rtol=1e-6)
        np.testing.assert_allclose(r.running_var, bn.running_var.double().numpy(), rtol=1e-6)
        assert r.num_batches_tracked == int(bn.num_batches_tracked)
        assert r.batches == -(-shape[0] // b)


def test_pytorch_batches_span_files_in_order(tmp_path):
    torch = pytest.importorskip("torch", reason="compared with torch.nn.BatchNorm2d")
    x = data((30, 3, 4, 4), seed=5)
    os.mkdir(tmp_path / "a")
    os.mkdir(tmp_path / "b")
    np.save(tmp_path / "a" / "acts.npy", x[:13])  # one array "acts" in two files, split along N
    np.save(tmp_path / "b" / "acts.npy", x[13:])
    bn = torch.nn.BatchNorm2d(3).train()
    with torch.no_grad():
        for xb in batches(x, 8):  # batch 1 takes samples 8..15: the end of a, the start of b
            bn(torch.from_numpy(xb))
    r = bnstat.running([str(tmp_path / "a" / "acts.npy"), str(tmp_path / "b" / "acts.npy")],
                       batch_size=8, layout="NCHW")["acts"]
    np.testing.assert_allclose(r.running_var, bn.running_var.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(r.running_mean, bn.running_mean.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(r.mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(r.var, x.astype(np.float64).var(axis=(0, 2, 3)), rtol=1e-12)


def test_drop_last_and_from_model(tmp_path):
    x = data((29, 4, 3), seed=7)
    rng = np.random.default_rng(3)
    mean0, var0 = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    np.savez(tmp_path / "m.npz", **{"bn.running_mean": mean0.astype(np.float32),
                                    "bn.running_var": var0.astype(np.float32),
                                    "bn.num_batches_tracked": np.array(10)})
    r = bnstat.running(x, batch_size=6, layout="NCL", drop_last=True, epochs=2,
                       from_model=str(tmp_path / "m.npz"), bn="bn")["array"]
    rm, rv = reference(x, 6, momentum=0.1, unbiased=True, new_weight=True, epochs=2, drop_last=True,
                       mean0=mean0.astype(np.float32), var0=var0.astype(np.float32))
    np.testing.assert_allclose(r.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(r.running_var, rv, rtol=1e-12)
    assert r.batches == 4 and r.num_batches_tracked == 18
    # the population statistics are of all the data, the dropped samples included
    np.testing.assert_allclose(r.var, x.astype(np.float64).var(axis=(0, 2)), rtol=1e-12)


# ---- acceptance 2: Keras, TF fused, MXNet ------------------------------------------

@pytest.mark.parametrize("framework,unbiased,default", [("keras", False, 0.99), ("tf-fused", True, 0.99),
                                                        ("mxnet", False, 0.9)])
@pytest.mark.parametrize("momentum", [None, 0.5])
def test_keras_tf_mxnet_equal_float64_transcription(framework, unbiased, default, momentum):
    x = data((41, 5, 3, 2), seed=11)
    r = bnstat.running(x, batch_size=6, layout="NCHW", framework=framework, momentum=momentum,
                       epochs=3, chunk_size=777)["array"]
    rm, rv = reference(x, 6, momentum=default if momentum is None else momentum, unbiased=unbiased,
                       new_weight=False, epochs=3)
    np.testing.assert_allclose(r.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(r.running_var, rv, rtol=1e-12)
    assert r.momentum == (default if momentum is None else momentum)


def test_channels_last_layout_equals_channels_first():
    x = data((20, 3, 4, 5), seed=2)
    a = bnstat.running(x, batch_size=6, layout="NCHW", framework="mxnet")["array"]
    b = bnstat.running(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), batch_size=6, layout="NHWC",
                       framework="mxnet")["array"]
    np.testing.assert_allclose(a.running_var, b.running_var, rtol=1e-12)
    np.testing.assert_allclose(a.running_mean, b.running_mean, rtol=1e-12)


@pytest.mark.slow
def test_keras_equals_keras_batchnormalization_in_training():
    pytest.importorskip("torch", reason="Keras runs on the torch backend here")
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="compared with keras.layers.BatchNormalization")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras was imported with another backend")
    x = data((26, 4, 3, 3), seed=13)
    layer = keras.layers.BatchNormalization(axis=1, momentum=0.9)
    layer.build(x.shape)
    for _ in range(2):
        for xb in batches(x, 8):
            layer(xb, training=True)
    r = bnstat.running(x, batch_size=8, layout="NCHW", framework="keras", momentum=0.9, epochs=2)["array"]
    # Keras holds its moving statistics in float32 (rel 1e-6 as for torch)
    def value(v):  # the torch tensor behind a Keras variable (keras' own conversion warns under numpy 2)
        return v.value.detach().cpu().double().numpy()

    np.testing.assert_allclose(r.running_mean, value(layer.moving_mean), rtol=1e-6)
    np.testing.assert_allclose(r.running_var, value(layer.moving_variance), rtol=1e-6)


# ---- the command ------------------------------------------------------------------------

@pytest.fixture
def acts(tmp_path):
    x = data((21, 3, 4, 4), seed=3)
    np.save(tmp_path / "acts.npy", x)
    return tmp_path / "acts.npy", x


def test_cli_json_csv_npz(cli, acts, tmp_path):
    path, x = acts
    code, out, err = cli("running", path, "-b", 8, "--layout", "NCHW", "--format", "json")
    assert code == 0, err
    rec = json.loads(out)["arrays"][0]
    for key in ("name", "framework", "momentum", "batch_size", "batches", "epochs", "running_mean",
                "running_var", "mean", "var", "mean_gap", "var_ratio"):
        assert key in rec
    assert (rec["framework"], rec["momentum"], rec["batch_size"], rec["batches"]) == ("pytorch", 0.1, 8, 3)
    rm, rv = reference(x, 8, momentum=0.1, unbiased=True, new_weight=True)
    np.testing.assert_allclose(rec["running_var"], rv, rtol=1e-12)
    mean, var = x.astype(np.float64).mean(axis=(0, 2, 3)), x.astype(np.float64).var(axis=(0, 2, 3))
    np.testing.assert_allclose(rec["var"], var, rtol=1e-12)
    np.testing.assert_allclose(rec["mean_gap"], (rm - mean) / np.sqrt(var), rtol=1e-10)
    np.testing.assert_allclose(rec["var_ratio"], rv / var, rtol=1e-12)

    code, out, err = cli("running", path, "-b", 8, "--layout", "NCHW", "--format", "csv",
                         "--framework", "keras", "--epochs", 2)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "name,unit,count,running_mean,running_var,mean,var,mean_gap,var_ratio"
    rm, rv = reference(x, 8, momentum=0.99, unbiased=False, new_weight=False, epochs=2)
    assert [float(v.split(",")[4]) for v in lines[1:]] == pytest.approx(rv, rel=1e-12)

    out_path = tmp_path / "run.npz"
    code, out, err = cli("running", path, "-b", 8, "--layout", "NCHW", "-o", out_path, "--cumulative")
    assert code == 0, err
    z = np.load(out_path)
    rm, rv = reference(x, 8, momentum=None, unbiased=True, new_weight=True)
    np.testing.assert_allclose(z["acts/running_var"], rv, rtol=1e-12)
    np.testing.assert_allclose(z["acts/var"], var, rtol=1e-12)
    meta = json.loads(str(z["__bnstat__"]))["arrays"][0]["running"]
    assert meta["framework"] == "pytorch" and meta["cumulative"] and meta["batches"] == 3
    code, out, err = cli("show", out_path, "--format", "json")  # a stats file too
    assert code == 0 and json.loads(out)["arrays"][0]["var"] == pytest.approx(var, rel=1e-12)


def test_cli_table(cli, acts):
    path, _ = acts
    code, out, err = cli("running", path, "-b", 8, "--layout", "NCHW", "--framework", "mxnet")
    assert code == 0, err
    assert "mxnet momentum 0.9" in out and "batches of 8: 3 per epoch x 1 epoch(s)" in out
    assert "running_mean" in out and "var ratio" in out and "largest mean gap" in out


@pytest.mark.parametrize("args,code,message", [
    (["--momentum", "1.5"], 2, "1.5 is not in the range"),
    (["--framework", "keras", "--cumulative"], 2, "--cumulative"),
    (["--momentum", "0.1", "--cumulative"], 2, "not both"),
    (["--norm", "layer"], 2, "per channel"),
    (["--layout", "NC"], 2, "--layout NC has 2 letters"),
    (["-b", "22"], 2, "larger than the 21 samples"),
    (["--layout", "CNHW"], 2, "must be the first axis"),
    (["--from-model", "MODEL"], 2, "go together"),
    (["--from-model", "MODEL", "--bn", "nope"], 1, "unknown BatchNorm layer 'nope'"),
    (["--from-model", "MODEL", "--bn", "b5"], 1, "has 5 channels"),
])
def test_cli_errors(cli, acts, tmp_path, args, code, message):
    path, _ = acts
    np.savez(tmp_path / "m.npz", **{"b5.running_mean": np.zeros(5), "b5.running_var": np.ones(5)})
    args = [str(tmp_path / "m.npz") if a == "MODEL" else a for a in args]
    if "-b" not in args:
        args += ["-b", "8"]
    out_path = tmp_path / "out.json"
    got, out, err = cli("running", path, *args, "-o", out_path)
    assert got == code, err
    assert message in err and "Traceback" not in err
    assert not out_path.exists()


def test_errors_of_the_data(tmp_path):
    x = data((10, 3), seed=1)
    with pytest.raises(DataError, match="batch 3 has 1 value"):  # torch: "Expected more than 1 value"
        bnstat.running(x, batch_size=3, layout="NC")
    r = bnstat.running(x, batch_size=3, layout="NC", drop_last=True)["array"]
    assert r.batches == 3
    assert bnstat.running(x, batch_size=3, layout="NC", framework="keras")["array"].batches == 4
    x[4, 1] = np.nan
    with pytest.raises(DataError, match="NaN values in batch 1"):
        bnstat.running(x, batch_size=3, layout="NC", drop_last=True)
    with pytest.raises(UsageProblem, match="between 0 and 1"):
        bnstat.running(x, batch_size=3, momentum=1.5)
    with pytest.raises(UsageProblem, match="larger than the 2 samples"):
        bnstat.running(np.ones((2, 3)), batch_size=3, layout="NC")


def test_hdf5_gzip_chunks_and_threads_give_the_same_batches(tmp_path):
    h5py = pytest.importorskip("h5py")
    x = data((33, 4, 6, 6), seed=17)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("g/acts", data=x, chunks=(5, 4, 6, 6), compression="gzip")
    want = bnstat.running(x, batch_size=7, layout="NCHW", framework="tf-fused", epochs=2)["array"]
    for threads in (1, 2):
        got = bnstat.running(str(tmp_path / "a.h5"), batch_size=7, layout="NCHW", framework="tf-fused",
                             epochs=2, threads=threads, chunk_size=3000)["g/acts"]
        np.testing.assert_allclose(got.running_mean, want.running_mean, rtol=1e-13)
        np.testing.assert_allclose(got.running_var, want.running_var, rtol=1e-13)
        assert got.batches == 5 and got.stats.sources == [str(tmp_path / "a.h5")]


def test_chunks_hold_whole_batches_within_the_chunk_size(tmp_path):
    from bnstat.batches import batch_rows
    from bnstat.io import open_sources

    np.save(tmp_path / "x.npy", np.zeros((100, 10), np.float32))  # 40 bytes per sample
    src = open_sources([str(tmp_path / "x.npy")])[0]
    assert batch_rows(src, 7, 1000) == 21  # 25 rows fit: 3 whole batches
    assert batch_rows(src, 30, 1000) == 25  # a batch over the chunk size: pieces of it
    x = data((100, 10), seed=2)
    want = bnstat.running(x, batch_size=30, layout="NC", framework="keras")["array"]
    np.save(tmp_path / "y.npy", x)
    got = bnstat.running(str(tmp_path / "y.npy"), batch_size=30, layout="NC", framework="keras",
                         chunk_size=1000)["y"]
    np.testing.assert_allclose(got.running_var, want.running_var, rtol=1e-13)
