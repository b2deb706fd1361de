"""Per-unit drift between two sets of statistics (``bnstat diff A B``).

A and B are each a stats file, an activation file (its moments computed as
``moments`` does) or a model file (its BN running statistics, as stored).
Per unit: both means and stds, the standardized mean shift
(mean_b - mean_a) / std_a, the log variance ratio ln(var_b / var_a), the
Gaussian KL(a || b) = (ln(var_b/var_a) + (var_a + (mean_a - mean_b)^2) /
var_b - 1) / 2, and the flags (empty, nan, const) that changed. Equal values
give 0 (a constant unit compared with itself included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from bnstat.errors import DataError, InputError, UsageProblem

METRICS = ("shift", "logvar", "kl", "changed")


@dataclass
class Side:
    """One side of a diff: per name, (mean, var, count or None, nan_count or None) per unit."""

    path: str
    kind: str  # "stats", "activations" or "model"
    units: dict[str, tuple]


@dataclass
class ArrayDiff:
    name_a: str
    name_b: str
    mean_a: np.ndarray
    var_a: np.ndarray
    mean_b: np.ndarray
    var_b: np.ndarray
    flags_a: np.ndarray
    flags_b: np.ndarray
    unit_shape: tuple

    @property
    def name(self) -> str:
        return self.name_a if self.name_a == self.name_b else f"{self.name_a} ~ {self.name_b}"

    def metrics(self) -> dict[str, np.ndarray]:
        ma, va, mb, vb = self.mean_a, self.var_a, self.mean_b, self.var_b
        same_m, same_v = ma == mb, va == vb
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            shift = np.where(same_m, 0.0, (mb - ma) / np.sqrt(va))
            logvar = np.where(same_v, 0.0, np.log(vb / va))
            kl = np.where(same_m & same_v, 0.0,
                          0.5 * (np.log(vb / va) + (va + (ma - mb) ** 2) / vb - 1.0))
            # a constant unit on either side (and not on both): the KL is infinite
            kl = np.where(~(same_m & same_v) & ((vb == 0) | (va == 0)), np.inf, kl)
        changed = np.array([len((set(a.split(",")) ^ set(b.split(","))) - {""})
                            for a, b in zip(self.flags_a, self.flags_b)], np.float64)
        return {"shift": shift, "logvar": logvar, "kl": kl, "changed": changed}

    def identical(self) -> bool:
        return bool(np.array_equal(self.mean_a, self.mean_b, equal_nan=True)
                    and np.array_equal(self.var_a, self.var_b, equal_nan=True)
                    and list(self.flags_a) == list(self.flags_b))

    def changes(self) -> list[str]:
        """Per unit: '+flag' (in B, not in A) and '-flag' (in A, not in B), comma-joined."""
        out = []
        for a, b in zip(self.flags_a, self.flags_b):
            fa, fb = set(filter(None, a.split(","))), set(filter(None, b.split(",")))
            out.append(",".join([f"+{f}" for f in sorted(fb - fa)] + [f"-{f}" for f in sorted(fa - fb)]))
        return out


@dataclass
class DiffResult:
    a: Side
    b: Side
    arrays: list[ArrayDiff]
    unmatched_a: list[str] = field(default_factory=list)
    unmatched_b: list[str] = field(default_factory=list)
    fail_over: dict[str, float] = field(default_factory=dict)

    def exceeded(self) -> list[tuple[str, str, float, int, float]]:
        """(array, metric, threshold, units over it, worst value) for each threshold exceeded;
        a NaN metric (an empty or NaN unit) never counts: gate on it with ``changed``."""
        out = []
        for d in self.arrays:
            m = d.metrics()
            for metric, limit in self.fail_over.items():
                v = np.abs(m[metric])
                over = v > limit
                if over.any():
                    out.append((d.name, metric, limit, int(over.sum()), float(np.nanmax(v))))
        return out


def _flags(mean, var, count, nan_count) -> np.ndarray:
    out = []
    for i in range(mean.size):
        f = []
        if count is not None and count[i] == 0:
            f.append("empty")
        if (nan_count is not None and nan_count[i] > 0) or np.isnan(mean[i]) or np.isnan(var[i]):
            f.append("nan")
        if var[i] == 0 and (count is None or count[i] > 1):
            f.append("const")
        out.append(",".join(f))
    return np.array(out, dtype=object)


def side_kind(path: str) -> str:
    """'stats', 'model' or 'activations', from the file's contents. Raises InputError."""
    from bnstat.bn_models import is_model
    from bnstat.io import sniff
    from bnstat.io.models import index_model

    try:
        kind = sniff(path)
    except InputError:
        kind = None  # not an activation container: perhaps a model format (.safetensors, ...)
    if kind == "npy":
        return "activations"
    if kind == "npz":
        import zipfile

        from bnstat.stats import STATS_KEY

        with zipfile.ZipFile(path) as zf:
            if f"{STATS_KEY}.npy" in zf.namelist():
                return "stats"
    try:
        index = index_model(path)
    except InputError:
        if kind is None:
            raise
        return "activations"
    return "model" if is_model(index.entries) else "activations"


def load_side(path, kw: dict) -> Side:
    """The per-unit statistics of one side of a diff."""
    if isinstance(path, dict):  # the Python API: {name: Stats}
        return Side("<stats>", "stats", {n: _of_stats(s) for n, s in path.items()})
    path = os.fspath(path)
    kind = side_kind(path)
    if kind == "model":
        from bnstat.bn_models import find_bns
        from bnstat.io.models import read_model

        mf = read_model(path)
        units = {}
        for name, layer in find_bns(mf.arrays, path).items():
            mean, var = layer.values(mf.arrays)
            units[name] = (mean, var, None, None)
        return Side(path, kind, units)
    if kind == "stats":
        from bnstat.stats import load_stats

        loaded = load_stats(path)
    else:
        from bnstat import moments

        loaded = moments(path, **kw)
    return Side(path, kind, {n: _of_stats(s) for n, s in loaded.items()})


def _of_stats(s) -> tuple:
    return (np.asarray(s.mean, np.float64).ravel(), np.asarray(s.var_with(0), np.float64).ravel(),
            np.asarray(s.count).ravel(), np.asarray(s.nan_count).ravel(), tuple(s.unit_shape))


def parse_fail_over(items) -> dict[str, float]:
    """{metric: threshold} from ``METRIC=X`` strings. Raises UsageProblem."""
    out = {}
    for text in items or ():
        metric, sep, value = str(text).partition("=")
        metric = metric.strip().lower()
        try:
            limit = float(value)
        except ValueError:
            limit = float("nan")
        if not sep or metric not in METRICS or not limit >= 0:
            raise UsageProblem(f"--fail-over/fail_over= {text!r}: write METRIC=X with METRIC one of "
                               f"{', '.join(METRICS)} and X >= 0, e.g. shift=3")
        out[metric] = limit
    return out


def diff(a, b, *, map=(), fail_over=(), layout=None, channel_axis=None, norm="batch", groups=None,
         reduce=None, dataset=None, chunk_size=None, threads=None, engine=None,
         check_crc=True) -> DiffResult:
    """Compare ``a`` and ``b`` (paths, or ``{name: Stats}``) unit by unit.

    Arrays are matched by name (models' BN layers to arrays as in ``recalibrate``;
    ``map``: ``A=B`` strings). Raises DataError when nothing matches or unit shapes differ,
    UsageProblem for a bad ``fail_over``.
    """
    from bnstat.bn_models import match_names, parse_maps

    limits = parse_fail_over(fail_over)
    kw = dict(layout=layout, channel_axis=channel_axis, norm=norm, groups=groups, reduce=reduce,
              dataset=dataset, chunk_size=chunk_size, threads=threads, engine=engine, check_crc=check_crc)
    sa, sb = load_side(a, kw), load_side(b, kw)
    explicit = parse_maps(map)
    if sa.kind == "model" and sb.kind != "model":  # arrays (B) name the BN layers (A)
        pairs = {x: y for y, x in match_names(list(sb.units), list(sa.units),
                                              {v: k for k, v in explicit.items()}, sa.path).items()}
    else:
        pairs = match_names(list(sa.units), list(sb.units), explicit, sb.path)
    if not pairs:
        raise DataError(f"{sa.path} and {sb.path}: no array of one matches an array of the other "
                        f"({', '.join(sa.units)} / {', '.join(sb.units)})", "Pair them with --map A=B.")
    arrays = []
    for na, nb in pairs.items():
        ua, ub = sa.units[na], sb.units[nb]
        shape_a = ua[4] if len(ua) > 4 else (ua[0].size,)
        shape_b = ub[4] if len(ub) > 4 else (ub[0].size,)
        if ua[0].size != ub[0].size:
            raise DataError(f"{sa.path}:{na} has {ua[0].size} units {shape_a}, {sb.path}:{nb} has "
                            f"{ub[0].size} {shape_b}", "Compare statistics of the same layout and channels.")
        arrays.append(ArrayDiff(na, nb, ua[0], ua[1], ub[0], ub[1], _flags(*ua[:4]), _flags(*ub[:4]),
                                tuple(shape_a)))
    return DiffResult(sa, sb, arrays, [n for n in sa.units if n not in pairs],
                      [n for n in sb.units if n not in pairs.values()], limits)
