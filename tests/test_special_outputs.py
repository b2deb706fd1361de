"""Nothing lost (issue 17, class 1): secondary inputs, stdin, special targets, a full disk.

Every refusal is checked with run_and_check: the exit code, the message, no
traceback, and every file of the folder byte-identical afterwards.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import _env, run_inproc
from test_bad_inputs import run_and_check, snapshot

REFUSED = r"the output is one of the inputs; refusing to overwrite it \(even with --force\)"


@pytest.fixture
def d(tmp_path):
    rng = np.random.default_rng(17)
    np.save(tmp_path / "x.npy", rng.random((8, 3)).astype(np.float32))
    np.savez(tmp_path / "acts.npz", x=np.load(tmp_path / "x.npy"))  # the format of s.npz and m.npz
    rc, _, err = run_inproc("moments", tmp_path / "x.npy", "--layout", "NC", "-o", tmp_path / "s.npz")
    assert rc == 0, err
    np.savez(tmp_path / "m.npz", **{"bn.weight": np.ones(3, np.float32), "bn.bias": np.zeros(3, np.float32),
                                    "bn.running_mean": np.full(3, 0.5, np.float32),
                                    "bn.running_var": np.full(3, 4.0, np.float32)})
    (tmp_path / "sub").mkdir()
    return tmp_path


def alias(d, kind, name):
    """A path naming d/name: itself, a symlink, a hard link, or through '..'."""
    if kind == "same":
        return d / name
    if kind == "dotdot":
        return d / "sub" / ".." / name
    out = d / f"{kind}-{name}"
    (os.symlink if kind == "symlink" else os.link)(d / name, out)
    return out


KINDS = ["same", "symlink", "hardlink", "dotdot"]


@pytest.mark.parametrize("kind", KINDS)
def test_normalize_never_writes_over_its_stats_file(d, kind):
    out = alias(d, kind, "s.npz")
    run_and_check(d, ["normalize", d / "acts.npz", "--stats", d / "s.npz", "-o", out, "--force"], 1, REFUSED)


@pytest.mark.parametrize("kind", KINDS)
def test_normalize_never_writes_over_its_model(d, kind):
    out = alias(d, kind, "m.npz")
    run_and_check(d, ["normalize", d / "acts.npz", "--model", d / "m.npz", "--bn", "bn", "--layout", "NC",
                      "-o", out, "--force"], 1, REFUSED)


def test_library_normalize_never_writes_over_its_stats_file(d):
    import bnstat
    from bnstat.errors import OutputError

    os.link(d / "s.npz", d / "hard.npz")
    before = snapshot(d)
    with pytest.raises(OutputError, match="one of the inputs"):
        bnstat.normalize(str(d / "acts.npz"), str(d / "hard.npz"), stats=str(d / "s.npz"), force=True)
    assert snapshot(d) == before


@pytest.mark.parametrize("kind", KINDS)
def test_fold_never_writes_over_its_plan(d, kind):
    from bnstat import fold  # a plan the fold reads: written by --dry-run

    np.savez(d / "model.npz", **{"0.weight": np.ones((3, 2), np.float32), "0.bias": np.zeros(3, np.float32),
                                 "1.weight": np.ones(3, np.float32), "1.bias": np.zeros(3, np.float32),
                                 "1.running_mean": np.zeros(3, np.float32),
                                 "1.running_var": np.ones(3, np.float32)})
    fold(str(d / "model.npz"), dry_run=True, plan_output=str(d / "plan.json"))
    out = alias(d, kind, "plan.json")
    run_and_check(d, ["fold", d / "model.npz", "--plan", d / "plan.json", "-o", out, "--force"], 1, REFUSED)


def test_stdin_redirected_from_the_output_is_refused(d):
    """`bnstat normalize - -o y.npy --force < y.npy`: fstat of fd 0 is the output."""
    os.link(d / "x.npy", d / "hard.npy")
    before = snapshot(d)
    for out in (d / "x.npy", d / "hard.npy"):
        with open(d / "x.npy", "rb") as fh:
            proc = subprocess.run([sys.executable, "-m", "bnstat", "normalize", "-", "--norm", "layer",
                                   "-o", str(out), "--force"], stdin=fh, capture_output=True, env=_env())
        err = proc.stderr.decode()
        assert proc.returncode == 1, err
        assert "the output is standard input; refusing to overwrite it (even with --force)" in err
        assert "Traceback" not in err
    assert snapshot(d) == before


def test_stdin_from_another_file_is_fine(d):
    with open(d / "x.npy", "rb") as fh:
        proc = subprocess.run([sys.executable, "-m", "bnstat", "normalize", "-", "--norm", "layer",
                               "-o", str(d / "y.npy")], stdin=fh, capture_output=True, env=_env())
    assert proc.returncode == 0, proc.stderr.decode()
    x = np.load(d / "x.npy").astype(np.float64)
    ref = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.load(d / "y.npy"), ref, rtol=1e-5, atol=1e-6)


# ---- special targets -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["normalize", "{x}", "--layout", "NC"],
    ["moments", "{x}", "--layout", "NC"],
    ["moments", "{x}", "--layout", "NC", "--format", "json"],
    ["moments", "{x}", "--layout", "NC", "--format", "npz"],
    ["show", "{s}"],
    ["info", "{x}"],
], ids=["normalize", "moments-table", "moments-json", "moments-npz", "show", "info"])
def test_dev_null_without_force(d, args):
    """`-o /dev/null` just works (no --force, no temporary file in /dev, still a device)."""
    args = [str(d / "x.npy") if a == "{x}" else str(d / "s.npz") if a == "{s}" else a for a in args]
    before = set(os.listdir("/dev"))
    rc, out, err = run_inproc(*args, "-o", "/dev/null")
    assert rc == 0, err
    assert out == "" and "Traceback" not in err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert set(os.listdir("/dev")) == before


def test_fifo_is_written_straight_into(d):
    """A FIFO target: bytes go through it (a reader gets a loadable .npy), it stays a FIFO."""
    fifo = d / "pipe.npy"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    rc, out, err = run_inproc("normalize", d / "x.npy", "--layout", "NC", "-o", fifo)
    data = reader.communicate(timeout=60)[0]
    assert rc == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert [n for n in os.listdir(d) if n.endswith(".bnstat-tmp")] == []
    import io

    x = np.load(d / "x.npy").astype(np.float64)
    ref = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(np.load(io.BytesIO(data)), ref, rtol=1e-5, atol=1e-6)


def test_directory_target_is_refused(d):
    run_and_check(d, ["normalize", d / "x.npy", "--layout", "NC", "-o", d / "sub", "--force"], 1,
                  r"sub: the output is a directory")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_dev_full_target(d):
    run_and_check(d, ["normalize", d / "x.npy", "--layout", "NC", "-o", "/dev/full"], 1,
                  r"/dev/full: cannot write: No space left on device")


def test_symlink_target_is_written_through(d):
    """-o LINK --force replaces the file LINK points to (as cp writes into it); the link stays."""
    (d / "real.npy").write_bytes(b"old")
    os.symlink("real.npy", d / "link.npy")
    rc, _, err = run_inproc("normalize", d / "x.npy", "--layout", "NC", "-o", d / "link.npy", "--force")
    assert rc == 0, err
    assert os.path.islink(d / "link.npy")
    assert np.load(d / "real.npy").shape == (8, 3)


def test_longest_legal_name(d):
    """A 255-byte output name: the temporary name beside it is shortened to fit."""
    name = "n" * 251 + ".npy"
    rc, _, err = run_inproc("normalize", d / "x.npy", "--layout", "NC", "-o", d / name)
    assert rc == 0, err
    assert np.load(d / name).shape == (8, 3)
    utf8 = "é" * 125 + ".npz"  # 254 bytes, the cut falls inside a character
    rc, _, err = run_inproc("moments", d / "x.npy", "--layout", "NC", "-o", d / utf8)
    assert rc == 0, err
    assert "x/mean" in np.load(d / utf8).files


# ---- a full disk while writing HDF5 -----------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 200 KiB tmpfs (root only), else skipped: test_hdf5_injected_enospc covers the case."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_hdf5_injected_enospc covers this case")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({proc.stderr.decode().strip()}); "
                    "test_hdf5_injected_enospc covers this case")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def gzip_h5(tmp_path):
    import h5py

    a = np.random.default_rng(3).random((64, 8, 8, 8)).astype(np.float32)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        for name in ("x", "y", "z"):
            f.create_dataset(name, data=a, chunks=(8, 8, 8, 8), compression="gzip")
    return tmp_path / "c.h5"


@pytest.mark.parametrize("datasets", [["x", "y", "z"], ["x"]])
def test_hdf5_on_a_full_disk(small_disk, gzip_h5, datasets):
    """Once SIGSEGV after the message (HDF5 freeing objects a failed write left broken)."""
    sel = [a for n in datasets for a in ("-d", n)] if len(datasets) == 1 else []
    if len(datasets) == 1:  # 1 dataset fits: fill the disk first
        (small_disk / "filler").write_bytes(b"\0" * (150 << 10))
    before = snapshot(gzip_h5.parent)
    proc = subprocess.run([sys.executable, "-m", "bnstat", "normalize", str(gzip_h5), *sel, "--layout", "NCHW",
                           "-o", str(small_disk / "o.h5")], capture_output=True, env=_env(), timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.strip().splitlines() == [f"bnstat: error: {small_disk / 'o.h5'}: cannot write: "
                                        "No space left on device"]
    assert sorted(os.listdir(small_disk)) == (["filler"] if len(datasets) == 1 else [])
    assert snapshot(gzip_h5.parent) == before


def test_hdf5_model_on_a_full_disk(small_disk, tmp_path):
    import h5py

    rng = np.random.default_rng(4)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f["0.weight"] = rng.random((300, 250)).astype(np.float32)
        f["0.bias"] = np.zeros(300, np.float32)
        for k, v in {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}.items():
            f[f"1.{k}"] = np.full(300, v, np.float32)
    proc = subprocess.run([sys.executable, "-m", "bnstat", "fold", str(tmp_path / "m.h5"),
                           "-o", str(small_disk / "f.h5")], capture_output=True, env=_env(), timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert f"{small_disk / 'f.h5'}: cannot write: No space left on device" in err
    assert "Traceback" not in err and proc.returncode != -11
    assert os.listdir(small_disk) == []


def test_hdf5_injected_enospc(gzip_h5, tmp_path, monkeypatch):
    """The same without root: every write of the HDF5 output fails after 100 KB."""
    import errno

    import bnstat.io.atomic as atomic

    real_open = open
    written = [0]

    class Filling:
        def __init__(self, path, mode):
            self._fh = real_open(path, mode)

        def __getattr__(self, name):
            return getattr(self._fh, name)

        def write(self, b):
            written[0] += len(memoryview(b).cast("B"))
            if written[0] > 100_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._fh.write(b)

    monkeypatch.setattr(atomic, "open", Filling, raising=False)
    before = snapshot(tmp_path)
    rc, out, err = run_inproc("normalize", gzip_h5, "--layout", "NCHW", "-o", tmp_path / "o.h5")
    assert rc == 1, err
    assert f"{tmp_path / 'o.h5'}: cannot write: No space left on device" in err
    assert snapshot(tmp_path) == before


# ---- standard output -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["moments", "{x}", "--layout", "NC"],
    ["moments", "{x}", "--layout", "NC", "--format", "json"],
    ["normalize", "{x}", "--layout", "NC", "-o", "-"],
    ["--version"],
], ids=["table", "json", "normalize", "version"])
def test_stdout_closed(d, args):
    """`bnstat ... >&-`: one line, exit 1, no traceback."""
    args = [str(d / "x.npy") if a == "{x}" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "bnstat", *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=_env(), close_fds=True,
                          preexec_fn=lambda: os.close(1))
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1].endswith("standard output is closed"), err
    assert "Traceback" not in err
