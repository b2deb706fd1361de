"""Per-batch moments of an array read once, in batches of B samples along N.

Training sees the data in batches of B samples along N, in file order; a
batch may span the end of one file and the start of the next (README.md,
"bnstat running"). One streamed pass computes, per batch and channel, the
exact float64 moments with the kernels: the full batches of a chunk in one
kernel call (the chunk viewed as (batches, B, ...) with the batch index kept,
like a unit axis), the pieces of a batch cut by a chunk or file boundary
merged exactly (Chan). The result is small (batches x C) and is kept for
replaying the running-average updates of later epochs without reading again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnstat.errors import UsageProblem, check_interrupt
from bnstat.io.base import ArraySource
from bnstat.layout import Plan, make_plan
from bnstat.stats import FIELDS, Moments
from bnstat.kernels._jit import set_threads
from bnstat.stream import chunk_moments, source_rows


@dataclass
class BatchMoments:
    """Moments per batch: every field of shape (batches, C); ``sizes``: samples per batch."""

    moments: Moments
    sizes: np.ndarray

    @property
    def batches(self) -> int:
        return int(self.sizes.size)

    def population(self) -> Moments:
        """The exact moments of all batches together (a two-level Chan merge, vectorized)."""
        m = self.moments
        n = m.count.sum(axis=0)
        w = m.count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, (w * m.mean).sum(axis=0) / np.maximum(n, 1), 0.0)
            d = np.where(m.count > 0, m.mean - mean, 0.0)
            m2 = m.m2.sum(axis=0) + (w * d * d).sum(axis=0)
        return Moments(n, mean, m2, m.min.min(axis=0, initial=np.inf),
                       m.max.max(axis=0, initial=-np.inf), m.nan_count.sum(axis=0))

    def take(self, count: int) -> BatchMoments:
        """The first ``count`` batches."""
        return BatchMoments(self.moments.map(lambda a: a[:count]), self.sizes[:count])


def batch_plan(shape, *, layout=None, channel_axis=None, name="array") -> Plan:
    """The BatchNorm plan of an array read in batches: N must be its first axis.

    Raises UsageProblem otherwise.
    """
    plan = make_plan(tuple(shape), layout=layout, channel_axis=channel_axis, norm="batch", name=name)
    if plan.n_axis != 0:
        raise UsageProblem(f"{name}: batches are runs of samples along N, which must be the "
                           f"first axis (the layout is {plan.letters})",
                           "Give --layout with N first (NCHW, NHWC, NC, NCL...).")
    return plan


def _stacked_plan(plan: Plan) -> Plan:
    """The plan of a chunk viewed as (batches, B, ...): the batch index kept, like C."""
    letter = next(ch for ch in "MQZYXWVUTS" if ch not in plan.letters)
    letters = letter + plan.letters
    keep = (0, plan.channel_axis + 1)
    return Plan(letters, tuple(a for a in range(len(letters)) if a not in keep), norm="custom")


class _Collector:
    """Batches of B samples from chunks arriving in order (any boundaries)."""

    def __init__(self, plan: Plan, batch_size: int, threads: int, engine: str, start: int = 0):
        self.plan, self.B, self.threads, self.engine = plan, batch_size, threads, engine
        self.stacked = _stacked_plan(plan)
        self.parts: list[Moments] = []  # each (k, C)
        self.pending: Moments | None = None
        # start: rows of the first batch read before this stream (by another Dask task)
        self.pending_rows = self.start = start
        self.sizes: list[int] = []

    def _moments(self, x: np.ndarray, plan: Plan) -> Moments:
        return chunk_moments(x, plan, threads=self.threads, engine=self.engine)

    def _emit(self, m: Moments, rows: int) -> None:
        self.parts.append(m.map(lambda a: a.reshape(1, -1)))
        self.sizes.append(rows)

    def _take(self, m: Moments, rows: int) -> None:
        """A piece of ``rows`` rows continuing the pending batch (or starting one)."""
        self.pending = m if self.pending is None else self.pending.merge(m)
        self.pending_rows += rows
        if self.pending_rows == self.B:
            self._emit(self.pending, self.B - self.start)
            self.pending, self.pending_rows, self.start = None, 0, 0

    def add(self, chunk: np.ndarray) -> None:
        B, r, pos = self.B, chunk.shape[0], 0
        if self.pending_rows:
            pos = min(B - self.pending_rows, r)
            self._take(self._moments(chunk[:pos], self.plan), pos)
        full = (r - pos) // B
        if full:
            x = chunk[pos:pos + full * B].reshape(full, B, *chunk.shape[1:])
            m = self._moments(x, self.stacked)
            self.parts.append(m.map(lambda a: a.reshape(full, -1)))
            self.sizes += [B] * full
            pos += full * B
        if pos < r:
            self._take(self._moments(chunk[pos:], self.plan), r - pos)

    def add_batches(self, bm: BatchMoments) -> None:
        """The per-batch moments of a later stretch of rows (a Dask task's): its first
        batch continues the pending one, its last, if short, is pending in turn."""
        first, last = 0, bm.batches
        if self.pending is not None:
            self._take(bm.moments.map(lambda a: a[0]), int(bm.sizes[0]))
            first = 1
        if last > first and bm.sizes[-1] < self.B:
            last -= 1
        if last > first:
            self.parts.append(bm.moments.map(lambda a: a[first:last]))
            self.sizes += [int(n) for n in bm.sizes[first:last]]
        if last < bm.batches:
            self._take(bm.moments.map(lambda a: a[last]), int(bm.sizes[last]))

    def finish(self) -> BatchMoments:
        if self.pending is not None:
            self._emit(self.pending, self.pending_rows - self.start)
            self.pending = None
        fields = {k: np.concatenate([getattr(p, k) for p in self.parts]) for k in FIELDS}
        return BatchMoments(Moments(**fields), np.array(self.sizes, np.int64))


def batch_rows(src: ArraySource, batch_size: int, chunk_size: int) -> int:
    """Rows per chunk: whole batches where they fit in the chunk size (one kernel call per
    chunk, not three); a batch larger than a chunk is read in pieces, so that memory stays
    bounded by the chunk size (a slab of one whole batch could be far larger)."""
    buffers = 2 if src.double_buffered else 1
    fits = batch_size * src.row_bytes <= chunk_size // buffers
    return source_rows(src, chunk_size, multiple_of=batch_size if fits else 1)


def check_c_order(src: ArraySource) -> None:
    """Raises UsageProblem for a Fortran-ordered source (batches are runs of rows)."""
    if src.fortran:
        raise UsageProblem(f"{src.where}: a Fortran-ordered array cannot be read in batches "
                           "along N", "Save it in C order (np.ascontiguousarray).")


def collector(plan: Plan, batch_size: int, *, threads: int = 1, engine: str = "numba",
              start: int = 0) -> _Collector:
    """Batches of ``batch_size`` rows from chunks (``add``) or from the per-batch moments
    of consecutive stretches of rows (``add_batches``), in order; ``finish()`` gives the
    BatchMoments. ``start``: rows of the first batch that came before."""
    return _Collector(plan, batch_size, threads, engine, start)


def batch_moments(sources: list[ArraySource], plan: Plan, batch_size: int, *, chunk_size: int,
                  threads: int = 1, engine: str = "numba",
                  progress: Callable[[int], None] | None = None, start: int = 0) -> BatchMoments:
    """Per-batch moments of the sources of one array, in order, in one pass.

    ``start``: rows of the first batch read before (a Dask task's slab; its first
    batch then holds only the rows that complete it). Every source must be
    C-ordered with N first (``batch_plan``); raises UsageProblem for a
    Fortran-ordered one.
    """
    collect = _Collector(plan, batch_size, threads, engine, start)
    for src in sources:
        check_c_order(src)
        # as in stream.source_moments: a reader with its own thread gets a core
        # ("auto" sets numba's count per chunk, stream.kernel_engine)
        spare = engine in ("numba", "auto") and threads > 1 and src.double_buffered
        if spare:
            if engine == "numba":
                set_threads(threads - 1)
            collect.threads = threads - 1
        try:
            for _r0, chunk in src.iter_chunks(batch_rows(src, batch_size, chunk_size)):
                check_interrupt()
                collect.add(chunk)
                if progress is not None:
                    progress(chunk.nbytes)
        finally:
            if spare:
                if engine == "numba":
                    set_threads(threads)
                collect.threads = threads
    return collect.finish()
