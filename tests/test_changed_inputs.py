"""An input rewritten or truncated by another program while bnstat reads it (issue 17).

Once SIGBUS (a memory map past the new end) with a temporary output left
behind; now exit 1 with "the input changed while it was read", no output,
no temporary file (bnstat/io/guard.py: a read lease while the file is mapped).
"""

from __future__ import annotations

import os
import time
import zipfile

import numpy as np
import pytest
from test_faults import start, temp_files, wait_until_working

SHAPE = (20_000, 1000)  # 80 MB of float32
# 4 KiB chunks: one row each, some 3 s of reading on an idle machine, so the change lands
# while the file is read (at 256 KiB an idle machine finished before it, exit 0)
SLOW = ["--layout", "NC", "--chunk-size", "4KiB", "--threads", "1"]


def make(folder, kind):
    a = np.lib.format.open_memmap(folder / "v.npy", "w+", np.float32, SHAPE)
    a[:] = 1.0
    a.flush()
    del a
    if kind == "npy":
        return folder / "v.npy"
    with zipfile.ZipFile(folder / "v.npz", "w") as zf:  # stored: the member is mapped
        zf.write(folder / "v.npy", "x.npy")
    os.unlink(folder / "v.npy")
    return folder / "v.npz"


def truncate(path):
    os.truncate(path, 4096)


def save_over(path):
    np.save(path, np.zeros((4, 4)))  # opens with O_TRUNC: waits on the lease


@pytest.mark.slow
@pytest.mark.parametrize("kind, change", [("npy", truncate), ("npy", save_over), ("npz", truncate)],
                         ids=["npy-truncate", "npy-np.save", "npz-truncate"])
@pytest.mark.parametrize("command", ["moments", "normalize"])
def test_input_changed_while_read(tmp_path, kind, change, command):
    data = make(tmp_path, kind)
    out = tmp_path / ("o.npy" if command == "normalize" and kind == "npy" else
                      "o.npz" if command == "normalize" else "s.json")
    proc = start([command, data, *SLOW, "-o", out])
    wait_until_working(proc, tmp_path, data, want_temp=command == "normalize", min_read=1 << 62)
    t0 = time.monotonic()
    change(data)  # waits on bnstat's lease, then goes on
    waited = time.monotonic() - t0
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 1, f"exit {proc.returncode} (-7 is SIGBUS)\n{err}"
    assert f"{data}" in err and "the input changed while it was read" in err, err
    assert "Traceback" not in err
    assert not out.exists() and temp_files(tmp_path) == []
    assert waited < 30, "the writer was held until the lease timed out"
