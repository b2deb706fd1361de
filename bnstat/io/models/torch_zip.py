"""PyTorch ``torch.save`` files (the zip format of torch >= 1.6), read without torch.

The archive holds ``<name>/data.pkl`` (the pickled object), one member
``<name>/data/<key>`` per storage (raw bytes, 64-byte aligned, stored), and
the records ``byteorder``, ``.format_version``, ``.storage_alignment`` and
``version``. The pickle is read by :class:`bnstat.io.models.
torch_pickle.SafeUnpickler`, which never runs code from the file; tensors become views
(storage offset, size, stride) of the storage members, memory-mapped where
stored as ``.npz`` members are. bfloat16 is read exactly as float32.

Here: the archive (:class:`TorchArchive`), tensor views, and the activation
sources (``.pt`` tensors and ``.safetensors`` tensors as inputs of
``moments``/``normalize``). The model layer (state_dict, module tree,
writing) is :mod:`bnstat.io.models.torch_pt`.
"""

from __future__ import annotations

import math
import os
import zipfile

import numpy as np

from bnstat.errors import InputError
from bnstat.io.base import ArraySource, check_dtype
from bnstat.io.npy import _Inflated, _open_file, _stored_offset, npy_name
from bnstat.io.models.torch_pickle import TORCH_DTYPES, Placeholder, SafeUnpickler, TensorRecord

TORCH_EXTS = (".pt", ".pth", ".ckpt", ".bin", ".tar")
RESAVE = "Re-save it with torch.save(model.state_dict(), path) (torch >= 1.6 writes the zip format)."


def _zip_names(path: str) -> list[str] | None:
    try:
        with _open_file(path) as fh, zipfile.ZipFile(fh) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None


def torch_prefix(names: list[str]) -> str | None:
    """The archive's ``<name>/`` prefix if the members are a torch.save zip, else None."""
    for n in names:
        if n.endswith("data.pkl") and n.count("/") == 1:
            return n[:-len("data.pkl")]
    return None


def is_torch_zip(path: str) -> bool:
    """Whether ``path`` is a torch zip (torch.save or TorchScript), not an .npz or .keras;
    a broken zip (truncated: no central directory) by its extension."""
    names = _zip_names(path)
    if names is None:
        return os.path.splitext(path)[1].lower() in TORCH_EXTS
    if not names:
        return False
    return torch_prefix(names) is not None or _torchscript(names)


def _torchscript(names: list[str]) -> bool:
    return any(n.count("/") == 1 and n.split("/", 1)[1] == "constants.pkl" for n in names) or \
        any(n.count("/") >= 2 and n.split("/")[1] == "code" for n in names)


def refuse_legacy(path: str, head: bytes) -> None:
    """Raise for the pre-1.6 torch.save formats (a raw pickle or a tar) or do nothing."""
    if head[:1] == b"\x80" or (len(head) > 262 and head[257:262] == b"ustar"):
        raise InputError(f"{path}: a legacy torch.save file (the pickle or tar format of torch < 1.6); "
                         "bnstat reads the zip format only", RESAVE)


class TorchArchive:
    """An opened torch.save zip: its members, byte order and unpickled object.

    Raises InputError: not a torch zip, TorchScript, missing records,
    encrypted or compressed-with-other-methods members, refused globals.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            with _open_file(path) as fh, zipfile.ZipFile(fh) as zf:
                infos = zf.infolist()
                names = [i.filename for i in infos]
                self.prefix = torch_prefix(names)
                if _torchscript(names):
                    raise InputError(f"{path}: a TorchScript archive (torch.jit.save); torch.jit is not "
                                     "supported", "Save the weights instead: torch.save(model."
                                     "state_dict(), path), or load it in torch and save its state_dict.")
                if self.prefix is None:
                    raise InputError(f"{path}: a zip without data.pkl: not a torch.save file")
                pkl = zf.read(self.prefix + "data.pkl")
                order = self.prefix + "byteorder"
                self.byteorder = zf.read(order).decode("ascii", "replace").strip() if order in names \
                    else "little"
                version = self.prefix + "version"
                self.version = zf.read(version) if version in names else b"3\n"
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
            raise InputError(f"{path}: not a valid torch.save (zip) file ({exc})",
                             "The file may be truncated: save it again.") from exc
        if self.byteorder not in ("little", "big"):
            raise InputError(f"{path}:{self.prefix}byteorder: unknown byte order {self.byteorder!r}")
        self.members = {i.filename: i for i in infos}
        self.name = self.prefix.rstrip("/")
        self.size = os.path.getsize(path)
        self.unpickler = SafeUnpickler(pkl, f"{path}:{self.prefix}data.pkl")
        self.root = self.unpickler.load_all()
        self._storages: dict[str, np.ndarray] = {}

    def member(self, key: str) -> str:
        return f"{self.prefix}data/{key}"

    def storage_bytes(self, key: str) -> np.ndarray:
        """The bytes of storage ``key`` (uint8, memory-mapped when stored). Raises InputError."""
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        name = self.member(key)
        where = f"{self.path}:{name}"
        info = self.members.get(name)
        if info is None:
            raise InputError(f"{where}: the storage member is missing (data.pkl refers to it)",
                             "The file is damaged: save it again.")
        if info.flag_bits & 0x1:
            raise InputError(f"{where}: the zip member is encrypted; bnstat cannot read it")
        offset = _stored_offset(self.path, info)
        if info.compress_type == zipfile.ZIP_STORED:
            if offset + info.file_size > self.size:
                raise InputError(f"{where}: truncated: the member ends past the end of the file",
                                 "The file is damaged: save it again.")
            data = np.memmap(self.path, np.uint8, "r", offset, (info.file_size,)) \
                if info.file_size else np.zeros(0, np.uint8)
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            import zlib

            with _Inflated(self.path, offset, info.compress_size) as fh:
                try:
                    raw = fh.read()
                except zlib.error as exc:
                    raise InputError(f"{where}: corrupt compressed data ({exc})") from exc
            if len(raw) != info.file_size:
                raise InputError(f"{where}: truncated compressed member")
            data = np.frombuffer(raw, np.uint8)
        else:
            raise InputError(f"{where}: zip compression method {info.compress_type} is not supported")
        self._storages[key] = data
        return data

    def dtype_of(self, rec: TensorRecord) -> tuple[np.dtype, bool]:
        """(numpy dtype of the stored elements, is-bfloat16). Raises InputError."""
        code = TORCH_DTYPES.get(rec.dtype)
        if code is None:
            raise InputError(f"{self.path}: a tensor of dtype torch.{rec.dtype}, which numpy cannot "
                             "hold", "Convert it in torch first, e.g. tensor.float().")
        bf16 = code == "bf16"
        dt = np.dtype("u2" if bf16 else ("?" if code == "b1" else code))
        if dt.itemsize > 1:
            dt = dt.newbyteorder("<" if self.byteorder == "little" else ">")
        return dt, bf16

    def view(self, rec: TensorRecord, where: str) -> tuple[np.ndarray, bool]:
        """The stored elements of a tensor as a read-only strided view, and is-bfloat16.

        Checks that the view lies inside the storage and the storage inside its
        member. Raises InputError naming ``where`` and the member.
        """
        dt, bf16 = self.dtype_of(rec)
        ref = rec.storage
        raw = self.storage_bytes(ref.key)
        member = f"{self.path}:{self.member(ref.key)}"
        nbytes = ref.numel if ref.storage_type.name == "UntypedStorage" else ref.numel * dt.itemsize
        if nbytes > raw.size:
            raise InputError(f"{member}: data.pkl says the storage holds {nbytes} bytes, the member "
                             f"{raw.size}", "The file is damaged: save it again.")
        size, stride = rec.size, rec.stride
        if len(size) != len(stride) or min(size, default=1) < 0 or min(stride, default=0) < 0 \
                or rec.offset < 0:
            raise InputError(f"{where}: corrupt tensor (size {size}, stride {stride})")
        if math.prod(size) == 0:
            return np.zeros(size, dt), bf16
        last = rec.offset + sum((n - 1) * s for n, s in zip(size, stride))
        if (last + 1) * dt.itemsize > nbytes:
            raise InputError(f"{where}: the tensor (offset {rec.offset}, size {size}, stride {stride}) "
                             f"reaches past the end of its storage {self.member(ref.key)} "
                             f"({nbytes} bytes)", "The file is damaged: save it again.")
        elements = raw[:nbytes - nbytes % dt.itemsize].view(dt)
        view = np.lib.stride_tricks.as_strided(elements[rec.offset:], shape=size,
                                               strides=[s * dt.itemsize for s in stride],
                                               writeable=False)
        return view, bf16

    def array(self, rec: TensorRecord, where: str) -> np.ndarray:
        """A tensor's values: a native, writable copy (bfloat16 as float32)."""
        view, bf16 = self.view(rec, where)
        try:
            return to_native(view, bf16)
        except (MemoryError, ValueError) as exc:  # a zero-stride view claiming a huge size
            raise InputError(f"{where}: the tensor of size {rec.size} cannot be held in memory "
                             f"({exc})") from exc


def to_native(view: np.ndarray, bf16: bool) -> np.ndarray:
    """A native-order copy of ``view``; bfloat16 bits (uint16) widened exactly to float32."""
    if bf16:
        bits = view.astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.array(view, dtype=view.dtype.newbyteorder("=") if view.dtype.itemsize > 1 else view.dtype)


def tensors_of(root, stem: str) -> list[tuple[str, TensorRecord]]:
    """The tensors of an activation file: a bare tensor (named ``stem``), or the
    tensors of a dict (nested dicts and lists named ``outer/inner``)."""
    if isinstance(root, TensorRecord):
        return [(stem, root)]
    if isinstance(root, Placeholder):
        from bnstat.io.models.torch_pt import module_tree

        return list(module_tree(root).tensors.items())
    found: list = []

    def walk(obj, prefix):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            name = f"{prefix}{k}"
            if isinstance(v, TensorRecord):
                found.append((name, v))
            elif isinstance(v, dict | list | tuple):
                walk(v, name + "/")

    if isinstance(root, dict | list | tuple):
        walk(root, "")
    return found


class MappedSource(ArraySource):
    """A tensor read as chunks of rows of a (memory-mapped) view: .pt and .safetensors."""

    def __init__(self, kind: str, path: str, name: str, opener, shape, dtype: np.dtype, bf16: bool):
        self.kind, self.path, self.name = kind, path, name
        self.opener = opener  # () -> the stored view (re-opened for each pass)
        self.shape = tuple(shape)
        self.bf16 = bf16
        self.dtype = np.dtype(np.float32) if bf16 else dtype.newbyteorder("=")
        check_dtype(self.dtype, self.where)

    def iter_chunks(self, rows: int):
        view = self.opener()
        for r0 in range(0, self.shape[0], rows):
            part = view[r0:r0 + rows]
            if self.bf16:
                yield r0, to_native(part, True)
            elif part.flags.c_contiguous and part.dtype.isnative:
                yield r0, part
            else:
                yield r0, np.ascontiguousarray(part, dtype=self.dtype)


def open_torch(path: str, selected) -> list[ArraySource]:
    """The tensors of a torch.save file as activation sources. Raises InputError."""
    archive = TorchArchive(path)
    sources = []
    for name, rec in tensors_of(archive.root, npy_name(path)):
        chosen = selected(name)
        if chosen is False:
            continue
        code = TORCH_DTYPES.get(rec.dtype)
        if chosen is None and (code is None or code == "b1" or code.startswith("c")):
            continue  # a bool mask or complex buffer of a checkpoint: not activations (-d names it)
        where = f"{path}:{name}"
        view, bf16 = archive.view(rec, where)  # validated now, re-opened per pass

        def opener(rec=rec, where=where):
            return TorchArchive(path).view(rec, where)[0]

        sources.append(MappedSource("pt", path, name, opener, view.shape, view.dtype, bf16))
    return sources


def open_safetensors(path: str, selected) -> list[ArraySource]:
    """The tensors of a .safetensors file as activation sources. Raises InputError."""
    from bnstat.io.models.safetensors import _ST_DTYPES, _st_header
    from bnstat.io.models.safetensors import index as st_index

    index = st_index(path)  # validates every entry
    with _open_file(path) as fh:
        header, start = _st_header(path, fh, os.path.getsize(path))
    sources = []
    for name, (shape, _dtype) in index.entries.items():
        if selected(name) is False:
            continue
        info = header[name]
        bf16 = info["dtype"] == "BF16"
        dt = np.dtype("<u2" if bf16 else _ST_DTYPES[info["dtype"]])
        begin = start + int(info["data_offsets"][0])

        def opener(begin=begin, dt=dt, shape=shape):
            count = math.prod(shape)
            if count == 0:
                return np.zeros(shape, dt)
            return np.memmap(path, dt, "r", begin, (count,)).reshape(shape)

        sources.append(MappedSource("safetensors", path, name, opener, shape, dt, bf16))
    return sources
