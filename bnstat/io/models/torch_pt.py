"""A torch.save file as a model: its state_dict, its module tree, and writing it back.

- The state_dict is the top-level object when it holds tensors, else the
  first of the keys in :data:`STATE_KEYS` that holds one (a checkpoint's
  ``state_dict``, ``model``, ``ema``...), else the first dict of tensors;
  a pickled whole module (``torch.save(model)``) gives the names its
  ``state_dict()`` would (parameters, persistent buffers, children, in
  registration order).
- Prefixes every name shares (DDP's ``module.``, Lightning's ``model.``,
  ``torch.compile``'s ``_orig_mod.``) are stripped, and put back on write.
- A pickled module also yields ``modules``: path -> :class:`ModuleInfo`
  (class name and plain attributes: Conv2d or ConvTranspose2d, groups,
  stride, BatchNorm eps and momentum), recorded from the pickle's state,
  nothing instantiated. Classes outside ``torch.nn`` are recorded by name.

Writing re-emits the whole pickled object with the new tensors (so epoch,
optimizer state and hyper-parameters are kept), storages as 64-byte aligned
stored members, as torch.save lays them out.
"""

from __future__ import annotations

import math
import struct
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from bnstat.errors import InputError, OutputError
from bnstat.io import magic
from bnstat.io.models.base import ModelFile, ModelFormat
from bnstat.io.models.safetensors import bf16_round
from bnstat.io.models.torch_zip import RESAVE, TORCH_EXTS, TorchArchive, is_torch_zip, refuse_legacy
from bnstat.io.models.torch_pickle import (DTYPE_STORAGE, STORAGE_DTYPES, GraphPickler, Placeholder,
                                   TensorRecord, TorchGlobal, placeholder)

STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "model_ema",
              "ema", "state_dict_ema", "ema_state_dict", "weights", "params")
PREFIXES = ("module.", "_orig_mod.", "model.")
_PLAIN = (bool, int, float, str, type(None))


@dataclass
class ModuleInfo:
    """One module of a pickled whole module: ``cls`` is its qualified class name."""

    cls: str
    attrs: dict = field(default_factory=dict)  # plain attributes (torch.nn classes only)

    @property
    def kind(self) -> str:
        """The class name alone: 'Conv2d', 'ConvTranspose2d', 'BatchNorm2d'."""
        return self.cls.rsplit(".", 1)[-1]


@dataclass
class Tree:
    """What walking a pickled module gives."""

    modules: dict = field(default_factory=dict)  # path -> ModuleInfo
    tensors: dict = field(default_factory=dict)  # state_dict name -> TensorRecord
    slots: dict = field(default_factory=dict)  # name -> (holder, key, kind), None slots included
    owners: dict = field(default_factory=dict)  # module path -> (parent _modules, child name, module)


def _plain(v) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, tuple | list) and all(isinstance(x, _PLAIN) for x in v))


def module_tree(root: Placeholder) -> Tree:
    """The module tree and state_dict tensors of a pickled whole module."""
    tree = Tree()

    def walk(obj, path: str, seen: set):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        cls = type(obj)
        state = obj.state if isinstance(obj.state, dict) else {}
        torch_nn = cls.module.startswith("torch.nn")
        attrs = {k: v for k, v in state.items() if not k.startswith("_") and _plain(v)} if torch_nn else {}
        tree.modules[path] = ModuleInfo(cls.qualname, attrs)
        prefix = path + "." if path else ""
        skip = state.get("_non_persistent_buffers_set") or set()
        for kind in ("_parameters", "_buffers"):
            holder = state.get(kind)
            if not isinstance(holder, dict):
                continue
            for key, value in holder.items():
                if kind == "_buffers" and key in skip:
                    continue
                tree.slots[prefix + key] = (holder, key, kind)
                if isinstance(value, TensorRecord):
                    tree.tensors[prefix + key] = value
        children = state.get("_modules")
        if isinstance(children, dict):
            for name, child in children.items():
                if isinstance(child, Placeholder):
                    tree.owners[prefix + name] = (children, name, child)
                    walk(child, prefix + name, seen)

    walk(root, "", set())
    return tree


def _holds_tensors(obj) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, TensorRecord) for v in obj.values())


def find_state(root, depth: int = 0):
    """(container, how) of the state_dict: a dict of tensors or a pickled module.

    ``how`` says where it was found, for ``info`` and the plan; None, None
    when there is none.
    """
    if isinstance(root, Placeholder) and isinstance(root.state, dict) and "_modules" in root.state:
        return root, f"a pickled whole module ({type(root).qualname})"
    if not isinstance(root, dict) or depth > 2:
        return None, None
    if _holds_tensors(root):
        return root, "a state_dict"
    keys = [k for k in STATE_KEYS if k in root] + [k for k in root if k not in STATE_KEYS]
    for key in keys:
        found, how = find_state(root[key], depth + 1)
        if found is not None:
            return found, f"{how} under {key!r}"
    return None, None


def _strip(names: list[str]) -> str:
    prefix = ""
    changed = True
    while changed and names:
        changed = False
        for p in PREFIXES:
            if all(n.startswith(prefix + p) and len(n) > len(prefix + p) for n in names):
                prefix += p
                changed = True
                break
    return prefix


@dataclass
class TorchModel(ModelFile):
    """A torch.save file as a model (``format`` 'torch'); ``arrays`` empty until read.

    ``modules``: path -> :class:`ModuleInfo` for a pickled whole module
    (paths without the stripped ``prefix``), else empty; ``naming`` says
    where the state_dict was found.
    """

    modules: dict = field(default_factory=dict)
    naming: str = ""
    prefix: str = ""
    archive: object = None
    container: object = None
    records: dict = field(default_factory=dict)  # name (prefix stripped) -> TensorRecord
    tree: object = None


def read_torch(path: str, values: bool = True) -> TorchModel:
    """A torch.save file as a model. Raises InputError (refused globals, no state_dict...)."""
    from bnstat.io.base import read_head

    head = read_head(path, 263)
    if not magic.is_zip(head):
        refuse_legacy(path, head)
        raise InputError(f"{path}: not a torch.save (zip) file", RESAVE)
    archive = TorchArchive(path)
    container, how = find_state(archive.root)
    if container is None:
        raise InputError(f"{path}: a torch.save file without a state_dict (no dict of tensors, "
                         "no pickled module)", "Save the model's weights: torch.save(model."
                         "state_dict(), path).")
    tree = None
    if isinstance(container, Placeholder):
        tree = module_tree(container)
        named = tree.tensors
    else:
        named = {k: v for k, v in container.items() if isinstance(k, str) and isinstance(v, TensorRecord)}
    prefix = _strip(list(named))
    entries, records, stored, arrays = {}, {}, {}, {}
    for full, rec in named.items():
        name = full[len(prefix):]
        where = f"{path}:{full}"
        dt, bf16 = archive.dtype_of(rec) if rec.dtype in _NUMERIC else (None, False)
        if dt is None:
            continue  # complex and the like: kept in the file, never folded
        records[name] = rec
        view, bf16 = archive.view(rec, where)
        entries[name] = (tuple(rec.size), np.dtype(np.float32) if bf16 else dt.newbyteorder("="))
        if bf16:
            stored[name] = "BF16"
        if values:
            arrays[name] = archive.array(rec, where)
    modules = _strip_modules(tree.modules, prefix) if tree is not None else {}
    naming = how + (f", prefix {prefix!r} stripped" if prefix else "")
    return TorchModel(path, "torch", entries, ordered=True,
                      order_source=f"torch.save zip: {naming}; registration order",
                      stored=stored, metadata=layer_metadata(modules) if modules else None, arrays=arrays, modules=modules, naming=naming, prefix=prefix,
                      archive=archive, container=container, records=records, tree=tree)


def layer_metadata(modules: dict) -> dict:
    """The fold hook (bnstat/folding/layers.py): ``{"layers": {path: {"module_type",
    "groups", "eps"}}}`` for the torch.nn modules of a pickled module tree."""
    layers = {}
    for path, info in modules.items():
        if not info.cls.startswith("torch.nn") or not path:
            continue
        entry = {"module_type": info.kind}
        for key in ("groups", "eps"):
            value = info.attrs.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                entry[key] = value
        layers[path] = entry
    return {"layers": layers}


def _strip_modules(modules: dict, prefix: str) -> dict:
    """Module paths without ``prefix``; the innermost wrapper becomes the root ''."""
    if not prefix:
        return dict(modules)
    out = {}
    for p, info in modules.items():
        if p + "." == prefix:
            out[""] = info
        elif p.startswith(prefix):
            out[p[len(prefix):]] = info
    return out


_NUMERIC = {name for code, name in STORAGE_DTYPES.values() if not code.startswith("c")} | \
    {"uint16", "uint32", "uint64"}


# ---- writing -----------------------------------------------------------------

def _new_record(a: np.ndarray, like: TensorRecord | None, bf16: bool = False) -> TensorRecord:
    if like is not None and like.dtype in _NUMERIC:
        dtype = like.dtype
    else:
        dtype = "bfloat16" if bf16 else _torch_dtype(a)
    version = 3 if dtype not in DTYPE_STORAGE else 2
    rec = TensorRecord(None, 0, tuple(a.shape), _contiguous(a.shape),
                       like.requires_grad if like is not None else False,
                       like.hooks if like is not None else OrderedDict(), dtype, version,
                       parameter=like.parameter if like is not None else None)
    rec.value = a
    return rec


def _torch_dtype(a: np.ndarray) -> str:
    codes = {"f8": "float64", "f4": "float32", "f2": "float16", "i8": "int64", "i4": "int32",
             "i2": "int16", "i1": "int8", "u1": "uint8", "b1": "bool", "u2": "uint16", "u4": "uint32",
             "u8": "uint64"}
    name = codes.get(f"{a.dtype.kind}{a.dtype.itemsize}")
    if name is None:
        raise OutputError(f"a tensor of dtype {a.dtype} cannot be written to a .pt file")
    return name


def _contiguous(shape) -> tuple:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _raw(a: np.ndarray, dtype: str, byteorder: str) -> bytes:
    from bnstat.io.models.torch_pickle import TORCH_DTYPES

    code = TORCH_DTYPES[dtype]
    order = "<" if byteorder == "little" else ">"
    if code == "bf16":
        bits = (bf16_round(np.asarray(a, np.float32)).view(np.uint32) >> 16).astype(order + "u2")
        return bits.tobytes()
    dt = np.dtype("?" if code == "b1" else code)
    dt = dt.newbyteorder(order) if dt.itemsize > 1 else dt
    return np.ascontiguousarray(a, dtype=dt).tobytes()


def write_torch(tmp: str, arrays: dict, template) -> None:
    """Write ``arrays`` as a torch.save zip. With a :class:`TorchModel` template the
    file's whole pickled object is written back with these tensors in its
    state_dict (or pickled module); otherwise a plain state_dict.
    Raises OutputError (a change a pickled module cannot take)."""
    if isinstance(template, TorchModel) and template.archive is not None:
        undo: list = []
        try:
            if template.tree is not None:
                _apply_module(template, arrays, undo)
            else:
                _apply_dict(template, arrays, undo)
            _write_zip(tmp, template.archive.root, template.archive, template.path)
        finally:
            for restore in reversed(undo):
                restore()
        return
    stored = getattr(template, "stored", {}) if template is not None else {}
    root = OrderedDict((name, _new_record(np.asarray(a), None, stored.get(name) == "BF16"))
                       for name, a in arrays.items())
    _write_zip(tmp, root, None, None)


def _record_for(template: TorchModel, name: str, a) -> TensorRecord:
    old = template.records.get(name)
    if old is not None and template.arrays.get(name) is a:
        return old
    return _new_record(np.asarray(a), old, template.stored.get(name) == "BF16")


def _followers(template: TorchModel, arrays: dict) -> dict:
    """anchor name (or None) -> the added names written right after it."""
    follows: dict = {}
    names = list(arrays)
    for i, name in enumerate(names):
        if name not in template.records:
            follows.setdefault(names[i - 1] if i else None, []).append(name)
    return follows


def _apply_dict(template: TorchModel, arrays: dict, undo: list) -> None:
    container, prefix = template.container, template.prefix
    follows = _followers(template, arrays)
    old_items = list(container.items())
    new_items: list = []

    def emit(name, write=True):
        if write:
            new_items.append((prefix + name, _record_for(template, name, arrays[name])))
        for new in follows.get(name, ()):
            emit(new)

    emit(None, write=False)
    for key, value in old_items:
        name = key[len(prefix):] if isinstance(key, str) and key.startswith(prefix) else None
        if name is not None and name in template.records:
            emit(name, write=name in arrays)
        else:
            new_items.append((key, value))  # a non-tensor entry, or a tensor fold never saw
    container.clear()
    container.update(new_items)

    def restore():
        container.clear()
        container.update(old_items)

    undo.append(restore)


def _apply_module(template: TorchModel, arrays: dict, undo: list) -> None:
    tree, prefix = template.tree, template.prefix
    hint = ("Write the weights as a state_dict instead (-o folded.safetensors or .npz), or keep the "
            "BatchNorm layers with --bn identity.")
    for name, a in arrays.items():
        slot = tree.slots.get(prefix + name)
        if slot is None:
            raise OutputError(f"{template.path}: the pickled module has no parameter or buffer "
                              f"{prefix + name} to hold the new tensor", hint)
        holder, key, kind = slot
        old, new = holder[key], _record_for(template, name, a)
        if new is not old:
            if new.parameter is None and kind == "_parameters":  # a bias filling a None slot
                new.parameter = (True, OrderedDict(), None)
            holder[key] = new
            undo.append(lambda holder=holder, key=key, old=old: holder.__setitem__(key, old))
    gone: dict = {}
    for name in template.records:
        if name not in arrays:
            full = prefix + name
            gone.setdefault(full.rsplit(".", 1)[0] if "." in full else "", []).append(full)
    for path, names in gone.items():
        own = [n for n in tree.tensors if n.rsplit(".", 1)[0] == path and "." in n]
        if path not in tree.owners or set(own) != set(names):
            raise OutputError(f"{template.path}: {names[0]} cannot be dropped from the pickled module "
                              f"alone (module {path or '<root>'})", hint)
        children, child, module = tree.owners[path]
        children[child] = _identity(module)
        undo.append(lambda c=children, k=child, m=module: c.__setitem__(k, m))


def _identity(module: Placeholder) -> Placeholder:
    """An ``nn.Identity`` in place of a folded BatchNorm module (its hooks dicts kept)."""
    cls = placeholder("torch.nn.modules.linear", "Identity")
    inst = Placeholder.__new__(cls)
    state = {k: v for k, v in module.state.items() if k == "training" or (
        k.startswith("_") and k not in ("_parameters", "_buffers", "_modules"))}
    state.update(_parameters=OrderedDict(), _buffers=OrderedDict(),
                 _non_persistent_buffers_set=set(), _modules=OrderedDict())
    inst.__setstate__(state)
    return inst


def _write_zip(tmp: str, root, archive: TorchArchive | None, source: str | None) -> None:
    """root pickled as data.pkl plus its storages, laid out as torch.save does."""
    byteorder = archive.byteorder if archive is not None else sys.byteorder
    name = archive.name if archive is not None else "archive"
    blobs: dict = {}
    taken = set(archive.members) if archive is not None else set()
    counter = [0]

    def storage_key(rec: TensorRecord):
        if rec.value is None:
            ref = rec.storage
            if ref.key not in blobs:
                blobs[ref.key] = archive.storage_bytes(ref.key)
            return ref.key, ref.storage_type, ref.location, ref.numel
        while f"{name}/data/{counter[0]}" in taken or str(counter[0]) in blobs:
            counter[0] += 1
        key = str(counter[0])
        raw = _raw(rec.value, rec.dtype, byteorder)
        blobs[key] = raw
        if rec.version == 2:
            return key, TorchGlobal("torch", DTYPE_STORAGE[rec.dtype]), "cpu", math.prod(rec.size)
        return key, TorchGlobal("torch.storage", "UntypedStorage"), "cpu", len(raw)

    pkl = GraphPickler(storage_key).dumps(root)
    version = archive.version if archive is not None else b"3\n"
    records = [("data.pkl", pkl), (".format_version", b"1"), (".storage_alignment", b"64"),
               ("byteorder", byteorder.encode())]
    records += [(f"data/{key}", blob) for key, blob in blobs.items()]
    records.append(("version", version))
    with open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for rec_name, data in records:
            info = zipfile.ZipInfo(f"{name}/{rec_name}", date_time=(1980, 1, 1, 0, 0, 0))
            size = len(data) if isinstance(data, bytes) else int(data.size)
            header = 30 + len(info.filename.encode()) + (20 if size * 1.05 > zipfile.ZIP64_LIMIT else 0)
            pad = -(fh.tell() + header + 4) % 64
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            zf.writestr(info, data if isinstance(data, bytes) else memoryview(data))


def _sniff(path: str, head: bytes) -> bool:
    """A torch zip (torch.save or TorchScript, refused later), or a legacy torch file
    by its extension (refused by read with what to do)."""
    if magic.is_zip(head):
        return is_torch_zip(path)
    return magic.extension(path) in TORCH_EXTS and head[:1] == b"\x80"


FORMAT = ModelFormat(
    name="torch", label="PyTorch .pt", extensions=(".pt", ".pth", ".ckpt", ".bin"),
    sniff=_sniff, index=lambda path: read_torch(path, values=False), read=read_torch,
    write=write_torch, mismatch="not a torch.save (zip) file (magic bytes {head!r}); " + RESAVE)
