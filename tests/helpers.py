"""Helpers shared by test modules: CLI failure checks, file hashes, h5py reads, table parsing."""

from __future__ import annotations

import hashlib
import os
import re

import h5py
import numpy as np
from conftest import REPO

SAMPLE = os.path.join(REPO, "sample_data")


def assert_fails(result, code, pattern):
    """Exit code, a message matching ``pattern`` on stderr, no traceback, nothing on stdout."""
    rc, out, err = result
    assert rc == code, (rc, err)
    assert re.search(pattern, err), (pattern, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert out in ("", b""), out[:300]


def sha256(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def npz_arrays(path) -> dict[str, np.ndarray]:
    """Every member of a .npz, read and the file closed (an open NpzFile kept alive by a failed
    or skipped test's frame is closed later, in another test: a ResourceWarning there)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def h5_arrays(path) -> dict[str, np.ndarray]:
    """Every numeric dataset of 2+ dimensions of an HDF5 file, read by h5py (SPEC 2)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.ndim >= 2 and obj.dtype.kind in "fiu":
                out[name] = obj[()]
        f.visititems(visit)
    return out


def table_blocks(text: str) -> list[list[str]]:
    """The tables of a `moments`/`show` run: lists of lines, split at the blank lines."""
    blocks, cur = [], []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def table_rows(block: list[str]) -> list[list[str]]:
    """The body rows of one rich table (cells split at the column separator)."""
    return [[c.strip() for c in line.split("│")] for line in block if "│" in line]


def torch_bn(rng, name, c):
    """The five arrays of a PyTorch BatchNorm of ``c`` channels named ``name``."""
    return {f"{name}.weight": rng.uniform(0.5, 1.5, c).astype(np.float32),
            f"{name}.bias": rng.normal(size=c).astype(np.float32),
            f"{name}.running_mean": rng.normal(size=c).astype(np.float32),
            f"{name}.running_var": rng.uniform(0.3, 2.0, c).astype(np.float32),
            f"{name}.num_batches_tracked": np.array(100, np.int64)}
