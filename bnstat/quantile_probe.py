"""The sampled first step of the exact quantiles: where to look, from a sample.

The first pass (the moments pass) takes every k-th value of each unit, in
strides along both the rows and the values of a row (``Sampler``). From the
sorted sample and the unit's count n, each wanted rank r gets a key interval
that very likely holds it: the sample's values around position r m / n,
MARGIN standard deviations either side. The standard deviation is the
binomial one times the sample's *design effect*, estimated from how much
contiguous groups of the sample disagree about the median (a sample of
whole images whose values go together gives wide intervals, an i.i.d. one
narrow). The next pass (``quantiles.Selector``, a probe pass) collects the
keys inside the intervals and counts the values below each one, so that
every rank is placed exactly: one inside an interval is read off its sorted
keys; one that fell between intervals (a sample that misled) is in a key
range whose count is known, which the ordinary narrowing passes take from
there. The sample decides the speed only, never the result.

Only for keys whose float64 values order them exactly (every float dtype,
integers up to 32 bits): the kernel counts "below" in values, and ties
between different keys (-0.0 and +0.0) are kept within one interval.
"""

from __future__ import annotations

import math

import numpy as np

SAMPLE_BYTES = 16 * 1024**2  # the whole sample (README "Exact quantiles")
MIN_SAMPLE, MAX_SAMPLE = 1024, 65536  # values per unit (fewer within SAMPLE_BYTES: no probe)
MARGIN = 4.0  # standard deviations either side of the estimate
GROUPS = 32  # contiguous groups for the design effect


def eligible(dtype, n_units: int) -> bool:
    """Whether the probe can take keys of the kernel input ``dtype``, and a sample of at
    least MIN_SAMPLE values of each of ``n_units`` units fits in SAMPLE_BYTES."""
    dtype = np.dtype(dtype)
    fits = SAMPLE_BYTES // (dtype.itemsize * max(1, n_units)) >= MIN_SAMPLE
    return fits and (dtype.kind == "f" or dtype.itemsize <= 4)


def _odd_coprime(B: int, s: int) -> int:
    """The smallest s' >= s with gcd(s', B) == 1 (so a stride along a row of B values
    walks every column of an image in turn), at most B."""
    s = max(1, s)
    while s < B and math.gcd(s, B) != 1:
        s += 1
    return min(s, B)


def sample_cap(n_units: int, dtype) -> int:
    """Values a unit of a sample holds: at most MAX_SAMPLE, all units within SAMPLE_BYTES."""
    return int(min(MAX_SAMPLE, SAMPLE_BYTES // (np.dtype(dtype).itemsize * max(1, n_units))))


class Sampler:
    """Every k-th value of each of ``n_units`` units (``values`` values each, about) in
    the first pass, at most ``SAMPLE_BYTES`` in all."""

    def __init__(self, n_units: int, values: int, dtype, along_rows: bool = True):
        self.cap = sample_cap(n_units, dtype)
        self.k = max(1, -(-int(values) // self.cap))  # one in k: at most ``cap`` values a unit
        self.n_units = n_units
        self.along_rows = along_rows  # False: only the values of a row strided (a presample's)
        self.rows = 0  # rows (A) seen so far of the units ``last``: the row stride runs on
        self.last = None
        self.blocks: list[tuple[np.ndarray, np.ndarray]] = []
        self.taken: list[int] = []  # after ``samples``: per unit, its values sampled, NaN too

    def strides(self, B: int) -> tuple[int, int]:
        """(rows, values of a row) strides for rows of B values."""
        if self.k == 1:
            return 1, 1
        if B == 1:
            return self.k, 1
        if not self.along_rows:
            return 1, self.k  # each chunk from another first value (``add``)
        sb = _odd_coprime(B, int(round(math.sqrt(self.k))))
        return max(1, -(-self.k // sb)), sb  # rows x values strides of at least k

    def add(self, x: np.ndarray, units: np.ndarray) -> None:
        """The sample of a (P, A, U, B) chunk whose units (p, u) are ``units[p * U + u]``.
        The row stride runs on from the chunk before where that one had the same units
        (chunks of fewer rows than the stride would each give their first row: a sample
        many times its bound); a chunk of other units starts at its first row."""
        P, A, U, B = x.shape
        sa, sb = self.strides(B)
        units = np.asarray(units)
        if self.last is None or not np.array_equal(units, self.last):
            self.rows = 0
        self.last = units
        a0 = -self.rows % sa
        self.rows += A
        b0 = 0 if self.along_rows else len(self.blocks) % sb  # every column of an image in turn
        s = np.ascontiguousarray(x[:, a0::sa, :, b0::sb].transpose(0, 2, 1, 3)).reshape(P * U, -1)
        self.blocks.append((units, s))

    def samples(self) -> list[np.ndarray]:
        """Per unit, its sample in the order it was read (NaN left out)."""
        blocks, self.blocks = self.blocks, []
        if len(blocks) > 1 and all(np.array_equal(u, blocks[0][0]) for u, _ in blocks):
            # the same units in every block (a presample's): one concatenation of them all
            blocks = [(blocks[0][0], np.concatenate([s for _, s in blocks], axis=1))]
        parts: list[list[np.ndarray]] = [[] for _ in range(self.n_units)]
        for units, s in blocks:
            for i, u in enumerate(units.tolist()):
                parts[u].append(s[i])
        del blocks
        out = []
        self.taken = []
        for p in parts:
            v = (p[0] if len(p) == 1 else np.concatenate(p)) if p else np.zeros(0)
            self.taken.append(v.size)
            out.append(v[v == v] if v.dtype.kind == "f" and np.isnan(v).any() else v)
        return out


def design_effect(seq: np.ndarray, med) -> float:
    """How many times the binomial variance of a quantile estimate the sample ``seq`` (in
    read order) shows: the variance of the fraction at or below ``med`` among GROUPS
    contiguous groups, against p(1-p) over the group size (at least 1)."""
    g = seq.size // GROUPS
    if g < 16:
        return 1.0
    f = (seq[:g * GROUPS].reshape(GROUPS, g) <= med).mean(axis=1)
    p = f.mean()
    if p <= 0.0 or p >= 1.0:
        return 1.0
    return max(1.0, float(f.var(ddof=1)) * g / (p * (1 - p)))


def intervals(sample: np.ndarray, n: int, ranks):
    """(sorted sample, groups, design effect): per group of nearby ranks, [lo index, hi
    index, ranks] into the sorted ``sample`` (-1 and m for "past the end"), the index
    range very likely holding each rank's value. (A sort: np.partition at the few indices
    took twice as long, bench/README.md.)"""
    srt = np.sort(sample)
    m = srt.size
    deff = design_effect(sample, srt[m // 2])
    out = []
    for r in sorted(set(ranks)):
        f = (r + 0.5) / n
        t = f * m - 0.5
        d = MARGIN * math.sqrt(deff * max(f * (1 - f) * m, 1.0)) + 2
        lo, hi = max(-1, math.floor(t - d)), min(m, math.ceil(t + d))
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
            out[-1][2].append(r)
        else:
            out.append([lo, hi, [r]])
    return srt, out, deff
