"""sample_data/: what it holds, and the README's first command run on it."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import REPO, _env
from helpers import SAMPLE, h5_arrays, table_blocks, table_rows
from reference import ref_moments


def test_readme_first_command_prints_a_table_per_layer():
    """Issue 2, acceptance 1: `bnstat moments sample_data/acts.h5 --layout NCHW`, run as the
    README says (from the repository, the default engine), prints one table per layer with
    the statistics of that layer."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert "bnstat moments sample_data/acts.h5 --layout NCHW" in readme
    env = _env()
    env.pop("BNSTAT_ENGINE", None)  # as a user runs it: engine chosen by size
    proc = subprocess.run([sys.executable, "-m", "bnstat", "moments", "sample_data/acts.h5",
                           "--layout", "NCHW"], cwd=REPO, env=env, capture_output=True, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert err == "" and "Traceback" not in err
    arrays = h5_arrays(os.path.join(SAMPLE, "acts.h5"))
    assert len(arrays) >= 2
    blocks = {b[0].split()[0]: b for b in table_blocks(out)}
    assert sorted(blocks) == sorted(arrays)
    for name, x in arrays.items():
        block = blocks[name]
        assert block[0] == (f"{name}  {tuple(x.shape)} {x.dtype} · layout NCHW · reduce NHW · "
                            f"{x.size:,} elements")
        ref = ref_moments(x, "NCHW")
        rows = table_rows(block)
        assert [int(r[0]) for r in rows] == list(range(x.shape[1]))  # every channel (<= 32)
        for r in rows:
            c = int(r[0])
            assert int(r[1].replace(",", "")) == ref.count[c]
            # the table prints 6 significant digits
            for col, want in ((2, ref.mean[c]), (3, ref.std[c]), (4, ref.var[c]),
                              (5, ref.min[c]), (6, ref.max[c])):
                assert float(r[col]) == pytest.approx(want, rel=1e-5, abs=1e-12), (name, c, col)
            assert r[7] == "0"


def test_sample_data_has_every_kind_of_file():
    """Issue 2, sample_data bullet: 5 MB at most, the script that makes them, an HDF5 dump
    of several layers in nested groups (NCHW, chunked), an NHWC .npy, an .npz, and a
    model.npz in PyTorch state_dict naming (conv/BN/ReLU blocks and one linear+BN1d)."""
    names = os.listdir(SAMPLE)
    assert "make_samples.py" in names
    total = sum(os.path.getsize(os.path.join(SAMPLE, n)) for n in names)
    assert total <= 5 * 1000**2, total
    with h5py.File(os.path.join(SAMPLE, "acts.h5"), "r") as f:
        dsets = []
        f.visititems(lambda n, o: dsets.append((n, o.shape, o.chunks))
                     if isinstance(o, h5py.Dataset) else None)
    assert len(dsets) >= 2
    assert all(n.count("/") >= 2 for n, _, _ in dsets), dsets  # nested groups
    assert all(len(s) == 4 and c is not None for _, s, c in dsets), dsets  # NCHW, chunked
    nhwc = [n for n in names if n.endswith(".npy") and "nhwc" in n.lower()]
    assert nhwc and np.load(os.path.join(SAMPLE, nhwc[0]), mmap_mode="r").ndim == 4
    with np.load(os.path.join(SAMPLE, "acts.npz")) as z:
        assert z.files and all(z[k].ndim >= 2 for k in z.files)
    with np.load(os.path.join(SAMPLE, "model.npz")) as z:
        keys = set(z.files)
        shapes = {k: z[k].shape for k in z.files}
    bns = sorted(k[: -len(".running_mean")] for k in keys if k.endswith(".running_mean"))
    assert len(bns) >= 2
    fed_by = {}
    for bn in bns:
        for part in ("weight", "bias", "running_var", "num_batches_tracked"):
            assert f"{bn}.{part}" in keys, (bn, part)
        prefix, k = bn.rsplit(".", 1)
        conv = f"{prefix}.{int(k) - 1}.weight"
        assert conv in keys, bn
        assert shapes[conv][0] == shapes[f"{bn}.running_mean"][0]
        # the module after the BN is a ReLU: no parameters
        assert not [key for key in keys if key.startswith(f"{prefix}.{int(k) + 1}.")], bn
        fed_by[bn] = len(shapes[conv])
    assert 4 in fed_by.values() and 2 in fed_by.values(), fed_by  # conv blocks and linear+BN1d
