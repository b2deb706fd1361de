"""The readings of a weight: which axes are the output channels, the groups, the layout.

A PyTorch conv weight (out, in/groups, k...) reads as a conv; the same
array read as a conv-transpose is (in, out/groups, k...). Keras kernels are
(k..., in, out) (conv), (k..., out, in) (Conv2DTranspose), (k..., C, M)
(depthwise: output channel c*M+m), (in, out) (Dense).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from bnstat.folding.layers import _CONV_TOKEN, _SPATIAL, _TRANSPOSE_NAME, KERAS, PYTORCH, Layer

_DEPTHWISE_NAME = re.compile(r"(?i)depthwise|dw_?conv")

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
            # Keras 3 names a DepthwiseConv2D's weight "kernel": (k..., C, M), channel c*M+m
            out.append(Reading("depthwise", sp + "CM", shape[-2] * shape[-1], shape[-2], fw))
    if kind is not None:
        same = {kind, "linear", "dense"} if kind in ("linear", "dense") else {kind}
        out = [r for r in out if r.kind in same]
    if C is not None:
        out = [r for r in out if r.channels == C]
    return out


def fit(layer: Layer, C: int, kind: str | None = None, groups: int | None = None) -> Reading | None:
    """The reading of ``layer`` whose output channels are C, or None (see :func:`read`)."""
    found = read(layer, C, kind, groups)
    return found.reading if found is not None else None


@dataclass(frozen=True)
class Read:
    """A reading and what it rests on: the evidence, and the assumption it makes ('' if none)."""

    reading: Reading
    evidence: tuple[str, ...]
    assumption: str = ""


def read(layer: Layer, C: int, kind: str | None = None, groups: int | None = None,
         source: str = "plan") -> Read | None:
    """How ``layer`` feeds a BN of C channels, or None when no reading with evidence gives C.

    ``kind``/``groups`` come from the user (``source``); else the layer's own
    evidence (a Keras config, a module type) decides. Otherwise a weight is
    read the ordinary way (conv, linear, dense), and as a conv-transpose only
    when its name says so (deconv, convT, conv_transpose, upconv...), never
    merely because the ordinary reading does not fit: a conv whose *input*
    channels are C would read as a conv-transpose with C outputs, which is
    how a pre-activation BN (BN -> conv) looks. A square weight read as a
    conv with nothing to tell it from a conv-transpose is an assumption.
    """
    if kind is None and groups is None and layer.kind_hint is not None:
        kind, source = layer.kind_hint, layer.kind_source or "graph"
    groups = groups if groups is not None else layer.groups
    if kind is not None:
        found = _readings(layer, C, kind, groups)
        return Read(found[0], (source,)) if found else None
    w = layer.params[layer.weight_param]
    shape = layer.shapes[layer.weight_param]
    if _transposey(layer):
        found = _readings(layer, C, "conv_transpose", groups)
        if found:
            return Read(found[0], ("names",))
        found = _readings(layer, C, "conv", groups)
        return Read(found[0], ("shapes",), f"{layer.display} is named like a transposed conv but "
                    f"{w} {tuple(shape)} reads only as an ordinary conv with {C} outputs") \
            if found else None
    if layer.convention == KERAS and layer.weight_param == "kernel" and len(shape) >= 3 \
            and _DEPTHWISE_NAME.search(layer.keras_name):
        found = _readings(layer, C, "depthwise", groups)
        return Read(found[0], ("names",)) if found else None
    found = [r for r in _readings(layer, C, None, groups) if r.kind != "conv_transpose"
             and not (r.kind == "depthwise" and layer.weight_param == "kernel")]
    if not found:
        return None
    r = found[0]
    square = r.kind == "conv" and (shape[0] == shape[1] if layer.convention == PYTORCH
                                   else shape[-1] == shape[-2])
    if square and not _conv_named(layer):
        return Read(r, ("shapes",), f"{w} {tuple(shape)} reads both as a conv and as a "
                    f"conv-transpose with {C} outputs and nothing in the file says which: read as "
                    "a conv")
    return Read(r, ("names",) if square else ("shapes",))


def _transposey(layer: Layer) -> bool:
    return bool(_TRANSPOSE_NAME.search(layer.segments[-1] if layer.segments else ""))


def _conv_named(layer: Layer) -> bool:
    """The layer's own name says an ordinary conv (conv1, stem_conv, conv2d_3)."""
    last = layer.segments[-1] if layer.segments else ""
    return any(_CONV_TOKEN.match(t) for t in [last, *last.split("_")]) and not _transposey(layer)


def _outs_text(layer: Layer) -> str:
    shape = layer.shapes[layer.weight_param]
    reads = _readings(layer, None)
    parts = ", ".join(f"{r.channels} as {r.label} {r.layout}" for r in reads)
    return f"{layer.params[layer.weight_param]} {tuple(shape)} has output channels {parts}"


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


