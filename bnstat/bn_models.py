"""BatchNorm layers of a model file, and activation names matched to them.

The one place where ``running``, ``recalibrate`` and ``diff`` learn which
keys of a model are which BN's running mean / variance / gamma / beta, and
whether the model follows the PyTorch or the Keras convention (README.md,
"Training and inference statistics"). The vocabulary itself lives with the
folding code; only the import below names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from bnstat.errors import DataError, InputError, UsageProblem
from bnstat.folding.layers import bn_layers  # the BN vocabulary: the one import of it

# an activation may carry one of these after the BN's name (README.md)
SUFFIXES = (":input", ".input", "_input")  # ".input" is also "/input"


@dataclass
class BNLayer:
    """One BN layer: its name, convention and the keys of its arrays."""

    name: str
    convention: str  # "pytorch" or "keras"
    mean_key: str
    var_key: str
    gamma_key: str | None = None
    beta_key: str | None = None
    tracked_key: str | None = None  # PyTorch num_batches_tracked

    def channels(self, arrays) -> int:
        return int(np.asarray(arrays[self.mean_key]).size)

    def values(self, arrays) -> tuple[np.ndarray, np.ndarray]:
        """(running mean, running var) in float64, as stored."""
        return (np.asarray(arrays[self.mean_key], np.float64).ravel(),
                np.asarray(arrays[self.var_key], np.float64).ravel())

    def tracked(self, arrays) -> int | None:
        if self.tracked_key is None:
            return None
        return int(np.asarray(arrays[self.tracked_key]).ravel()[0])


def find_bns(arrays, where: str, *, required: bool = True) -> dict[str, BNLayer]:
    """{name: BNLayer} of a model's arrays, in model order. Raises DataError when
    ``required`` and there is none."""
    out = {}
    for name, roles in bn_layers(arrays).items():
        keras = "moving_mean" in roles
        tracked = f"{name}.num_batches_tracked"
        out[name] = BNLayer(
            name, "keras" if keras else "pytorch",
            roles["moving_mean" if keras else "running_mean"],
            roles["moving_variance" if keras else "running_var"],
            roles.get("gamma" if keras else "weight"), roles.get("beta" if keras else "bias"),
            None if keras or tracked not in arrays else tracked)
    if required and not out:
        raise DataError(f"{where}: no BatchNorm layer found (no running_mean/running_var or "
                        "moving_mean/moving_variance arrays)",
                        "Give a model file with BatchNorm layers (PyTorch or Keras naming).")
    return out


def find_layer(layers: dict[str, BNLayer], name: str, where: str, option: str = "--bn/bn=") -> BNLayer:
    """The BN called ``name`` (``/`` and ``.`` one separator; trailing segments suffice when
    unique). Raises DataError listing the layers."""
    for test in (lambda L: _segments(L) == _segments(name), lambda L: _fits(name, L)):
        hits = [L for L in layers if test(L)]
        if len(hits) == 1:
            return layers[hits[0]]
        if hits:
            break
    raise DataError(f"{where}: {'ambiguous' if len(hits) > 1 else 'unknown'} BatchNorm layer {name!r}; "
                    f"the file has: {', '.join(layers)}", f"Give one of those names with {option}.")


def is_model(arrays) -> bool:
    return bool(bn_layers(arrays))


def _segments(name: str) -> list[str]:
    """``/`` and ``.`` are one separator."""
    return [s for s in re.split(r"[/.]", name) if s]


def _strip_suffix(name: str) -> str | None:
    dotted = name.replace("/", ".")
    for suffix in SUFFIXES:
        if dotted.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return None


def _fits(act: str, bn: str) -> bool:
    """An activation name names a BN: same segments, or one's segments end the other's."""
    a, b = _segments(act), _segments(bn)
    if not a or not b:
        return False
    n = min(len(a), len(b))
    return a[-n:] == b[-n:]


def resolve_bn(act: str, bn: str, bns: list[str], where: str) -> str:
    """The layer of ``bns`` that ``--map act=bn`` names. Raises DataError."""
    if bn in bns:
        return bn
    hits = [b for b in bns if _segments(b) == _segments(bn)] or [b for b in bns if _fits(bn, b)]
    if len(hits) == 1:
        return hits[0]
    what = f"several BatchNorm layers named like {bn!r}" if hits else f"no BatchNorm layer {bn!r}"
    raise DataError(f"--map {act}={bn}: {where} has {what} (it has: {', '.join(bns)})",
                    "Name one of those layers.")


def match_names(acts: list[str], bns: list[str], explicit: dict[str, str], where: str) -> dict[str, str]:
    """{activation name: BN name}. ``explicit`` ({act: bn}, from --map) first, then names:
    exactly (``/`` and ``.`` one separator), then with a suffix of SUFFIXES removed, then
    by trailing segments. Unmatched activations are left out (the caller decides).

    Raises DataError when --map names a missing array or layer, or a name is ambiguous.
    """
    out: dict[str, str] = {}
    for act, bn in explicit.items():
        if act not in acts:
            raise DataError(f"--map {act}={bn}: no array {act!r} (the arrays: {', '.join(acts)})")
        out[act] = resolve_bn(act, bn, bns, where)
    taken = set(out.values())
    for act in acts:
        if act in out:
            continue
        base = _strip_suffix(act)
        for test in (lambda b: _segments(b) == _segments(act),
                     lambda b: base is not None and _segments(b) == _segments(base),
                     lambda b: _fits(act, b) or (base is not None and _fits(base, b))):
            hits = [b for b in bns if test(b) and b not in taken]
            if len(hits) > 1:
                raise DataError(f"{act}: the name fits several BatchNorm layers of {where} "
                                f"({', '.join(hits)})", f"Say which with --map {act}=BN.")
            if hits:
                out[act] = hits[0]
                taken.add(hits[0])
                break
    seen: dict[str, str] = {}
    for act, bn in out.items():
        if bn in seen:
            raise DataError(f"{where}: BatchNorm {bn} is named by two arrays, {seen[bn]} and {act}",
                            "Keep one (-d), or map them with --map ACT=BN.")
        seen[bn] = act
    return out


def parse_maps(items, map_file: str | None = None) -> dict[str, str]:
    """{act: bn} from ``--map ACT=BN`` items and a map file (JSON object, or lines
    ``ACT=BN`` with ``#`` comments). Raises UsageProblem / InputError."""
    pairs: list[tuple[str, str, str]] = []
    for text in items or ():
        act, sep, bn = str(text).partition("=")
        if not sep or not act.strip() or not bn.strip():
            raise UsageProblem(f"--map/map= {text!r}: write ACT=BN, e.g. features/1:input=features.1")
        pairs.append((act.strip(), bn.strip(), "--map"))
    if map_file is not None:
        import json

        try:
            with open(map_file, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise InputError(f"{map_file}: cannot read the map file: {exc.strerror}") from exc
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            pairs += [(str(k), str(v), map_file) for k, v in doc.items()]
        else:
            for i, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                act, sep, bn = line.partition("=")
                if not sep or not act.strip() or not bn.strip():
                    raise InputError(f"{map_file}:{i}: {line!r} is not ACT=BN",
                                     "A map file is a JSON object {act: bn} or lines ACT=BN.")
                pairs.append((act.strip(), bn.strip(), map_file))
    out: dict[str, str] = {}
    for act, bn, origin in pairs:
        if act in out and out[act] != bn:
            raise UsageProblem(f"{origin}: {act} is mapped to both {out[act]} and {bn}")
        out[act] = bn
    return out
