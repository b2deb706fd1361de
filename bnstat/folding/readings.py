"""The readings of a weight: which axes are the output channels, the groups, the layout.

A PyTorch conv weight (out, in/groups, k...) reads as a conv; the same
array read as a conv-transpose is (in, out/groups, k...). Keras kernels are
(k..., in, out) (conv), (k..., out, in) (Conv2DTranspose), (k..., C, M)
(depthwise: output channel c*M+m), (in, out) (Dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnstat.folding.layers import _SPATIAL, _TRANSPOSE_NAME, KERAS, PYTORCH, Layer

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


