"""A pure-numpy float64 two-pass reference for bnstat's statistics (STYLE 9).

Written from SPEC 1 and 4 alone, not from bnstat's code: the array is cast to
float64, the kept axes are moved to the front (group norm first splits C
into (G, C/G)), every unit's values are taken as one row, and per row the
mean is an exactly rounded sum (math.fsum) divided by the count, then the
variance the sum of squared deviations from that mean (a second pass) over
count - ddof. NaNs are counted and left out (``nan="omit"``) or make every
statistic of their unit NaN (``nan="propagate"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PYTORCH = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}


@dataclass
class Ref:
    unit_shape: tuple
    count: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nan_count: np.ndarray
    skew: np.ndarray
    kurtosis: np.ndarray
    m2: np.ndarray

    @property
    def std(self):
        return np.sqrt(self.var)


def units(x: np.ndarray, layout: str | None = None, norm: str = "batch", groups: int | None = None,
          reduce: str | None = None) -> tuple[tuple, np.ndarray]:
    """(unit_shape, 2-D float64 array with one row of values per unit, C order of units)."""
    a = np.asarray(x).astype(np.float64)
    letters = (layout or PYTORCH[a.ndim]).upper()
    assert len(letters) == a.ndim
    c = letters.index("C")
    n = letters.index("N") if "N" in letters else None
    if reduce is not None:
        keep = [i for i, ch in enumerate(letters) if ch not in reduce.upper()]
    elif norm == "batch":
        keep = [c]
    elif norm == "layer":
        keep = [n]
    elif norm == "instance":
        keep = sorted([n, c])
    elif norm == "group":
        size = a.shape[c]
        assert size % groups == 0
        a = a.reshape(a.shape[:c] + (groups, size // groups) + a.shape[c + 1:])
        # axes after C moved one place right; C itself now indexes the groups
        keep = sorted([n if n < c else n + 1, c])
    else:
        raise ValueError(norm)
    red = [i for i in range(a.ndim) if i not in keep]
    t = a.transpose(keep + red)
    unit_shape = tuple(t.shape[:len(keep)])
    rows = t.reshape(math.prod(unit_shape), -1)
    return unit_shape, rows


def hist_edges(v: np.ndarray, rng_mode, bins: int) -> np.ndarray:
    """np.histogram's edges of a unit's values ``v`` (|x| already taken for "abs"): over
    ``rng_mode`` (lo, hi), or 0..max for "abs", min..max for "auto" (a constant widened by 0.5)."""
    if isinstance(rng_mode, tuple):
        lo, hi = rng_mode
    else:
        lo, hi = (0.0 if rng_mode == "abs" else v.min()), v.max()
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def _sum(v: np.ndarray) -> float:
    if v.size and np.all(np.isfinite(v)):
        return math.fsum(v.tolist())
    return float(np.sum(v))  # inf/-inf: numpy's answer (inf, -inf or nan)


def ref_moments(x, layout=None, norm="batch", groups=None, reduce=None, ddof=0,
                nan="omit") -> Ref:
    """Per-unit count, mean, var, min, max, nan_count, skew, excess kurtosis (float64)."""
    unit_shape, rows = units(x, layout, norm, groups, reduce)
    k = rows.shape[0]
    out = {name: np.full(k, np.nan) for name in ("mean", "var", "min", "max", "skew", "kurtosis", "m2")}
    count = np.zeros(k, np.int64)
    nan_count = np.zeros(k, np.int64)
    for i, row in enumerate(rows):
        isnan = np.isnan(row)
        nan_count[i] = int(isnan.sum())
        v = row[~isnan]
        count[i] = v.size
        if v.size == 0:
            continue
        mean = _sum(v) / v.size
        with np.errstate(invalid="ignore", over="ignore"):
            d = v - mean
            m2 = _sum(d * d)
            m3 = _sum(d * d * d)
            m4 = _sum((d * d) * (d * d))
            dof = v.size - ddof
            out["mean"][i] = mean
            out["m2"][i] = m2
            out["var"][i] = m2 / dof if dof > 0 else np.nan
            out["min"][i] = v.min()
            out["max"][i] = v.max()
            c2, c3, c4 = m2 / v.size, m3 / v.size, m4 / v.size
            out["skew"][i] = c3 / c2**1.5 if c2 > 0 else np.nan
            out["kurtosis"][i] = c4 / (c2 * c2) - 3.0 if c2 > 0 else np.nan
        if nan == "propagate" and nan_count[i]:
            for name in ("mean", "var", "min", "max", "skew", "kurtosis"):
                out[name][i] = np.nan
    shaped = {name: v.reshape(unit_shape) for name, v in out.items()}
    return Ref(unit_shape, count.reshape(unit_shape), nan_count=nan_count.reshape(unit_shape), **shaped)


def data_scale(x) -> float:
    """The largest finite magnitude of the data (for absolute tolerances), at least tiny."""
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.abs(a).max()) if a.size else 1.0


def assert_matches(got, ref: Ref, x, *, rtol=1e-9, higher=False, check_count=True):
    """Exact count, nan_count, min, max; mean and var within ``rtol`` (plus float64's
    rounding at the data's scale, so that means near 0 are judged fairly)."""
    scale = data_scale(x) or 1.0
    assert tuple(np.shape(got.mean)) == ref.unit_shape
    for name in ("count", "nan_count", "mean", "var", "std", "min", "max"):
        assert tuple(np.shape(getattr(got, name))) == ref.unit_shape, name
    if check_count:
        np.testing.assert_array_equal(got.count, ref.count, err_msg="count")
    np.testing.assert_array_equal(got.nan_count, ref.nan_count, err_msg="nan_count")
    np.testing.assert_array_equal(got.min, ref.min, err_msg="min")
    np.testing.assert_array_equal(got.max, ref.max, err_msg="max")
    np.testing.assert_allclose(got.mean, ref.mean, rtol=rtol, atol=rtol * scale * 1e-3, err_msg="mean")
    np.testing.assert_allclose(got.var, ref.var, rtol=rtol, atol=rtol * scale * scale * 1e-6,
                               err_msg="var")
    np.testing.assert_allclose(got.std, ref.std, rtol=rtol, atol=rtol * scale * 1e-3, err_msg="std")
    if higher:
        np.testing.assert_allclose(got.skew, ref.skew, rtol=1e-7, atol=1e-9, err_msg="skew")
        np.testing.assert_allclose(got.kurtosis, ref.kurtosis, rtol=1e-7, atol=1e-9, err_msg="kurtosis")
