"""`bnstat recalibrate` (issue 13, acceptance 3 and 5): precise BN against a float64
two-pass reference in the PyTorch and Keras conventions, torch's eval-mode BatchNorm and
torch.optim.swa_utils.update_bn; every other array unchanged; the error paths."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import npz_arrays

import bnstat
from bnstat.errors import DataError, UsageProblem


def acts(n=23, c=4, seed=0, shape=(3, 5)):
    rng = np.random.default_rng(seed)
    bshape = (1, c) + (1,) * len(shape)
    x = rng.normal(size=(n, c) + shape) * rng.uniform(0.5, 2, c).reshape(bshape) + rng.uniform(-2, 5, c).reshape(bshape)
    return x


def two_pass(x):
    axes = tuple(a for a in range(x.ndim) if a != 1)
    x = x.astype(np.float64)
    mean = x.sum(axis=axes) / (x.size // x.shape[1])
    m2 = ((x - mean.reshape((1, -1) + (1,) * (x.ndim - 2))) ** 2).sum(axis=axes)
    return mean, m2, x.size // x.shape[1]


def pytorch_model(path, dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)
    sd = {"stem.weight": rng.normal(size=(4, 3, 3, 3)).astype(dtype)}
    for name, c in (("bn1", 4), ("head.bn", 6)):
        sd.update({f"{name}.weight": rng.uniform(0.5, 1.5, c).astype(dtype),
                   f"{name}.bias": rng.normal(size=c).astype(dtype),
                   f"{name}.running_mean": rng.normal(size=c).astype(dtype),
                   f"{name}.running_var": rng.uniform(0.5, 2, c).astype(dtype),
                   f"{name}.num_batches_tracked": np.array(37, np.int64)})
    np.savez(path, **sd)
    return sd


def unchanged_except(path_a, path_b, keys):
    a, b = np.load(path_a), np.load(path_b)
    assert list(a.files) == list(b.files)
    for k in a.files:
        if k not in keys:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


# ---- acceptance 3 ------------------------------------------------------------------------

def test_pytorch_convention_equals_two_pass_reference(tmp_path, cli):
    x = acts()
    os.mkdir(tmp_path / "s1")
    os.mkdir(tmp_path / "s2")
    np.save(tmp_path / "s1" / "bn1.npy", x[:9])  # one array "bn1" (named like the layer) in two files
    np.save(tmp_path / "s2" / "bn1.npy", x[9:])
    pytorch_model(tmp_path / "m.npz")
    code, out, err = cli("recalibrate", tmp_path / "m.npz", tmp_path / "s1" / "bn1.npy",
                         tmp_path / "s2" / "bn1.npy", "--layout", "NCHW", "-o", tmp_path / "o.npz")
    assert code == 0, err
    mean, m2, n = two_pass(x)
    o = npz_arrays(tmp_path / "o.npz")
    np.testing.assert_allclose(o["bn1.running_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(o["bn1.running_var"], m2 / (n - 1), rtol=1e-12)  # unbiased
    unchanged_except(tmp_path / "m.npz", tmp_path / "o.npz", {"bn1.running_mean", "bn1.running_var"})
    assert int(o["bn1.num_batches_tracked"]) == 37  # left as is
    assert "1 BatchNorm layer(s) recalibrated" in out and "1 kept" in out
    assert "head.bn" in out and "none: kept" in out and "num_batches_tracked left as is" in out


def test_keras_convention_from_merged_shards(tmp_path, cli):
    h5py = pytest.importorskip("h5py")
    x = acts(n=30, c=5, seed=2)
    rng = np.random.default_rng(4)
    with h5py.File(tmp_path / "k.h5", "w") as f:
        f.attrs["note"] = "kept"
        g = f.create_group("model_weights/batch_normalization/batch_normalization")
        for k, v in (("gamma:0", rng.uniform(size=5)), ("beta:0", rng.normal(size=5)),
                     ("moving_mean:0", rng.normal(size=5)), ("moving_variance:0", rng.uniform(size=5))):
            g.create_dataset(k, data=v)
        f.create_dataset("model_weights/conv2d/conv2d/kernel:0", data=rng.normal(size=(3, 3, 2, 5)))
    for i, part in enumerate((x[:11], x[11:20], x[20:])):
        os.mkdir(tmp_path / f"s{i}")
        np.save(tmp_path / f"s{i}" / "act.npy", part)
        assert cli("moments", tmp_path / f"s{i}" / "act.npy", "--layout", "NCHW", "-o", tmp_path / f"p{i}.npz")[0] == 0
    # shards are merged first; the stats' array name ("act") is mapped with --map
    assert cli("merge", *(tmp_path / f"p{i}.npz" for i in range(3)), "-o", tmp_path / "all.npz")[0] == 0
    code, out, err = cli("recalibrate", tmp_path / "k.h5", "--stats", tmp_path / "all.npz", "--map",
                         "act=batch_normalization", "-o", tmp_path / "o.h5")
    assert code == 0, err
    mean, m2, n = two_pass(x)
    with h5py.File(tmp_path / "o.h5") as f, h5py.File(tmp_path / "k.h5") as g:
        bn = "model_weights/batch_normalization/batch_normalization/"
        np.testing.assert_allclose(f[bn + "moving_mean:0"][()], mean, rtol=1e-12)
        np.testing.assert_allclose(f[bn + "moving_variance:0"][()], m2 / n, rtol=1e-12)  # biased
        for k in (bn + "gamma:0", bn + "beta:0", "model_weights/conv2d/conv2d/kernel:0"):
            assert f[k][()].tobytes() == g[k][()].tobytes()
        assert f.attrs["note"] == "kept"
    assert "keras" in out


def test_float32_model_gets_the_float64_values_rounded_and_safetensors(tmp_path):
    x = acts(seed=3).astype(np.float32)
    pytorch_model(tmp_path / "m.npz", np.float32)
    res = bnstat.recalibrate(str(tmp_path / "m.npz"), {"bn1:input": x}, layout="NCHW",
                             output=str(tmp_path / "o.npz"))
    mean, m2, n = two_pass(x)
    with np.load(tmp_path / "o.npz") as o:  # closed before a skip keeps this frame alive
        o_var, o_mean = o["bn1.running_var"], o["bn1.running_mean"]
    assert o_var.dtype == np.float32
    np.testing.assert_array_equal(o_var, (m2 / (n - 1)).astype(np.float32))
    np.testing.assert_array_equal(o_mean, mean.astype(np.float32))
    assert [c.layer.name for c in res.changed] == ["bn1"] and [c.layer.name for c in res.kept] == ["head.bn"]
    st = pytest.importorskip("safetensors.numpy")
    with np.load(tmp_path / "m.npz") as m:
        st.save_file(dict(m), str(tmp_path / "m.safetensors"))
    bnstat.recalibrate(str(tmp_path / "m.safetensors"), {"bn1.input": x}, layout="NCHW",
                       output=str(tmp_path / "o.safetensors"))
    got, before = st.load_file(str(tmp_path / "o.safetensors")), st.load_file(str(tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(got["bn1.running_var"], o_var)
    for k in before:
        if k not in ("bn1.running_mean", "bn1.running_var"):
            assert got[k].tobytes() == before[k].tobytes()


def test_recalibrated_model_in_torch_reproduces_eval_batchnorm(tmp_path):
    torch = pytest.importorskip("torch", reason="the recalibrated model is loaded into torch")
    x = acts(n=17, c=4, seed=5)
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(4)).double()
    with torch.no_grad():
        net[0].weight.uniform_(0.5, 1.5)
        net[0].bias.normal_()
    np.savez(tmp_path / "m.npz", **{k: v.numpy() for k, v in net.state_dict().items()})
    bnstat.recalibrate(str(tmp_path / "m.npz"), {"0": x}, layout="NCHW", output=str(tmp_path / "o.npz"))
    o = npz_arrays(tmp_path / "o.npz")
    net.load_state_dict({k: torch.from_numpy(o[k]) for k in o}, strict=True)
    net.eval()
    mean, m2, n = two_pass(x)
    var = m2 / (n - 1)
    y = net(torch.from_numpy(x)).detach().numpy()
    w, b = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    s = (1, -1, 1, 1)
    want = (x - mean.reshape(s)) / np.sqrt(var.reshape(s) + 1e-5) * w.reshape(s) + b.reshape(s)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_batch_mean_equals_swa_update_bn(tmp_path, cli):
    torch = pytest.importorskip("torch", reason="compared with torch.optim.swa_utils.update_bn")
    x = acts(n=26, c=3, seed=6).astype(np.float32)
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    np.savez(tmp_path / "m.npz", **{k: v.numpy() for k, v in net.state_dict().items()})
    loader = [torch.from_numpy(x[i:i + 8]) for i in range(0, 26, 8)]  # a short last batch of 2
    torch.optim.swa_utils.update_bn(loader, net)
    np.save(tmp_path / "0.npy", x)
    code, out, err = cli("recalibrate", tmp_path / "m.npz", tmp_path / "0.npy", "--layout", "NCHW",
                         "--estimator", "batch-mean", "-b", 8, "-o", tmp_path / "o.npz")
    assert code == 0, err
    o = npz_arrays(tmp_path / "o.npz")
    # torch averages in float32: rel 1e-6
    np.testing.assert_allclose(o["0.running_mean"], net[0].running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(o["0.running_var"], net[0].running_var.numpy(), rtol=1e-6)
    mean, m2, n = two_pass(x)  # and it is not the population variance
    assert not np.allclose(o["0.running_var"], m2 / (n - 1), rtol=1e-3)


def test_names_map_and_map_file(tmp_path):
    pytorch_model(tmp_path / "m.npz")
    x4, x6 = acts(c=4, seed=7), acts(c=6, seed=8, shape=())
    for name in ("bn1", "bn1:input", "bn1/input", "model/bn1", "bn1_input"):
        res = bnstat.recalibrate(str(tmp_path / "m.npz"), {name: x4}, layout="NCHW")
        assert res.changed[0].layer.name == "bn1" and res.changed[0].source == name
    res = bnstat.recalibrate(str(tmp_path / "m.npz"), {"head/bn": x6, "a": x4}, map=["a=bn1"],
                             channel_axis=1)
    assert sorted(c.layer.name for c in res.changed) == ["bn1", "head.bn"]
    (tmp_path / "map.txt").write_text("# act=bn\na = bn1\nb=head/bn\n")
    res = bnstat.recalibrate(str(tmp_path / "m.npz"), {"a": x4, "b": x6}, map_file=str(tmp_path / "map.txt"),
                             channel_axis=1)
    assert sorted(c.layer.name for c in res.changed) == ["bn1", "head.bn"]
    (tmp_path / "map.json").write_text(json.dumps({"a": "bn1"}))
    res = bnstat.recalibrate(str(tmp_path / "m.npz"), {"a": x4}, map_file=str(tmp_path / "map.json"),
                             layout="NCHW")
    mean, m2, n = two_pass(x4)
    np.testing.assert_allclose(res.arrays["bn1.running_var"], m2 / (n - 1), rtol=1e-12)


# ---- acceptance 5: errors, nothing written -------------------------------------------

@pytest.fixture
def files(tmp_path):
    pytorch_model(tmp_path / "m.npz")
    np.save(tmp_path / "bn1.npy", acts(c=4))
    np.save(tmp_path / "other.npy", acts(c=4))
    np.save(tmp_path / "bn1x.npy", acts(c=5))
    np.savez(tmp_path / "nobn.npz", **{"fc.weight": np.ones((3, 3))})
    return tmp_path


@pytest.mark.parametrize("args,code,message", [
    (["NOBN", "bn1.npy"], 1, "no BatchNorm layer found"),
    (["m.npz", "other.npy"], 1, "no BatchNorm layer for other"),
    (["m.npz", "bn1x.npy", "--map", "bn1x=bn1"], 1, "BatchNorm bn1 has 4 channels, bn1x has 5"),
    (["m.npz", "bn1.npy", "--map", "bn1=missing"], 1, "has no BatchNorm layer 'missing'"),
    (["m.npz", "bn1.npy", "--estimator", "batch-mean"], 2, "needs activations and --batch-size"),
    (["m.npz", "bn1.npy", "-b", "4"], 2, "goes with --estimator"),
    (["m.npz", "bn1.npy", "--estimator", "batch-mean", "-b", "40"], 2, "larger than the 23 samples"),
    (["m.npz", "bn1.npy", "--norm", "layer"], 2, "per channel"),
    (["m.npz", "bn1.npy", "--layout", "NC"], 2, "--layout NC has 2 letters"),
    (["m.npz", "bn1.npy", "--map", "bn1"], 2, "write ACT=BN"),
    (["m.npz", "--stats", "LAYERSTATS"], 1, "a BatchNorm needs per-channel statistics"),
    (["m.npz"], 2, "give activation files or --stats"),
])
def test_errors(cli, files, args, code, message):
    if "LAYERSTATS" in args:
        assert cli("moments", files / "bn1.npy", "--layout", "NCHW", "--norm", "layer",
                   "-o", files / "ln.npz")[0] == 0
    args = [str(files / "nobn.npz") if a == "NOBN" else str(files / "ln.npz") if a == "LAYERSTATS"
            else str(files / a) if a.endswith((".npz", ".npy")) else a for a in args]
    before = {p: p.stat().st_mtime_ns for p in files.iterdir()}
    got, out, err = cli("recalibrate", *args, "-o", files / "out.npz")
    assert got == code, err
    assert message in err and "Traceback" not in err
    assert not (files / "out.npz").exists()
    assert {p: p.stat().st_mtime_ns for p in files.iterdir()} == before


def test_output_over_the_model_is_refused(cli, files):
    code, out, err = cli("recalibrate", files / "m.npz", files / "bn1.npy", "--layout", "NCHW",
                         "-o", files / "m.npz", "--force")
    assert code == 1 and "one of the inputs" in err


def test_library_errors(files):
    with pytest.raises(UsageProblem, match="one of the two"):
        bnstat.recalibrate(str(files / "m.npz"))
    with pytest.raises(DataError, match="channel 0 has 1 value"):
        bnstat.recalibrate(str(files / "m.npz"), {"bn1": np.ones((1, 4))}, layout="NC")
