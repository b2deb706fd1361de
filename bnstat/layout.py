"""Axis letters and norm kinds: which axes are reduced, and canonical views.

A :class:`Plan` says, for an array of a given shape, which axes are kept
(one statistics unit per combination of their indices) and which are
reduced (README, the --norm table). Group norm splits the channel axis into (G, C/G): G is
kept, C/G reduced. ``kernel_view`` turns a C-contiguous chunk into the 4-D
view (P, A, U, B) the kernels work on: P and U kept, A and B reduced, e.g.
NCHW batch norm -> (1, N, C, H*W), NHWC batch norm -> (1, N*H*W, C, 1),
NHWC instance norm -> (N, H*W, C, 1).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, replace

from bnstat.errors import UsageProblem

PYTORCH_LAYOUTS = {2: "NC", 3: "NCL", 4: "NCHW", 5: "NCDHW"}
_SPARE = "ABDEFGIJKMOPQRSTUVXYZ"  # generic letters for axes that have no name
_INNER_MIN = 1024  # when a reduced run is split into A x B, make B at least this long


def default_letters(ndim: int, channel_axis: int = 1) -> str:
    """The PyTorch convention (channel axis 1), or generic letters around a given C."""
    if channel_axis == 1 and ndim in PYTORCH_LAYOUTS:
        return PYTORCH_LAYOUTS[ndim]
    spare = iter(_SPARE)
    letters = []
    for axis in range(ndim):
        if axis == channel_axis:
            letters.append("C")
        elif axis == 0:
            letters.append("N")
        else:
            letters.append(next(spare))
    return "".join(letters)


@dataclass(frozen=True)
class Plan:
    """Which axes of an array are reduced. Axis numbers refer to ``letters``."""

    letters: str
    reduce: tuple[int, ...]
    norm: str = "batch"
    groups: int | None = None
    assumed: bool = False

    @property
    def ndim(self) -> int:
        return len(self.letters)

    @property
    def channel_axis(self) -> int:
        return self.letters.index("C")

    @property
    def n_axis(self) -> int | None:
        return self.letters.index("N") if "N" in self.letters else None

    @property
    def keep(self) -> tuple[int, ...]:
        return tuple(a for a in range(self.ndim) if a not in self.reduce)

    @property
    def reduce_letters(self) -> str:
        if self.groups is None:
            return "".join(self.letters[a] for a in self.reduce)
        return "".join("(C/G)" if a == self.channel_axis else ch for a, ch in enumerate(self.letters)
                       if a in self.reduce or a == self.channel_axis)

    @property
    def unit_axes(self) -> list[str]:
        """Names of the axes of ``unit_shape`` ("G" for the groups of group norm)."""
        names = []
        for a in self.keep:
            names.append("G" if (self.groups is not None and a == self.channel_axis) else self.letters[a])
        return names

    def expanded(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        """Shape with C split into (G, C/G) for group norm, and which axes are kept."""
        exp, kept = [], []
        for a, size in enumerate(shape):
            if self.groups is not None and a == self.channel_axis:
                exp += [self.groups, size // self.groups]
                kept += [True, False]
            else:
                exp.append(size)
                kept.append(a not in self.reduce)
        return tuple(exp), tuple(kept)

    def unit_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        exp, kept = self.expanded(shape)
        return tuple(s for s, k in zip(exp, kept) if k)

    def transposed(self) -> Plan:
        """The plan for the transposed array (a Fortran-ordered file read as C)."""
        n = self.ndim
        return replace(self, letters=self.letters[::-1],
                       reduce=tuple(sorted(n - 1 - a for a in self.reduce)))

    def kernel_view(self, shape: tuple[int, ...]) -> tuple[tuple[int, int, int, int], tuple[int, ...] | None]:
        """The (P, A, U, B) shape of a C-contiguous chunk of ``shape``.

        Returns ``(shape4, perm)``; ``perm`` is None when the chunk reshapes
        to ``shape4`` as a view, else the axes order (of the expanded shape)
        into which the chunk must be copied first (kept axes, then reduced).
        """
        exp, kept = self.expanded(shape)
        runs: list[list] = []  # [kept, [sizes]] for runs of axes of one kind
        for size, k in zip(exp, kept):
            if size == 1:
                continue  # a length-1 axis changes neither memory nor unit order
            if runs and runs[-1][0] == k:
                runs[-1][1].append(size)
            else:
                runs.append([k, [size]])
        pattern = "".join("K" if k else "R" for k, _ in runs)
        sizes = [math.prod(s) for _, s in runs]
        if pattern in ("", "K"):
            return (1, 1, math.prod(sizes), 1), None
        if pattern == "R":
            a, b = _split(runs[0][1])
            return (1, a, 1, b), None
        if pattern == "RK":
            return (1, sizes[0], sizes[1], 1), None
        if pattern == "KR":
            a, b = _split(runs[1][1])
            return (sizes[0], a, 1, b), None
        if pattern == "RKR":
            return (1, sizes[0], sizes[1], sizes[2]), None
        if pattern == "KRK":
            return (sizes[0], sizes[1], sizes[2], 1), None
        if pattern == "KRKR":
            return tuple(sizes), None
        # anything else (R K R K...): copy with the kept axes first
        keep_axes = tuple(i for i, k in enumerate(kept) if k)
        red_axes = tuple(i for i, k in enumerate(kept) if not k)
        p = math.prod(exp[i] for i in keep_axes)
        r = math.prod(exp[i] for i in red_axes)
        return (p, r, 1, 1), keep_axes + red_axes


def _split(sizes: list[int]) -> tuple[int, int]:
    """Split a run of reduced axes into (A, B): B the trailing axes, at least _INNER_MIN long."""
    b = 1
    i = len(sizes)
    while i > 0 and b < _INNER_MIN:
        i -= 1
        b *= sizes[i]
    return math.prod(sizes[:i]), b


@dataclass(frozen=True)
class LayoutRules:
    """--layout given as rules (README, "Layouts per array"): ``PATTERN=LETTERS`` entries,
    fnmatch on the array name, the first match wins; bare ``LETTERS`` apply to the arrays
    of their rank that no pattern matches (one bare layout alone applies to every array)."""

    patterns: tuple[tuple[str, str], ...] = ()
    bare: tuple[str, ...] = ()

    def pick(self, names: tuple[str, ...], ndim: int, where: str) -> str | None:
        """The letters for an array called ``names`` (its name, its key in the file) of
        ``ndim`` dimensions; None when no rule applies. Raises UsageProblem when bare
        layouts of other ranks only are given."""
        for pattern, letters in self.patterns:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                return letters
        for letters in self.bare:
            if len(letters) == ndim:
                return letters
        if len(self.bare) == 1:
            return self.bare[0]  # make_plan says it does not fit, as for one --layout
        if self.bare:
            raise UsageProblem(
                f"{where}: no --layout for a {ndim}-D array: "
                + ", ".join(f"{b} is {len(b)}-D" for b in self.bare),
                f"Add a {ndim}-letter --layout, or PATTERN={'X' * ndim} for this array.")
        return None


def layout_rules(layout) -> LayoutRules | None:
    """``layout`` (None, "NCHW", or a list of "LETTERS" / "PATTERN=LETTERS" entries) as rules.

    Raises UsageProblem for an empty entry, or two entries that conflict: two bare layouts
    of one rank, one pattern with two layouts."""
    if layout is None or isinstance(layout, LayoutRules):
        return layout
    entries = [layout] if isinstance(layout, str) else list(layout)
    if not entries:
        return None
    patterns: dict[str, str] = {}
    bare: dict[int, str] = {}
    for entry in entries:
        pattern, sep, letters = str(entry).rpartition("=")
        letters = letters.strip().upper()
        if not letters or not letters.isalpha() or (sep and not pattern):
            raise UsageProblem(f"--layout {entry!r}: give LETTERS (NCHW) or PATTERN=LETTERS ('fc*=NC')")
        seen = patterns.get(pattern) if sep else bare.get(len(letters))
        if seen is not None and seen != letters:
            what = f"the pattern {pattern!r}" if sep else f"{len(letters)}-D arrays"
            raise UsageProblem(f"--layout {seen} and --layout {letters}: both given for {what}",
                               "Give one layout per rank, or PATTERN=LAYOUT entries for the others.")
        if sep:
            patterns[pattern] = letters
        else:
            bare[len(letters)] = letters
    return LayoutRules(tuple(patterns.items()), tuple(bare.values()))


def array_layout(source, layout=None, channel_axis=None, *, stored: bool = True) -> str | None:
    """The layout letters of one array (an ArraySource): the --layout rules, else (with
    ``stored``, and no --channel-axis) the layout stored with it, an HDF5 ``layout``
    attribute; None when neither applies. Raises UsageProblem (rules), InputError (an
    attribute that does not fit the array)."""
    rules = layout_rules(layout)
    names = (source.name, getattr(source, "key", source.name))
    ndim = len(source.shape)
    letters = rules.pick(names, ndim, source.where) if rules is not None else None
    attr = getattr(source, "layout", None)
    if letters is not None or not stored or channel_axis is not None or attr is None:
        return letters
    text = attr.upper() if isinstance(attr, str) else ""
    if len(text) != ndim or text.count("C") != 1 or text.count("N") > 1 or len(set(text)) != ndim \
            or not text.isalpha():
        from bnstat.errors import InputError

        raise InputError(f"{source.where}: its layout attribute {attr!r} does not fit the "
                         f"{ndim}-D shape {tuple(source.shape)}",
                         "Give --layout (which wins over the attribute), or fix the attribute.")
    return text


def make_plan(shape: tuple[int, ...], *, layout: str | None = None, channel_axis: int | None = None,
              norm: str = "batch", groups: int | None = None, reduce: str | None = None,
              name: str = "array") -> Plan:
    """Resolve the layout options for an array of ``shape``.

    Raises UsageProblem when the options do not fit the array (exit 2).
    """
    ndim = len(shape)
    norm = norm or "batch"
    assumed = False
    if layout is not None and not isinstance(layout, str):  # rules (a list): picked by ``name``
        layout = layout_rules(layout).pick((name,), ndim, name) if layout else None
    if layout is not None:
        letters = layout.upper()
        if len(letters) != ndim:
            raise UsageProblem(
                f"{name}: --layout {letters} has {len(letters)} letters but the array has "
                f"{ndim} dimensions {tuple(shape)}",
                "Give one letter per dimension, e.g. " + (PYTORCH_LAYOUTS.get(ndim) or "NC" + "X" * (ndim - 2)) + ".")
        if letters.count("C") != 1 or letters.count("N") > 1 or len(set(letters)) != ndim:
            raise UsageProblem(f"--layout {letters}: needs exactly one C, at most one N, no letter twice")
    elif channel_axis is not None:
        if not -ndim <= channel_axis < ndim:
            raise UsageProblem(
                f"{name}: --channel-axis {channel_axis} is out of range for {ndim} dimensions {tuple(shape)}")
        letters = default_letters(ndim, channel_axis % ndim)
    else:
        letters = default_letters(ndim, 1)
        assumed = True
    c = letters.index("C")
    n = letters.index("N") if "N" in letters else None
    if reduce is not None:
        missing = [ch for ch in reduce if ch not in letters]
        if missing:
            raise UsageProblem(f"{name}: --reduce {reduce}: {''.join(missing)} is not in the layout {letters}")
        red = tuple(sorted(letters.index(ch) for ch in reduce))
        return Plan(letters, red, norm="custom", assumed=assumed)
    if norm in ("layer", "instance", "group") and n is None:
        raise UsageProblem(f"{name}: --norm {norm} keeps the N axis, but the layout {letters} has none",
                           "Name the batch axis N in --layout.")
    if norm == "batch":
        red = tuple(a for a in range(ndim) if a != c)
    elif norm == "layer":
        red = tuple(a for a in range(ndim) if a != n)
    elif norm == "instance":
        red = tuple(a for a in range(ndim) if a not in (n, c))
    elif norm == "group":
        if not groups or shape[c] % groups:
            raise UsageProblem(
                f"{name}: --groups {groups} does not divide the {shape[c]} channels",
                "GroupNorm needs C divisible by G.")
        red = tuple(a for a in range(ndim) if a not in (n, c))
    else:
        raise UsageProblem(f"unknown --norm {norm!r}")
    return Plan(letters, red, norm=norm, groups=groups if norm == "group" else None, assumed=assumed)
