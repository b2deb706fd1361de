"""Folding BatchNorm into the conv / conv-transpose / linear layer that feeds it (SPEC 3).

With s = gamma / sqrt(var + eps), computed in float64::

    W' = W * s   along W's output channels
    b' = (b - mean) * s + beta      (b = 0 where the layer had no bias)

and the results cast back to the weight's dtype.

The pieces, in the order :func:`fold` runs them:

1. :func:`parse_layers`: array names -> layers. PyTorch state_dict naming
   (``x.weight``, ``y.running_mean``...) and Keras naming (``kernel``,
   ``gamma``, ``moving_mean``..., with ``:0`` suffixes and the nesting of
   Keras HDF5 files) are both recognised, layer by layer.
2. :func:`make_plan`: every BatchNorm paired with the layer that feeds it,
   from explicit pairs (``--pair``, a plan file), then names, then shapes
   and file order. A BN that cannot be paired unambiguously is reported
   with the reason and left alone: never guessed (the heuristics are listed
   in :data:`PAIRING_RULES`).
3. :func:`fold_arrays`: the folding math, for every weight layout of SPEC 3,
   with ``--bn drop`` or ``--bn identity``; refusals (negative or NaN
   variance, NaN parameters, channel mismatches) are DataErrors naming the
   layer, raised before anything is written.
4. :func:`check_pairs`: each folded layer against the original layer then
   BN (inference mode), on random inputs, through the pure-numpy reference
   convolution / transposed convolution / matmul of this module.

No click and no rich here; :mod:`bnstat.fold_render` draws the plan.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from bnstat.errors import DataError, InputError, OutputError, UsageProblem, warn

__all__ = ["fold", "describe_model", "FoldResult", "Pair", "Unpaired", "Layer", "Reading",
           "parse_layers", "make_plan", "DEFAULT_EPS", "PAIRING_RULES", "FoldCheckError"]

PYTORCH = "pytorch"
KERAS = "keras"
DEFAULT_EPS = {PYTORCH: 1e-5, KERAS: 1e-3}
CONVENTION_LABEL = {PYTORCH: "PyTorch", KERAS: "Keras", "mixed": "PyTorch and Keras", None: "unknown"}

PAIRING_RULES = """\
1. Explicit pairs first: --pair CONV=BN, then the pairs of a --plan file (which may also fix the
   kind, e.g. conv_transpose, the groups and the eps); a plan's "unfolded" BNs are left alone.
2. Keras model graph: a Keras HDF5 model's model_config names the layer feeding each BN, the
   layer classes (Conv2DTranspose...), groups, activations and each BN's epsilon. A BN fed by a
   non-conv layer, by a conv with a fused activation, or by a conv that also feeds other layers
   is not folded.
3. Sequential neighbours (PyTorch): BN `P.k` is fed by `P.(k-1)` (features.0/features.1,
   downsample.0/downsample.1). If `P.(k-1)` has no weights (ReLU, pooling, dropout) or is not a
   conv/linear, the BN is not folded: folding through another module is wrong.
4. Names differing in one segment by a BN word vs a conv word: conv1/bn1, conv/bn, conv0/norm0,
   stem_conv/stem_bn, convs.1/bns.1, or by a BN suffix or prefix: conv1/conv1_bn, Conv1/bn_Conv1.
   Keras' automatic names (conv2d_3, batch_normalization_3) are numbered apart and not used.
   A layer named for two BNs pairs with neither.
5. Pre-activation guard: when the file order is the model's and the layer a BN's name points at
   comes after the BN and has the BN's channel count, the block is BN -> ReLU -> conv: not folded.
6. Keras layer order (layer_names of an HDF5 file, or model.weights order in .npz): the weighted
   layer directly before the BN, if it fits.
7. Shapes: among the layers not yet paired whose output channels equal the BN's (and that come
   before it, when the file order is the model's): exactly one, directly before the BN, is paired;
   none, or several, or one further away: reported with the candidates, not folded. BNs are taken
   in model order, so earlier BNs claim their layers first. A layer feeds at most one BN.
8. Readings: PyTorch (out, in/groups, k...) is a conv when shape[0] fits; (in, out/groups, k...)
   a conv-transpose with groups = C / shape[1] only when the conv reading does not fit, and, when
   pairing by shapes alone, only for layers named or configured as transposed (a conv whose input
   channels equal the BN's would read as one: a pre-activation BN). Keras (k..., in, out) likewise
   before (k..., out, in); depthwise_kernel (k..., C, M) gives output channel c*M+m; a separable
   conv folds into its pointwise kernel.
"""

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
    # from a Keras model_config: the layer's class, groups, epsilon, and why it cannot feed a BN
    kind_hint: str | None = None
    groups_hint: int | None = None
    eps_hint: float | None = None
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


def convention_of(layers: list[Layer]) -> str | None:
    """pytorch, keras, mixed, or None (from the BN layers, else the weighted ones)."""
    for role in ("bn", "weighted"):
        found = {ly.convention for ly in layers if ly.role == role}
        if found:
            return found.pop() if len(found) == 1 else "mixed"
    return None


# ---- readings of a weight ----------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """How a weight is read: its kind, axis layout, output channels and groups."""

    kind: str
    layout: str
    channels: int
    groups: int = 1
    framework: str = PYTORCH

    @property
    def label(self) -> str:
        return self.kind.replace("_", "-")


def _readings(layer: Layer, C: int | None, kind: str | None = None,
              groups: int | None = None) -> list[Reading]:
    """The readings of a layer's weight, ordinary first; those fitting C only when C is given."""
    shape = layer.shapes[layer.weight_param]
    nd = len(shape)
    out: list[Reading] = []
    if layer.convention == PYTORCH:
        if nd == 2:
            out.append(Reading("linear", "OI", shape[0], 1))
        else:
            sp = _SPATIAL[nd - 2]
            g = groups or 1
            if shape[0] % g == 0:
                out.append(Reading("conv", "OI" + sp, shape[0], g))
            if groups is not None:
                gt = groups
            elif C is not None and shape[1] and C % shape[1] == 0:
                gt = C // shape[1]
            else:
                gt = 1
            if gt >= 1 and shape[0] % gt == 0:
                out.append(Reading("conv_transpose", "IO" + sp, shape[1] * gt, gt))
    else:
        fw = KERAS
        param = layer.weight_param
        if param == "pointwise_kernel":
            out.append(Reading("separable", "HWIO" if nd == 4 else _SPATIAL.get(nd - 2, "?") + "IO",
                               shape[-1], 1, fw))
        elif param == "depthwise_kernel":
            out.append(Reading("depthwise", _SPATIAL[nd - 2] + "CM", shape[-2] * shape[-1],
                               shape[-2], fw))
        elif nd == 2:
            out.append(Reading("dense", "IO", shape[-1], 1, fw))
        else:
            sp = _SPATIAL[nd - 2]
            out.append(Reading("conv", sp + "IO", shape[-1], groups or 1, fw))
            out.append(Reading("conv_transpose", sp + "OI", shape[-2], 1, fw))
    if kind is not None:
        same = {kind, "linear", "dense"} if kind in ("linear", "dense") else {kind}
        out = [r for r in out if r.kind in same]
    if C is not None:
        out = [r for r in out if r.channels == C]
    return out


def fit(layer: Layer, C: int, kind: str | None = None, groups: int | None = None,
        transpose: bool = True) -> Reading | None:
    """The reading of ``layer`` whose output channels are C (ordinary conv first), or None.

    Without ``kind``/``groups``, those a Keras model_config gives are used.
    ``transpose=False`` leaves out the conv-transpose reading unless the
    config or the layer's name says it is one: a conv whose *input* channels
    are C also reads as a conv-transpose with C outputs, which is how a
    pre-activation BN (BN -> conv) would look.
    """
    if kind is None and groups is None:
        kind, groups = layer.kind_hint, layer.groups_hint
    found = _readings(layer, C, kind, groups)
    if not transpose and kind is None and not _transposey(layer):
        found = [r for r in found if r.kind != "conv_transpose"]
    return found[0] if found else None


def _transposey(layer: Layer) -> bool:
    return bool(_TRANSPOSE_NAME.search(layer.segments[-1] if layer.segments else ""))


def _outs_text(layer: Layer) -> str:
    shape = layer.shapes[layer.weight_param]
    reads = _readings(layer, None)
    parts = ", ".join(f"{r.channels} as {r.label} {r.layout}" for r in reads)
    return f"{layer.params[layer.weight_param]} {tuple(shape)} has output channels {parts}"


# ---- the plan ----------------------------------------------------------------

@dataclass
class Pair:
    """One BN folded into one layer."""

    conv: Layer
    bn: Layer
    reading: Reading
    eps: float
    by: str  # the evidence: --pair, plan, sequence, name, layer order, shape
    eps_source: str = "default"
    note: str = ""
    caution: str = ""  # a doubt about the reading, warned about by fold()
    check_abs: float | None = None
    check_rel: float | None = None
    tolerance: float | None = None

    @property
    def ok(self) -> bool:
        return self.check_rel is None or (not math.isnan(self.check_rel)
                                          and self.check_rel <= self.tolerance)

    def record(self) -> dict:
        rec = {"conv": self.conv.display, "bn": self.bn.display, "kind": self.reading.kind,
               "layout": self.reading.layout, "groups": self.reading.groups,
               "channels": self.reading.channels, "eps": self.eps, "by": self.by}
        if self.note:
            rec["note"] = self.note
        if self.check_rel is not None:
            rec["check"] = {"max_abs_error": _json_float(self.check_abs),
                            "max_rel_error": _json_float(self.check_rel),
                            "tolerance": self.tolerance, "ok": self.ok}
        return rec


@dataclass
class Unpaired:
    """A BN left unfolded, and why."""

    bn: Layer
    reason: str
    candidates: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"bn": self.bn.display, "channels": self.bn.channels, "conv": None,
                "reason": self.reason, "candidates": self.candidates}


def _json_float(v):
    return None if v is None or not math.isfinite(v) else v


@dataclass
class Explicit:
    conv: str | None  # None: leave the BN unfolded
    bn: str
    kind: str | None = None
    groups: int | None = None
    eps: float | None = None
    source: str = "--pair"


def resolve(name: str, layers: list[Layer], what: str, source: str) -> Layer:
    """The layer a user means by ``name``: a layer name, an array key or a unique suffix.

    Raises UsageProblem when nothing or several layers match.
    """
    for ly in layers:
        if name in (ly.name, ly.display):
            return ly
    for ly in layers:
        if name in ly.params.values() or name in {_KERAS_SUFFIX.sub("", k) for k in ly.params.values()}:
            return ly
    hits = [ly for ly in layers
            if any(full.endswith(sep + name) for full in (ly.name, ly.display) for sep in "./")]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise UsageProblem(f"{source}: {what} {name!r} matches several layers: "
                           + ", ".join(ly.display for ly in hits[:6]),
                           "Give the full layer name.")
    close = difflib.get_close_matches(name, [ly.display for ly in layers], n=3)
    raise UsageProblem(f"{source}: no layer {name!r} in the model",
                       f"Did you mean {' or '.join(close)}?" if close else
                       "List the layers with: bnstat fold MODEL --dry-run")


def _name_partner(bn: Layer, by_display: dict[str, Layer],
                  C: int | None = None) -> tuple[Layer | None, str, bool]:
    """The layer a BN's name points at: (layer, rule, blocks) where blocks means stop here.

    Returns (None, reason, True) when the name says the BN cannot be folded
    (a parameter-free module before it in its Sequential).
    """
    segs = bn.segments
    if not segs:
        return None, "", False
    last = segs[-1]
    if bn.convention == PYTORCH and last.isdigit():
        k = int(last)
        parent = bn.display[:len(bn.display) - len(last) - 1]
        sep = bn.display[len(parent)] if parent else "."
        siblings = [ly for ly in by_display.values()
                    if parent and ly.display.startswith(parent + sep)
                    and ly.display[len(parent) + 1:].split(".")[0].split("/")[0].isdigit()]
        mixed = any(ly.role == "weighted" for ly in siblings)
        prev = f"{parent}{sep}{k - 1}" if parent else str(k - 1)
        if k >= 1 and mixed:
            layer = by_display.get(prev)
            if layer is not None and layer.role == "weighted":
                return layer, "sequence", False
            if layer is not None:
                what = "another BatchNorm" if layer.role == "bn" else "not a conv or linear layer"
                return None, (f"the module before it in its Sequential, {prev}, is {what}; "
                              "a BN is folded only into the layer directly before it"), True
            if not any(ly.display.startswith(prev + sep) for ly in by_display.values()):
                return None, (f"the module before it in its Sequential, {prev}, has no weights "
                              "(an activation, pooling or dropout?); folding through it would be "
                              "wrong"), True
    if bn.convention == KERAS and _KERAS_AUTO.match(last):
        return None, "", False
    stripped = _strip_bn(last)
    found = []
    for ly in by_display.values():
        if ly.role != "weighted":
            continue
        other = ly.segments
        if len(other) != len(segs):
            continue
        diff = [i for i, (a, b) in enumerate(zip(segs, other, strict=True)) if a != b]
        if len(diff) != 1:
            continue
        i = diff[0]
        a, b = segs[i], other[i]
        if (i == len(segs) - 1 and stripped is not None and b == stripped) \
                or _segment_keys(a, _BN_TOKEN) & _segment_keys(b, _CONV_TOKEN):
            found.append((ly, "name"))
    if len(found) > 1 and C is not None:  # conv1 and fc1 beside bn1: the one that fits
        fitting = [f for f in found if fit(f[0], C) is not None]
        found = fitting if len(fitting) == 1 else found
    if len(found) == 1:
        return found[0][0], found[0][1], False
    return None, "", False


def _segment_keys(seg: str, token: re.Pattern) -> set:
    """Keys of a name segment with its BN (or conv) word replaced by '#': bn1 -> {'#1'}."""
    toks = seg.split("_")
    keys = set()
    for i, t in enumerate(toks):
        m = token.match(t)
        if m:
            keys.add("_".join(toks[:i] + ["#" + m.group(1)] + toks[i + 1:]).lower())
    m = token.match(seg)
    if m:
        keys.add("#" + m.group(1))
    return keys


def _strip_bn(seg: str) -> str | None:
    """conv1_bn -> conv1, bn_Conv1 -> Conv1, expanded_conv_depthwise_BN -> ...; else None."""
    toks = seg.split("_")
    if len(toks) < 2:
        return None
    if re.fullmatch(r"(?i)bn|batchnorm|batch_norm|norm", toks[-1]):
        return "_".join(toks[:-1])
    if re.fullmatch(r"(?i)bn|batchnorm|norm", toks[0]):
        return "_".join(toks[1:])
    return None


# ---- a Keras model_config: classes, epsilon, the graph -----------------------------------

_KERAS_CLASS_KINDS = {"Dense": "dense", "DepthwiseConv1D": "depthwise", "DepthwiseConv2D": "depthwise",
                      "SeparableConv1D": "separable", "SeparableConv2D": "separable",
                      "Conv1DTranspose": "conv_transpose", "Conv2DTranspose": "conv_transpose",
                      "Conv3DTranspose": "conv_transpose", "Convolution2DTranspose": "conv_transpose",
                      "Conv1D": "conv", "Conv2D": "conv", "Conv3D": "conv",
                      "Convolution1D": "conv", "Convolution2D": "conv", "Convolution3D": "conv"}
_BN_CLASSES = {"BatchNormalization", "SyncBatchNormalization"}


def _inbound_names(layer: dict) -> list[str]:
    """The layers feeding a layer of a Keras functional config (Keras 2 and 3 formats)."""
    names: list[str] = []

    def walk(obj):
        if isinstance(obj, dict):
            hist = (obj.get("config") or {}).get("keras_history") \
                if obj.get("class_name") == "__keras_tensor__" else None
            if isinstance(hist, list) and hist and isinstance(hist[0], str):
                names.append(hist[0])
                return
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int):
                names.append(obj[0])  # Keras 2: [name, node_index, tensor_index, kwargs]
                return
            for v in obj:
                walk(v)

    walk(layer.get("inbound_nodes") or [])
    return names


def keras_graph(config: dict) -> dict[str, dict]:
    """``{layer name: {"class", "config", "inputs", "consumers"}}`` from a Keras model_config.

    Sequential models feed each layer from the one before it; functional
    models from their inbound nodes; nested models are walked too.
    """
    graph: dict[str, dict] = {}

    def visit(model: dict) -> None:
        cfg = model.get("config") if isinstance(model.get("config"), dict) else {}
        layers = cfg.get("layers")
        if not isinstance(layers, list):
            return
        sequential = model.get("class_name") == "Sequential"
        prev = None
        for ly in layers:
            if not isinstance(ly, dict):
                continue
            lcfg = ly.get("config") if isinstance(ly.get("config"), dict) else {}
            name = lcfg.get("name") or ly.get("name")
            if not isinstance(name, str):
                continue
            inputs = ([prev] if prev else []) if sequential else _inbound_names(ly)
            graph[name] = {"class": ly.get("class_name"), "config": lcfg, "inputs": inputs,
                           "consumers": []}
            prev = name
            visit(ly)
    visit(config)
    for name, node in graph.items():
        for src in node["inputs"]:
            if src in graph:
                graph[src]["consumers"].append(name)
    return graph


def apply_keras_config(layers: list[Layer], graph: dict[str, dict]) -> None:
    """Give Keras layers the kind, groups, epsilon and activation their config states."""
    for ly in layers:
        if ly.convention != KERAS:
            continue
        node = graph.get(ly.keras_name)
        if node is None:
            continue
        cfg = node["config"]
        if ly.role == "bn":
            eps = cfg.get("epsilon")
            if isinstance(eps, int | float) and not isinstance(eps, bool) and eps >= 0:
                ly.eps_hint = float(eps)
        elif ly.role == "weighted":
            kind = _KERAS_CLASS_KINDS.get(node["class"])
            if kind is not None and ly.weight_param == "kernel" and kind in ("conv", "conv_transpose",
                                                                             "dense"):
                ly.kind_hint = kind
            groups = cfg.get("groups")
            if isinstance(groups, int) and groups > 1 and kind == "conv":
                ly.groups_hint = groups
            act = cfg.get("activation")
            if isinstance(act, dict):  # a serialized activation object
                act = (act.get("config") or {}).get("name") or act.get("class_name")
            if act not in (None, "linear", "Linear"):
                ly.block = f"{ly.display} applies its activation ({act}) before the BN"


def _graph_pass(bns: list[Layer], by_keras: dict[str, Layer], graph: dict[str, dict],
                decided: dict, claimed: dict, eps_for) -> None:
    """Pair Keras BNs from the model graph: definitive where the config knows the layer."""
    for bn in bns:
        if bn.name in decided or bn.convention != KERAS or bn.keras_name not in graph:
            continue
        ins = graph[bn.keras_name]["inputs"]
        if len(ins) != 1:
            decided[bn.name] = Unpaired(bn, f"the model graph feeds it from {len(ins)} layers")
            continue
        src = graph.get(ins[0], {})
        conv = by_keras.get(ins[0])
        if conv is None or conv.role != "weighted":
            what = src.get("class") or "a layer"
            decided[bn.name] = Unpaired(bn, f"the model graph feeds it from {ins[0]} ({what}), not "
                                        "from a conv or dense layer; folding through it would be wrong")
            continue
        consumers = src.get("consumers", [])
        if len(consumers) > 1:
            others = ", ".join(c for c in consumers if c != bn.keras_name)
            decided[bn.name] = Unpaired(bn, f"{conv.display} also feeds {others}: folding would "
                                        "change their input", [conv.display])
            continue
        if conv.block:
            decided[bn.name] = Unpaired(bn, conv.block, [conv.display])
            continue
        if conv.name in claimed:
            continue
        reading = fit(conv, bn.channels)
        if reading is None:
            decided[bn.name] = Unpaired(bn, f"the model graph feeds it from {conv.display}, but "
                                        f"{_outs_text(conv)}, not {bn.channels}", [conv.display])
            continue
        e, src_label = eps_for(bn, None)
        decided[bn.name] = Pair(conv, bn, reading, e, "model graph", eps_source=src_label)
        claimed[conv.name] = bn


def _previous(bn: Layer, layers: list[Layer]) -> Layer | None:
    """The layer directly before a BN in the model: from a Keras file's layer_names when known
    (where a weightless Dropout or pooling layer in between leaves None), else file order."""
    if bn.seq is not None:
        before = [ly for ly in layers if ly.seq == bn.seq - 1]
        return before[0] if len(before) == 1 else None
    before = [ly for ly in layers if ly.order < bn.order]
    return max(before, key=lambda ly: ly.order) if before else None


def make_plan(layers: list[Layer], *, explicit: Iterable[Explicit] = (), eps: float | None = None,
              ordered: bool = True, keras_order: bool = False, plan_eps: float | None = None,
              graph: dict | None = None) -> tuple[list[Pair], list[Unpaired]]:
    """Pair every BN with the layer feeding it (see PAIRING_RULES).

    Raises UsageProblem for explicit pairs that name no layer, or the wrong
    kind of layer, or one layer twice; DataError for an explicit pair whose
    channel counts differ.
    """
    bns = [ly for ly in layers if ly.role == "bn"]
    weighted = [ly for ly in layers if ly.role == "weighted"]
    by_display = {ly.display: ly for ly in layers}
    claimed: dict[str, Layer] = {}  # conv name -> bn
    decided: dict[str, Pair | Unpaired] = {}  # bn name -> outcome

    def eps_for(bn: Layer, own: float | None) -> tuple[float, str]:
        if eps is not None:
            return eps, "--eps"
        if own is not None:
            return own, "plan"
        if plan_eps is not None:
            return plan_eps, "plan"
        if bn.eps_hint is not None:
            return bn.eps_hint, "model config"
        return DEFAULT_EPS[bn.convention], f"{CONVENTION_LABEL[bn.convention]} default"

    for ex in explicit:
        bn = resolve(ex.bn, layers, "BN", ex.source)
        if bn.role != "bn":
            raise UsageProblem(f"{ex.source}: {bn.display} is not a BatchNorm layer (it has "
                               f"{', '.join(bn.params)}; a BN has running statistics)")
        if bn.name in decided:
            raise UsageProblem(f"{ex.source}: the BN {bn.display} is named twice")
        if ex.conv is None:
            decided[bn.name] = Unpaired(bn, f"left unfolded by {ex.source}")
            continue
        conv = resolve(ex.conv, layers, "layer", ex.source)
        if conv.role != "weighted":
            raise UsageProblem(f"{ex.source}: {conv.display} is not a conv, conv-transpose or linear "
                               f"layer (it has {', '.join(conv.params)})")
        if conv.name in claimed:
            raise UsageProblem(f"{ex.source}: {conv.display} is paired with two BNs "
                               f"({claimed[conv.name].display} and {bn.display}); a layer feeds one BN")
        C = bn.channels
        reading = fit(conv, C, ex.kind, ex.groups)
        if reading is None:
            want = f" as {ex.kind.replace('_', '-')}" if ex.kind else ""
            raise DataError(f"{bn.display}: channel-count mismatch: the BN has {C} channels but "
                            f"{_outs_text(conv)}; refusing to fold it into {conv.display}{want} "
                            "(nothing written)",
                            "Check the pair, or the kind and groups in the plan.")
        e, src = eps_for(bn, ex.eps)
        decided[bn.name] = Pair(conv, bn, reading, e, "--pair" if ex.source == "--pair" else "plan",
                                eps_source=src)
        claimed[conv.name] = bn

    if graph:
        by_keras = {ly.keras_name: ly for ly in layers if ly.convention == KERAS}
        _graph_pass(bns, by_keras, graph, decided, claimed, eps_for)

    # names: a layer named for two BNs pairs with neither
    proposals: dict[str, list[tuple[Layer, Layer, str]]] = {}  # conv name -> [(conv, bn, rule)]
    notes: dict[str, str] = {}  # bn name -> why its name partner did not fit
    for bn in bns:
        if bn.name in decided:
            continue
        if bn.channels is None or len(bn.shapes.get("running_mean" if bn.convention == PYTORCH
                                                    else "moving_mean", ())) != 1:
            decided[bn.name] = Unpaired(bn, "its running mean is not a 1-D array")
            continue
        partner, rule, blocks = _name_partner(bn, by_display, bn.channels)
        if blocks:
            decided[bn.name] = Unpaired(bn, rule)
            continue
        if partner is None or partner.name in claimed:
            continue
        if partner.block:
            decided[bn.name] = Unpaired(bn, partner.block, [partner.display])
            continue
        after = ordered and partner.order > bn.order
        if fit(partner, bn.channels, transpose=not after) is None:
            notes[bn.name] = (f"{partner.display} matches it by name but {_outs_text(partner)}, "
                              f"not {bn.channels}")
            continue
        if after:
            decided[bn.name] = Unpaired(
                bn, f"{partner.display} matches it by name but comes after it in the file: a "
                "pre-activation block (BN -> ReLU -> conv) cannot be folded; if "
                f"{partner.display} does feed it, say --pair {partner.display}={bn.display}",
                [partner.display])
            continue
        proposals.setdefault(partner.name, []).append((partner, bn, rule))
    for props in proposals.values():
        if len(props) > 1:
            names = ", ".join(p[1].display for p in props)
            for partner, bn, _ in props:
                decided[bn.name] = Unpaired(
                    bn, f"ambiguous: {partner.display} matches the names of several BNs ({names})",
                    [partner.display])
            continue
        partner, bn, rule = props[0]
        e, src = eps_for(bn, None)
        decided[bn.name] = Pair(partner, bn, fit(partner, bn.channels), e, rule, eps_source=src)
        claimed[partner.name] = bn

    # order and shapes, in model order so that earlier BNs claim their layers first
    for bn in bns:
        if bn.name in decided:
            continue
        C = bn.channels
        prev = _previous(bn, layers) if ordered else None
        fits = [ly for ly in weighted if ly.name not in claimed and not ly.block
                and fit(ly, C, transpose=False) is not None
                and (not ordered or ly.order < bn.order)]
        note = notes.get(bn.name, "")
        e, src = eps_for(bn, None)
        pair = None
        if keras_order and bn.convention == KERAS and any(f is prev for f in fits):
            pair = Pair(prev, bn, fit(prev, C, transpose=False), e, "layer order", eps_source=src)
        elif len(fits) == 1 and (not ordered or fits[0] is prev):
            how = "shape" if ordered else "shape (order unknown)"
            pair = Pair(fits[0], bn, fit(fits[0], C, transpose=False), e, how, eps_source=src)
        if pair is not None:
            decided[bn.name] = pair
            claimed[pair.conv.name] = bn
            continue
        lead = (note + "; ") if note else ""
        if not fits:
            reason = f"{lead}no unpaired conv/linear layer with {C} output channels" + (
                " before it" if ordered else "")
        elif len(fits) == 1:
            reason = (f"{lead}the only unpaired layer with {C} output channels, {fits[0].display}, "
                      "is not directly before it in the file")
        else:
            reason = (f"{lead}ambiguous: {len(fits)} layers with {C} output channels and no name "
                      "or order to choose; settle it with --pair CONV=BN")
        decided[bn.name] = Unpaired(bn, reason, [ly.display for ly in fits[:8]])

    pairs = [decided[bn.name] for bn in bns if isinstance(decided[bn.name], Pair)]
    for p in pairs:
        if p.by in ("--pair", "plan") or p.reading.kind != "conv" or p.reading.framework != PYTORCH:
            continue
        if _TRANSPOSE_NAME.search(p.conv.segments[-1] if p.conv.segments else "") \
                and fit(p.conv, p.reading.channels, "conv_transpose") is not None:
            p.caution = (f"{p.conv.display} is named like a transposed conv and its weight also "
                         "reads as one (in, out/groups, k...); it was read as an ordinary conv. If it "
                         "is a ConvTranspose, say \"kind\": \"conv_transpose\" in a plan")
    unpaired = [decided[bn.name] for bn in bns if isinstance(decided[bn.name], Unpaired)]
    return pairs, unpaired


# ---- plans and pairs from the user ---------------------------------------------

def parse_pair(text) -> Explicit:
    """'CONV=BN' (or a (conv, bn) tuple) -> Explicit. Raises UsageProblem."""
    if isinstance(text, tuple | list):
        if len(text) != 2:
            raise UsageProblem(f"--pair {text!r}: give (CONV, BN)")
        return Explicit(str(text[0]), str(text[1]))
    conv, sep, bn = str(text).partition("=")
    if not sep or not conv.strip() or not bn.strip():
        raise UsageProblem(f"--pair {text}: write CONV=BN, e.g. --pair features.0=features.1")
    return Explicit(conv.strip(), bn.strip())


def _kind(value, where: str) -> str | None:
    if value is None:
        return None
    kind = _KIND_ALIASES.get(str(value).lower().replace(" ", ""))
    if kind is None:
        raise InputError(f"{where}: unknown kind {value!r}", f"Use one of: {', '.join(KINDS)}.")
    return kind


_LAYOUT_KINDS = {"OI": "linear", "IO": "dense"}


def _kind_from_layout(layout, where: str) -> str | None:
    if layout is None:
        return None
    text = str(layout).upper()
    if text in _LAYOUT_KINDS:
        return _LAYOUT_KINDS[text]
    if text.startswith("OI"):
        return "conv"
    if text.startswith("IO"):
        return "conv_transpose"
    if text.endswith("IO"):
        return "conv"
    if text.endswith("OI"):
        return "conv_transpose"
    if text.endswith("CM"):
        return "depthwise"
    raise InputError(f"{where}: unknown layout {layout!r}", "Examples: OIHW, IOHW, OI, HWIO, HWOI, IO, HWCM.")


def load_plan(plan, label: str | None = None) -> tuple[list[Explicit], float | None]:
    """The explicit pairs of a plan (a path or a parsed dict) and its default eps.

    Raises InputError for an unreadable or malformed plan.
    """
    if isinstance(plan, str | os.PathLike):
        label = os.fspath(plan)
        try:
            with open(plan, encoding="utf-8") as fh:
                doc = json.load(fh)
        except FileNotFoundError as exc:
            raise InputError(f"{label}: no such plan file") from exc
        except OSError as exc:
            raise InputError(f"{label}: cannot read the plan: {exc.strerror}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{label}: not a JSON plan ({exc})",
                             "Write one with: bnstat fold MODEL --dry-run --plan FILE") from exc
    else:
        doc = plan
        label = label or "plan"
    if not isinstance(doc, dict):
        raise InputError(f"{label}: a plan is a JSON object with \"pairs\"")
    out: list[Explicit] = []
    plan_eps = _eps_value(doc.get("eps"), f"{label}: eps")
    for i, rec in enumerate(doc.get("pairs") or []):
        where = f"{label}: pairs[{i}]"
        if not isinstance(rec, dict) or not isinstance(rec.get("bn"), str):
            raise InputError(f"{where}: each pair needs \"bn\" (and \"conv\")")
        conv = rec.get("conv")
        if conv is not None and not isinstance(conv, str):
            raise InputError(f"{where}: \"conv\" must be a layer name or null")
        kind = _kind(rec.get("kind"), where)
        from_layout = _kind_from_layout(rec.get("layout"), where)
        if kind and from_layout and {kind, from_layout} not in ({"linear", "dense"},) \
                and kind != from_layout and rec.get("kind") is not None:
            if not (kind == "separable" and from_layout == "conv"):
                raise InputError(f"{where}: kind {rec.get('kind')} and layout {rec.get('layout')} "
                                 "disagree")
        kind = kind or from_layout
        groups = rec.get("groups")
        if groups is not None and (not isinstance(groups, int) or groups < 1):
            raise InputError(f"{where}: groups must be a positive integer")
        out.append(Explicit(conv, rec["bn"], kind, groups, _eps_value(rec.get("eps"), where + ": eps"),
                            source=f"plan {label}"))
    for i, rec in enumerate(doc.get("unfolded") or []):
        if not isinstance(rec, dict) or not isinstance(rec.get("bn"), str):
            raise InputError(f"{label}: unfolded[{i}] needs \"bn\"")
        out.append(Explicit(None, rec["bn"], source=f"plan {label}"))
    return out, plan_eps


def _eps_value(v, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise InputError(f"{where}: eps must be a number >= 0")
    return float(v)


# ---- the folding math -------------------------------------------------------

def out_index(reading: Reading, shape: tuple) -> np.ndarray:
    """For each weight element, the output channel it belongs to (broadcastable to shape)."""
    nd = len(shape)
    if reading.framework == PYTORCH:
        if reading.kind == "conv_transpose":
            cin, og = shape[0], shape[1]
            per = cin // reading.groups
            idx = (np.arange(cin) // per)[:, None] * og + np.arange(og)[None, :]
            return idx.reshape((cin, og) + (1,) * (nd - 2))
        return np.arange(shape[0]).reshape((shape[0],) + (1,) * (nd - 1))
    if reading.kind == "conv_transpose":
        return np.arange(shape[-2])[:, None]
    if reading.kind == "depthwise":
        c, m = shape[-2], shape[-1]
        return np.arange(c)[:, None] * m + np.arange(m)[None, :]
    return np.arange(shape[-1])


def _finite(where: str, a: np.ndarray) -> None:
    """Refuse NaN and infinite parameters. Raises DataError."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return
    bad = ~np.isfinite(a)
    if bad.any():
        first = int(np.flatnonzero(bad.ravel())[0])
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        what = " and ".join(t for t in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "")
                            if t)
        raise DataError(f"{where}: {what} value(s) (the first at flat index {first}); refusing to "
                        "fold (nothing written)",
                        "Fix or retrain the layer; a model with NaN parameters cannot be folded.")


def _cast(key: str, exact: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``exact`` (float64) cast to ``dtype``, warning about overflow and underflow."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        out = exact.astype(dtype)
    if dtype.kind == "f":
        info = np.finfo(dtype)
        over = int((np.isinf(out) & np.isfinite(exact)).sum())
        if over:
            warn(f"{key}: {over} value(s) overflow {dtype} after folding (largest "
                 f"{np.max(np.abs(exact)):.4g} > {float(info.max):.4g}); they become inf")
        small = int(((np.abs(exact) < info.tiny) & (exact != 0)).sum())
        if small and dtype.itemsize <= 2:
            warn(f"{key}: {small} value(s) become subnormal or zero in {dtype} after folding "
                 f"(smaller than {float(info.tiny):.4g}); precision is lost")
    return out


@dataclass
class _Folded:
    updates: dict[str, np.ndarray]
    removed: list[str]
    added: dict[str, str]  # new key -> key it follows
    note: str = ""


def _bn_arrays(pair: Pair, arrays: Mapping[str, np.ndarray]):
    bn = pair.bn
    names = ({"mean": "running_mean", "var": "running_var", "gamma": "weight", "beta": "bias"}
             if bn.convention == PYTORCH else
             {"mean": "moving_mean", "var": "moving_variance", "gamma": "gamma", "beta": "beta"})
    keys = {k: bn.params.get(p) for k, p in names.items()}
    vals = {k: (np.asarray(arrays[key]) if key else None) for k, key in keys.items()}
    return keys, vals


def validate_pair(pair: Pair, arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse what cannot be folded: bad shapes, NaN or negative variance, NaN parameters.

    Raises DataError naming the layer.
    """
    bn, conv = pair.bn, pair.conv
    C = pair.reading.channels
    keys, vals = _bn_arrays(pair, arrays)
    for k, v in vals.items():
        if v is None:
            continue
        if v.size != C or v.ndim != 1:
            raise DataError(f"{bn.display}: channel-count mismatch: {keys[k]} has shape {v.shape}, "
                            f"the layer {conv.display} has {C} output channels; refusing to fold "
                            "(nothing written)")
        if v.dtype.kind not in "fiu":
            raise DataError(f"{keys[k]}: dtype {v.dtype} is not numeric")
    var = vals["var"].astype(np.float64)
    if np.isnan(var).any():
        ch = int(np.flatnonzero(np.isnan(var))[0])
        raise DataError(f"{bn.display}: the running variance {keys['var']} is NaN at channel {ch} "
                        f"({int(np.isnan(var).sum())} NaN); refusing to fold (nothing written)",
                        "The BN's statistics are broken: recompute them (bnstat moments).")
    if (var < 0).any():
        ch = int(np.flatnonzero(var < 0)[0])
        raise DataError(f"{bn.display}: the running variance {keys['var']} is negative at channel {ch} "
                        f"({var[ch]:.6g}; {int((var < 0).sum())} negative); a variance cannot be "
                        "negative; refusing to fold (nothing written)",
                        "The BN's statistics are broken: recompute them (bnstat moments).")
    if (var + pair.eps <= 0).any():
        ch = int(np.flatnonzero(var + pair.eps <= 0)[0])
        raise DataError(f"{bn.display}: running variance 0 and eps 0 at channel {ch}: division by zero",
                        "Give --eps.")
    for k in ("mean", "gamma", "beta", "var"):
        if vals[k] is not None:
            _finite(f"{bn.display}: {keys[k]}", vals[k])
    wkey = conv.params[conv.weight_param]
    w = np.asarray(arrays[wkey])
    if w.dtype.kind != "f":
        raise DataError(f"{wkey}: dtype {w.dtype} is not a float; bnstat folds float weights only")
    _finite(f"{conv.display}: {wkey}", w)
    bkey = conv.params.get("bias")
    if bkey is not None:
        b = np.asarray(arrays[bkey])
        if b.size != C:
            raise DataError(f"{conv.display}: channel-count mismatch: {bkey} has shape {b.shape} but "
                            f"{C} output channels; refusing to fold (nothing written)")
        _finite(f"{conv.display}: {bkey}", b)


def _bias_key(conv: Layer) -> str:
    wkey = conv.params[conv.weight_param]
    if conv.convention == PYTORCH:
        return wkey[: -len("weight")] + "bias"
    head, _, tail = wkey.rpartition("/")
    suffix = _KERAS_SUFFIX.search(tail)
    return f"{head}/bias{suffix.group(0) if suffix else ''}"


def fold_pair(pair: Pair, arrays: Mapping[str, np.ndarray], bn_mode: str,
              round_stored=None) -> _Folded:
    """The new arrays of one pair (validated first). Raises DataError, UsageProblem."""
    validate_pair(pair, arrays)
    rs = round_stored or (lambda key, a: a)
    conv, bn, r = pair.conv, pair.bn, pair.reading
    keys, vals = _bn_arrays(pair, arrays)
    C = r.channels
    f64 = np.float64
    mean = vals["mean"].astype(f64)
    var = vals["var"].astype(f64)
    gamma = vals["gamma"].astype(f64) if vals["gamma"] is not None else np.ones(C)
    beta = vals["beta"].astype(f64) if vals["beta"] is not None else np.zeros(C)
    wkey = conv.params[conv.weight_param]
    w = np.asarray(arrays[wkey])
    bkey = conv.params.get("bias")
    b = np.asarray(arrays[bkey]).astype(f64).reshape(C) if bkey else np.zeros(C)
    scale = gamma / np.sqrt(var + pair.eps)
    shift = (b - mean) * scale + beta
    w_new = rs(wkey, _cast(wkey, w.astype(f64) * scale[out_index(r, w.shape)], w.dtype))
    bias_dtype = np.asarray(arrays[bkey]).dtype if bkey else w.dtype
    updates = {wkey: w_new}
    if bn_mode == "drop":
        new_bkey = bkey or _bias_key(conv)
        bias = rs(new_bkey, _cast(new_bkey, shift, bias_dtype))
        if bkey:
            bias = bias.reshape(np.asarray(arrays[bkey]).shape)
        updates[new_bkey] = bias
        added = {} if bkey else {new_bkey: wkey}
        note = "" if bkey else "bias added"
        return _Folded(updates, sorted(bn.params.values(), key=list(arrays).index), added, note)
    # identity: the BN stays, computing x + shift
    if pair.eps >= 1:
        raise UsageProblem(f"{bn.display}: --bn identity sets the variance to 1 - eps, which needs "
                           f"eps < 1 (eps is {pair.eps:g})")
    note = ""
    bn_dtype = lambda k: np.asarray(arrays[keys[k]]).dtype  # noqa: E731
    updates[keys["mean"]] = np.zeros(C, bn_dtype("mean"))
    updates[keys["var"]] = rs(keys["var"], _cast(keys["var"], np.full(C, 1.0 - pair.eps),
                                                  bn_dtype("var")))
    if keys["gamma"]:
        updates[keys["gamma"]] = np.ones(C, bn_dtype("gamma"))
    if keys["beta"]:
        updates[keys["beta"]] = rs(keys["beta"], _cast(keys["beta"], shift, bn_dtype("beta")))
        if bkey:
            updates[bkey] = np.zeros_like(np.asarray(arrays[bkey]))
            note = "conv bias moved into the BN's beta"
    elif bkey:
        updates[bkey] = rs(bkey, _cast(bkey, shift, bias_dtype)).reshape(np.asarray(arrays[bkey]).shape)
        note = "the BN has no beta: the shift is in the conv bias"
    else:
        updates[keys["mean"]] = rs(keys["mean"], _cast(keys["mean"], -shift, bn_dtype("mean")))
        note = "no bias or beta key: the shift is carried as running mean = -shift"
    return _Folded(updates, [], {}, note)


# ---- the reference layers of --check ---------------------------------------------

def _conv_ref(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """Cross-correlation, stride 1, no padding: x (N, Cin, *S), w (Cout, Cin/g, *K)."""
    nd = w.ndim - 2
    k = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, k, axis=tuple(range(2, 2 + nd)))
    n, cin = x.shape[:2]
    osz = win.shape[2:2 + nd]
    cout = w.shape[0]
    win = win.reshape((n, groups, cin // groups) + osz + k)
    wg = w.reshape((groups, cout // groups, cin // groups) + k)
    o_l, k_l = "pqr"[:nd], "xyz"[:nd]
    out = np.einsum(f"ngc{o_l}{k_l},goc{k_l}->ngo{o_l}", win, wg, optimize=True)
    return out.reshape((n, cout) + osz)


def _conv_transpose_ref(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """Transposed conv, stride 1, no padding: x (N, Cin, *S), w (Cin, Cout/g, *K)."""
    n, cin = x.shape[:2]
    s = x.shape[2:]
    k = w.shape[2:]
    og = w.shape[1]
    out = np.zeros((n, og * groups) + tuple(a + b - 1 for a, b in zip(s, k, strict=True)))
    xg = x.reshape((n, groups, cin // groups) + s)
    wg = w.reshape((groups, cin // groups, og) + k)
    for pos in np.ndindex(*k):
        part = np.einsum("ngc...,gco->ngo...", xg, wg[(Ellipsis,) + pos])
        where = (slice(None), slice(None)) + tuple(slice(p, p + d) for p, d in zip(pos, s, strict=True))
        out[where] += part.reshape((n, og * groups) + s)
    return out


def _canonical(r: Reading, w: np.ndarray) -> tuple[str, np.ndarray, int]:
    """The weight in PyTorch layout: ('conv'|'conv_transpose'|'linear', weight, groups)."""
    if r.framework == PYTORCH:
        return ("linear" if r.kind == "linear" else r.kind), w, r.groups
    if r.kind == "dense":
        return "linear", w.T, 1
    if r.kind == "conv_transpose":
        return "conv_transpose", np.moveaxis(w, (-1, -2), (0, 1)), 1
    if r.kind == "depthwise":
        c, m = w.shape[-2:]
        flat = w.reshape(w.shape[:-2] + (c * m,))
        return "conv", np.moveaxis(flat, -1, 0)[:, None], c
    return "conv", np.moveaxis(w, (-1, -2), (0, 1)), r.groups  # conv, separable's pointwise


def _input_for(kind: str, w: np.ndarray, groups: int, rng) -> np.ndarray:
    if kind == "linear":
        return rng.standard_normal((4, w.shape[1]))
    if kind == "conv":
        return rng.standard_normal((2, w.shape[1] * groups) + tuple(k + 1 for k in w.shape[2:]))
    return rng.standard_normal((2, w.shape[0]) + (2,) * (w.ndim - 2))


def _run(kind: str, w: np.ndarray, b: np.ndarray, groups: int, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        y = x @ w.T
    elif kind == "conv":
        y = _conv_ref(x, w, groups)
    else:
        y = _conv_transpose_ref(x, w, groups)
    return y + b.reshape((1, -1) + (1,) * (y.ndim - 2))


def _bn_eval(y, mean, var, gamma, beta, eps):
    sh = (1, -1) + (1,) * (y.ndim - 2)
    return ((y - mean.reshape(sh)) / np.sqrt(var.reshape(sh) + eps) * gamma.reshape(sh)
            + beta.reshape(sh))


def tolerance_for(dtype: np.dtype, stored: str | None = None) -> float:
    """The check's bound on the max error relative to the output's largest value."""
    eps = 2.0 ** -8 if stored == "BF16" else float(np.finfo(dtype).eps)
    return max(32 * eps, 1e-12)


def check_pair(pair: Pair, before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
               bn_mode: str, rng, stored: str | None = None) -> tuple[float, float, float]:
    """Max absolute and relative error of the folded layer against layer then BN (eval)."""
    conv, r = pair.conv, pair.reading
    keys, vals = _bn_arrays(pair, before)
    C = r.channels
    f64 = np.float64

    def bn_params(arrays):
        k, v = _bn_arrays(pair, arrays)
        return (v["mean"].astype(f64), v["var"].astype(f64),
                v["gamma"].astype(f64) if v["gamma"] is not None else np.ones(C),
                v["beta"].astype(f64) if v["beta"] is not None else np.zeros(C))

    wkey = conv.params[conv.weight_param]
    bkey_old = conv.params.get("bias")
    bkey_new = bkey_old or _bias_key(conv)
    w0 = np.asarray(before[wkey]).astype(f64)
    b0 = np.asarray(before[bkey_old]).astype(f64).ravel() if bkey_old else np.zeros(C)
    w1 = np.asarray(after[wkey]).astype(f64)
    b1 = np.asarray(after[bkey_new]).astype(f64).ravel() if bkey_new in after else np.zeros(C)
    kind, cw0, groups = _canonical(r, w0)
    _, cw1, _ = _canonical(r, w1)
    x = _input_for(kind, cw0, groups, rng)
    with np.errstate(all="ignore"):
        ref = _bn_eval(_run(kind, cw0, b0, groups, x), *bn_params(before), pair.eps)
        got = _run(kind, cw1, b1, groups, x)
        if bn_mode == "identity":
            got = _bn_eval(got, *bn_params(after), pair.eps)
        err = np.abs(got - ref)
        abs_err = float(np.max(err)) if err.size else 0.0
        if not np.all(np.isfinite(got)):
            abs_err = float("inf")
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        rel = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
    return abs_err, rel, tolerance_for(np.asarray(before[wkey]).dtype, stored)


# ---- the API -------------------------------------------------------------------

@dataclass
class FoldResult:
    """What :func:`fold` did: the plan, the checks, the folded arrays."""

    source: str
    convention: str | None
    order_source: str
    bn_mode: str
    eps: float | None  # --eps, or None for the conventions' defaults
    pairs: list[Pair]
    unpaired: list[Unpaired]
    arrays: dict[str, np.ndarray]  # the folded model, in order
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    checked: bool = False
    output: str | None = None
    output_format: str | None = None
    plan_output: str | None = None
    layer_count: int = 0
    dry_run: bool = False
    requested_output: str | None = None  # -o given with a dry run

    @property
    def failed(self) -> list[Pair]:
        """Pairs whose check exceeded the tolerance."""
        return [p for p in self.pairs if not p.ok]

    @property
    def default_eps(self) -> dict[str, float]:
        convs = {p.bn.convention for p in self.pairs} | {u.bn.convention for u in self.unpaired}
        return {c: DEFAULT_EPS[c] for c in sorted(convs)}

    def plan_dict(self) -> dict:
        """The plan as JSON-ready data (what --dry-run --plan FILE writes)."""
        from bnstat._version import __version__

        doc = {"bnstat": __version__, "model": self.source,
               "convention": self.convention, "order": self.order_source,
               "bn": self.bn_mode, "pairs": [p.record() for p in self.pairs],
               "unfolded": [u.record() for u in self.unpaired]}
        if self.eps is not None:
            doc["eps"] = self.eps
        return doc

    def plan_json(self) -> str:
        return json.dumps(self.plan_dict(), indent=1, allow_nan=False) + "\n"


class FoldCheckError(DataError):
    """--check found a pair over tolerance; ``result`` holds the plan with the errors."""

    def __init__(self, result: FoldResult):
        bad = result.failed
        names = ", ".join(f"{p.conv.display}+{p.bn.display}" for p in bad[:4])
        super().__init__(f"{result.source}: the check failed for {len(bad)} pair(s) ({names}): the "
                         "folded layer differs from layer then BN; nothing written",
                         "Check the pairing and kinds in the plan (bnstat fold --dry-run --plan FILE).")
        self.result = result


def _layers_of(model) -> tuple[list[Layer], dict | None]:
    layers = parse_layers(model.entries)
    sequence = getattr(model, "layer_sequence", None)
    if sequence:
        for ly in layers:
            tops = [i for i, g in enumerate(sequence) if ly.name == g or ly.name.startswith(g + "/")]
            ly.seq = tops[-1] if tops else None
    graph = keras_graph(model.config) if getattr(model, "config", None) else None
    if graph:
        apply_keras_config(layers, graph)
    return layers, graph


def _load(source):
    from bnstat.io.models import ModelFile, read_model

    if isinstance(source, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
        entries = {k: (a.shape, a.dtype) for k, a in arrays.items()}
        return ModelFile(None, "memory", entries, arrays=arrays)
    return read_model(os.fspath(source))


def fold(source, *, output: str | None = None, pairs: Iterable = (), plan=None,
         eps: float | None = None, bn: str = "drop", check: bool = False, dry_run: bool = False,
         plan_output: str | None = None, force: bool = False, seed: int = 0) -> FoldResult:
    """Fold every BatchNorm of a model into the layer that feeds it.

    ``source``: a model file (.npz, HDF5, .safetensors) or a mapping of named
    arrays. ``pairs``: ``"CONV=BN"`` strings or ``(conv, bn)`` tuples;
    ``plan``: a plan file or dict (its pairs and unfolded BNs are explicit);
    ``eps``: overrides every default. ``bn``: ``"drop"`` removes the folded
    BNs' arrays and gives every folded layer a bias; ``"identity"`` keeps the
    keys, the BN computing x + shift. ``check``: run every pair against the
    original on random inputs. With ``output`` (and not ``dry_run``) the
    folded model is written there atomically, in the format its extension
    names (else the input's); ``plan_output`` receives the plan as JSON.

    Returns a :class:`FoldResult`. Raises InputError (unreadable model or
    plan), DataError (refusals: negative/NaN variance, NaN parameters,
    channel mismatch; FoldCheckError when a check fails), UsageProblem (bad
    pairs), OutputError. Nothing is written when it raises.
    """
    from bnstat.io.atomic import atomic_open, check_output
    from bnstat.io.models import write_model

    if bn not in ("drop", "identity"):
        raise UsageProblem(f"bn={bn!r}: use 'drop' or 'identity'")
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        raise UsageProblem(f"eps={eps!r}: eps must be a number >= 0")
    path = None if isinstance(source, Mapping) else os.fspath(source)
    inputs = [path] if path else []
    if isinstance(plan, str | os.PathLike):
        inputs.append(os.fspath(plan))
    if output is not None and not dry_run:
        check_output(output, force=force, inputs=inputs)
    if plan_output is not None:
        if os.path.exists(plan_output) and not force and not os.path.isdir(plan_output):
            raise OutputError(f"{plan_output}: the plan file exists; with --dry-run, --plan FILE is "
                              "where the plan is written; nothing was written",
                              "Use --force to replace it, or drop --dry-run to fold with it.")
        check_output(plan_output, force=force, inputs=inputs)

    model = _load(source)
    layers, graph = _layers_of(model)
    convention = convention_of(layers)
    if not any(ly.role in ("bn", "weighted") for ly in layers):
        raise InputError(f"{model.label}: no layer weights found: not a model in PyTorch or Keras "
                         "naming (x.weight, y.running_mean / kernel, moving_mean)",
                         "List its arrays with: bnstat info " + (path or "FILE"))
    explicit = [parse_pair(p) for p in pairs]
    plan_eps = None
    if plan is not None:
        from_plan, plan_eps = load_plan(plan)
        listed = {e.bn for e in explicit}
        explicit += [e for e in from_plan if e.bn not in listed]  # --pair wins over the plan
    keras_order = model.ordered and (model.order_source == "Keras layer order" or model.format != "hdf5")
    found, unpaired = make_plan(layers, explicit=explicit, eps=eps, ordered=model.ordered,
                                keras_order=keras_order, plan_eps=plan_eps, graph=graph)
    if not any(ly.role == "bn" for ly in layers):
        raise DataError(f"{model.label}: no BatchNorm layers (running_mean/running_var or "
                        "moving_mean/moving_variance); nothing to fold",
                        "Give the model file whose BatchNorm layers should be folded.")

    arrays = model.arrays
    updates: dict[str, np.ndarray] = {}
    removed: list[str] = []
    added: dict[str, str] = {}
    for pair in found:
        folded = fold_pair(pair, arrays, bn, model.round_stored)
        updates.update(folded.updates)
        removed += folded.removed
        added.update(folded.added)
        pair.note = "; ".join(n for n in (folded.note, "read as conv?" if pair.caution else "") if n)
        if pair.caution:
            warn(pair.caution)
    for new, anchor in added.items():  # a bias added to a bfloat16 weight is bfloat16 too
        if model.stored.get(anchor) == "BF16":
            model.stored[new] = "BF16"
            updates[new] = model.round_stored(new, updates[new])
    out: dict[str, np.ndarray] = {}
    gone = set(removed)
    follows: dict[str, list[str]] = {}
    for new, anchor in added.items():
        follows.setdefault(anchor, []).append(new)
    for key, value in arrays.items():
        if key in gone:
            continue
        out[key] = updates.get(key, value)
        for new in follows.get(key, ()):
            out[new] = updates[new]

    result = FoldResult(model.label, convention, model.order_source if model.format != "memory"
                        else "mapping order", bn, eps, found, unpaired, out, list(added), removed,
                        layer_count=len(layers), dry_run=dry_run,
                        requested_output=output if dry_run else None)
    if check:
        rng = np.random.default_rng(seed)
        for pair in found:
            wkey = pair.conv.params[pair.conv.weight_param]
            pair.check_abs, pair.check_rel, pair.tolerance = check_pair(
                pair, arrays, out, bn, rng, model.stored.get(wkey))
        result.checked = True
        if result.failed:
            raise FoldCheckError(result)
    if unpaired:
        names = ", ".join(u.bn.display for u in unpaired[:5]) + (" ..." if len(unpaired) > 5 else "")
        warn(f"{len(unpaired)} BatchNorm layer(s) left unfolded ({names}); the plan says why. "
             "Settle them with --pair CONV=BN or --plan FILE")
    if bn == "drop" and found and getattr(model, "config", None) and output and not dry_run \
            and model.format == "hdf5":  # a Keras 3 file's config is rewritten (bnstat.io.keras3)
        warn(f"{model.label}: its model_config still describes the dropped BatchNorm layers: load "
             "the folded weights into a model without them (load_weights), or use --bn identity "
             "to keep the file loadable as it is")
    if plan_output is not None:
        with atomic_open(plan_output, "w", force=force, inputs=inputs) as fh:
            fh.write(result.plan_json())
        result.plan_output = plan_output
    if output is not None and not dry_run:
        result.output_format = write_model(output, out, template=model, force=force, inputs=inputs)
        result.output = output
    return result


def describe_model(source) -> list[str]:
    """The layers fold would see in a model file, as text lines (for ``bnstat info``).

    Reads names and shapes only. Returns [] for a file without layer weights
    (an activation file). Raises InputError for an unreadable file.
    """
    from bnstat.io.models import index_model

    if isinstance(source, Mapping):
        model = _load(source)
    else:
        model = index_model(os.fspath(source))
    layers, graph = _layers_of(model)
    if not any(ly.role == "bn" for ly in layers):
        return []
    keras_order = model.ordered and (model.order_source == "Keras layer order" or model.format != "hdf5")
    try:
        found, unpaired = make_plan(layers, ordered=model.ordered, keras_order=keras_order,
                                    graph=graph)
    except Exception:  # a malformed model: list nothing rather than fail `info`
        return []
    convention = convention_of(layers)
    eps = ", ".join(f"{CONVENTION_LABEL[c]} {DEFAULT_EPS[c]:g}" for c in (PYTORCH, KERAS)
                    if any(ly.convention == c and ly.role == "bn" for ly in layers))
    n_bn = sum(ly.role == "bn" for ly in layers)
    n_w = sum(ly.role == "weighted" for ly in layers)
    lines = [f"{model.label}: {CONVENTION_LABEL[convention]} naming, {n_w} conv/linear layers, "
             f"{n_bn} BatchNorm layers ({len(found)} pairable), default eps {eps}; "
             f"order: {model.order_source}"]
    for p in found:
        lines.append(f"  {p.conv.display} <- {p.bn.display}: {p.reading.label} {p.reading.layout}, "
                     f"{p.reading.channels} channels ({p.by})")
    for u in unpaired:
        lines.append(f"  {u.bn.display}: not folded: {u.reason}")
    return lines


# `bnstat.fold` is both this module and the API function of bnstat/__init__.py: importing the
# module (as `bnstat fold` and `bnstat info` do) rebinds the package attribute to the module, so
# the module itself forwards calls to fold(); `bnstat.fold(...)` works either way.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return fold(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
