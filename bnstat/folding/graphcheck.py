"""--check on the whole model where the file carries its graph (a Keras model_config): the
folded model and the original run on the same random inputs through numpy references, and the
largest output difference is reported relative to the largest output.

This catches what the per-pair check cannot: a wrong pairing or reading. It runs Sequential
and functional (single-input) Keras models made of :data:`SUPPORTED` layers, channels_last,
dilation 1; any other layer (or a nested model) makes it say what it refused instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from bnstat.folding.check import _conv_ref, _conv_transpose_ref
from bnstat.folding.layers import KERAS, Layer

SUPPORTED = ("InputLayer", "Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D",
             "Conv2DTranspose", "Dense", "BatchNormalization", "Activation", "ReLU", "Dropout",
             "Flatten", "Add", "Concatenate", "MaxPooling2D", "AveragePooling2D",
             "GlobalAveragePooling2D", "GlobalMaxPooling2D")
TOLERANCE = 1e-4  # float32 weights through a few dozen layers, computed in float64

_ACTS = {"linear": lambda x: x, None: lambda x: x, "relu": lambda x: np.maximum(x, 0),
         "relu6": lambda x: np.clip(x, 0, 6), "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
         "tanh": np.tanh, "swish": lambda x: x / (1 + np.exp(-x)),
         "silu": lambda x: x / (1 + np.exp(-x)), "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
         "softmax": lambda x: np.exp(x - x.max(-1, keepdims=True))
         / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)}


class Refused(Exception):
    """The model holds something the numpy runner does not run."""


def _act(cfg: dict):
    a = cfg.get("activation")
    if isinstance(a, dict):
        a = (a.get("config") or {}).get("name") or a.get("class_name")
    if a not in _ACTS:
        raise Refused(f"activation {a!r}")
    return _ACTS[a]


def _pair(v, n=2):
    return tuple(v) if isinstance(v, list | tuple) else (v,) * n


def _pad_same(x, k, s):
    """TF 'same' padding of NHWC (or NLC) x for kernel k and stride s."""
    pads = [(0, 0)]
    for size, kk, ss in zip(x.shape[1:-1], k, s, strict=True):
        total = max((math.ceil(size / ss) - 1) * ss + kk - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, pads + [(0, 0)])


def _conv(x, w_oihw, groups, cfg):
    """Keras conv of channels_last x with a PyTorch-layout weight (O, I/g, k...)."""
    k = w_oihw.shape[2:]
    s = _pair(cfg.get("strides", 1), len(k))
    if any(d != 1 for d in _pair(cfg.get("dilation_rate", 1), len(k))):
        raise Refused("a dilated convolution")
    if cfg.get("padding", "valid") == "same":
        x = _pad_same(x, k, s)
    y = _conv_ref(np.moveaxis(x, -1, 1), w_oihw, groups)
    y = y[(slice(None), slice(None)) + tuple(slice(None, None, ss) for ss in s)]
    return np.moveaxis(y, 1, -1)


def _conv_transpose(x, kern, cfg):
    """Keras Conv2DTranspose: kernel (k..., out, in); strides by zero insertion."""
    k = kern.shape[:-2]
    s = _pair(cfg.get("strides", 1), len(k))
    if cfg.get("output_padding") not in (None, [0] * len(k)) or any(
            d != 1 for d in _pair(cfg.get("dilation_rate", 1), len(k))):
        raise Refused("a Conv2DTranspose with output_padding or dilation")
    xc = np.moveaxis(x, -1, 1)
    up = np.zeros(xc.shape[:2] + tuple((n - 1) * ss + 1 for n, ss in zip(xc.shape[2:], s,
                                                                            strict=True)))
    up[(slice(None), slice(None)) + tuple(slice(None, None, ss) for ss in s)] = xc
    y = _conv_transpose_ref(up, np.moveaxis(kern, (-1, -2), (0, 1)), 1)
    if cfg.get("padding", "valid") == "same":
        crop = []
        for n, kk, ss in zip(xc.shape[2:], k, s, strict=True):
            total = max(kk - ss, 0)
            crop.append(slice(total // 2, total // 2 + n * ss))
        y = y[(slice(None), slice(None)) + tuple(crop)]
    return np.moveaxis(y, 1, -1)


def _pool(x, cfg, fn):
    p = _pair(cfg.get("pool_size", 2))
    s = _pair(cfg.get("strides") or p)
    if p != s or cfg.get("padding", "valid") != "valid":
        raise Refused("a pooling layer whose strides differ from its size, or padded")
    n, h, w, c = x.shape
    x = x[:, :h - h % p[0], :w - w % p[1]]
    return fn(x.reshape(n, h // p[0], p[0], w // p[1], p[1], c), axis=(2, 4))


def _layer(node: dict, xs: list, get) -> np.ndarray:
    """One layer's output from its inputs; ``get(param)`` the layer's array or None."""
    cls, cfg = node["class"], node["config"]
    x = xs[0] if xs else None
    if cls in ("Conv1D", "Conv2D"):
        k = get("kernel")
        g = cfg.get("groups") or 1
        y = _conv(x, np.moveaxis(k, (-1, -2), (0, 1)), g, cfg)
    elif cls in ("DepthwiseConv2D", "SeparableConv2D"):
        k = get("depthwise_kernel") if get("depthwise_kernel") is not None else get("kernel")
        c, m = k.shape[-2:]
        y = _conv(x, np.moveaxis(k.reshape(k.shape[:-2] + (c * m,)), -1, 0)[:, None], c, cfg)
        if cls == "SeparableConv2D":
            y = y @ get("pointwise_kernel").reshape(c * m, -1)
    elif cls == "Conv2DTranspose":
        y = _conv_transpose(x, get("kernel"), cfg)
    elif cls == "Dense":
        y = x @ get("kernel")
    elif cls == "BatchNormalization":
        if get("moving_mean") is None:  # dropped by --bn drop: folded into the layer before
            return x
        if cfg.get("axis", -1) not in (-1, [-1], len(x.shape) - 1, [len(x.shape) - 1]):
            raise Refused("a BatchNormalization over an axis other than the last")
        one = np.ones(x.shape[-1])
        g = get("gamma") if get("gamma") is not None else one
        b = get("beta") if get("beta") is not None else 0 * one
        return (x - get("moving_mean")) / np.sqrt(get("moving_variance")
                                                  + float(cfg.get("epsilon", 1e-3))) * g + b
    elif cls in ("Activation", "ReLU"):
        if cls == "ReLU" and (cfg.get("max_value") not in (None, 6, 6.0)
                              or cfg.get("negative_slope") or cfg.get("threshold")):
            raise Refused("a ReLU with a slope or threshold")
        return _ACTS["relu6" if cls == "ReLU" and cfg.get("max_value") else "relu"](x) \
            if cls == "ReLU" else _act(cfg)(x)
    elif cls == "Dropout":
        return x
    elif cls == "Flatten":
        return x.reshape(x.shape[0], -1)
    elif cls == "Add":
        return sum(xs)
    elif cls == "Concatenate":
        return np.concatenate(xs, axis=cfg.get("axis", -1))
    elif cls == "MaxPooling2D":
        return _pool(x, cfg, np.max)
    elif cls == "AveragePooling2D":
        return _pool(x, cfg, np.mean)
    elif cls == "GlobalAveragePooling2D":
        return x.mean(axis=(1, 2))
    elif cls == "GlobalMaxPooling2D":
        return x.max(axis=(1, 2))
    else:
        raise Refused(f"layer class {cls}")
    if get("bias") is not None:
        y = y + get("bias")
    return _act(cfg)(y)


def _input_shape(graph: dict, config: dict) -> tuple[str | None, tuple]:
    inputs = [n for n, node in graph.items() if node["class"] == "InputLayer"]
    if len(inputs) > 1:
        raise Refused("a model with several inputs")
    if inputs:
        cfg = graph[inputs[0]]["config"]
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    else:  # Keras 2 Sequential: the first layer's batch_input_shape
        first = next(iter(graph.values()), {"config": {}})
        shape = first["config"].get("batch_input_shape") or (config.get("config") or {}).get(
            "build_input_shape")
    if not isinstance(shape, list) or any(s is None for s in shape[1:]):
        raise Refused("an input shape the config does not fix")
    return (inputs[0] if inputs else None), (2,) + tuple(int(s) for s in shape[1:])


def _run(graph: dict, config: dict, weights, x: np.ndarray) -> list[np.ndarray]:
    start, _ = _input_shape(graph, config)
    out: dict[str, np.ndarray] = {}
    for name, node in graph.items():
        if node["class"] in ("Sequential", "Functional", "Model"):
            raise Refused("a nested model")
        if node["class"] == "InputLayer":
            out[name] = x
            continue
        ins = [out[i] for i in node["inputs"] if i in out] if node["inputs"] else [x]
        if len(ins) != max(len(node["inputs"]), 1):
            raise Refused(f"layer {name}: inputs the runner cannot follow")
        out[name] = _layer(node, ins, lambda p, n=name: weights(n, p))
    ends = [n for n, node in graph.items() if not node["consumers"] and n != start]
    return [out[n] for n in ends]


def check_model(graph: dict, config: dict, layers: list[Layer], before: Mapping,
                after: Mapping, rng) -> dict:
    """``{"max_rel_error", "tolerance", "ok", "input_shape"}`` of the folded model against the
    original, or ``{"refused": why}`` for a model the runner does not run."""
    by_name = {ly.keras_name: ly for ly in layers if ly.convention == KERAS}

    def weights_of(arrays):
        def get(name, param):
            ly = by_name.get(name)
            key = ly.params.get(param) if ly is not None else None
            if key is None and ly is not None and param == "bias":  # a bias fold added
                key = next((k for k in arrays if k.startswith(ly.name + "/bias")), None)
            return np.asarray(arrays[key], np.float64) if key in arrays else None
        return get

    try:
        _, shape = _input_shape(graph, config)
        x = rng.standard_normal(shape)
        with np.errstate(all="ignore"):
            ref = _run(graph, config, weights_of(before), x)
            got = _run(graph, config, weights_of(after), x)
    except Refused as exc:
        return {"refused": f"{exc} (it runs Sequential and functional models of "
                f"{', '.join(SUPPORTED)})"}
    scale = max(float(np.max(np.abs(r))) for r in ref) if ref else 0.0
    err = max(float(np.max(np.abs(g - r))) for g, r in zip(got, ref, strict=True)) if ref else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
    ok = bool(np.isfinite(rel) and rel <= TOLERANCE)
    return {"max_rel_error": rel, "tolerance": TOLERANCE, "ok": ok, "input_shape": list(shape)}
