"""Model files: named float arrays in .npz, HDF5 or .safetensors.

A model is read whole (weights are small next to activations), as an
insertion-ordered mapping from array name to numpy array:

- ``.npz``: member keys (``features.0.weight``), in the zip's member order,
  which is the order ``np.savez(**state_dict)`` wrote, i.e. the module
  registration order of a PyTorch state_dict.
- HDF5: dataset paths without the leading ``/`` (``model_weights/conv2d/
  conv2d/kernel:0``), walked recursively. A Keras weight file names its
  layers in model order in the ``layer_names`` attribute and each layer's
  weights in ``weight_names``: that order is used when the file has it;
  otherwise h5py's iteration order, which is alphabetical unless the groups
  track creation order.
- ``.safetensors``: an 8-byte little-endian header length, a JSON header of
  ``{name: {dtype, shape, data_offsets}}`` (plus ``__metadata__``), then
  the raw little-endian bytes. Read and written in pure numpy. ``BF16``
  tensors are read as float32 (exact) and written back rounded to bfloat16
  (nearest even); 8-bit float types are refused.

Writes go through :func:`bnstat.io.atomic.atomic_path`. An HDF5 output is a
copy of the input file changed in place, so groups, attributes, chunking and
compression survive; Keras' ``layer_names``/``weight_names`` attributes are
updated for added and dropped weights.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from dataclasses import dataclass, field

import numpy as np

from bnstat.errors import InputError, OutputError
from bnstat.io.atomic import atomic_path
from bnstat.io.base import read_head

__all__ = ["ModelIndex", "ModelFile", "model_format", "index_model", "read_model",
           "write_model", "output_format"]

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
NPY_MAGIC = b"\x93NUMPY"
HDF5_EXTS = (".h5", ".hdf5", ".hdf", ".keras.h5", ".weights.h5")
FORMAT_EXTS = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5",
               ".safetensors": "safetensors"}

# safetensors dtype codes <-> numpy (little-endian)
_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
_NP_TO_ST = {np.dtype(v).newbyteorder("<") if np.dtype(v).itemsize > 1 else np.dtype(v): k
             for k, v in _ST_DTYPES.items()}
_ST_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


@dataclass
class ModelIndex:
    """The arrays of a model file without their values: names in model order.

    ``ordered`` says whether the order of ``entries`` follows the model
    (PyTorch registration order, Keras layer order) or is merely the file's
    (alphabetical HDF5 groups, safetensors' sorted tensors); ``order_source``
    says which, for the plan.
    """

    path: str | None
    format: str  # "npz", "hdf5", "safetensors" or "memory"
    entries: dict[str, tuple[tuple[int, ...], np.dtype]]
    ordered: bool = True
    order_source: str = "file order"
    compressed: bool = False  # npz: members were deflated
    metadata: dict | None = None  # safetensors __metadata__
    stored: dict[str, str] = field(default_factory=dict)  # name -> stored dtype code (BF16)
    config: dict | None = None  # a Keras HDF5 file's model_config (layer classes, eps, graph)
    layer_sequence: list[str] | None = None  # a Keras HDF5 file's layer groups, weightless included

    @property
    def label(self) -> str:
        return self.path if self.path is not None else "<arrays>"


@dataclass
class ModelFile(ModelIndex):
    """A model file read whole: ``arrays`` maps names to arrays in model order."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def round_stored(self, name: str, values: np.ndarray) -> np.ndarray:
        """``values`` as they will read back once written (bfloat16 rounding)."""
        if self.stored.get(name) == "BF16":
            return _bf16_round(values)
        return values


# ---- format detection --------------------------------------------------------

def _head(path: str, n: int = 16) -> bytes:
    return read_head(path, n, "Give a model file (.npz, .h5, .safetensors).")


def model_format(path: str) -> str:
    """'npz', 'hdf5' or 'safetensors', from the first bytes. Raises InputError."""
    head = _head(path)
    if not head:
        raise InputError(f"{path}: empty file")
    if head.startswith(ZIP_MAGICS):
        return "npz"
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(NPY_MAGIC):
        raise InputError(f"{path}: a single .npy array, not a model file",
                         "A model is a .npz, HDF5 or .safetensors file of named arrays.")
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    lower = path.lower()
    if lower.endswith((".h5", ".hdf5", ".hdf")):
        import h5py  # HDF5 allows a user block before the signature

        try:
            if h5py.is_hdf5(path):
                return "hdf5"
        except OSError:
            pass
        raise InputError(f"{path}: not an HDF5 file (no HDF5 signature)")
    if lower.endswith(".safetensors"):
        raise InputError(f"{path}: not a .safetensors file (no JSON header after 8 bytes)")
    if lower.endswith(".npz"):
        raise InputError(f"{path}: not a .npz (zip) file (bad magic bytes {head[:4]!r})")
    raise InputError(f"{path}: unknown model file format",
                     "bnstat reads models as .npz, HDF5 (.h5) and .safetensors files of named arrays.")


def output_format(path: str, default: str | None) -> str | None:
    """The format an output path asks for by its extension, else ``default``."""
    lower = path.lower()
    for ext, fmt in FORMAT_EXTS.items():
        if lower.endswith(ext):
            return fmt
    return default


# ---- reading -----------------------------------------------------------------

def index_model(path: str) -> ModelIndex:
    """Names, shapes and dtypes of a model file, in model order, values unread.

    Raises InputError for a missing, unreadable or corrupt file.
    """
    fmt = model_format(path)
    if fmt == "npz":
        return _npz_index(path)
    if fmt == "hdf5":
        return _hdf5_read(path, values=False)
    return _st_read(path, values=False)


def read_model(path: str) -> ModelFile:
    """Every array of a model file, in model order. Raises InputError."""
    fmt = model_format(path)
    if fmt == "npz":
        return _npz_read(path)
    if fmt == "hdf5":
        return _hdf5_read(path, values=True)
    return _st_read(path, values=True)


def _check_numeric(where: str, dtype: np.dtype) -> None:
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "fiub":
        raise InputError(f"{where}: dtype {dtype} is not numeric; a model file holds numeric arrays")


def _npy_header(fh, where: str):
    """(shape, dtype) of a .npy stream's header. Raises InputError."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = fmt.read_array_header_1_0(fh, max_header_size=1 << 20)
        else:
            shape, _fortran, dtype = fmt.read_array_header_2_0(fh, max_header_size=1 << 20)
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise InputError(f"{where}: not a .npy array ({exc})") from exc
    return tuple(int(s) for s in shape), dtype


def _npz_index(path: str) -> ModelIndex:
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
                    shape, dtype = _npy_header(fh, f"{path}:{name}")
                _check_numeric(f"{path}:{name}", dtype)
                entries[name] = (shape, dtype)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{path}: not a valid .npz (zip) file ({exc})") from exc
    return ModelIndex(path, "npz", entries, compressed=compressed)


def _npz_read(path: str) -> ModelFile:
    index = _npz_index(path)
    arrays: dict = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in index.entries:
                arrays[name] = np.asarray(npz[name])
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: cannot read the .npz file ({exc})") from exc
    return ModelFile(**vars(index), arrays=arrays)


def _attr_names(value) -> list[str]:
    """A Keras ``layer_names``/``weight_names`` attribute as a list of str."""
    out = []
    for v in np.atleast_1d(np.asarray(value)).ravel():
        out.append(v.decode("utf-8") if isinstance(v, bytes) else str(v))
    return out


def _keras_order(f) -> tuple[list[str], list[str]] | None:
    """(dataset names in Keras model order, layer group paths in model order), from the
    layer_names/weight_names attributes of a Keras weight file; None without them."""
    for root in (f, f.get("model_weights")):
        if root is None or "layer_names" not in root.attrs:
            continue
        names, groups = [], []
        base = root.name.strip("/")
        for layer in _attr_names(root.attrs["layer_names"]):
            groups.append("/".join(p for p in (base, layer) if p))
            group = root.get(layer)
            if group is None or "weight_names" not in group.attrs:
                continue
            for weight in _attr_names(group.attrs["weight_names"]):
                full = "/".join(p for p in (base, layer, weight) if p)
                names.append(full)
        return names, groups
    return None


def _keras_config(f) -> dict | None:
    """The ``model_config`` JSON attribute of a Keras HDF5 model, or None."""
    raw = f.attrs.get("model_config")
    if raw is None:
        return None
    try:
        doc = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else str(raw))
    except (ValueError, UnicodeDecodeError):
        return None  # a broken config is ignored: names and shapes still pair
    return doc if isinstance(doc, dict) else None


def _hdf5_walk(f):
    """(name, dataset, tracked) for every dataset; tracked: every group keeps creation order."""
    import h5py

    found = []
    tracked = [True]

    def visit(group, prefix):
        try:
            if not group.id.get_create_plist().get_link_creation_order():
                tracked[0] = False
        except Exception:  # an old HDF5 library: assume alphabetical
            tracked[0] = False
        for key in group:
            name = f"{prefix}{key}"
            try:
                obj = group[key]
            except (KeyError, OSError) as exc:
                raise InputError(f"{f.filename}:{name}: cannot be read ({exc})") from exc
            if isinstance(obj, h5py.Group):
                visit(obj, name + "/")
            elif isinstance(obj, h5py.Dataset):
                found.append((name, obj))

    visit(f, "")
    return found, tracked[0]


def _hdf5_read(path: str, values: bool):
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc
    entries: dict = {}
    arrays: dict = {}
    try:
        with f:
            found, tracked = _hdf5_walk(f)
            numeric = {}
            for name, ds in found:
                dt = ds.dtype
                if dt.hasobject or dt.fields is not None or dt.kind not in "fiub" or ds.shape is None:
                    continue  # strings and the like: copied verbatim, never folded
                numeric[name] = ds
            keras = _keras_order(f)
            order = list(numeric)
            ordered, source = tracked, ("creation order" if tracked else "alphabetical (HDF5)")
            sequence = None
            if keras is not None:
                keras, sequence = keras
                known = [n for n in keras if n in numeric]
                rest = [n for n in order if n not in set(known)]
                order = known + rest
                ordered, source = True, "Keras layer order"
            config = _keras_config(f)
            for name in order:
                ds = numeric[name]
                entries[name] = (tuple(int(s) for s in ds.shape), ds.dtype)
                if values:
                    arrays[name] = ds[()]
    except OSError as exc:
        raise InputError(f"{path}: cannot read the HDF5 file ({exc})") from exc
    index = ModelIndex(path, "hdf5", entries, ordered=ordered, order_source=source, config=config,
                       layer_sequence=sequence)
    if not values:
        return index
    for name, a in arrays.items():
        if isinstance(a, np.ndarray) and not a.dtype.isnative:
            arrays[name] = a.astype(a.dtype.newbyteorder("="))
        elif not isinstance(a, np.ndarray):
            arrays[name] = np.asarray(a)
    return ModelFile(**vars(index), arrays=arrays)


def _st_header(path: str, fh, size: int) -> tuple[dict, int]:
    raw = fh.read(8)
    if len(raw) < 8:
        raise InputError(f"{path}: truncated .safetensors file (no header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > _ST_MAX_HEADER or 8 + n > size:
        raise InputError(f"{path}: corrupt .safetensors file (header length {n} of a {size}-byte file)")
    try:
        header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: corrupt .safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt .safetensors header (not a JSON object)")
    return header, 8 + n


def _st_read(path: str, values: bool):
    try:
        size = os.path.getsize(path)
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    with fh:
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


def _bf16_round(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    a = np.ascontiguousarray(values, dtype=np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32).reshape(a.shape)
    return np.where(np.isnan(a), a, out)


# ---- writing -----------------------------------------------------------------

def write_model(path: str, arrays: dict[str, np.ndarray], *, fmt: str | None = None,
                template: ModelIndex | None = None, force: bool = False, inputs=()) -> str:
    """Write ``arrays`` (in order) to ``path`` atomically; returns the format written.

    ``fmt`` defaults to the path's extension, else the template's format. With
    an HDF5 ``template`` read from a file, the output is that file with the
    changed datasets rewritten in place, the missing ones deleted and the new
    ones created, so everything else (groups, attributes, chunks, filters)
    is kept. Raises OutputError (and UsageProblem-free: an unknown format is
    an OutputError naming the path).
    """
    fmt = fmt or output_format(path, template.format if template is not None else None)
    if fmt not in ("npz", "hdf5", "safetensors"):
        raise OutputError(f"{path}: cannot tell the model format from the extension",
                          "Use .npz, .h5 or .safetensors.")
    with atomic_path(path, force=force, inputs=inputs) as tmp:
        try:
            if fmt == "npz":
                _npz_write(tmp, arrays, compressed=bool(template and template.compressed))
            elif fmt == "safetensors":
                _st_write(tmp, arrays, template)
            else:
                _hdf5_write(tmp, path, arrays, template)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return fmt


def _npz_write(tmp: str, arrays: dict, compressed: bool) -> None:
    # zipfile + write_array rather than np.savez: any key is allowed (np.savez
    # takes them as keyword arguments, so a layer named "file" would clash)
    from bnstat.io.atomic import StreamOnly, is_special

    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with open(tmp, "wb") as fh, zipfile.ZipFile(StreamOnly(fh) if is_special(tmp) else fh, "w",
                                                compression=method, allowZip64=True) as zf:
        for name, a in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(a), allow_pickle=False)


def _st_write(tmp: str, arrays: dict, template: ModelIndex | None) -> None:
    stored = template.stored if template is not None else {}
    header: dict = {}
    blobs = []
    offset = 0
    for name, a in arrays.items():
        a = np.asarray(a)
        if stored.get(name) == "BF16" and a.dtype.kind == "f":
            raw = (_bf16_round(a).view(np.uint32) >> 16).astype("<u2").tobytes()
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
    if template is not None and template.metadata is not None:
        header = {"__metadata__": template.metadata, **header}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for raw in blobs:
            fh.write(raw)


def _hdf5_write(tmp: str, path: str, arrays: dict, template: ModelIndex | None) -> None:
    from bnstat.io.atomic import hdf5_file

    if template is None or template.format != "hdf5" or template.path is None:
        with hdf5_file(tmp, path) as (f, _check):
            for name, a in arrays.items():
                f.create_dataset(name, data=np.asarray(a))
        return
    shutil.copyfile(template.path, tmp)
    with hdf5_file(tmp, path, "r+") as (f, _check):
        _hdf5_edit(f, arrays, template)


def _hdf5_edit(f, arrays: dict, template: ModelIndex) -> None:
    old = template.entries
    dropped = [n for n in old if n not in arrays]
    names = list(arrays)
    added = [(n, names[i - 1] if i else None) for i, n in enumerate(names) if n not in old]
    for name, a in arrays.items():
        if name in old:
            ds = f[name]
            a = np.asarray(a)
            if ds.shape == a.shape and ds.dtype == a.dtype:
                if not _same(template, name, a):
                    ds[()] = a
            else:  # a changed shape or dtype: recreate it, keeping attributes
                attrs = dict(ds.attrs)
                del f[name]
                new = f.create_dataset(name, data=a)
                for k, v in attrs.items():
                    new.attrs[k] = v
    for name in dropped:
        del f[name]
    emptied = _remove_emptied_groups(f, dropped)
    for name, _anchor in added:
        f.create_dataset(name, data=np.asarray(arrays[name]))
    _fix_keras_attrs(f, dropped, added, emptied)


def _same(template: ModelIndex, name: str, a: np.ndarray) -> bool:
    held = getattr(template, "arrays", {}).get(name)
    return held is a


def _remove_emptied_groups(f, dropped: list[str]) -> set[str]:
    """Delete the groups left empty by deleting ``dropped``; their names."""
    emptied: set[str] = set()
    parents = sorted({n.rsplit("/", 1)[0] for n in dropped if "/" in n}, key=len, reverse=True)
    for parent in parents:
        path = parent
        while path:
            group = f.get(path)
            if group is None or len(group) or len(group.attrs.keys() - {"weight_names"}):
                break
            del f[path]
            emptied.add(path)
            path = path.rsplit("/", 1)[0] if "/" in path else ""
    return emptied


def _attr_like(names: list[str], original):
    if len(names) == 0:
        return np.array([], dtype=np.asarray(original).dtype if np.asarray(original).size else "S1")
    return np.array([n.encode("utf-8") for n in names])


def _fix_keras_attrs(f, dropped: list[str], added, emptied: set[str]) -> None:
    """Keep Keras' layer_names/weight_names attributes in step with the datasets."""
    import h5py

    for root in (f, f.get("model_weights")):
        if not isinstance(root, h5py.Group) or "layer_names" not in root.attrs:
            continue
        base = root.name.strip("/")
        layers = _attr_names(root.attrs["layer_names"])
        kept = [ln for ln in layers if "/".join(p for p in (base, ln) if p) not in emptied]
        if kept != layers:
            root.attrs["layer_names"] = _attr_like(kept, root.attrs["layer_names"])
        for layer in kept:
            group = root.get(layer)
            if group is None or "weight_names" not in group.attrs:
                continue
            prefix = group.name.strip("/") + "/"
            weights = _attr_names(group.attrs["weight_names"])
            new = [w for w in weights if prefix + w not in set(dropped)]
            for name, anchor in added:
                if not name.startswith(prefix):
                    continue
                rel = name[len(prefix):]
                if anchor is not None and anchor.startswith(prefix) and anchor[len(prefix):] in new:
                    new.insert(new.index(anchor[len(prefix):]) + 1, rel)
                else:
                    new.append(rel)
            if new != weights:
                group.attrs["weight_names"] = _attr_like(new, group.attrs["weight_names"])
