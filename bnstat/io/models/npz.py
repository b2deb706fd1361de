"""``.npz`` model files: member keys (``features.0.weight``) in the zip's member
order, which is the order ``np.savez(**state_dict)`` wrote, i.e. the module
registration order of a PyTorch state_dict."""

from __future__ import annotations

import zipfile

import numpy as np

from bnstat.errors import InputError
from bnstat.io import magic
from bnstat.io.npy import read_npy_header
from bnstat.io.models.base import ModelFile, ModelFormat, ModelIndex, check_numeric


def index(path: str) -> ModelIndex:
    entries: dict = {}
    compressed = False
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                compressed |= info.compress_type != zipfile.ZIP_STORED
                with zf.open(info) as fh:
                    shape, _fortran, dtype = read_npy_header(fh, f"{path}:{name}")
                check_numeric(f"{path}:{name}", dtype)
                entries[name] = (shape, dtype)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{path}: not a valid .npz (zip) file ({exc})") from exc
    return ModelIndex(path, "npz", entries, compressed=compressed)


def read(path: str) -> ModelFile:
    idx = index(path)
    arrays: dict = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in idx.entries:
                arrays[name] = np.asarray(npz[name])
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: cannot read the .npz file ({exc})") from exc
    return ModelFile(**vars(idx), arrays=arrays)


def write(tmp: str, arrays: dict, template: ModelIndex | None) -> None:
    # zipfile + write_array rather than np.savez: any key is allowed (np.savez
    # takes them as keyword arguments, so a layer named "file" would clash)
    from bnstat.io.atomic import StreamOnly, is_special

    compressed = bool(template and template.compressed)
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with open(tmp, "wb") as fh, zipfile.ZipFile(StreamOnly(fh) if is_special(tmp) else fh, "w",
                                                compression=method, allowZip64=True) as zf:
        for name, a in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(a), allow_pickle=False)


FORMAT = ModelFormat(
    name="npz", label=".npz", extensions=(".npz",),
    sniff=lambda path, head: magic.is_zip(head),
    index=index, read=read, write=write,
    mismatch="not a .npz (zip) file (bad magic bytes {head!r})")
