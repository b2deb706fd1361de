"""`bnstat normalize` against PyTorch's own normalization functions (issue 3, acceptance 1).

Skipped cleanly where torch is not installed (`pip install torch==2.13.0`, CPU build).
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import bnstat  # noqa: E402

SHAPES = {"NC": (33, 6), "NCL": (7, 6, 9), "NCHW": (5, 6, 4, 3), "NCDHW": (3, 6, 2, 3, 4)}
TOL = {np.float64: 1e-10, np.float32: 3e-5}


def data(shape, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=shape[1]).reshape(
        (1, shape[1]) + (1,) * (len(shape) - 2)) + 3.0
    return x.astype(dtype)


def close(y, t, dtype):
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_allclose(y, t.detach().numpy(), rtol=0, atol=TOL[np.dtype(dtype).type])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_batch_norm_training(layout, dtype):
    x = data(SHAPES[layout], dtype, seed=1)
    t = F.batch_norm(torch.from_numpy(x), None, None, training=True, eps=1e-5)
    close(bnstat.normalize(x, layout=layout, chunk_size=1000), t, dtype)
    # channels last: the same numbers, permuted
    perm = (0,) + tuple(range(2, x.ndim)) + (1,)
    last = "N" + layout[2:] + "C"
    y = bnstat.normalize(np.ascontiguousarray(x.transpose(perm)), layout=last, chunk_size=1000)
    close(y, t.permute(perm), dtype)


@pytest.mark.parametrize("b", [3, 4])
def test_per_batch_is_batch_norm_training_on_each_batch(b):
    x = data((10, 6, 4, 3), np.float64, seed=2)
    bn = torch.nn.BatchNorm2d(6, affine=False, dtype=torch.float64).train()
    t = torch.cat([bn(torch.from_numpy(x[i:i + b])) for i in range(0, 10, b)])
    close(bnstat.normalize(x, layout="NCHW", per_batch=b, chunk_size=700), t, np.float64)


def trained_bn_model(c, eps=1e-5):
    """A conv + BatchNorm2d with running statistics from a few training steps and random affine."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, c, 3), torch.nn.BatchNorm2d(c, eps=eps))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.normal_()
        model.train()
        for _ in range(3):
            model(torch.randn(4, 2, 6, 6) * 2 + 1)
    return model.eval()


def save_state_dict(model, path):
    np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_batch_norm_eval_with_a_saved_state_dict(tmp_path, eps):
    model = trained_bn_model(6, eps=1e-5 if eps is None else eps)
    save_state_dict(model, tmp_path / "model.npz")
    assert "1.num_batches_tracked" in np.load(tmp_path / "model.npz").files
    x = data((5, 6, 4, 3), np.float32, seed=3)
    with torch.no_grad():
        t = model[1](torch.from_numpy(x))
    y = bnstat.normalize(x, model=str(tmp_path / "model.npz"), bn="1", eps=eps, layout="NCHW",
                         chunk_size=1000)
    close(y, t, np.float32)
    with torch.no_grad():
        t64 = model[1].double()(torch.from_numpy(x.astype(np.float64)))
    y64 = bnstat.normalize(x.astype(np.float64), model=str(tmp_path / "model.npz"), bn="1", eps=eps,
                           layout="NCHW")
    close(y64, t64, np.float64)


def test_cli_batch_norm_eval_to_stdout(tmp_path):
    model = trained_bn_model(6)
    save_state_dict(model, tmp_path / "model.npz")
    x = data((7, 4, 3, 6), np.float32, seed=4)  # NHWC on disk
    np.save(tmp_path / "acts.npy", x)
    proc = subprocess.run([sys.executable, "-m", "bnstat", "normalize", "acts.npy", "-o", "-", "--model",
                           "model.npz", "--bn", "1", "--layout", "NHWC", "--chunk-size", "1000"],
                          cwd=tmp_path, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    y = np.load(io.BytesIO(proc.stdout))
    with torch.no_grad():
        t = model[1](torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    close(y, t, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_layer_norm(layout, dtype):
    x = data(SHAPES[layout], dtype, seed=5)
    t = F.layer_norm(torch.from_numpy(x), x.shape[1:], eps=1e-5)
    close(bnstat.normalize(x, layout=layout, norm="layer", chunk_size=1000), t, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transformer_layer_norm_is_reduce_C_with_NLC(dtype):
    x = data((4, 10, 8), dtype, seed=6)
    t = F.layer_norm(torch.from_numpy(x), (8,), eps=1e-5)
    close(bnstat.normalize(x, layout="NLC", reduce="C", chunk_size=500), t, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCL", "NCHW", "NCDHW"])
def test_instance_norm(layout, dtype):
    x = data(SHAPES[layout], dtype, seed=7)
    t = F.instance_norm(torch.from_numpy(x), eps=1e-5)
    close(bnstat.normalize(x, layout=layout, norm="instance", chunk_size=1000), t, dtype)
    perm = (0,) + tuple(range(2, x.ndim)) + (1,)
    y = bnstat.normalize(np.ascontiguousarray(x.transpose(perm)), layout="N" + layout[2:] + "C",
                         norm="instance", chunk_size=1000)
    close(y, t.permute(perm), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_group_norm(layout, dtype, groups):
    x = data(SHAPES[layout], dtype, seed=8)
    t = F.group_norm(torch.from_numpy(x), groups, eps=1e-5)
    close(bnstat.normalize(x, layout=layout, norm="group", groups=groups, chunk_size=1000), t, dtype)
    if layout != "NC":
        perm = (0,) + tuple(range(2, x.ndim)) + (1,)
        y = bnstat.normalize(np.ascontiguousarray(x.transpose(perm)), layout="N" + layout[2:] + "C",
                             norm="group", groups=groups, chunk_size=1000)
        close(y, t.permute(perm), dtype)
