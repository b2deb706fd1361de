"""Mergeable moments and the statistics objects built on them.

:class:`Moments` holds, per unit, count, mean, m2 (sum of squared
deviations), min, max, nan_count and optionally m3, m4; ``merge`` combines
two of them exactly (Chan et al. for m2, Pébay for m3/m4). :class:`Stats`
adds what a user needs to read them: the array's name, sources, shape,
layout, reduced axes, ddof. Stats files (README "Output formats") are written and read here.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from bnstat._version import __version__
from bnstat.errors import BnstatWarning, DataError, InputError

FIELDS = ("count", "mean", "m2", "min", "max", "nan_count", "inf_count")


@dataclass
class Moments:
    """Per-unit partial moments; all arrays share one shape."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nan_count: np.ndarray
    m3: np.ndarray | None = None
    m4: np.ndarray | None = None
    inf_count: np.ndarray | None = None  # values +-inf per unit (None: none counted, zeros)

    def __post_init__(self):
        if self.inf_count is None:
            self.inf_count = np.zeros(np.shape(self.count), np.int64)

    @classmethod
    def empty(cls, shape, higher: bool = False) -> Moments:
        z = np.zeros(shape)
        return cls(np.zeros(shape, np.int64), z.copy(), z.copy(), np.full(shape, np.inf),
                   np.full(shape, -np.inf), np.zeros(shape, np.int64),
                   z.copy() if higher else None, z.copy() if higher else None)

    @property
    def higher(self) -> bool:
        return self.m3 is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.count.shape

    def arrays(self) -> dict[str, np.ndarray]:
        out = {k: getattr(self, k) for k in FIELDS}
        if self.higher:
            out.update(m3=self.m3, m4=self.m4)
        return out

    def map(self, fn) -> Moments:
        """Apply ``fn`` (a reshape, a slice, a transpose) to every array."""
        return Moments(**{k: (None if v is None else fn(v)) for k, v in
                          {**{f: getattr(self, f) for f in FIELDS}, "m3": self.m3, "m4": self.m4}.items()})

    def merge(self, other: Moments) -> Moments:
        """Exact merge of the moments of two disjoint parts of the data, per unit."""
        if self.shape != other.shape:
            raise ValueError(f"cannot merge moments of shapes {self.shape} and {other.shape}")
        na = self.count.astype(np.float64)
        nb = other.count.astype(np.float64)
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            safe = np.where(n > 0, n, 1.0)
            delta = other.mean - self.mean
            delta = np.where((na > 0) & (nb > 0), delta, 0.0)
            wb = nb / safe
            mean = np.where(na == 0, other.mean, np.where(nb == 0, self.mean, self.mean + delta * wb))
            nab = na * nb / safe
            m2 = self.m2 + other.m2 + delta * delta * nab
            m3 = m4 = None
            if self.higher and other.higher:
                m3 = (self.m3 + other.m3 + delta**3 * nab * (na - nb) / safe
                      + 3.0 * delta * (na * other.m2 - nb * self.m2) / safe)
                m4 = (self.m4 + other.m4 + delta**4 * nab * (na * na - na * nb + nb * nb) / (safe * safe)
                      + 6.0 * delta**2 * (na * na * other.m2 + nb * nb * self.m2) / (safe * safe)
                      + 4.0 * delta * (na * other.m3 - nb * self.m3) / safe)
            # ±inf in a part: numpy's sum/n gives ±inf (inf - inf: NaN) and a NaN
            # variance; the update above would give inf - inf = NaN for the mean
            infinite = (na > 0) & (nb > 0) & ~(np.isfinite(self.mean) & np.isfinite(other.mean))
            if infinite.any():
                mean = np.where(infinite, self.mean + other.mean, mean)
                m2 = np.where(infinite, np.nan, m2)
                if m3 is not None:
                    m3 = np.where(infinite, np.nan, m3)
                    m4 = np.where(infinite, np.nan, m4)
        return Moments(self.count + other.count, mean, m2,
                       np.fmin(self.min, other.min), np.fmax(self.max, other.max),
                       self.nan_count + other.nan_count, m3, m4, self.inf_count + other.inf_count)


def concatenate(parts: list[Moments], axis: int) -> Moments:
    """Moments of units side by side (the data split along a kept axis)."""
    out = {k: np.concatenate([getattr(p, k) for p in parts], axis=axis) for k in FIELDS}
    if all(p.higher for p in parts):
        out["m3"] = np.concatenate([p.m3 for p in parts], axis=axis)
        out["m4"] = np.concatenate([p.m4 for p in parts], axis=axis)
    return Moments(**out)


@dataclass
class Stats:
    """Statistics of one named array: per-unit arrays of ``unit_shape``.

    ``count``, ``mean``, ``var``, ``std``, ``min``, ``max``, ``nan_count``
    (and ``skew``, ``kurtosis`` with higher moments) are numpy arrays. Under
    ``nan_policy="propagate"`` every statistic of a unit that saw a NaN is
    NaN, as in numpy. ``merge`` combines the statistics of two parts of one
    data set (split along N).
    """

    name: str
    moments: Moments
    shape: tuple[int, ...]
    dtype: str
    layout: str
    reduce: str
    unit_axes: list[str]
    ddof: int = 0
    sources: list[str] = field(default_factory=list)
    norm: str = "batch"
    groups: int | None = None
    assumed_layout: bool = False
    nan_policy: str = "omit"

    # ---- per-unit results -------------------------------------------------
    @property
    def unit_shape(self) -> tuple[int, ...]:
        return self.moments.shape

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def _mask(self, values: np.ndarray) -> np.ndarray:
        values = np.where(self.moments.count > 0, values, np.nan)
        if self.nan_policy == "propagate":
            values = np.where(self.moments.nan_count > 0, np.nan, values)
        return values

    @property
    def count(self) -> np.ndarray:
        return self.moments.count

    @property
    def nan_count(self) -> np.ndarray:
        return self.moments.nan_count

    @property
    def inf_count(self) -> np.ndarray:
        return self.moments.inf_count

    @property
    def mean(self) -> np.ndarray:
        return self._mask(self.moments.mean)

    @property
    def m2(self) -> np.ndarray:
        return self.moments.m2

    def var_with(self, ddof: int) -> np.ndarray:
        dof = self.moments.count - ddof
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(dof > 0, self.moments.m2 / np.where(dof > 0, dof, 1), np.nan)
        return self._mask(var)

    @property
    def var(self) -> np.ndarray:
        return self.var_with(self.ddof)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def min(self) -> np.ndarray:
        return self._mask(self.moments.min)

    @property
    def max(self) -> np.ndarray:
        return self._mask(self.moments.max)

    @property
    def higher(self) -> bool:
        return self.moments.higher

    @property
    def skew(self) -> np.ndarray | None:
        if not self.higher:
            return None
        n = self.moments.count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            m2 = self.moments.m2 / n
            m3 = self.moments.m3 / n
            return self._mask(m3 / m2**1.5)

    @property
    def kurtosis(self) -> np.ndarray | None:
        if not self.higher:
            return None
        n = self.moments.count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            m2 = self.moments.m2 / n
            m4 = self.moments.m4 / n
            return self._mask(m4 / (m2 * m2) - 3.0)

    def columns(self) -> dict[str, np.ndarray]:
        """The reported per-unit statistics, in the order of the outputs."""
        cols = {"count": self.count, "mean": self.mean, "var": self.var, "std": self.std,
                "min": self.min, "max": self.max, "nan_count": self.nan_count,
                "inf_count": self.inf_count}
        if self.higher:
            cols["skew"] = self.skew
            cols["kurtosis"] = self.kurtosis
        return cols

    # ---- merging ----------------------------------------------------------
    @property
    def n_unit_axis(self) -> int | None:
        """Position of N among the unit axes, when N is kept (layer/instance/group)."""
        return self.unit_axes.index("N") if "N" in self.unit_axes else None

    def merge(self, other: Stats) -> Stats:
        """The statistics of both parts as one data set split along N.

        With N reduced (batch norm) units are merged exactly; with N kept the
        units of ``other`` follow those of ``self`` along N. Raises DataError
        when the two do not describe parts of one data set.
        """
        if (self.layout, self.reduce, tuple(self.unit_axes)) != (other.layout, other.reduce, tuple(other.unit_axes)):
            raise DataError(
                f"{self.name}: cannot merge statistics of layout {self.layout} reducing {self.reduce} "
                f"with statistics of layout {other.layout} reducing {other.reduce}")
        n_axis = self.n_unit_axis
        if n_axis is None:
            if self.unit_shape != other.unit_shape:
                raise DataError(f"{self.name}: cannot merge statistics of unit shape "
                                f"{self.unit_shape} and {other.unit_shape}")
            moments = self.moments.merge(other.moments)
        else:
            a = tuple(s for i, s in enumerate(self.unit_shape) if i != n_axis)
            b = tuple(s for i, s in enumerate(other.unit_shape) if i != n_axis)
            if a != b:
                raise DataError(f"{self.name}: cannot join statistics of unit shapes "
                                f"{self.unit_shape} and {other.unit_shape} along N")
            moments = concatenate([self.moments, other.moments], axis=n_axis)
        if self.higher != other.higher:
            moments = replace(moments, m3=None, m4=None)
        shape = list(self.shape)
        if self.n_axis_in_shape is not None:
            shape[self.n_axis_in_shape] += other.shape[self.n_axis_in_shape]
        return replace(self, moments=moments, shape=tuple(shape),
                       sources=list(dict.fromkeys(self.sources + other.sources)),
                       dtype=self.dtype if self.dtype == other.dtype else str(np.result_type(self.dtype, other.dtype)))

    @property
    def n_axis_in_shape(self) -> int | None:
        return self.layout.index("N") if "N" in self.layout else 0

    # ---- metadata ---------------------------------------------------------
    def meta(self) -> dict:
        return {"name": self.name, "sources": self.sources, "shape": list(self.shape),
                "dtype": self.dtype, "layout": self.layout, "reduce": self.reduce,
                "unit_shape": list(self.unit_shape), "unit_axes": self.unit_axes, "ddof": self.ddof,
                "norm": self.norm, "groups": self.groups, "assumed_layout": self.assumed_layout,
                "nan_policy": self.nan_policy, "higher": self.higher}


def merge_all(stats: list[Stats]) -> Stats:
    """Merge statistics of parts of one data set (see Stats.merge); the first part's ddof
    is kept, with a warning when the parts were saved with different ones."""
    ddofs = sorted({s.ddof for s in stats})
    if len(ddofs) > 1:
        warnings.warn(
            f"{stats[0].name}: the statistics were saved with different --ddof ({', '.join(map(str, ddofs))}); "
            f"the merged variance uses --ddof {stats[0].ddof} (m2 is merged exactly either way)",
            BnstatWarning, stacklevel=2)
    out = stats[0]
    for s in stats[1:]:
        out = out.merge(s)
    return out


def merge_files(paths, load=None, merge=None, *, allow_duplicates: bool = True) -> dict[str, Stats]:
    """The stats files ``paths`` (parts of one data set split along N) merged, array by array.

    Arrays are matched by name, in the order they first appear. ``load``/``merge``
    replace ``load_stats``/``merge_all`` (histogram files: bnstat.histogram). Raises
    InputError (a file that is no stats file, or one file twice) and DataError (an array
    missing from some files, parts that are not of one data set, or two parts of the same
    sources), unless ``allow_duplicates``. Warns when some parts lack --higher's moments.
    """
    from bnstat.io import refuse_same_file_twice

    paths = [str(p) for p in paths]
    refuse_same_file_twice(paths, allow_duplicates)
    load, merge_all_ = load or load_stats, merge or merge_all
    loaded = [(path, load(path)) for path in paths]
    names = list(dict.fromkeys(name for _, st in loaded for name in st))
    _warn_mixed_higher(loaded, names)
    merged = {}
    for name in names:
        missing = [path for path, st in loaded if name not in st]
        if missing:
            raise DataError(f"{name}: in some stats files but not in {', '.join(missing)}",
                            "Merge files that hold the same arrays.")
        try:
            merged[name] = merge_all_([st[name] for _, st in loaded])
        except DataError as exc:
            raise DataError(f"{', '.join(paths)}: {exc.message}", exc.hint) from None
    if not allow_duplicates:  # after the checks that the parts are of one data set
        _refuse_same_sources(loaded, names)
    return merged


def _refuse_same_sources(loaded, names) -> None:
    """DataError when an array of two files comes from the same input files (counted twice)."""
    for name in names:
        seen = {}
        for path, st in loaded:
            sources = getattr(st.get(name), "sources", None)
            if not sources or any(s == "-" or s.startswith("<") for s in sources):
                continue  # standard input, batches: nothing tells two runs apart
            first = seen.setdefault(tuple(sorted(sources)), path)
            if first != path:
                raise DataError(
                    f"{first} and {path}: {name} comes from the same sources ({', '.join(sources)}) "
                    "in both; merged, its counts would double",
                    "Merge statistics of different parts, or give --allow-duplicates/"
                    "allow_duplicates=True to count them twice.")


def _warn_mixed_higher(loaded, names) -> None:
    """Warn (once) when some files have --higher's m3/m4 and others not: skew, kurtosis dropped."""
    mixed = [name for name in names
             if len({getattr(st[name], "higher", None) for _, st in loaded if name in st}) > 1]
    if mixed:
        plain = [path for path, st in loaded
                 if mixed[0] in st and not getattr(st[mixed[0]], "higher", True)]
        warnings.warn(
            f"{', '.join(mixed)}: {', '.join(plain)} computed without --higher; the merged "
            "statistics drop skew and kurtosis (rerun those parts with --higher to keep them)",
            BnstatWarning, stacklevel=3)


def warn_degenerate(stats: Stats) -> None:
    """Warn about units whose variance is NaN because there are too few values."""
    few = (stats.count > 0) & (stats.count <= stats.ddof)
    if np.any(few):
        warnings.warn(
            f"{stats.name}: {int(few.sum())} unit(s) have {stats.ddof} value(s) or fewer; "
            f"their variance with --ddof {stats.ddof} is NaN", BnstatWarning, stacklevel=3)


# ---- stats files ----------------------------------------------------------
STATS_KEY = "__bnstat__"


def save_stats(stats: dict[str, Stats], fh, extra: dict | None = None, extra_meta: dict | None = None) -> None:
    """Write a stats file (.npz, loadable with plain numpy) to a binary file object.

    ``extra`` arrays (``NAME/edges``...) and ``extra_meta`` keys of the metadata are
    written beside the moments (bnstat.histogram's files).
    """
    arrays: dict[str, np.ndarray] = dict(extra or {})
    meta = {"bnstat": __version__, "format": 1, "arrays": [], **(extra_meta or {})}
    for name, s in stats.items():
        for key in ("count", "mean", "m2"):
            arrays[f"{name}/{key}"] = getattr(s.moments, key)
        arrays[f"{name}/var"] = s.var
        # raw per-unit moments (NaNs omitted); NaN only where a unit is empty
        empty = s.moments.count == 0
        arrays[f"{name}/min"] = np.where(empty, np.nan, s.moments.min)
        arrays[f"{name}/max"] = np.where(empty, np.nan, s.moments.max)
        arrays[f"{name}/nan_count"] = s.nan_count
        arrays[f"{name}/inf_count"] = s.inf_count
        if s.higher:
            arrays[f"{name}/m3"] = s.moments.m3
            arrays[f"{name}/m4"] = s.moments.m4
            arrays[f"{name}/skew"] = s.skew
            arrays[f"{name}/kurtosis"] = s.kurtosis
        meta["arrays"].append(s.meta())
    arrays[STATS_KEY] = np.array(json.dumps(meta))
    np.savez(fh, **arrays)


def load_stats(path: str) -> dict[str, Stats]:
    """Read a stats file written by ``save_stats``. Raises InputError."""
    import zipfile

    try:
        _check_stats_zip(path)
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if STATS_KEY not in files:
                raise InputError(f"{path}: not a bnstat stats file (no {STATS_KEY} key)",
                                 "Make one with: bnstat moments DATA -o stats.npz")
            meta = json.loads(str(z[STATS_KEY][()]))
            out = {}
            for m in meta["arrays"]:
                name = m["name"]
                _check_member_sizes(path, z.zip, name, tuple(m["unit_shape"]))
                get = lambda k, name=name: np.asarray(z[f"{name}/{k}"])  # noqa: E731
                higher = f"{name}/m3" in files
                shape = tuple(m["unit_shape"])
                mn = get("min")
                mx = get("max")
                count = get("count").astype(np.int64)
                # min/max are saved NaN where a unit is empty; restore the identities
                mn = np.where(count > 0, mn, np.inf)
                mx = np.where(count > 0, mx, -np.inf)
                nan_count = get("nan_count").astype(np.int64)
                # files written before inf_count existed: no infinite value was counted
                inf_count = (get("inf_count").astype(np.int64).reshape(shape) if f"{name}/inf_count" in files
                             else np.zeros(shape, np.int64))
                moments = Moments(count.reshape(shape), get("mean").reshape(shape), get("m2").reshape(shape),
                                  mn.reshape(shape), mx.reshape(shape), nan_count.reshape(shape),
                                  get("m3").reshape(shape) if higher else None,
                                  get("m4").reshape(shape) if higher else None, inf_count)
                out[name] = Stats(name=name, moments=moments, shape=tuple(m["shape"]), dtype=m["dtype"],
                                  layout=m["layout"], reduce=m["reduce"], unit_axes=list(m["unit_axes"]),
                                  ddof=int(m["ddof"]), sources=list(m["sources"]), norm=m.get("norm", "batch"),
                                  groups=m.get("groups"), assumed_layout=bool(m.get("assumed_layout")),
                                  nan_policy=m.get("nan_policy", "omit"))
            return out
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{path}: is a directory, not a stats file") from exc
    except PermissionError as exc:
        raise InputError(f"{path}: permission denied") from exc
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, json.JSONDecodeError, TypeError,
            EOFError, OverflowError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{path}: not a readable bnstat stats file ({first})") from exc
    except RecursionError as exc:  # JSON nested thousands deep
        raise InputError(f"{path}: not a readable bnstat stats file (its metadata is nested too "
                         "deep)") from exc


# A stats file is small: its metadata and one float64 per unit and moment.
# Members are checked against that before np.load inflates them, so that a
# member declaring a gigabyte (a deflate bomb) is refused, never allocated.
_META_LIMIT = 64 << 20
_HEADER_ROOM = 1 << 20


def _check_stats_zip(path: str) -> None:
    import zipfile

    from bnstat.io import magic

    with open(path, "rb") as fh:
        head = fh.read(8)
    if not magic.is_zip(head):
        what = "a .npy array" if head.startswith(b"\x93NUMPY") else (
            "an empty file" if not head else "not a zip file")
        raise InputError(f"{path}: not a bnstat stats file ({what})",
                         "A stats file is the .npz written by: bnstat moments DATA -o stats.npz")
    with zipfile.ZipFile(path) as zf:
        info = next((i for i in zf.infolist() if i.filename == STATS_KEY + ".npy"), None)
        if info is not None and info.file_size > _META_LIMIT:
            raise InputError(f"{path}: not a readable bnstat stats file ({STATS_KEY} declares "
                             f"{info.file_size} bytes, more than any stats file's metadata)")


def _check_member_sizes(path: str, zf, name: str, unit_shape: tuple) -> None:
    need = math.prod(unit_shape) * 8 + _HEADER_ROOM
    for info in zf.infolist():
        if info.filename.rsplit("/", 1)[0] == name and info.file_size > need:
            raise InputError(f"{path}:{info.filename[:-4]}: declares {info.file_size} bytes, more "
                             f"than statistics of unit shape {unit_shape} need")
