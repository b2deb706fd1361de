"""normalize writes each chunk in small pieces (normalizing.WRITE_PIECE): with
pieces of a few rows, chunks of several pieces and a ragged last piece, every
output format and statistics source still equals the float64 numpy reference."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import bnstat
from bnstat import normalizing


def ref_normalize(x, axes, eps=1e-5):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps)


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(normalizing, "WRITE_PIECE", 3 * 4 * 5 * 6 * 4 * 3 + 7)  # 3 rows and a bit


@pytest.mark.parametrize("fmt", ["npy", "npz", "h5"])
@pytest.mark.parametrize("layout, norm, axes", [
    ("NCHW", "batch", (0, 2, 3)),
    ("NHWC", "batch", (0, 1, 2)),
    ("NCHW", "instance", (2, 3)),
    ("NCHW", "layer", (1, 2, 3)),
])
@pytest.mark.parametrize("source", ["own", "stats"])
def test_pieces_equal_reference(tmp_path, small_pieces, fmt, layout, norm, axes, source):
    rng = np.random.default_rng(3)
    shape = (23, 4, 5, 6) if layout == "NCHW" else (23, 5, 6, 4)
    x = (rng.standard_normal(shape) * 2 + 5).astype(np.float32)
    path = tmp_path / f"x.{fmt}"
    if fmt == "npy":
        np.save(path, x)
    elif fmt == "npz":
        np.savez(path, x=x)
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=x, chunks=(2,) + shape[1:])
    kw = dict(layout=layout, norm=norm, chunk_size=10 * x[0].nbytes)  # 10 rows a chunk
    if source == "stats":
        stats = bnstat.moments(str(path), **kw)
        kw["stats"] = stats
    out = tmp_path / f"y.{fmt}"
    bnstat.normalize(str(path), str(out), **kw)
    if fmt == "npy":
        y = np.load(out)
    elif fmt == "npz":
        with np.load(out) as z:
            y = z["x"]
    else:
        with h5py.File(out, "r") as f:
            y = f["x"][...]
    assert y.dtype == np.float32 and y.shape == shape
    np.testing.assert_allclose(y, ref_normalize(x, axes), rtol=2e-6, atol=2e-6)
