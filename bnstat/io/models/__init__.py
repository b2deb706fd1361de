"""Model files: named arrays read whole, written atomically, one module per format.

A model is read whole (weights are small next to activations), as an
insertion-ordered mapping from array name to numpy array, in model order
(see each format module for what that order is): :func:`read_model` (values)
and :func:`index_model` (names, shapes, dtypes) return a
:class:`ModelFile` / :class:`ModelIndex`; :func:`write_model` writes one
through :func:`bnstat.io.atomic.atomic_path`. Nothing else in bnstat reads
or writes a model file.

The format registry
-------------------
``FORMATS`` below lists one :class:`~bnstat.io.models.base.ModelFormat` per
format, each defined as ``FORMAT`` at the bottom of its own module
(``npz.py``, ``hdf5.py``, ``safetensors.py``). Adding a format is one module
plus one entry in ``FORMATS``:

- the module defines ``index(path) -> ModelIndex`` and ``read(path) ->
  ModelFile`` (InputError for anything wrong with the file, naming it), and
  ``write(tmp, arrays, template)`` (OutputError) or ``write=None``;
  ``ModelIndex.format`` is the format's ``name``;
- ``sniff(path, head)`` decides from the first ``bnstat.io.magic.HEAD_BYTES``
  bytes; magic bytes live in :mod:`bnstat.io.magic` (add new ones there);
- ``FORMATS`` is tried in order and the first format whose ``sniff`` says yes
  reads the file: a format that is a zip inside (torch ``.pt``, Keras 3
  ``.keras``) goes *before* ``npz`` (which claims any zip) and peeks at the
  member names in its ``sniff``;
- ``extensions`` pick the format of an output path (``output_format``) and,
  when no ``sniff`` says yes, the ``mismatch`` message; ``label`` names the
  format in the "unknown model file format" hint;
- framework imports (torch, onnx, h5py) happen inside the functions, never at
  module level: importing the registry must stay cheap for every command that
  reads a model, and the core package never needs a framework installed.
"""

from __future__ import annotations

from bnstat.errors import InputError, OutputError
from bnstat.io import magic
from bnstat.io.atomic import atomic_path
from bnstat.io.base import read_head
from bnstat.io.models import hdf5, keras3, npz, safetensors, torch_pt
from bnstat.io.models.base import ModelFile, ModelFormat, ModelIndex

__all__ = ["ModelIndex", "ModelFile", "ModelFormat", "FORMATS", "model_format", "index_model",
           "read_model", "write_model", "output_format"]

FORMATS: tuple[ModelFormat, ...] = (torch_pt.FORMAT, keras3.WEIGHTS_FORMAT, keras3.FORMAT,
                                    npz.FORMAT, hdf5.FORMAT, safetensors.FORMAT)


def _by_name(name: str) -> ModelFormat | None:
    return next((f for f in FORMATS if f.name == name), None)


def _listing(items: list[str], last: str) -> str:
    return ", ".join(items[:-1]) + f" {last} " + items[-1] if len(items) > 1 else items[0]


def model_format(path: str) -> str:
    """The registered format's name ('npz', 'hdf5', 'safetensors', ...) from the first bytes.

    Raises InputError for a missing, empty or unknown file."""
    hint = "Give a model file (" + ", ".join(f.extensions[0] for f in FORMATS) + ")."
    head = read_head(path, magic.HEAD_BYTES, hint)
    if not head:
        raise InputError(f"{path}: empty file")
    if magic.is_npy(head):
        raise InputError(f"{path}: a single .npy array, not a model file",
                         "A model is a .npz, HDF5 or .safetensors file of named arrays.")
    for fmt in FORMATS:
        if fmt.sniff(path, head):
            return fmt.name
    lower = path.lower()
    for fmt in FORMATS:
        if lower.endswith(fmt.extensions):
            raise InputError(f"{path}: " + fmt.mismatch.format(head=head[:4]))
    labels = _listing([f.label for f in FORMATS], "and")
    raise InputError(f"{path}: unknown model file format",
                     f"bnstat reads models as {labels} files of named arrays.")


def output_format(path: str, default: str | None) -> str | None:
    """The format an output path asks for by its extension, else ``default``."""
    lower = path.lower()
    for fmt in FORMATS:
        if fmt.write is not None and lower.endswith(fmt.extensions):
            return fmt.name
    return default


def index_model(path: str) -> ModelIndex:
    """Names, shapes and dtypes of a model file, in model order, values unread.

    Raises InputError for a missing, unreadable or corrupt file.
    """
    return _by_name(model_format(path)).index(path)


def read_model(path: str) -> ModelFile:
    """Every array of a model file, in model order. Raises InputError."""
    return _by_name(model_format(path)).read(path)


def write_model(path: str, arrays: dict, *, fmt: str | None = None,
                template: ModelIndex | None = None, force: bool = False, inputs=()) -> str:
    """Write ``arrays`` (in order) to ``path`` atomically; returns the format written.

    ``fmt`` defaults to the path's extension, else the template's format. With
    an HDF5 ``template`` read from a file, the output is that file with the
    changed datasets rewritten in place, the missing ones deleted and the new
    ones created, so everything else (groups, attributes, chunks, filters)
    is kept. Raises OutputError (an unknown format is an OutputError naming
    the path).
    """
    fmt = fmt or output_format(path, template.format if template is not None else None)
    writer = _by_name(fmt) if fmt else None
    if writer is None or writer.write is None:
        exts = _listing([f.extensions[0] for f in FORMATS if f.write is not None], "or")
        raise OutputError(f"{path}: cannot tell the model format from the extension", f"Use {exts}.")
    with atomic_path(path, force=force, inputs=inputs) as tmp:
        try:
            writer.write(tmp, arrays, template)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    return fmt
