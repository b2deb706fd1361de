"""Applying a plan to the arrays: validation, --bn drop / identity bookkeeping, dtype casts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from bnstat.errors import DataError, UsageProblem, warn
from bnstat.folding.layers import _KERAS_SUFFIX, PYTORCH, Layer
from bnstat.folding.math import fold_weights
from bnstat.folding.plans import Pair
from bnstat.folding.readings import out_index

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
    w64, shift = fold_weights(w, b, mean, var, pair.eps, gamma, beta, index=out_index(r, w.shape))
    w_new = rs(wkey, _cast(wkey, w64, w.dtype))
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




def apply_plan(pairs: list[Pair], model, bn_mode: str) -> tuple[dict, list[str], list[str]]:
    """(the folded arrays in order, keys added, keys removed) of a plan on ``model`` (a
    ModelFile). Every pair is validated first. Raises DataError, UsageProblem."""
    arrays = model.arrays
    updates: dict[str, np.ndarray] = {}
    removed: list[str] = []
    added: dict[str, str] = {}
    for pair in pairs:
        folded = fold_pair(pair, arrays, bn_mode, model.round_stored)
        updates.update(folded.updates)
        removed += folded.removed
        added.update(folded.added)
        pair.note = "; ".join(n for n in (folded.note, "assumed" if pair.assumption else "") if n)
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
    return out, list(added), removed
