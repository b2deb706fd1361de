"""bnstat.io.magic: containers told apart by their first bytes, and the data sniffer on top."""

from __future__ import annotations

import numpy as np
import pytest

from bnstat.errors import InputError
from bnstat.io import magic, sniff


def head(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(magic.HEAD_BYTES)


def test_every_container_by_its_bytes_whatever_its_name(tmp_path):
    h5py = pytest.importorskip("h5py", reason="HDF5 files")
    np.save(tmp_path / "a.npy", np.ones(3))
    np.savez(tmp_path / "b.npz", x=np.ones(3))
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["x"] = np.ones(3)
    header = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (tmp_path / "d.bin").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    want = {"a.npy": "npy", "b.npz": "zip", "c.h5": "hdf5", "d.bin": "safetensors"}
    for name, kind in want.items():
        renamed = tmp_path / ("renamed-" + name.split(".")[0])
        renamed.write_bytes((tmp_path / name).read_bytes())
        assert magic.container(str(renamed), head(renamed)) == kind, name
    assert magic.container("x.txt", b"hello world, no magic") is None


def test_hdf5_with_a_user_block_is_found_by_its_extension(tmp_path):
    h5py = pytest.importorskip("h5py", reason="HDF5 files")
    with h5py.File(tmp_path / "u.h5", "w", userblock_size=512) as f:
        f["x"] = np.ones((2, 2))
    assert not head(tmp_path / "u.h5").startswith(magic.HDF5_MAGIC)
    assert magic.container(str(tmp_path / "u.h5"), head(tmp_path / "u.h5")) == "hdf5"
    assert sniff(str(tmp_path / "u.h5")) == "hdf5"
    (tmp_path / "u.dat").write_bytes((tmp_path / "u.h5").read_bytes())
    assert magic.container(str(tmp_path / "u.dat"), head(tmp_path / "u.dat")) is None


@pytest.mark.parametrize(("name", "content", "message"), [
    ("a.npy", b"not numpy", r"a\.npy: not a \.npy array \(bad magic bytes"),
    ("a.npz", b"not a zip", r"a\.npz: not a \.npz \(zip\) file"),
    ("a.h5", b"not hdf5 at all", r"a\.h5: not an HDF5 file \(no HDF5 signature\)"),
    ("a.txt", b"some text", r"a\.txt: unknown file format"),
    ("e.npy", b"", r"e\.npy: empty file"),
])
def test_the_data_sniffer_refuses_with_the_file_name(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        sniff(str(tmp_path / name))
