"""Statistics as JSON (README "Output formats") and CSV: plain text, no rich."""

from __future__ import annotations

import csv
import json
import math

import numpy as np

from bnstat._version import __version__
from bnstat.stats import Stats


def _finite_or_none(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj


def dumps(doc, **kwargs) -> str:
    """Standard JSON (README "Output formats"): a non-finite float is null, never the
    NaN/Infinity tokens jq and JavaScript reject; the record's nan_count/inf_count say why."""
    return json.dumps(_finite_or_none(doc), allow_nan=False, **kwargs) + "\n"


def _floats(a: np.ndarray) -> list:
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def _ints(a: np.ndarray) -> list:
    return [int(v) for v in np.asarray(a).ravel()]


def stats_record(s: Stats) -> dict:
    cols = s.columns()
    rec = {"name": s.name, "sources": s.sources, "shape": list(s.shape), "dtype": s.dtype,
           "layout": s.layout, "layout_assumed": s.assumed_layout, "reduce": s.reduce,
           "unit_axes": s.unit_axes, "unit_shape": list(s.unit_shape), "ddof": s.ddof,
           "nan_policy": s.nan_policy,
           "count": _ints(cols["count"]), "mean": _floats(cols["mean"]), "var": _floats(cols["var"]),
           "std": _floats(cols["std"]), "min": _floats(cols["min"]), "max": _floats(cols["max"]),
           "nan_count": _ints(cols["nan_count"]), "inf_count": _ints(cols["inf_count"])}
    if s.higher:
        rec["skew"] = _floats(cols["skew"])
        rec["kurtosis"] = _floats(cols["kurtosis"])
    return rec


def to_json(stats: dict[str, Stats]) -> str:
    """The README's JSON; floats round-trip (Python's repr), NaN and +-inf as null."""
    doc = {"bnstat": __version__, "arrays": [stats_record(s) for s in stats.values()]}
    return dumps(doc)


CSV_COLUMNS = ["name", "unit", "count", "mean", "var", "std", "min", "max", "nan_count", "inf_count"]


def coordinate_heads(stats) -> list[str]:
    """The CSV's coordinate columns: every array's unit axes, lower case, in order of appearance
    (``c``; ``n``, ``c`` for instance norm; ``n``, ``g`` for group norm)."""
    return list(dict.fromkeys(a.lower() for s in stats for a in s.unit_axes))


def coordinates(s: Stats, heads: list[str]) -> list[list]:
    """Per unit in C order (the flat ``unit`` index), its index along each of ``heads``; empty
    where the array has no such axis."""
    n = int(np.prod(s.unit_shape))
    along = dict(zip((a.lower() for a in s.unit_axes), np.unravel_index(np.arange(n), s.unit_shape)))
    return [[int(along[h][i]) if h in along else "" for h in heads] for i in range(n)]


def write_csv(stats: dict[str, Stats], fh) -> None:
    """One header line, one row per unit in C order: ``unit`` is the flat index, the last
    columns the unit's coordinates (README "Output formats")."""
    higher = any(s.higher for s in stats.values())
    heads = coordinate_heads(stats.values())
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + (["skew", "kurtosis"] if higher else []) + heads)
    for s in stats.values():
        cols = {k: np.asarray(v).ravel() for k, v in s.columns().items()}
        for i, at in enumerate(coordinates(s, heads)):
            row = [s.name, i, int(cols["count"][i])]
            row += [repr(float(cols[k][i])) for k in ("mean", "var", "std", "min", "max")]
            row += [int(cols["nan_count"][i]), int(cols["inf_count"][i])]
            if higher:
                row += [repr(float(cols[k][i])) if k in cols else "" for k in ("skew", "kurtosis")]
            writer.writerow(row + at)
