"""What every model format module shares: the index and file records, the
format record the registry holds, and the numeric-dtype check."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bnstat.errors import InputError


@dataclass
class ModelIndex:
    """The arrays of a model file without their values: names in model order.

    ``ordered`` says whether the order of ``entries`` follows the model
    (PyTorch registration order, Keras layer order) or is merely the file's
    (alphabetical HDF5 groups, safetensors' sorted tensors); ``order_source``
    says which, for the plan.
    """

    path: str | None
    format: str  # a registered format's name ("npz", "hdf5", "safetensors", ...) or "memory"
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
            from bnstat.io.models.safetensors import bf16_round

            return bf16_round(values)
        return values


@dataclass(frozen=True)
class ModelFormat:
    """One model file format, as the registry in :mod:`bnstat.io.models` holds it.

    ``sniff(path, head)`` says whether the file is this format from its first
    ``bnstat.io.magic.HEAD_BYTES`` bytes (cheap: magic bytes, at most a peek
    inside a zip); ``index(path)`` and ``read(path)`` return a ModelIndex /
    ModelFile and raise InputError; ``write(tmp, arrays, template)`` writes
    ``arrays`` (in order) to the temporary path ``tmp`` (``template``: the
    ModelIndex read, or None) and raises OutputError, or is None for a
    read-only format. ``extensions`` (lower case, the preferred first) choose
    the format of an output path; ``label`` names the format in messages;
    ``mismatch`` is the message for a file with one of the extensions that
    ``sniff`` refused (``{head}``: its first 4 bytes).
    """

    name: str
    label: str
    extensions: tuple[str, ...]
    sniff: Callable[[str, bytes], bool]
    index: Callable[[str], ModelIndex]
    read: Callable[[str], ModelFile]
    write: Callable[[str, dict, ModelIndex | None], None] | None
    mismatch: str


def check_numeric(where: str, dtype: np.dtype) -> None:
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "fiub":
        raise InputError(f"{where}: dtype {dtype} is not numeric; a model file holds numeric arrays")
