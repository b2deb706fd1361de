"""--check: numpy reference conv / conv-transpose / matmul, each folded pair against
layer-then-BN in inference mode on random inputs.

What it verifies is :data:`CHECK_SCOPE` (the plan's header says it): the
arithmetic of each pair under the reading the plan chose, not the pairing
itself; where the file carries a graph, :mod:`bnstat.folding.graphcheck`
also runs the whole folded model against the original.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bnstat.folding.apply import _bias_key, _bn_arrays
from bnstat.folding.layers import PYTORCH
from bnstat.folding.plans import Pair
from bnstat.folding.readings import Reading

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




CHECK_SCOPE = ("the arithmetic of each planned pair (folded layer vs layer then BN, random "
               "inputs, the pair's reading); it cannot tell a wrong pairing: see the evidence")


def check_plan(result, model, seed: int = 0) -> None:
    """Fill each pair's check errors in ``result`` (a FoldResult) from ``model``'s arrays."""
    rng = np.random.default_rng(seed)
    for pair in result.pairs:
        wkey = pair.conv.params[pair.conv.weight_param]
        pair.check_abs, pair.check_rel, pair.tolerance = check_pair(
            pair, model.arrays, result.arrays, result.bn_mode, rng, model.stored.get(wkey))
    result.checked = True
