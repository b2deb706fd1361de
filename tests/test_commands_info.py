"""bnstat info (commands/info.py): the arrays of files against numpy and h5py, and the
layers fold would see in a model file."""

from __future__ import annotations

import json
import os
import re

import h5py
import numpy as np
from conftest import run_inproc
from helpers import SAMPLE


def test_info_lists_every_array_with_shape_dtype_chunks_compression_size(tmp_path, monkeypatch):
    """Issue 2, outputs bullet (SPEC 3 info): name, shape, dtype, chunking, compression and
    size of every array of .npy, .npz and HDF5 inputs, checked against numpy and h5py."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "f.npy", np.asfortranarray(rng.integers(0, 9, (5, 6)).astype(np.int16)))
    np.savez(tmp_path / "stored.npz", a=np.ones((4, 3), np.float32))
    np.savez_compressed(tmp_path / "deflated.npz", b=np.ones((2, 3, 4)))
    with h5py.File(tmp_path / "n.h5", "w") as f:
        f.create_dataset("g/h/x", data=np.ones((10, 3, 5), np.float32), chunks=(4, 3, 5),
                         compression="gzip")
        f.create_dataset("flat", data=np.ones((7, 2)))
        f.create_dataset("lz", data=np.ones((6, 2), np.float16), chunks=(3, 2), compression="lzf")
    paths = [tmp_path / "f.npy", tmp_path / "stored.npz", tmp_path / "deflated.npz", tmp_path / "n.h5"]
    rc, out, err = run_inproc("info", *paths, "--format", "json")
    assert rc == 0 and "Traceback" not in err, err
    got = {r["name"]: r for r in json.loads(out)["arrays"]}
    want = {
        "f": ((5, 6), "int16", None, None, 60, "F"),
        "a": ((4, 3), "float32", None, None, 48, "C"),
        "b": ((2, 3, 4), "float64", None, "deflate", 192, "C"),
        "g/h/x": ((10, 3, 5), "float32", [4, 3, 5], "gzip", 600, "C"),
        "flat": ((7, 2), "float64", None, None, 112, "C"),
        "lz": ((6, 2), "float16", [3, 2], "lzf", 24, "C"),
    }
    assert set(got) == set(want)
    for name, (shape, dtype, chunks, comp, nbytes, order) in want.items():
        r = got[name]
        assert (tuple(r["shape"]), r["dtype"], r["chunks"], r["compression"], r["nbytes"],
                r["order"]) == (shape, dtype, chunks, comp, nbytes, order), name
    monkeypatch.chdir(tmp_path)  # short paths: the table is one table at any pytest temp path
    rc, out, err = run_inproc("info", *(p.name for p in paths))
    assert rc == 0, err
    for name in want:
        assert re.search(rf"│ {re.escape(name)} +│", out), name
    assert re.search(r"g/h/x +│ 10x3x5 +│ float32 +│ C +│ 4x3x5 +│ gzip +│ +600 B", out), out


def test_info_of_a_model_file_shows_the_layers_fold_sees():
    """SPEC 3 info: for model files the layers that fold would see."""
    rc, out, err = run_inproc("info", os.path.join(SAMPLE, "model.npz"), "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    text = "\n".join(doc["fold"])
    assert "PyTorch naming" in text and "4 BatchNorm layers" in text
    assert "features.0 <- features.1" in text and "classifier.0 <- classifier.1" in text
