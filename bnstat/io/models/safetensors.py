""".safetensors model files: an 8-byte little-endian header length, a JSON
header of ``{name: {dtype, shape, data_offsets}}`` (plus ``__metadata__``),
then the raw little-endian bytes. Read and written in pure numpy. ``BF16``
tensors are read as float32 (exact) and written back rounded to bfloat16
(nearest even); 8-bit float types are refused.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from bnstat.errors import InputError, OutputError
from bnstat.io import magic
from bnstat.io.base import open_input
from bnstat.io.models.base import ModelFile, ModelFormat, ModelIndex

# safetensors dtype codes <-> numpy (little-endian)
_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_NP_TO_ST = {np.dtype(v).newbyteorder("<") if np.dtype(v).itemsize > 1 else np.dtype(v): k
             for k, v in _ST_DTYPES.items()}
_ST_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit



def _st_header(path: str, fh, size: int) -> tuple[dict, int]:
    raw = fh.read(8)
    if len(raw) < 8:
        raise InputError(f"{path}: truncated .safetensors file (no header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > _ST_MAX_HEADER or 8 + n > size:
        raise InputError(f"{path}: corrupt .safetensors file (header length {n} of a {size}-byte file)")
    try:
        header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: corrupt .safetensors header ({str(exc)[:200]})") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt .safetensors header (not a JSON object)")
    return header, 8 + n


def _read(path: str, values: bool):
    with open_input(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        header, start = _st_header(path, fh, size)
        metadata = header.pop("__metadata__", None)
        entries: dict = {}
        stored: dict = {}
        spans = []
        for name, info in header.items():
            where = f"{path}:{name}"
            try:
                code = info["dtype"]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(v) for v in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{where}: corrupt .safetensors entry ({exc!r})") from exc
            if code == "BF16":
                dtype, itemsize = np.dtype(np.float32), 2
                stored[name] = "BF16"
            elif code in _ST_DTYPES:
                dtype = np.dtype(_ST_DTYPES[code])
                itemsize = dtype.itemsize
            else:
                raise InputError(f"{where}: safetensors dtype {code} is not supported",
                                 "bnstat reads F64, F32, F16, BF16 and integer tensors.")
            if min(shape, default=1) < 0 or end - begin != int(np.prod(shape)) * itemsize \
                    or begin < 0 or start + end > size:
                raise InputError(f"{where}: corrupt .safetensors entry (offsets {begin}..{end} "
                                 f"do not hold shape {shape} of {code})")
            entries[name] = (shape, dtype.newbyteorder("=") if dtype.itemsize > 1 else dtype)
            spans.append((begin, end, name, code, shape))
        index = ModelIndex(path, "safetensors", entries, ordered=False,
                           order_source="safetensors order (sorted)", metadata=metadata,
                           stored=stored)
        if not values:
            return index
        arrays: dict = {}
        for begin, end, name, code, shape in spans:
            fh.seek(start + begin)
            buf = fh.read(end - begin)
            if len(buf) != end - begin:
                raise InputError(f"{path}:{name}: truncated .safetensors data")
            if code == "BF16":
                bits = np.frombuffer(buf, "<u2").astype(np.uint32) << 16
                a = bits.view(np.float32).reshape(shape)
            else:
                a = np.frombuffer(buf, _ST_DTYPES[code]).reshape(shape)
                a = a.astype(a.dtype.newbyteorder("="))  # a writable native copy
            arrays[name] = a
    arrays = {n: arrays[n] for n in entries}
    return ModelFile(**vars(index), arrays=arrays)


def bf16_round(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    a = np.ascontiguousarray(values, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32).reshape(a.shape)
    return np.where(np.isnan(a), a, out)


def write(tmp: str, arrays: dict, template: ModelIndex | None) -> None:
    stored = template.stored if template is not None else {}
    header: dict = {}
    blobs = []
    offset = 0
    for name, a in arrays.items():
        a = np.asarray(a)
        if stored.get(name) == "BF16" and a.dtype.kind == "f":
            raw = (bf16_round(a).view(np.uint32) >> 16).astype("<u2").tobytes()
            code = "BF16"
        else:
            dt = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
            code = _NP_TO_ST.get(dt)
            if code is None:
                raise OutputError(f"{tmp}: {name}: dtype {a.dtype} cannot be stored in .safetensors")
            raw = np.ascontiguousarray(a, dtype=dt).tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if template is not None and template.metadata is not None and template.format == "safetensors":
        header = {"__metadata__": template.metadata, **header}  # (other formats' metadata is theirs)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for raw in blobs:
            fh.write(raw)


def index(path: str) -> ModelIndex:
    return _read(path, values=False)


def read(path: str) -> ModelFile:
    return _read(path, values=True)


FORMAT = ModelFormat(
    name="safetensors", label=".safetensors", extensions=(".safetensors",),
    sniff=lambda path, head: magic.is_safetensors(head), index=index, read=read, write=write,
    mismatch="not a .safetensors file (no JSON header after 8 bytes)")
