"""Folding ONNX BatchNormalization nodes into the Conv / ConvTranspose / Gemm feeding them.

A BatchNormalization node ``Y = BN(X, scale, B, mean, var)`` (inference
form: one output, ``training_mode`` 0) is folded when

- ``X`` is the first output of a Conv, ConvTranspose (any ``group``) or
  Gemm node, consumed by this BN only and not a graph output;
- that node's weight (and bias, if any) are initializers of a float type
  used by that node only, and the BN's four vectors are constants
  (initializers or Constant nodes);
- the channel counts agree (a Gemm's bias broadcasts along its output
  columns: shape (N,), (1, N) or a scalar).

Then, with s = scale / sqrt(var + epsilon) (the node's own epsilon), the
weight's output channels are scaled by s and the bias becomes
(b - mean) * s + B; for a Gemm, ``C' = (beta * C - mean) * s + B`` and
``beta`` becomes 1 (``alpha`` is kept). The producing node takes over the
BN's output name, the BN node goes, and the BN's initializers go when no
other node uses them; everything else of the model is kept as it was.

Needs the ``onnx`` extra (``pip install 'bnstat[onnx]'``); ``--check`` runs
both models with onnxruntime when it is installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from bnstat.errors import DataError, InputError, OutputError, UsageProblem, warn
from bnstat.folding.math import fold_weights

__all__ = ["is_onnx", "fold_onnx", "describe_onnx", "OnnxFold"]

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
_FLOAT_TYPES = (1, 10, 11)  # FLOAT, FLOAT16, DOUBLE


def is_onnx(path) -> bool:
    return isinstance(path, str | os.PathLike) and os.fspath(path).lower().endswith(".onnx")


def _onnx(path: str):
    try:
        import onnx
    except ImportError as exc:
        raise InputError(f"{path}: reading ONNX models needs the onnx package",
                         "Install the extra: pip install 'bnstat[onnx]'") from exc
    return onnx


@dataclass
class Candidate:
    """One BatchNormalization node and what fold does with it."""

    bn: object  # the NodeProto
    producer: object | None = None
    reason: str | None = None  # why it is not folded; None: folded
    channels: int = 0
    eps: float = 1e-5

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass
class OnnxFold:
    """The result of :func:`fold_onnx`."""

    path: str
    candidates: list[Candidate] = field(default_factory=list)
    output: str | None = None
    checked: bool = False
    check_rel: float | None = None

    @property
    def folded(self) -> list[Candidate]:
        return [c for c in self.candidates if c.ok]

    def report_dict(self) -> dict:
        """What fold --format json prints: the keys of a FoldResult's report where they apply
        (every ONNX pair rests on the graph: certain)."""
        pairs = [{"conv": _label(c.producer), "bn": _label(c.bn), "kind": c.producer.op_type,
                  "channels": c.channels, "eps": c.eps, "by": "ONNX graph",
                  "evidence": ["ONNX graph"], "certain": True} for c in self.folded]
        unfolded = [{"bn": _label(c.bn), "channels": c.channels or None, "conv": None,
                     "reason": c.reason, "candidates": []} for c in self.candidates if not c.ok]
        doc = {"model": self.path, "format": "onnx", "pairs": pairs, "unfolded": unfolded,
               "assumed": [], "output": self.output, "output_format": "onnx" if self.output
               else None}
        if self.checked:
            doc["model_check"] = {"max_rel_error": self.check_rel, "by": "onnxruntime"}
        return doc

    def lines(self) -> list[str]:
        out = [f"{self.path}: ONNX, {len(self.candidates)} BatchNormalization node(s), "
               f"{len(self.folded)} foldable"]
        for c in self.candidates:
            if c.ok:
                out.append(f"  {_label(c.producer)} <- {_label(c.bn)}: {c.producer.op_type}, "
                           f"{c.channels} channels, eps {c.eps:g}")
            else:
                out.append(f"  {_label(c.bn)}: not folded: {c.reason}")
        if self.checked:
            out.append(f"check: onnxruntime outputs of both models agree (max relative error "
                       f"{self.check_rel:.2e})")
        if self.output:
            out.append(f"written {self.output}")
        return out


def _label(node) -> str:
    return node.name or f"{node.op_type}({node.output[0]})"


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def _uses(graph) -> dict[str, int]:
    """How many node inputs (subgraphs included) and graph outputs name each value."""
    counts: dict[str, int] = {}

    def walk(g):
        for node in g.node:
            for name in node.input:
                if name:
                    counts[name] = counts.get(name, 0) + 1
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(sub)
        for o in g.output:
            counts[o.name] = counts.get(o.name, 0) + 1

    walk(graph)
    return counts


def _analyse(model) -> list[Candidate]:
    from onnx import numpy_helper

    graph = model.graph
    inits = _constants(graph)
    producers = {o: n for n in graph.node for o in n.output if o}
    uses = _uses(graph)
    found = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        c = Candidate(bn, eps=float(_attr(bn, "epsilon", 1e-5)))
        c.reason = _why_not(c, inits, producers, uses, numpy_helper)
        found.append(c)
    return found


def _constants(graph) -> dict:
    """Initializers and the tensors of Constant nodes (``value``), by name."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    out[node.output[0]] = a.t
    return out


def _why_not(c: Candidate, inits, producers, uses, numpy_helper) -> str | None:
    bn = c.bn
    if _attr(bn, "training_mode", 0) or any(o for o in bn.output[1:]):
        return "it is in training mode (it updates running statistics)"
    params = list(bn.input[1:5])
    if len(params) != 4 or any(p not in inits for p in params):
        return "its scale, bias, mean and variance are not all constants (initializers)"
    if any(inits[p].data_type not in _FLOAT_TYPES for p in params):
        return "its parameters are not of a float type"
    vecs = [numpy_helper.to_array(inits[p]) for p in params]
    c.channels = int(vecs[0].size)
    if any(v.ndim != 1 or v.size != c.channels for v in vecs):
        return "its scale, bias, mean and variance are not vectors of one length"
    src = producers.get(bn.input[0])
    if src is None:
        return f"its input {bn.input[0]} is a graph input or initializer, not a node's output"
    c.producer = src
    if src.op_type not in _PRODUCERS or src.domain not in ("", "ai.onnx"):
        return f"fed by {src.op_type} ({_label(src)}), not a Conv, ConvTranspose or Gemm"
    if src.output[0] != bn.input[0]:
        return f"fed by a secondary output of {_label(src)}"
    if uses.get(bn.input[0], 0) != 1:
        return f"the output of {_label(src)} also feeds other nodes (or is a graph output)"
    weights = [n for n in src.input[1:3] if n]
    for name in weights:
        if name not in inits:
            return f"the weights of {_label(src)} ({name}) are not an initializer"
        if uses.get(name, 0) != 1:
            return f"the weights of {_label(src)} ({name}) are used by other nodes too"
        if inits[name].data_type not in _FLOAT_TYPES:
            return f"the weights of {_label(src)} ({name}) are not of a float type"
    if src.op_type == "Gemm" and len(src.input) < 2:
        return f"{_label(src)} has no weight input"
    w = numpy_helper.to_array(inits[src.input[1]])
    try:
        _index(src, w, c.channels)
    except ValueError as exc:
        return str(exc)
    if len(weights) == 2:
        b = numpy_helper.to_array(inits[src.input[2]])
        if src.op_type == "Gemm":
            if b.size not in (1, c.channels) or (b.ndim == 2 and b.shape[0] != 1):
                return f"the bias of {_label(src)} has shape {b.shape}, not (N,) or (1, N)"
        elif b.size != c.channels:
            return f"the bias of {_label(src)} has {b.size} values, the BN {c.channels}"
    return None


def _index(node, w: np.ndarray, C: int) -> np.ndarray:
    """Each weight element's output channel. Raises ValueError (channel mismatch)."""
    if node.op_type == "Conv":
        outs, index = w.shape[0], np.arange(w.shape[0]).reshape((-1,) + (1,) * (w.ndim - 1))
    elif node.op_type == "ConvTranspose":
        g = int(_attr(node, "group", 1))
        if w.ndim < 3 or w.shape[0] % g:
            raise ValueError(f"{_label(node)}: weight {w.shape} does not split into {g} groups")
        per_in, per_out = w.shape[0] // g, w.shape[1]
        outs = g * per_out
        group = (np.arange(w.shape[0]) // per_in).reshape((-1, 1) + (1,) * (w.ndim - 2))
        index = group * per_out + np.arange(per_out).reshape((1, -1) + (1,) * (w.ndim - 2))
    else:  # Gemm: B is (K, N), or (N, K) with transB
        if w.ndim != 2:
            raise ValueError(f"{_label(node)}: weight of shape {w.shape} is not a matrix")
        trans = int(_attr(node, "transB", 0))
        outs = w.shape[0] if trans else w.shape[1]
        index = np.arange(outs).reshape((-1, 1) if trans else (1, -1))
    if outs != C:
        raise ValueError(f"{_label(node)} gives {outs} channels, the BN has {C}")
    return np.broadcast_to(index, w.shape)


def _apply(model, c: Candidate, taken: set[str]) -> None:
    """Fold one candidate into ``model`` in place."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    bn, src = c.bn, c.producer
    consts = _constants(graph)
    gamma, beta, mean, var = (numpy_helper.to_array(consts[p]) for p in bn.input[1:5])
    w = numpy_helper.to_array(inits[src.input[1]])
    bias_name = src.input[2] if len(src.input) > 2 and src.input[2] else None
    b = numpy_helper.to_array(inits[bias_name]) if bias_name else None
    scale_b = 1.0
    if src.op_type == "Gemm":
        scale_b = float(_attr(src, "beta", 1.0))
        if b is not None:
            b = np.broadcast_to(b.astype(np.float64).ravel(), (c.channels,)) * scale_b
    w_new, b_new = fold_weights(w, b, mean, var, c.eps, gamma, beta,
                                index=_index(src, w, c.channels))
    inits[src.input[1]].CopyFrom(numpy_helper.from_array(w_new.astype(w.dtype), src.input[1]))
    if bias_name:
        old = numpy_helper.to_array(inits[bias_name])
        shape = old.shape if src.op_type != "Gemm" or old.size == c.channels else (c.channels,)
        inits[bias_name].CopyFrom(numpy_helper.from_array(
            b_new.astype(old.dtype).reshape(shape), bias_name))
    else:
        bias_name = _fresh(f"{src.input[1]}_bnstat_bias", taken)
        graph.initializer.append(numpy_helper.from_array(b_new.astype(w.dtype), bias_name))
        while len(src.input) < 2:
            src.input.append("")
        if len(src.input) == 2:
            src.input.append(bias_name)
        else:
            src.input[2] = bias_name
    if src.op_type == "Gemm" and scale_b != 1.0:
        kept = [a for a in src.attribute if a.name != "beta"]
        del src.attribute[:]
        src.attribute.extend(kept + [helper.make_attribute("beta", 1.0)])
    dead = src.output[0]
    src.output[0] = bn.output[0]
    graph.node.remove(bn)
    for vi in list(graph.value_info):
        if vi.name == dead:
            graph.value_info.remove(vi)


def _fresh(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def _drop_unused(model) -> None:
    """Remove the initializers (and Constant nodes) that nothing uses any more."""
    graph = model.graph
    uses = _uses(graph)
    for node in list(graph.node):
        if node.op_type == "Constant" and all(uses.get(o, 0) == 0 for o in node.output):
            graph.node.remove(node)
    for t in list(graph.initializer):
        if uses.get(t.name, 0) == 0:
            graph.initializer.remove(t)
            for inp in list(graph.input):
                if inp.name == t.name:
                    graph.input.remove(inp)


def load(path: str):
    """The ModelProto of ``path``. Raises InputError."""
    onnx = _onnx(path)
    try:
        model = onnx.load(path)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except Exception as exc:  # protobuf's DecodeError and the like: not an ONNX model
        raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") \
            from exc
    if not model.HasField("graph") or not len(model.graph.node):
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    return model


def describe_onnx(path: str) -> list[str]:
    """The BatchNormalization nodes of an ONNX model and what fold would do (``bnstat info``)."""
    return OnnxFold(path, _analyse(load(path))).lines()


def fold_onnx(path: str, output: str | None = None, *, dry_run: bool = False, check: bool = False,
              force: bool = False, seed: int = 0) -> OnnxFold:
    """Fold every foldable BatchNormalization of the ONNX model ``path`` (see the module doc).

    With ``output`` (and not ``dry_run``) the folded model is written there
    atomically, after ``onnx.checker.check_model``; ``check`` also runs both
    models with onnxruntime on random inputs (DataError when they differ).
    Raises InputError (unreadable model), DataError, OutputError.
    """
    from bnstat.io.atomic import atomic_path, check_output

    if output is not None and not dry_run:
        check_output(output, force=force, inputs=[path])
    onnx = _onnx(path)
    model = load(path)
    result = OnnxFold(path, _analyse(model))
    if not result.candidates:
        raise DataError(f"{path}: no BatchNormalization nodes; nothing to fold",
                        "Give the ONNX model whose BatchNormalization nodes should be folded.")
    original = model.SerializeToString()
    taken = {t.name for t in model.graph.initializer} | {v for n in model.graph.node
                                                         for v in (*n.input, *n.output)}
    for c in result.folded:
        _apply(model, c, taken)
    _drop_unused(model)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError
        raise DataError(f"{path}: the folded model fails onnx.checker ({exc}); nothing written") \
            from exc
    if check:
        result.check_rel = _compare(path, original, model.SerializeToString(), seed)
        result.checked = True
    left = [c for c in result.candidates if not c.ok]
    if left:
        warn(f"{len(left)} BatchNormalization node(s) left unfolded ("
             + ", ".join(_label(c.bn) for c in left[:5]) + (" ..." if len(left) > 5 else "")
             + "); the plan says why")
    if output is not None and not dry_run:
        with atomic_path(output, force=force, inputs=[path]) as tmp:
            try:
                onnx.save(model, tmp)
            except (OSError, ValueError) as exc:
                raise OutputError(f"{output}: cannot write: {exc}") from exc
        result.output = output
    return result


def _compare(path: str, before: bytes, after: bytes, seed: int) -> float:
    """Max relative error between the two models' outputs on random inputs (onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise UsageProblem(f"{path}: --check/check= on an ONNX model runs it with onnxruntime, "
                           "which is not installed", "pip install onnxruntime") from exc
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        s0 = ort.InferenceSession(before, opts, providers=["CPUExecutionProvider"])
        s1 = ort.InferenceSession(after, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise DataError(f"{path}: onnxruntime cannot run the model ({exc})") from exc
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in s0.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in inp.shape]
        kind = inp.type[len("tensor("):-1]
        dtype = {"float": np.float32, "double": np.float64, "float16": np.float16}.get(kind)
        if dtype is None:
            raise DataError(f"{path}: input {inp.name} is {inp.type}: --check feeds float inputs only")
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    worst = 0.0
    for a, b in zip(s0.run(None, feeds), s1.run(None, feeds), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rel = float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)) if a.size else 0.0
        worst = max(worst, rel)
    tol = 1e-4 if all(i.type != "tensor(float16)" for i in s0.get_inputs()) else 1e-2
    if not worst <= tol:
        raise DataError(f"{path}: the folded model's outputs differ from the original's (max "
                        f"relative error {worst:.2e} > {tol:g}); nothing written")
    return worst
