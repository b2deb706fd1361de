"""Writing Keras 3 files: a ``.keras`` zip or a ``.weights.h5`` (layout: see keras3.py).

The output is the input with the changed variables rewritten. When arrays
of BatchNorm layers are gone (fold's ``--bn drop``), the model changes
shape: config.json loses those layers (each consumer of a dropped BN is fed
from the tensor that fed the BN; ``output_layers`` likewise), the layers
that got a ``bias`` get ``use_bias: true``, and the weights are laid out as
Keras saves that model (the per-class counters renumbered), so
``keras.saving.load_model`` reads it as it is.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import tempfile
import time
import zipfile

import numpy as np

from bnstat.errors import OutputError, warn
from bnstat.io.models import keras3
from bnstat.io.models.keras3 import Keras3File, Slot

__all__ = ["write_keras", "write_weights"]

_BIASED = {"Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
           "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "Dense"}


def _final(tmp: str) -> str:
    """The output path an atomic_path temporary stands for (for messages)."""
    base = os.path.basename(tmp)
    m = re.match(r"^\.(.+)\.[^.]+\.bnstat-tmp$", base)
    return os.path.join(os.path.dirname(tmp), m.group(1)) if m else tmp


def _changes(template: Keras3File, arrays: dict, out: str) -> tuple[set, set]:
    """(BN layers whose arrays are all gone, layers that got a bias)."""
    dropped, biased = set(), set()
    by_name = {s.name: s for s in template.slots}
    for s in template.slots:
        keys = [f"{s.name}/{p}" for p in s.params] if s.params is not None else \
            [k for k in template.keys if k.startswith(s.name + "/vars/")]
        missing = [k for k in keys if k not in arrays]
        if missing and len(missing) == len(keys) and s.cls == "BatchNormalization":
            dropped.add(s.name)
        elif missing:
            raise OutputError(f"{out}: {missing[0]} is missing: a Keras 3 file needs every "
                              f"variable of {s.cls} {s.name}")
    for key in arrays:
        if key in template.entries:
            continue
        layer, _, param = key.rpartition("/")
        s = by_name.get(layer)
        if param == "bias" and s is not None and s.params is not None and "bias" not in s.params \
                and s.cls in _BIASED:
            biased.add(layer)
        else:
            raise OutputError(f"{out}: {key}: no variable of the Keras config has this name",
                              "A Keras 3 file holds the variables its config.json describes.")
    return dropped, biased


def _history(tensor) -> list | None:
    if isinstance(tensor, dict) and tensor.get("class_name") == "__keras_tensor__":
        hist = (tensor.get("config") or {}).get("keras_history")
        if isinstance(hist, list) and len(hist) == 3 and isinstance(hist[0], str):
            return hist
    return None


def _bn_input(layer: dict, out: str, name: str) -> dict:
    nodes = layer.get("inbound_nodes")
    try:
        tensor = nodes[0]["args"][0]
    except (TypeError, KeyError, IndexError):
        tensor = None
    if not isinstance(nodes, list) or len(nodes) != 1 or _history(tensor) is None:
        raise OutputError(f"{out}: cannot remove {name} from the model graph (its inbound "
                          "nodes are not one Keras 3 tensor)", "Use --bn identity.")
    return tensor


def _replace(obj, gone: dict):
    """``obj`` with every tensor (or [name, node, index] triple) of a dropped BN replaced
    by the tensor that fed the BN."""
    hist = _history(obj)
    if hist is not None:
        return copy.deepcopy(gone[hist[0]]) if hist[0] in gone else obj
    if isinstance(obj, dict):
        return {k: _replace(v, gone) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) == 3 and isinstance(obj[0], str) and isinstance(obj[1], int) and obj[0] in gone:
            return list(_history(gone[obj[0]]))
        return [_replace(v, gone) for v in obj]
    return obj


def _rewrite(model: dict, prefix: str, dropped: set, biased: set, out: str) -> None:
    cfg = model["config"]
    gone, kept = {}, []
    for ly in cfg["layers"]:
        lcfg = ly.get("config") if isinstance(ly.get("config"), dict) else {}
        name = lcfg.get("name") or ly.get("name")
        full = f"{prefix}{name}"
        if full in dropped:
            if model.get("class_name") != "Sequential":
                gone[name] = _bn_input(ly, out, full)
            continue
        if full in biased:
            lcfg["use_bias"] = True
        if ly.get("class_name") in keras3._MODELS and isinstance(lcfg.get("layers"), list):
            _rewrite(ly, full + "/", dropped, biased, out)
        kept.append(ly)
    cfg["layers"] = kept
    if gone:
        for ly in kept:
            if "inbound_nodes" in ly:
                ly["inbound_nodes"] = _replace(ly["inbound_nodes"], gone)
        for key in ("output_layers", "input_layers"):
            if key in cfg:
                cfg[key] = _replace(cfg[key], gone)


def _source_bytes(template: Keras3File) -> bytes:
    import h5py

    if template.kind == "keras":
        with zipfile.ZipFile(template.path) as zf:
            return zf.read(keras3._WEIGHTS)
    if template.kind == "weights":
        with open(template.path, "rb") as fh:
            return fh.read()
    buf = io.BytesIO()
    merged = keras3._merge_shards(template.path)
    with h5py.File(buf, "w") as f:
        for key in merged:
            merged.copy(merged[key], f, name=key)
    merged.close()
    return buf.getvalue()


def _fill(dst: str, template: Keras3File, arrays: dict, slots: list[Slot]) -> None:
    """Lay the weights file ``dst`` (a copy of the input's) out for ``slots``, with ``arrays``."""
    import h5py

    old = {s.name: s for s in template.slots}
    live = {s.name for s in slots}
    held = getattr(template, "arrays", {})
    with h5py.File(dst, "r+") as f:
        for s in template.slots:
            if s.name not in live and s.h5 in f:
                del f[s.h5]
        if len(live) < len(old) and "optimizer" in f:
            del f["optimizer"]  # its slots were the variables of the model before folding
        for s in slots:  # counters only move down: each target is free when reached
            if old[s.name].h5 != s.h5 and old[s.name].h5 in f:
                f.move(old[s.name].h5, s.h5)
        for s in slots:
            for i, param in enumerate(s.params or ()):
                key, where = f"{s.name}/{param}", f"{s.h5}/vars/{i}"
                a = np.asarray(arrays[key])
                if where in f and f[where].shape == a.shape and f[where].dtype == a.dtype:
                    if held.get(key) is not arrays[key]:
                        f[where][()] = a
                    continue
                if where in f:
                    del f[where]
                group = f.require_group(f"{s.h5}/vars")
                group.attrs.setdefault("name", s.name.rsplit("/", 1)[-1])
                group.create_dataset(str(i), data=a)


def _layout(tmp: str, arrays: dict, template: Keras3File) -> tuple[dict, list[Slot], bytes, set]:
    """(config document, its slots, the weights file's bytes, dropped BN names)."""
    out = _final(tmp)
    dropped, biased = _changes(template, arrays, out)
    doc = template.document
    slots = template.slots
    if dropped or biased:
        doc = copy.deepcopy(doc)
        _rewrite(doc, "", dropped, biased, out)
        slots = keras3.slots_of(doc, out)
    fd, scratch = tempfile.mkstemp(prefix=".bnstat-keras.", suffix=".h5",
                                   dir=os.path.dirname(os.path.abspath(tmp)))
    os.close(fd)
    try:
        with open(scratch, "wb") as fh:
            fh.write(_source_bytes(template))
        _fill(scratch, template, arrays, slots)
        with open(scratch, "rb") as fh:
            raw = fh.read()
    finally:
        os.unlink(scratch)
    return doc, slots, raw, dropped


def _fallback_hdf5(tmp: str, arrays: dict, template) -> None:
    from bnstat.io.models import hdf5

    hdf5.write(tmp, arrays, template)


def write_weights(tmp: str, arrays: dict, template) -> None:
    """A ``.weights.h5`` that ``model.load_weights`` reads. Raises OutputError."""
    out = _final(tmp)
    if not isinstance(template, Keras3File):
        return _fallback_hdf5(tmp, arrays, template)
    if out.lower().endswith(".weights.json"):
        raise OutputError(f"{out}: bnstat writes Keras 3 weights as one .weights.h5 file, not "
                          "shards", "Give -o NAME.weights.h5 (model.load_weights reads it).")
    _doc, slots, raw, dropped = _layout(tmp, arrays, template)
    with open(tmp, "wb") as fh:
        fh.write(raw)
    if dropped:
        biased = [s.name for s in slots if s.params and "bias" in s.params
                  and f"{s.name}/bias" not in template.entries]
        warn(f"{out}: laid out for the model without the folded BatchNorm layers"
             + (f" and with use_bias=True on {', '.join(biased)}" if biased else "")
             + ": build that model to load it, write -o NAME.keras to get the model with it, "
             "or use --bn identity to load the weights into the model as it is")


def write_keras(tmp: str, arrays: dict, template) -> None:
    """A ``.keras`` zip that ``keras.saving.load_model`` reads. Raises OutputError."""
    out = _final(tmp)
    if not isinstance(template, Keras3File):
        raise OutputError(f"{out}: a .keras file is written from a Keras 3 model (a .keras or "
                          ".weights.h5 with its config)", "Give the output another extension.")
    doc, _slots, raw, _dropped = _layout(tmp, arrays, template)
    config = json.dumps(doc).encode("utf-8") if doc is not template.document else None
    with zipfile.ZipFile(tmp, "w") as zout:
        if template.kind == "keras":
            with zipfile.ZipFile(template.path) as zin:
                for info in zin.infolist():
                    if info.filename == keras3._WEIGHTS:
                        data = raw
                    elif info.filename == keras3._CONFIG and config is not None:
                        data = config
                    else:
                        data = zin.read(info)
                    zout.writestr(info, data, compress_type=info.compress_type)
            return
        meta = template.keras_metadata or json.dumps(
            {"keras_version": "3.0.0", "date_saved": time.strftime("%Y-%m-%d@%H:%M:%S")}).encode()
        zout.writestr(keras3._META, meta)
        zout.writestr(keras3._CONFIG, config or json.dumps(doc).encode("utf-8"))
        zout.writestr(keras3._WEIGHTS, raw)
