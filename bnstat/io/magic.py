"""The magic bytes of every file format bnstat reads, defined once.

:func:`container` names a file's container from its first bytes
(``HEAD_BYTES`` of them); the data reader (:func:`bnstat.io.sniff_data`) and
the model-file registry (:mod:`bnstat.io.models`) both decide from it.
"""

from __future__ import annotations

import os

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
HDF5_EXTS = (".h5", ".hdf5", ".hdf")
HEAD_BYTES = 16


def extension(path: str) -> str:
    """The lower-case extension of ``path`` ('' without one)."""
    return os.path.splitext(path)[1].lower()


def is_npy(head: bytes) -> bool:
    return head.startswith(NPY_MAGIC)


def is_zip(head: bytes) -> bool:
    return head.startswith(ZIP_MAGICS)


def is_safetensors(head: bytes) -> bool:
    """An 8-byte little-endian header length, then the JSON header's ``{``."""
    return len(head) >= 9 and head[8:9] == b"{"


def is_hdf5(path: str, head: bytes) -> bool:
    """The HDF5 signature at byte 0, or (an .h5 name) after a user block at 512, 1024, ..."""
    if head.startswith(HDF5_MAGIC):
        return True
    if extension(path) in HDF5_EXTS:
        from bnstat.io.hdf5 import is_hdf5 as h5py_is_hdf5

        return h5py_is_hdf5(path)
    return False


def container(path: str, head: bytes) -> str | None:
    """'npy', 'zip', 'hdf5', 'safetensors' or None (unknown), from the first bytes."""
    if is_npy(head):
        return "npy"
    if is_zip(head):
        return "zip"
    if is_hdf5(path, head):
        return "hdf5"
    if is_safetensors(head):
        return "safetensors"
    return None
