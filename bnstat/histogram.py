"""Exact per-unit histograms: the objects, their edges, merging, histogram files.

A :class:`Histogram` is the histogram of one named array: per unit the bin
``edges`` (bins + 1 float64, as ``np.linspace`` gives them), exact int64
``counts`` (the last bin closed, as ``np.histogram``), the values below and
above the outer edges, the zeros, and the moments of the same values (a
:class:`bnstat.stats.Stats`, with its NaN and inf counts). Histograms with
equal edges merge by adding counts (README "Histograms"); quantiles and
amax are kept beside them when they were asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np

from bnstat.errors import DataError, InputError, UsageProblem
from bnstat.stats import STATS_KEY, Stats, load_stats, merge_all

DEFAULT_BINS = 2048


# ---- the range and edges -------------------------------------------------------

def parse_range(text: str) -> str | tuple[float, float]:
    """``auto``, ``abs`` or ``LO:HI`` -> "auto", "abs" or (lo, hi). Raises ValueError."""
    text = str(text).strip()
    if text in ("auto", "abs"):
        return text
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = float(lo), float(hi)
    except ValueError:
        raise ValueError(f"{text!r}: give auto, abs or LO:HI (e.g. -4:4)") from None
    if not (np.isfinite(a) and np.isfinite(b)):
        raise ValueError(f"{text!r}: LO and HI must be finite numbers")
    if not a < b:
        raise ValueError(f"{text!r}: LO must be smaller than HI")
    return a, b


def outer_edges(stats: Stats, rng, finite_min: np.ndarray, finite_max: np.ndarray):
    """Per-unit (lo, hi) float64 arrays of ``unit_shape``, as np.histogram chooses them.

    ``auto``: the unit's finite min and max; ``abs``: 0 and its largest finite |x|;
    a unit without finite values gets 0..1, a constant one c-0.5..c+0.5 (numpy's rules).
    """
    shape = stats.unit_shape
    if isinstance(rng, tuple):
        return np.full(shape, float(rng[0])), np.full(shape, float(rng[1]))
    empty = ~(finite_min <= finite_max)
    if rng == "abs":
        lo = np.zeros(shape)
        hi = np.maximum(np.abs(finite_min), np.abs(finite_max))
    else:
        lo, hi = finite_min.astype(np.float64), finite_max.astype(np.float64)
    lo = np.where(empty, 0.0, lo)
    hi = np.where(empty, 1.0, hi)
    same = lo == hi
    return np.where(same, lo - 0.5, lo), np.where(same, hi + 0.5, hi)


def make_edges(lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """``np.linspace(lo, hi, bins + 1)`` per unit: shape ``lo.shape + (bins + 1,)``."""
    return np.linspace(lo, hi, bins + 1, axis=-1)


# ---- the object ----------------------------------------------------------------

@dataclass
class Histogram:
    """The histogram of one named array (API ``bnstat.hist``; README "Histograms").

    ``edges`` (unit_shape + (bins + 1,)), ``counts`` (unit_shape + (bins,), int64),
    ``underflow``/``overflow``/``zero_count`` (unit_shape), ``stats`` the moments.
    ``quantile(q)`` and ``amax(method)`` return arrays of ``unit_shape``.
    """

    stats: Stats
    edges: np.ndarray
    counts: np.ndarray
    underflow: np.ndarray
    overflow: np.ndarray
    zero_count: np.ndarray
    range: object = "auto"
    quantile_q: tuple = ()
    quantile_values: np.ndarray | None = None  # unit_shape + (len(quantile_q),)
    amax_values: dict = field(default_factory=dict)  # method -> unit_shape array
    num_bits: int = 8
    unsigned: bool = False
    per_tensor: bool = False
    _rerun: object = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.stats.name

    @property
    def bins(self) -> int:
        return self.counts.shape[-1]

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return self.stats.unit_shape

    @property
    def zero_fraction(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.stats.count > 0, self.zero_count / np.maximum(self.stats.count, 1), np.nan)

    @property
    def dead(self) -> np.ndarray:
        """Units whose values (NaN left out) are all zero."""
        return (self.stats.count > 0) & (self.zero_count == self.stats.count)

    def quantile(self, q) -> np.ndarray:
        """Exact ``np.quantile(values, q, method="linear")`` per unit (float64).

        ``q`` a number or a sequence: the result has shape ``unit_shape`` (+ (len(q),)).
        A q that was not computed runs the counting passes again over the source
        (DataError when the histogram was loaded from a file).
        """
        qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
        have = {float(v): i for i, v in enumerate(self.quantile_q)}
        if not all(float(v) in have for v in qs):
            if self._rerun is None:
                raise DataError(f"{self.name}: quantiles {list(map(float, qs))} were not computed",
                                "Ask for them with --quantiles/quantiles= when making the histogram.")
            fresh = self._rerun(quantiles=[float(v) for v in qs])
            values = fresh.quantile_values
        else:
            values = self.quantile_values[..., [have[float(v)] for v in qs]]
        return values if np.ndim(q) else values[..., 0]

    def amax(self, method: str = "max") -> np.ndarray:
        """The calibration range per unit by ``method`` (max, percentile:P, mse, entropy)."""
        from bnstat.amax import check_method, compute_amax

        method = check_method(method)
        if method in self.amax_values:
            return self.amax_values[method]
        if self.range != "abs":
            if self._rerun is None:
                raise DataError(f"{self.name}: amax needs the histogram of |x| (--range abs)",
                                "Make it with bnstat hist --range abs, or ask for --amax then.")
            return self._rerun(amax=[method], range="abs").amax(method)
        return compute_amax(self, method)

    def merge(self, other: Histogram) -> Histogram:
        """The histogram of both parts (split along N); the edges must agree. Raises DataError."""
        if self.edges.shape[-1] != other.edges.shape[-1] or self.range != other.range:
            raise DataError(f"{self.name}: cannot merge histograms of {self.bins} and {other.bins} bins "
                            f"(ranges {fmt_range(self.range)} and {fmt_range(other.range)})",
                            "Make both with the same --bins and --range LO:HI.")
        stats = self.stats.merge(other.stats)
        n_axis = self.stats.n_unit_axis

        def join(a, b):
            return a + b if n_axis is None else np.concatenate([a, b], axis=n_axis)

        if n_axis is None and not np.array_equal(self.edges, other.edges):
            raise DataError(f"{self.name}: the histograms have different bin edges; counts over "
                            "different edges cannot be added",
                            "Make every part with the same --range LO:HI (auto and abs ranges "
                            "follow each part's own data).")
        edges = self.edges if n_axis is None else join(self.edges, other.edges)
        out = replace(self, stats=stats, edges=edges, counts=join(self.counts, other.counts),
                      underflow=join(self.underflow, other.underflow),
                      overflow=join(self.overflow, other.overflow),
                      zero_count=join(self.zero_count, other.zero_count),
                      quantile_q=(), quantile_values=None, amax_values={}, _rerun=None)
        if self.range == "abs":
            methods = [m for m in self.amax_values if m in other.amax_values]
            out.amax_values = {m: out.amax(m) for m in methods}
        return out


def fmt_range(rng) -> str:
    return f"{rng[0]!r}:{rng[1]!r}" if isinstance(rng, tuple | list) else str(rng)


# ---- histogram files -----------------------------------------------------------

HIST_KEY = "histogram"
_UNIT_ARRAYS = ("edges", "counts", "underflow", "overflow", "zero_count")


def save_hist(hists: dict[str, Histogram], fh) -> None:
    """A stats file with, per array, NAME/edges, NAME/counts (and the rest) beside the moments."""
    from bnstat.stats import save_stats

    extra: dict[str, np.ndarray] = {}
    meta = {}
    for name, h in hists.items():
        for key in _UNIT_ARRAYS:
            extra[f"{name}/{key}"] = getattr(h, key)
        if h.quantile_values is not None:
            extra[f"{name}/quantiles"] = h.quantile_values
        methods = list(h.amax_values)
        if methods:
            extra[f"{name}/amax"] = np.stack([h.amax_values[m] for m in methods], axis=-1)
        meta[name] = {"bins": h.bins, "range": list(h.range) if isinstance(h.range, tuple) else h.range,
                      "quantiles": list(h.quantile_q), "amax": methods, "num_bits": h.num_bits,
                      "unsigned": h.unsigned, "per_tensor": h.per_tensor}
    save_stats({n: h.stats for n, h in hists.items()}, fh, extra, {HIST_KEY: meta})


def read_meta(path: str) -> dict:
    """The ``__bnstat__`` metadata of a stats file. Raises InputError."""
    import zipfile

    from bnstat.stats import _check_stats_zip

    try:
        _check_stats_zip(path)  # not a zip (a .npy, empty), metadata over its bound
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise InputError(f"{path}: not a bnstat stats file (a single array)",
                             "Make one with: bnstat moments DATA -o stats.npz (or bnstat hist)")
        with z:
            if STATS_KEY not in z.files:
                raise InputError(f"{path}: not a bnstat stats file (no {STATS_KEY} key)",
                                 "Make one with: bnstat hist DATA -o hist.npz")
            return json.loads(str(z[STATS_KEY][()]))
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{path}: is a directory, not a stats file") from exc
    except RecursionError as exc:  # JSON nested thousands deep
        raise InputError(f"{path}: not a readable bnstat stats file (its metadata is nested too "
                         "deep)") from exc
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, json.JSONDecodeError, TypeError) as exc:
        raise InputError(f"{path}: not a readable bnstat stats file ({exc})") from exc


def is_hist_file(path: str) -> bool:
    """True for a histogram file (False for a moments stats file). Raises InputError."""
    return HIST_KEY in read_meta(path)


def load_hist(path: str) -> dict[str, Histogram]:
    """Read a histogram file written by ``save_hist``. Raises InputError."""
    meta = read_meta(path)
    if HIST_KEY not in meta:
        raise InputError(f"{path}: a stats file of moments, not a histogram file",
                         "Make one with: bnstat hist DATA -o hist.npz")
    stats = load_stats(path)
    out = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for name, m in meta[HIST_KEY].items():
                arrays = {k: np.asarray(z[f"{name}/{k}"]) for k in _UNIT_ARRAYS}
                rng = tuple(m["range"]) if isinstance(m["range"], list) else m["range"]
                qv = np.asarray(z[f"{name}/quantiles"]) if m["quantiles"] else None
                amax = {}
                if m["amax"]:
                    stacked = np.asarray(z[f"{name}/amax"])
                    amax = {meth: stacked[..., i] for i, meth in enumerate(m["amax"])}
                out[name] = Histogram(stats[name], arrays["edges"].astype(np.float64),
                                      arrays["counts"].astype(np.int64), arrays["underflow"].astype(np.int64),
                                      arrays["overflow"].astype(np.int64), arrays["zero_count"].astype(np.int64),
                                      range=rng, quantile_q=tuple(m["quantiles"]), quantile_values=qv,
                                      amax_values=amax, num_bits=int(m["num_bits"]),
                                      unsigned=bool(m["unsigned"]), per_tensor=bool(m["per_tensor"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a readable bnstat histogram file ({exc})") from exc
    return out


def merge_hists(parts: list[Histogram]) -> Histogram:
    """Merge the histograms of parts of one data set (in order). Raises DataError."""
    merge_all([p.stats for p in parts])  # the moments' own checks and warnings first
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out


def check_bins(bins: int) -> int:
    if int(bins) < 1:
        raise UsageProblem(f"--bins/bins={bins}: needs at least one bin")
    return int(bins)


def kind_of_files(paths) -> str:
    """"histogram" when every file is a histogram file, "moments" when none is.

    Raises InputError for a file that is not a stats file, DataError for a mix.
    """
    kinds = {path: is_hist_file(path) for path in paths}
    if all(kinds.values()):
        return "histogram"
    if any(kinds.values()):
        hist = [p for p, k in kinds.items() if k]
        other = [p for p, k in kinds.items() if not k]
        raise DataError(f"{hist[0]} is a histogram file but {other[0]} holds moments only",
                        "Merge files made by the same command (bnstat hist or bnstat moments).")
    return "moments"
