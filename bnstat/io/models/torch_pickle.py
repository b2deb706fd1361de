"""The pickle of a ``torch.save`` file, read and written without torch.

Reading never runs code from the file. :class:`SafeUnpickler` resolves a
global to one of three things:

- the few harmless callables a weights file needs (``collections.
  OrderedDict``, ``builtins.set``, ``_codecs.encode`` for bytes, ``torch.
  Size``, ``torch.device``, the ``torch._utils._rebuild_*`` tensor and
  parameter functions), each replaced by a function of ours that builds a
  record (:class:`TensorRecord`) or a plain container;
- torch dtypes and storage types, as inert :class:`TorchGlobal` records;
- anything else, a :class:`Placeholder` class that records its qualified
  name. ``NEWOBJ`` (how protocol 2 pickles an instance, e.g. a whole
  ``nn.Module``) makes an inert instance that only collects the state the
  pickle gives it (``BUILD``, ``SETITEMS``, ``APPENDS``); calling it
  (``REDUCE``, how ``__reduce__`` exploits run ``os.system``) is refused
  with an InputError naming the global.

:class:`GraphPickler` writes the object graph back (the opcodes of protocol
2 that ``torch.load(weights_only=True)`` accepts), so a checkpoint keeps
every entry; only the tensors given new values change.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

from bnstat.errors import InputError

# storage class -> (numpy dtype code, torch dtype name); "bf16" is bfloat16
STORAGE_DTYPES = {
    "DoubleStorage": ("f8", "float64"), "FloatStorage": ("f4", "float32"),
    "HalfStorage": ("f2", "float16"), "BFloat16Storage": ("bf16", "bfloat16"),
    "LongStorage": ("i8", "int64"), "IntStorage": ("i4", "int32"),
    "ShortStorage": ("i2", "int16"), "CharStorage": ("i1", "int8"),
    "ByteStorage": ("u1", "uint8"), "BoolStorage": ("b1", "bool"),
    "ComplexFloatStorage": ("c8", "complex64"), "ComplexDoubleStorage": ("c16", "complex128"),
}
TORCH_DTYPES = {name: code for code, name in STORAGE_DTYPES.values()}
TORCH_DTYPES.update({"uint16": "u2", "uint32": "u4", "uint64": "u8"})
DTYPE_STORAGE = {name: storage for storage, (_code, name) in STORAGE_DTYPES.items()}
_UNSUPPORTED_HINT = "bnstat reads the tensors, containers and numbers a weights file holds."


@dataclass(eq=False)
class TorchGlobal:
    """A torch global that is named, never called: a dtype or a storage type."""

    module: str
    name: str

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"BUILD on {self.module}.{self.name}")


@dataclass(eq=False)
class StorageRef:
    """A persistent id ('storage', type, key, location, numel): member ``data/<key>``."""

    key: str
    storage_type: TorchGlobal
    location: str
    numel: int  # elements (typed storages) or bytes (UntypedStorage)

    def __setstate__(self, state):
        raise pickle.UnpicklingError("BUILD on a storage")


@dataclass(eq=False)
class TensorRecord:
    """A tensor as pickled: a view (offset, size, stride, in elements) of a storage.

    ``dtype`` is the torch dtype name; ``version`` 2 or 3 says which rebuild
    function built it; ``parameter`` is None for a plain tensor, else
    ``(requires_grad, hooks, state)`` of the ``nn.Parameter`` around it.
    ``value`` (writing only) is the numpy array that replaces the storage.
    """

    storage: StorageRef | None
    offset: int
    size: tuple
    stride: tuple
    requires_grad: bool
    hooks: object
    dtype: str
    version: int = 2
    metadata: object = None
    parameter: tuple | None = None
    value: object = None

    def __setstate__(self, state):
        raise pickle.UnpicklingError("BUILD on a tensor")


@dataclass(eq=False)
class Call:
    """An allow-listed call kept as such (torch.Size, torch.device): re-emitted verbatim."""

    module: str
    name: str
    args: tuple

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"BUILD on {self.module}.{self.name}")


class _Refused(type):
    """The metaclass of placeholders: calling one (REDUCE) is refused."""

    def __call__(cls, *args, **kwargs):
        raise InputError(f"the pickle calls {cls.qualname}, a global bnstat does not run",
                         "bnstat never runs code from a model file: it reads tensors, containers "
                         "and numbers, and records other objects without creating them.")


class Placeholder(metaclass=_Refused):
    """An inert stand-in for an instance of a class named in the pickle."""

    qualname = "?"
    module = "?"
    name = "?"

    def __new__(cls, *args):
        self = object.__new__(cls)
        object.__setattr__(self, "_bn", {"args": args, "state": None, "items": [], "list": []})
        return self

    def __setstate__(self, state):
        self._bn["state"] = state

    def __setitem__(self, key, value):
        self._bn["items"].append((key, value))

    def append(self, value):
        self._bn["list"].append(value)

    def extend(self, values):
        self._bn["list"].extend(values)

    @property
    def state(self):
        return self._bn["state"]


_placeholders: dict[tuple[str, str], type] = {}


def placeholder(module: str, name: str) -> type:
    """The placeholder class for ``module.name`` (one per name, so identity holds)."""
    cls = _placeholders.get((module, name))
    if cls is None:
        cls = _Refused(f"Placeholder[{module}.{name}]", (Placeholder,),
                       {"qualname": f"{module}.{name}", "module": module, "name": name})
        _placeholders[(module, name)] = cls
    return cls


def _rebuild_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    if not isinstance(storage, StorageRef) or storage.storage_type.name not in STORAGE_DTYPES:
        raise pickle.UnpicklingError("_rebuild_tensor_v2 without a typed storage")
    dtype = STORAGE_DTYPES[storage.storage_type.name][1]
    return TensorRecord(storage, int(offset), tuple(size), tuple(stride), bool(requires_grad),
                        hooks, dtype, 2, metadata)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(storage, StorageRef) or not isinstance(dtype, TorchGlobal):
        raise pickle.UnpicklingError("_rebuild_tensor_v3 without a storage and a dtype")
    return TensorRecord(storage, int(offset), tuple(size), tuple(stride), bool(requires_grad),
                        hooks, dtype.name, 3, metadata)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    if not isinstance(data, TensorRecord):
        raise pickle.UnpicklingError("a Parameter without a tensor")
    data.parameter = (bool(requires_grad), hooks, state)
    return data


def _encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode other than latin1 bytes")
    return text.encode("latin1")


def _call(module, name):
    return lambda *args: Call(module, name, args)


# what each allow-listed global is replaced with: never the real object
_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _call("torch", "Size"),
    ("torch", "device"): _call("torch", "device"),
}
# tensors bnstat cannot represent (quantized, sparse, nested, meta, subclasses): named in the refusal
_TORCH_REFUSED = ("_rebuild", "Tensor", "Parameter")


class SafeUnpickler(pickle.Unpickler):
    """Unpickles a torch.save ``data.pkl`` into records; see the module docstring.

    ``where`` names the member in messages. Raises InputError (refused
    globals, corrupt pickles).
    """

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self.where = where
        self.globals_seen: set[str] = set()

    def find_class(self, module, name):
        # protocol 2 names Python 2 modules (__builtin__.set): map them as pickle's own find_class does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        self.globals_seen.add(f"{module}.{name}")
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and (name in TORCH_DTYPES or name.endswith("Storage")):
            return TorchGlobal(module, name)
        if module.split(".")[0] == "torch" and name.startswith(_TORCH_REFUSED):
            raise InputError(f"{self.where}: holds {module}.{name}, a kind of tensor bnstat "
                             "cannot read", _UNSUPPORTED_HINT)
        return placeholder(module, name)

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], TorchGlobal) or not isinstance(pid[2], str)
                or not isinstance(pid[4], int)):
            raise InputError(f"{self.where}: unknown persistent id {pid!r:.80}",
                             "Re-save the file with torch.save(model.state_dict(), path).")
        return StorageRef(pid[2], pid[1], str(pid[3]), pid[4])

    def load_all(self):
        try:
            return self.load()
        except InputError as exc:
            if exc.message.startswith(self.where):
                raise
            raise InputError(f"{self.where}: {exc.message}", exc.hint) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, struct.error, RecursionError, MemoryError) as exc:
            raise InputError(f"{self.where}: corrupt pickle ({type(exc).__name__}: {exc})",
                             "Re-save the file with torch.save.") from None


# ---- writing -----------------------------------------------------------------

@dataclass
class GraphPickler:
    """Writes an object graph of records back as a protocol-2 pickle.

    ``storage_key(record)`` returns the persistent-id key of a tensor's
    storage (and registers the bytes to write). Shared objects are written
    once and referenced (memo), as pickle does.
    """

    storage_key: object
    out: bytearray = field(default_factory=bytearray)
    memo: dict = field(default_factory=dict)
    keep: list = field(default_factory=list)  # keeps memoized objects alive (stable ids)

    def dumps(self, obj) -> bytes:
        self.out += b"\x80\x02"
        self.save(obj)
        self.out += b"."
        return bytes(self.out)

    def _put(self, obj) -> None:
        i = len(self.memo)
        self.memo[id(obj)] = i
        self.keep.append(obj)
        self.out += b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)

    def _get(self, obj) -> bool:
        i = self.memo.get(id(obj))
        if i is None:
            return False
        self.out += b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)
        return True

    def glob(self, module: str, name: str) -> None:
        key = ("global", module, name)
        i = self.memo.get(key)
        if i is not None:
            self.out += b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)
            return
        self.out += b"c" + f"{module}\n{name}\n".encode()
        i = len(self.memo)
        self.memo[key] = i
        self.out += b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)

    def save(self, obj) -> None:  # noqa: C901 - one branch per type, as pickle's dispatch
        out = self.out
        if obj is None:
            out += b"N"
        elif obj is True or obj is False:
            out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, float):
            out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            raw = obj.encode("utf-8", "surrogatepass")
            out += b"X" + struct.pack("<I", len(raw)) + raw
        elif self._get(obj):
            return
        elif isinstance(obj, tuple):
            self._tuple(obj)
        elif isinstance(obj, list):
            out += b"]"
            self._put(obj)
            self._batch(obj, b"e")
        elif type(obj) is dict:
            out += b"}"
            self._put(obj)
            self._setitems(obj.items())
        elif isinstance(obj, OrderedDict):
            self.glob("collections", "OrderedDict")
            out += b")R"
            self._put(obj)
            self._setitems(obj.items())
            if vars(obj):  # a state_dict's _metadata
                self.save(dict(vars(obj)))
                self.out += b"b"
        else:
            self._object(obj)

    def _object(self, obj) -> None:
        if isinstance(obj, TensorRecord):
            self._tensor(obj)
        elif isinstance(obj, TorchGlobal):
            self.glob(obj.module, obj.name)
        elif isinstance(obj, Call):
            self._reduce(obj.module, obj.name, obj.args, obj)
        elif isinstance(obj, bytes):
            self._reduce("_codecs", "encode", (obj.decode("latin1"), "latin1"), obj)
        elif isinstance(obj, bytearray):
            self._reduce("builtins", "bytearray", (bytes(obj),), obj)
        elif isinstance(obj, set | frozenset):
            self._reduce("builtins", type(obj).__name__, (list(obj),), obj)
        elif isinstance(obj, complex):
            self._reduce("builtins", "complex", (obj.real, obj.imag), obj)
        elif isinstance(obj, Placeholder):
            self._instance(obj)
        elif isinstance(obj, type) and issubclass(obj, Placeholder):
            self.glob(obj.module, obj.name)
        else:  # pragma: no cover - the reader makes nothing else
            raise TypeError(f"cannot pickle {type(obj).__name__}")

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)
        elif -(2 ** 31) <= v < 2 ** 31:
            self.out += b"J" + struct.pack("<i", v)
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw

    def _tuple(self, obj: tuple) -> None:
        if not obj:
            self.out += b")"
            return
        if len(obj) <= 3:
            for v in obj:
                self.save(v)
            self.out += b"\x85\x86\x87"[len(obj) - 1:len(obj)]
        else:
            self.out += b"("
            for v in obj:
                self.save(v)
            self.out += b"t"
        self._put(obj)

    def _batch(self, items, op: bytes) -> None:
        items = list(items)
        for i in range(0, len(items), 1000):
            self.out += b"("
            for v in items[i:i + 1000]:
                self.save(v)
            self.out += op

    def _setitems(self, pairs) -> None:
        pairs = list(pairs)
        for i in range(0, len(pairs), 1000):
            self.out += b"("
            for k, v in pairs[i:i + 1000]:
                self.save(k)
                self.save(v)
            self.out += b"u"

    def _reduce(self, module: str, name: str, args: tuple, obj) -> None:
        self.glob(module, name)
        self.save(tuple(args))
        self.out += b"R"
        self._put(obj)

    def _instance(self, obj: Placeholder) -> None:
        cls = type(obj)
        self.glob(cls.module, cls.name)
        self.save(obj._bn["args"])
        self.out += b"\x81"  # NEWOBJ
        self._put(obj)
        if obj._bn["list"]:
            self._batch(obj._bn["list"], b"e")
        if obj._bn["items"]:
            self._setitems(obj._bn["items"])
        if obj._bn["state"] is not None:
            self.save(obj._bn["state"])
            self.out += b"b"

    def _tensor(self, t: TensorRecord) -> None:
        if t.parameter is not None:
            name = "_rebuild_parameter" if t.parameter[2] is None else "_rebuild_parameter_with_state"
            self.glob("torch._utils", name)
            self.out += b"("
        self.glob("torch._utils", f"_rebuild_tensor_v{t.version}")
        self.out += b"("
        key, storage_type, location, numel = self.storage_key(t)
        self.out += b"("
        self.save("storage")
        self.glob(storage_type.module, storage_type.name)
        self.save(key)
        self.save(location)
        self.save(numel)
        self.out += b"tQ"  # the persistent id tuple, BINPERSID
        self.save(t.offset)
        self.save(tuple(t.size))
        self.save(tuple(t.stride))
        self.save(t.requires_grad)
        self.save(t.hooks if t.hooks is not None else OrderedDict())
        if t.version == 3:
            self.glob("torch", t.dtype)
        if t.metadata is not None:
            self.save(t.metadata)
        self.out += b"tR"
        if t.parameter is not None:
            requires_grad, hooks, state = t.parameter
            self.save(requires_grad)
            self.save(hooks if hooks is not None else OrderedDict())
            if state is not None:
                self.save(state)
            self.out += b"tR"
        self._put(t)
