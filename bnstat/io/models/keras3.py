"""Keras 3 model files: ``.keras`` zips and ``.weights.h5`` / sharded ``.weights.json``.

What Keras 3 (``keras.src.saving.saving_lib``) writes:

- ``.keras``: a zip of ``metadata.json``, ``config.json`` (the model graph)
  and ``model.weights.h5``.
- ``.weights.h5`` (``model.save_weights``): the same HDF5 file alone;
  ``.weights.json`` (``max_shard_size=``): ``{"weight_map": {"/layers/dense/
  vars": ["m_00000.weights.h5"]}}`` and the shard files beside it.

The weights file names no variable and no layer: a layer's variables are
the datasets ``<container>/layers/<class>/vars/<i>``, where ``<class>`` is
the snake-cased class name with a per-class counter inside each container
(``conv2d``, ``conv2d_1``...; a nested model is a container of its own:
``layers/sequential/layers/dense``) and ``<i>`` counts the variables in the
order the layer's ``build()`` creates them. So the graph (``config.json``)
is what maps them to layers; it is read as JSON and never deserialized, so
no code from the file (a Lambda layer's) ever runs.

The model is presented to fold in Keras naming, ``<layer name>/<variable>``
(``conv2d/kernel``, ``batch_normalization/moving_mean``,
``sub/dense_1/bias`` inside a nested model ``sub``; variables of classes
not listed in :data:`_VARIABLES` are ``<layer>/vars/<i>``), with the config
as ``ModelIndex.config``, so pairing reads the graph as for a Keras 2 file.

Writing: the weights file is a copy of the input with the changed datasets
rewritten. When fold dropped BatchNorm layers (``--bn drop``), config.json
is rewritten without them (their consumers fed from the layer that fed
them; ``use_bias`` set on the layers that got a bias) and the weights are
laid out for that model (counters renumbered), so ``keras.saving.load_model``
reads the folded model as it is.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from bnstat.errors import InputError
from bnstat.io import magic
from bnstat.io.models.base import ModelFile, ModelFormat, ModelIndex

__all__ = ["Keras3File", "Keras3Index", "Keras3Model", "config_from", "is_keras_zip",
           "is_keras_weights", "read", "index", "slots_of", "KERAS_EXTS", "WEIGHTS_EXTS"]

KERAS_EXTS = (".keras",)
WEIGHTS_EXTS = (".weights.h5", ".weights.json")
_CONFIG, _META, _WEIGHTS = "config.json", "metadata.json", "model.weights.h5"
_MODELS = ("Sequential", "Functional", "Model")
_MAX_JSON = 64 << 20
_config_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "bnstat_keras3_config", default=None)


def _bias(cfg):
    return ["bias"] if cfg.get("use_bias", True) else []


def _bn_vars(cfg):
    if cfg.get("renorm"):
        return None  # renorm's extra statistics: not a plain BatchNorm
    return (["gamma"] if cfg.get("scale", True) else []) + (["beta"] if cfg.get("center", True)
                                                             else []) + ["moving_mean",
                                                                         "moving_variance"]


def _dense_vars(cfg):
    if cfg.get("lora_rank") or cfg.get("quantization_config") or cfg.get("dtype") == "int8":
        return None
    return ["kernel"] + _bias(cfg)


# variable names in build() creation order, by class (None: unknown -> vars/<i>)
_VARIABLES = {
    **{c: lambda cfg: ["kernel"] + _bias(cfg) for c in (
        "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")},
    "DepthwiseConv1D": lambda cfg: ["depthwise_kernel"] + _bias(cfg),
    "DepthwiseConv2D": lambda cfg: ["depthwise_kernel"] + _bias(cfg),
    "SeparableConv1D": lambda cfg: ["depthwise_kernel", "pointwise_kernel"] + _bias(cfg),
    "SeparableConv2D": lambda cfg: ["depthwise_kernel", "pointwise_kernel"] + _bias(cfg),
    "Dense": _dense_vars,
    "BatchNormalization": _bn_vars,
}


@dataclass
class Slot:
    """One layer of the config and where its variables live in the weights file."""

    name: str  # the array-name prefix: layer names from the top model down, joined by "/"
    h5: str  # its group in the weights file: layers/conv2d
    cls: str
    cfg: dict  # the layer's config (a reference into the config document)
    params: list[str] | None  # the names of vars/0, vars/1...; None: an unknown class


@dataclass
class Keras3File:
    """What a Keras 3 file adds to a ModelIndex/ModelFile (see :func:`index`)."""

    kind: str = "keras"  # keras (a .keras zip), weights (.weights.h5) or sharded (.weights.json)
    document: dict | None = None  # config.json as read
    config_source: str | None = None  # the file (and member) the config came from
    slots: list[Slot] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # array name -> dataset path
    keras_metadata: bytes | None = None  # metadata.json of the .keras the config came from


@dataclass
class Keras3Index(Keras3File, ModelIndex):
    """The index of a Keras 3 file."""


@dataclass
class Keras3Model(Keras3File, ModelFile):
    """A Keras 3 file read whole."""


@contextlib.contextmanager
def config_from(path: str | None):
    """Within this block, Keras 3 weight files take their graph from ``path`` (a config.json
    or a .keras file; ``--config``), not from the ``.keras`` beside them."""
    token = _config_override.set(path)
    try:
        yield
    finally:
        _config_override.reset(token)


# ---- recognising the files -----------------------------------------------------

def is_keras_zip(path: str, head: bytes) -> bool:
    """A zip named .keras, or any zip holding config.json and model.weights.h5."""
    if not magic.is_zip(head):
        return False
    if path.lower().endswith(KERAS_EXTS):
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return _CONFIG in names and _WEIGHTS in names


def is_keras_archive(path: str) -> bool:
    """Whether ``path`` is a .keras zip (a model file, not an activation .npz)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return is_keras_zip(path, head)


def is_keras_weights(path: str, head: bytes) -> bool:
    """A Keras 3 weights file: HDF5 with ``layers``/``vars`` groups and no Keras 2
    ``layer_names``, or a ``.weights.json`` shard map."""
    lower = path.lower()
    if lower.endswith(".weights.json"):
        return head.lstrip()[:1] == b"{"
    if not head.startswith(magic.HDF5_MAGIC):
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return ("layer_names" not in f.attrs and "model_weights" not in f
                    and "model_config" not in f.attrs and ("layers" in f or "vars" in f))
    except OSError:
        return False


# ---- the config ----------------------------------------------------------------

def snake_case(name: str) -> str:
    """keras.src.utils.naming.to_snake_case."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _unique(name: str, used: dict) -> str:
    if name in used:
        used[name] += 1
        return f"{name}_{used[name]}"
    used[name] = 0
    return name


def slots_of(doc: dict, where: str) -> list[Slot]:
    """Every layer of a config document with its variables' group. Raises InputError."""
    if not isinstance(doc, dict) or not isinstance((doc.get("config") or {}).get("layers"), list):
        raise InputError(f"{where}: the config lists no layers (a subclassed model?): bnstat "
                         "cannot tell which layer each vars/<i> group belongs to",
                         "Save a Sequential or functional model, or fold its state as .npz.")
    out: list[Slot] = []
    _visit(doc, "", "", out, where)
    return out


def _visit(model: dict, h5: str, prefix: str, out: list[Slot], where: str) -> None:
    layers = [ly for ly in model["config"]["layers"] if isinstance(ly, dict)]
    if model.get("class_name") == "Sequential" and layers and \
            layers[0].get("class_name") == "InputLayer":
        layers = layers[1:]  # Sequential.layers leaves its InputLayer out
    used: dict[str, int] = {}
    for ly in layers:
        cls = ly.get("class_name")
        cfg = ly.get("config") if isinstance(ly.get("config"), dict) else {}
        name = cfg.get("name") or ly.get("name")
        if not isinstance(cls, str) or not isinstance(name, str):
            raise InputError(f"{where}: a layer of the config has no class_name or name")
        path = "/".join(p for p in (h5, "layers", _unique(snake_case(cls), used)) if p)
        full = f"{prefix}{name}"
        if cls in _MODELS and isinstance(cfg.get("layers"), list):
            _visit(ly, path, full + "/", out, where)
            continue
        spec = _VARIABLES.get(cls)
        out.append(Slot(full, path, cls, cfg, spec(cfg) if spec else None))


def _load_json(raw: bytes, where: str) -> dict:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise InputError(f"{where}: not a JSON object")
    return doc


def _zip_member(zf: zipfile.ZipFile, path: str, member: str) -> bytes:
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise InputError(f"{path}: no {member} member: not a Keras 3 .keras file",
                         "A .keras zip holds config.json, metadata.json and model.weights.h5 "
                         "(keras model.save).") from None
    if member.endswith(".json") and info.file_size > _MAX_JSON:
        raise InputError(f"{path}:{member}: {info.file_size} bytes, too large for a config")
    try:
        return zf.read(member)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{path}:{member}: cannot be read ({exc})") from exc


def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a valid .keras (zip) file ({exc})") from exc


def _weights_config(path: str) -> tuple[dict, str, bytes | None]:
    """(config document, where it came from, metadata.json bytes) of a weights file."""
    given = _config_override.get()
    if given is None:
        stem = re.sub(r"(?i)\.weights\.(h5|json)$", "", path)
        beside = stem + ".keras"
        if stem == path or not os.path.exists(beside):
            raise InputError(f"{path}: a Keras 3 weights file names its arrays layers/<class>/"
                             "vars/<i> only; the model's graph is needed to read them",
                             f"Give it with --config config.json (or a .keras), or put {beside} "
                             "beside it.")
        given = beside
    if given.lower().endswith(".keras") or zipfile.is_zipfile(given):
        with _open_zip(given) as zf:
            doc = _load_json(_zip_member(zf, given, _CONFIG), f"{given}:{_CONFIG}")
            meta = zf.read(_META) if _META in zf.namelist() else None
        return doc, f"{given}:{_CONFIG}", meta
    try:
        with open(given, "rb") as fh:
            raw = fh.read(_MAX_JSON + 1)
    except OSError as exc:
        raise InputError(f"{given}: cannot read the config: {exc.strerror}") from exc
    return _load_json(raw, given), given, None


# ---- reading -------------------------------------------------------------------

def _h5_source(path: str, kind: str):
    """An open h5py.File of the weights: the zip member in memory, the file, or the shards
    merged into an in-memory file."""
    import h5py

    if kind == "keras":
        with _open_zip(path) as zf:
            raw = _zip_member(zf, path, _WEIGHTS)
        where = f"{path}:{_WEIGHTS}"
        try:
            return h5py.File(io.BytesIO(raw), "r"), where
        except OSError as exc:
            raise InputError(f"{where}: not a readable HDF5 file ({exc})") from exc
    if kind == "sharded":
        return _merge_shards(path), path
    try:
        return h5py.File(path, "r"), path
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc


def _merge_shards(path: str):
    import h5py

    try:
        with open(path, "rb") as fh:
            doc = _load_json(fh.read(_MAX_JSON + 1), path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    wmap = doc.get("weight_map")
    if not isinstance(wmap, dict):
        raise InputError(f"{path}: no weight_map: not a Keras 3 sharded weights file")
    merged = h5py.File(io.BytesIO(), "w")
    opened: dict[str, h5py.File] = {}
    try:
        for group, files in wmap.items():
            files = files if isinstance(files, list) else [files]
            for name in files:
                shard = os.path.join(os.path.dirname(path), str(name))
                if shard not in opened:
                    try:
                        opened[shard] = h5py.File(shard, "r")
                    except OSError as exc:
                        raise InputError(f"{path}: shard {name}: not a readable HDF5 file ({exc})",
                                         "Keep the shard files beside the .weights.json.") from exc
                src = opened[shard]
                g = str(group).strip("/")
                if g in src and g not in merged:
                    src.copy(src[g], merged, name="/" + g)
    finally:
        for f in opened.values():
            f.close()
    return merged


def _vars_of(f, slot: Slot, where: str):
    """[(index, dataset)] of a layer's vars group, checked against the config."""
    group = f.get(slot.h5 + "/vars")
    found = sorted(((int(k), group[k]) for k in group if k.isdigit()), key=lambda t: t[0]) \
        if group is not None else []
    if slot.params is not None and len(found) != len(slot.params):
        raise InputError(f"{where}: {slot.h5}/vars holds {len(found)} arrays; the config's "
                         f"{slot.cls} {slot.name} ({_settings(slot)}) has {len(slot.params)} "
                         f"({', '.join(slot.params) or 'none'}): the weights do not match the "
                         "config", "Give the config the weights were saved with (--config).")
    if [i for i, _ in found] != list(range(len(found))):
        raise InputError(f"{where}: {slot.h5}/vars is not numbered 0..{len(found) - 1}")
    return found


def _settings(slot: Slot) -> str:
    keys = ("use_bias", "center", "scale")
    return ", ".join(f"{k}={slot.cfg[k]}" for k in keys if k in slot.cfg) or "its settings"


def _load(path: str, values: bool):
    import h5py

    lower = path.lower()
    kind = "sharded" if lower.endswith(".weights.json") else "weights"
    meta = None
    if not lower.endswith(WEIGHTS_EXTS) and not is_keras_weights(path, _head(path)):
        kind = "keras"
    if kind == "keras":
        with _open_zip(path) as zf:
            doc = _load_json(_zip_member(zf, path, _CONFIG), f"{path}:{_CONFIG}")
            meta = zf.read(_META) if _META in zf.namelist() else None
        source = f"{path}:{_CONFIG}"
    else:
        doc, source, meta = _weights_config(path)
    slots = slots_of(doc, source)
    f, where = _h5_source(path, kind)
    entries, arrays, keys = {}, {}, {}
    try:
        with f:
            claimed = set()
            for slot in slots:
                for i, ds in _vars_of(f, slot, where):
                    name = f"{slot.name}/{slot.params[i] if slot.params else f'vars/{i}'}"
                    if ds.dtype.kind not in "fiub" or ds.shape is None:
                        raise InputError(f"{where}: {ds.name.lstrip('/')}: dtype {ds.dtype} is "
                                         "not numeric")
                    entries[name] = (tuple(int(s) for s in ds.shape), ds.dtype.newbyteorder("="))
                    keys[name] = f"{slot.h5}/vars/{i}"
                    if values:
                        arrays[name] = np.asarray(ds[()]).astype(entries[name][1], copy=False)
                claimed.add(slot.h5)
            _check_unclaimed(f, claimed, where, h5py)
    except OSError as exc:
        raise InputError(f"{where}: cannot read the HDF5 file ({exc})") from exc
    _check_bn_shapes(slots, entries, where)
    common = dict(path=path, format="keras" if kind == "keras" else "keras-weights",
                  entries=entries, ordered=True, order_source="Keras 3 config order", config=doc,
                  kind=kind, document=doc, config_source=source, slots=slots, keys=keys,
                  keras_metadata=meta)
    return Keras3Model(**common, arrays=arrays) if values else Keras3Index(**common)


def _head(path: str) -> bytes:
    from bnstat.io.base import read_head

    return read_head(path, magic.HEAD_BYTES, "Give a Keras 3 file (.keras, .weights.h5).")


def _check_unclaimed(f, claimed: set, where: str, h5py) -> None:
    """Datasets in a layers/*/vars group that no layer of the config owns."""
    stray: list[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.startswith("layers/") and "/vars/" in name:
            owner = name.rsplit("/vars/", 1)[0]
            if not any(owner == c or owner.startswith(c + "/") for c in claimed) \
                    and not any(c.startswith(owner + "/") for c in claimed):
                stray.append(name)

    f.visititems(visit)
    if stray:
        raise InputError(f"{where}: {stray[0]}: no layer of the config owns this array: the "
                         "weights do not match the config",
                         "Give the config the weights were saved with (--config).")


def _check_bn_shapes(slots: list[Slot], entries: dict, where: str) -> None:
    for slot in slots:
        if slot.cls != "BatchNormalization" or not slot.params:
            continue
        shapes = {entries[f"{slot.name}/{p}"][0] for p in slot.params}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise InputError(f"{where}: {slot.h5}/vars: the BatchNormalization {slot.name} has "
                             f"arrays of shapes {sorted(shapes)}, not one vector each: the "
                             "weights do not match the config")


def index(path: str):
    """Names, shapes and dtypes of a Keras 3 file, in config order. Raises InputError."""
    return _load(path, values=False)


def read(path: str):
    """Every variable of a Keras 3 file, in config order. Raises InputError."""
    return _load(path, values=True)


def _write_keras(tmp, arrays, template):
    from bnstat.io.models import keras3_write

    keras3_write.write_keras(tmp, arrays, template)


def _write_weights(tmp, arrays, template):
    from bnstat.io.models import keras3_write

    keras3_write.write_weights(tmp, arrays, template)


# both go before npz and hdf5 in the registry: a .keras is a zip, a .weights.h5 an HDF5 file
FORMAT = ModelFormat(
    name="keras", label="Keras 3 (.keras)", extensions=KERAS_EXTS, sniff=is_keras_zip,
    index=index, read=read, write=_write_keras,
    mismatch="not a .keras (zip) file (bad magic bytes {head!r})")
WEIGHTS_FORMAT = ModelFormat(
    name="keras-weights", label="Keras 3 weights (.weights.h5)", extensions=WEIGHTS_EXTS,
    sniff=is_keras_weights, index=index, read=read, write=_write_weights,
    mismatch="not a Keras 3 weights file (HDF5, or a .weights.json shard map)")
