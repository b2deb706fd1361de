"""HDF5 model files: dataset paths without the leading ``/`` (``model_weights/
conv2d/conv2d/kernel:0``), walked recursively. A Keras weight file names its
layers in model order in the ``layer_names`` attribute and each layer's
weights in ``weight_names``: that order is used when the file has it;
otherwise h5py's iteration order, which is alphabetical unless the groups
track creation order.

An HDF5 output is a copy of the input file changed in place, so groups,
attributes, chunking and compression survive; Keras' ``layer_names``/
``weight_names`` attributes are updated for added and dropped weights.
"""

from __future__ import annotations

import json
import shutil

import numpy as np

from bnstat.errors import InputError
from bnstat.io import magic
from bnstat.io.models.base import ModelFile, ModelFormat, ModelIndex


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
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None  # a broken config is ignored: names and shapes still pair
    return doc if isinstance(doc, dict) else None


def _datasets(path: str, f):
    """(name, dataset) of every dataset, and whether every group keeps creation order."""
    from bnstat.io.hdf5 import tracks_creation_order, walk

    groups: list = []
    found = []
    for name, ds, problem in walk(path, f, groups):
        if problem:
            raise InputError(f"{path}:{name}: {problem}")
        found.append((name, ds))
    return found, all(tracks_creation_order(g) for g in groups)


def _read(path: str, values: bool):
    from bnstat.io.hdf5 import open_h5

    f = open_h5(path)
    entries: dict = {}
    arrays: dict = {}
    try:
        with f:
            found, tracked = _datasets(path, f)
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


def write(tmp: str, arrays: dict, template: ModelIndex | None) -> None:
    # through atomic.hdf5_file: a full disk is an OSError, never a crash in HDF5
    from bnstat.io.atomic import hdf5_file

    if template is None or template.format != "hdf5" or template.path is None:
        with hdf5_file(tmp) as (f, _check):
            for name, a in arrays.items():
                f.create_dataset(name, data=np.asarray(a))
        return
    shutil.copyfile(template.path, tmp)
    with hdf5_file(tmp, mode="r+") as (f, _check):
        _edit(f, arrays, template)


def _edit(f, arrays: dict, template: ModelIndex) -> None:
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


def index(path: str) -> ModelIndex:
    return _read(path, values=False)


def read(path: str) -> ModelFile:
    return _read(path, values=True)


FORMAT = ModelFormat(
    name="hdf5", label="HDF5 (.h5)", extensions=(".h5", ".hdf5", ".hdf"),
    sniff=magic.is_hdf5, index=index, read=read, write=write,
    mismatch="not an HDF5 file (no HDF5 signature)")
