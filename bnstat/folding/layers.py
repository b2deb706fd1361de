"""Layers of a model file and the BatchNorm vocabulary shared by fold, normalize --model,
recalibrate and diff.

Array names -> layers: PyTorch state_dict naming (``x.weight``,
``y.running_mean``...) and Keras naming (``kernel``, ``gamma``,
``moving_mean``..., with ``:0`` suffixes and the nesting of Keras HDF5
files) are both recognised, layer by layer (:func:`parse_layers`).

The BN vocabulary, for any module that needs a model's BatchNorm layers
(see README "Model files"):

- ``bn_layers(arrays) -> {layer: {role: key}}``: the BatchNorm layers of a
  mapping of named arrays, roles being the framework's own names
  (``running_mean``, ``running_var``, ``weight``, ``bias`` or
  ``moving_mean``, ``moving_variance``, ``gamma``, ``beta``).
- ``bn_params(arrays, name, eps=None, where=...) -> BNParams``: one layer's
  ``mean``, ``var``, ``gamma``, ``beta`` (float64, gamma/beta None when the
  file has none), ``eps`` (given, else the convention's default of
  :data:`DEFAULT_EPS`), ``convention``, ``layer`` and ``keys``; ``name`` is
  the layer or any trailing part of it. Raises DataError for an unknown or
  ambiguous name (listing the layers), a NaN or negative variance, NaN
  parameters.
- ``short_names(layer)``: the names a user may give for a layer.

Evidence from a reader (the hook for pickled module trees, ONNX graphs...):
a reader that knows more than names and shapes fills, per layer, the
attributes ``module_type`` (the framework class, e.g. ``"Conv2d"``,
``"ConvTranspose2d"``, ``"BatchNorm2d"``, ``"DepthwiseConv2D"``),
``groups`` (int) and ``eps`` (a BN's epsilon) of :class:`Layer`. It does so
through ``ModelIndex.metadata["layers"]``: ``{layer name (the prefix of its
array keys, e.g. "features.0"): {"module_type": ..., "groups": ...,
"eps": ...}}``; :func:`apply_layer_metadata` copies them onto the layers,
and pairing then treats the module type as evidence (a ConvTranspose is
read as transposed, a BN's eps is used).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from bnstat.errors import DataError

PYTORCH = "pytorch"
KERAS = "keras"
DEFAULT_EPS = {PYTORCH: 1e-5, KERAS: 1e-3}
CONVENTION_LABEL = {PYTORCH: "PyTorch", KERAS: "Keras", "mixed": "PyTorch and Keras", None: "unknown"}

_TORCH_PARAMS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_KERAS_PARAMS = {"kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance",
                 "depthwise_kernel", "pointwise_kernel"}
_KERAS_ONLY = _KERAS_PARAMS - {"bias"}
_KERAS_SUFFIX = re.compile(r":\d+$")
_SEP = re.compile(r"[./]")

_BN_TOKEN = re.compile(r"^(?:bn|batchnorm|batch_norm|bnorm|norm)s?(\d*)$", re.IGNORECASE)
_CONV_TOKEN = re.compile(
    r"^(?:conv|convolution|deconv|convt|conv_?transpose|dwconv|pwconv|sepconv|fc|linear|dense|proj)"
    r"s?(\d*)$", re.IGNORECASE)
_KERAS_AUTO = re.compile(
    r"^(?:batch_normalization|conv[123]d|conv[123]d_transpose|dense|depthwise_conv[12]d|"
    r"separable_conv[12]d)(?:_\d+)?$")
_SPATIAL = {1: "L", 2: "HW", 3: "DHW"}
_TRANSPOSE_NAME = re.compile(r"(?i)transpose|deconv|convt|up_?conv|upsampl|^up\d*$")
KINDS = ("conv", "conv_transpose", "linear", "dense", "depthwise", "separable")
_KIND_ALIASES = {
    "conv": "conv", "convolution": "conv", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
    "conv_transpose": "conv_transpose", "conv-transpose": "conv_transpose",
    "convtranspose": "conv_transpose", "transpose": "conv_transpose", "deconv": "conv_transpose",
    "conv2dtranspose": "conv_transpose", "linear": "linear", "gemm": "linear", "dense": "dense",
    "depthwise": "depthwise", "separable": "separable",
}


# ---- layers ------------------------------------------------------------------

@dataclass
class Layer:
    """A group of arrays sharing a name prefix: one layer of the model."""

    name: str  # the prefix in the file: features.0, model_weights/conv2d/conv2d
    convention: str  # pytorch or keras
    params: dict[str, str]  # param -> array key
    order: int  # position of the layer's first array in model order
    role: str = "other"  # bn, weighted or other
    display: str = ""
    shapes: dict[str, tuple] = field(default_factory=dict)  # param -> shape
    # Evidence beyond names and shapes (the hook readers fill, see the module docstring): the
    # framework class (Conv2d, ConvTranspose2d, DepthwiseConv2D...), groups, a BN's epsilon;
    # kind_hint is the kind they imply (conv, conv_transpose, depthwise...), kind_source where
    # it comes from ("graph" for a Keras model_config, "module type" for a pickled module tree)
    module_type: str | None = None
    groups: int | None = None
    eps: float | None = None
    kind_hint: str | None = None
    kind_source: str | None = None
    block: str | None = None
    seq: int | None = None  # position of its layer group in a Keras file's layer_names

    @property
    def keras_name(self) -> str:
        return self.display.rsplit("/", 1)[-1]

    @property
    def segments(self) -> list[str]:
        return [s for s in _SEP.split(self.display) if s] if self.convention == PYTORCH \
            else [s for s in self.display.split("/") if s]

    @property
    def channels(self) -> int | None:
        """A BN's channel count (the length of its running mean)."""
        key = "running_mean" if self.convention == PYTORCH else "moving_mean"
        shape = self.shapes.get(key)
        return int(np.prod(shape)) if shape is not None else None

    @property
    def weight_param(self) -> str:
        if self.convention == PYTORCH:
            return "weight"
        if "pointwise_kernel" in self.params:
            return "pointwise_kernel"
        return "depthwise_kernel" if "depthwise_kernel" in self.params else "kernel"


def _split_key(key: str):
    """(layer, param, convention) of an array name, or None.

    ``bias`` belongs to both conventions: its convention is None and the
    layer's other arrays decide.
    """
    stripped = _KERAS_SUFFIX.sub("", key)
    if "/" in stripped:
        layer, _, param = stripped.rpartition("/")
        if param in _KERAS_ONLY:
            return layer, param, KERAS
    match = re.match(r"^(.+)[./]([^./]+)$", stripped)
    if match and match.group(2) == "bias":
        return match.group(1), "bias", None
    match = re.match(r"^(.+)[./]([^./]+)$", key)
    if match and match.group(2) in _TORCH_PARAMS:
        return match.group(1), match.group(2), PYTORCH
    return None


def _keras_display(name: str) -> str:
    segs = [s for s in name.split("/") if s]
    if segs and segs[0] == "model_weights":
        segs = segs[1:]
    for n in range(len(segs) // 2, 0, -1):  # conv2d/conv2d -> conv2d, conv1/bn/conv1/bn -> conv1/bn
        if segs[-2 * n:-n] == segs[-n:]:
            segs = segs[:-n]
            break
    return "/".join(segs) or name


def parse_layers(entries: Mapping[str, tuple]) -> list[Layer]:
    """Layers of a model from ``{name: (shape, dtype)}`` in model order.

    Every layer gets a role: ``bn`` (running statistics), ``weighted`` (a
    conv / conv-transpose / linear weight of 2 to 5 dimensions, maybe a bias)
    or ``other`` (left as it is).
    """
    groups: dict[str, dict] = {}
    for i, key in enumerate(entries):
        parsed = _split_key(key)
        if parsed is None:
            continue
        layer, param, conv = parsed
        g = groups.setdefault(layer, {"params": {}, "conv": set(), "order": i})
        if param in g["params"]:  # features.0.weight and features.0/weight: keep the first
            continue
        g["params"][param] = key
        if conv is not None:
            g["conv"].add(conv)
    layers = []
    for name, g in groups.items():
        convs = g["conv"]
        if len(convs) != 1:
            continue
        convention = convs.pop()
        shapes = {p: tuple(entries[k][0]) for p, k in g["params"].items()}
        layer = Layer(name, convention, g["params"], g["order"], shapes=shapes)
        p = set(g["params"])
        if convention == PYTORCH:
            if {"running_mean", "running_var"} <= p:
                layer.role = "bn"
            elif "weight" in p and p <= {"weight", "bias"} and 2 <= len(shapes["weight"]) <= 5:
                layer.role = "weighted"
        else:
            if {"moving_mean", "moving_variance"} <= p and p <= {"gamma", "beta", "moving_mean",
                                                                "moving_variance"}:
                layer.role = "bn"
            elif p in ({"kernel"}, {"kernel", "bias"}) and 2 <= len(shapes["kernel"]) <= 5:
                layer.role = "weighted"
            elif p in ({"depthwise_kernel"}, {"depthwise_kernel", "bias"}) \
                    and 3 <= len(shapes["depthwise_kernel"]) <= 5:
                layer.role = "weighted"
            elif {"depthwise_kernel", "pointwise_kernel"} <= p <= {"depthwise_kernel",
                                                                  "pointwise_kernel", "bias"}:
                layer.role = "weighted"
        layer.display = name if convention == PYTORCH else _keras_display(name)
        layers.append(layer)
    # display names must stay unique (nested Keras models may repeat a layer name)
    seen: dict[str, int] = {}
    for layer in layers:
        seen[layer.display] = seen.get(layer.display, 0) + 1
    for layer in layers:
        if seen[layer.display] > 1:
            layer.display = layer.name
    layers.sort(key=lambda ly: ly.order)
    return layers


_MODULE_KINDS = (("convtranspose", "conv_transpose"), ("conv2dtranspose", "conv_transpose"),
                 ("conv1dtranspose", "conv_transpose"), ("conv3dtranspose", "conv_transpose"),
                 ("depthwise", "depthwise"), ("separable", "separable"), ("conv", "conv"),
                 ("linear", "linear"), ("dense", "dense"), ("gemm", "linear"))


def kind_of_module(module_type: str | None) -> str | None:
    """The kind a framework class names: ConvTranspose2d -> conv_transpose, Conv2d -> conv..."""
    low = (module_type or "").lower().replace("_", "")
    for word, kind in _MODULE_KINDS:
        if word in low:
            return kind
    return None


def apply_layer_metadata(layers: list[Layer], metadata: Mapping | None) -> None:
    """Copy a reader's per-layer evidence (``{layer: {"module_type", "groups", "eps"}}``) on."""
    if not isinstance(metadata, Mapping):
        return
    for ly in layers:
        info = metadata.get(ly.name)
        if not isinstance(info, Mapping):
            continue
        mt = info.get("module_type")
        if isinstance(mt, str):
            ly.module_type = mt
            kind = kind_of_module(mt)
            if kind is not None and ly.role == "weighted" and ly.kind_hint is None:
                ly.kind_hint, ly.kind_source = kind, "module type"
        g = info.get("groups")
        if isinstance(g, int) and not isinstance(g, bool) and g >= 1:
            ly.groups = g
        e = info.get("eps")
        if isinstance(e, int | float) and not isinstance(e, bool) and e >= 0:
            ly.eps = float(e)


def convention_of(layers: list[Layer]) -> str | None:
    """pytorch, keras, mixed, or None (from the BN layers, else the weighted ones)."""
    for role in ("bn", "weighted"):
        found = {ly.convention for ly in layers if ly.role == role}
        if found:
            return found.pop() if len(found) == 1 else "mixed"
    return None




# ---- the BN vocabulary (normalize --model, recalibrate, diff) --------------------------

PT_BN_KEYS = ("running_mean", "running_var", "weight", "bias")
KERAS_BN_KEYS = ("moving_mean", "moving_variance", "gamma", "beta")


def _strip_suffix(key: str) -> str:
    return key[:-2] if key.endswith(":0") else key


def bn_layers(arrays: Mapping) -> dict[str, dict[str, str]]:
    """The BatchNorm layers of a model's named arrays: ``{layer: {role: key}}``.

    PyTorch naming: NAME.running_mean, .running_var, .weight, .bias. Keras
    naming: .../NAME/moving_mean(:0), moving_variance, gamma, beta. A layer
    needs both its mean and its variance.
    """
    layers: dict[str, dict[str, str]] = {}
    for key in arrays:
        k = _strip_suffix(key)
        for sep in (".", "/"):
            prefix, _, leaf = k.rpartition(sep)
            if not prefix:
                continue
            if sep == "." and leaf in ("running_mean", "running_var"):
                layers.setdefault(prefix, {})[leaf] = key
            if sep == "/" and leaf in ("moving_mean", "moving_variance"):
                layers.setdefault(prefix, {})[leaf] = key
    out = {}
    for layer, roles in layers.items():
        keras = "moving_mean" in roles or "moving_variance" in roles
        names = KERAS_BN_KEYS if keras else PT_BN_KEYS
        sep = "/" if keras else "."
        found = {}
        for role in names:
            for key in (f"{layer}{sep}{role}", f"{layer}{sep}{role}:0"):
                if key in arrays:
                    found[role] = key
        if names[0] in found and names[1] in found:
            out[layer] = found
    return out


def short_names(layer: str) -> set[str]:
    """Names a user may give for a layer: the full path and its trailing parts."""
    parts = layer.split("/")
    return {layer} | {"/".join(parts[i:]) for i in range(len(parts))}


@dataclass
class BNParams:
    """One BatchNorm layer's inference parameters, float64 (gamma/beta None: 1 and 0)."""

    layer: str
    convention: str  # pytorch or keras
    mean: np.ndarray
    var: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    eps: float
    keys: dict[str, str]  # role -> array key


def bn_params(arrays: Mapping, name: str, eps: float | None = None, *,
              where: str = "model=") -> BNParams:
    """The parameters of the BatchNorm layer ``name`` (the layer or a trailing part of it).

    ``eps`` None: the convention's default (:data:`DEFAULT_EPS`). ``where``
    starts every message (the file, or the parameter). Raises DataError when
    the name is unknown or ambiguous (listing the BN layers), the running
    variance is negative or NaN, or a parameter is NaN.
    """
    layers = bn_layers(arrays)
    if not layers:
        raise DataError(f"{where}: no BatchNorm layer found (no running_mean/running_var or "
                        "moving_mean/moving_variance arrays)")
    matches = [layer for layer in layers if name in short_names(layer)]
    if len(matches) != 1:
        listing = ", ".join(layers)
        what = "ambiguous" if matches else "unknown"
        raise DataError(f"{where}: {what} BatchNorm layer {name!r}; the file has: {listing}",
                        "Give one of those names with --bn.")
    layer = matches[0]
    roles = layers[layer]
    keras = "moving_mean" in roles
    get = lambda role: (np.asarray(arrays[roles[role]], np.float64) if role in roles else None)  # noqa: E731
    mean, var, gamma, beta = (get(r) for r in (KERAS_BN_KEYS if keras else PT_BN_KEYS))
    if np.any(np.isnan(var)) or np.any(var < 0):
        raise DataError(f"{where}: BatchNorm {layer}: running variance is negative or NaN")
    for label, value in (("running mean", mean), ("weight", gamma), ("bias", beta)):
        if value is not None and np.any(np.isnan(value)):
            raise DataError(f"{where}: BatchNorm {layer}: {label} has NaN values")
    convention = KERAS if keras else PYTORCH
    return BNParams(layer, convention, mean, var, gamma, beta,
                    DEFAULT_EPS[convention] if eps is None else eps, dict(roles))
