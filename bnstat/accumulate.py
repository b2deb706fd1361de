"""An incremental accumulator of exact statistics, for a training loop or a forward hook.

    acc = bnstat.Accumulator(layout="NCHW")
    for batch in loader:
        acc.update(batch)          # a numpy array, or anything with __array__
    acc.stats.mean, acc.stats.var  # a bnstat Stats: merges and saves like the others

Each update computes the batch's moments with the kernels (float64) and
merges them exactly into the total (Chan), so the result is the same as
``bnstat.moments`` over all the batches stacked along N. With ``bins`` and a
fixed ``range`` (LO:HI: the edges must be known before the first batch),
each update also counts the batch into per-unit histograms, added exactly:
``acc.hist`` is the ``bnstat.hist`` of all the batches.
"""

from __future__ import annotations

import os

import numpy as np

from bnstat.errors import DataError, UsageProblem


class Accumulator:
    """Exact per-unit statistics of batches given one at a time (split along N).

    Keywords as ``bnstat.moments``: ``layout``, ``channel_axis``, ``norm``, ``groups``,
    ``reduce``, ``ddof``, ``higher``, ``nan`` (the policy the Stats report with) and
    ``engine``; ``name`` names the array in the Stats and in a saved file.
    """

    def __init__(self, *, layout=None, channel_axis=None, norm="batch", groups=None, reduce=None,
                 ddof=0, higher=False, nan="omit", name="array", engine=None, threads=None,
                 bins=None, range=None):
        if nan not in ("omit", "propagate"):
            raise UsageProblem(f"nan={nan!r}: the accumulator takes 'omit' or 'propagate'")
        self.bins, self.range = self._hist_options(bins, range)
        self.options = dict(layout=layout, channel_axis=channel_axis, norm=norm or "batch",
                            groups=groups, reduce=reduce)
        self.ddof, self.higher, self.nan, self.name = int(ddof), bool(higher), nan, name
        self.engine, self.threads = engine, threads
        self._plan = None
        self._stats = None
        self._hist = None
        self.batches = 0

    @staticmethod
    def _hist_options(bins, rng):
        """(bins, (lo, hi)) or (None, None). Raises UsageProblem."""
        if bins is None and rng is None:
            return None, None
        from bnstat.histogram import check_bins, parse_range

        if rng is None:
            raise UsageProblem(f"bins={bins!r}: histograms of batches need range=(LO, HI), the "
                               "edges every batch is counted over")
        if bins is None:
            bins = 2048
        try:
            bins = check_bins(int(bins))
            fixed = parse_range(rng if isinstance(rng, str) else ":".join(map(str, rng)))
        except (TypeError, ValueError) as exc:
            raise UsageProblem(f"bins={bins!r}, range={rng!r}: {exc}") from None
        if not isinstance(fixed, tuple):
            raise UsageProblem(f"range={rng!r}: batches are counted as they come, so the edges must "
                               "be fixed before the first one",
                               "Give range=(LO, HI) or 'LO:HI' (bnstat hist --range auto/abs "
                               "needs the whole data first).")
        return bins, fixed

    @staticmethod
    def _array(batch) -> np.ndarray:
        # a torch tensor that requires grad or lives on a GPU refuses __array__: detach, move
        if hasattr(batch, "detach") and hasattr(batch, "cpu") and not isinstance(batch, np.ndarray):
            batch = batch.detach().cpu()
        try:
            return np.asarray(batch)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(f"batch=: cannot be read as an array ({exc})",
                            "Give a numpy array or an object with __array__.") from exc

    def update(self, batch) -> Accumulator:
        """Add one batch (its first axis, or its N axis, is the batch axis). Returns self.

        Raises UsageProblem when the layout does not fit, InputError for an unsupported
        dtype or shape, DataError when the batch's non-N axes differ from the first's.
        """
        from bnstat.io import MemorySource
        from bnstat.layout import make_plan
        from bnstat.stats import Stats
        from bnstat.kernels._jit import set_threads
        from bnstat.stream import DEFAULT_CHUNK_SIZE, pick_engine, source_moments

        x = self._array(batch)
        src = MemorySource(x, self.name)
        plan = make_plan(x.shape, name=self.name, **self.options)
        if self._plan is None:
            if plan.assumed:
                from bnstat.errors import warn

                warn(f"{self.name}: no layout given: assuming the PyTorch layout {plan.letters} (channel axis 1)")
            self._plan = plan
        hist = None
        if self.bins is not None:
            hist = self._count(x, plan)
            moments = hist.stats.moments
        else:
            engine = pick_engine(x.nbytes, self.engine)
            threads = set_threads(self.threads) if engine == "numba" else 1
            moments = source_moments(src, plan, chunk_size=DEFAULT_CHUNK_SIZE, higher=self.higher,
                                     threads=threads, engine=engine)
        part = Stats(name=self.name, moments=moments, shape=tuple(x.shape), dtype=x.dtype.name,
                     layout=plan.letters, reduce=plan.reduce_letters, unit_axes=plan.unit_axes,
                     ddof=self.ddof, sources=["<batches>"], norm=plan.norm, groups=plan.groups,
                     assumed_layout=plan.assumed, nan_policy=self.nan)
        if hist is not None:
            from dataclasses import replace

            hist = replace(hist, stats=part, _rerun=None)
        if self._stats is not None:
            n = plan.n_axis if plan.n_axis is not None else 0
            want = tuple(s for i, s in enumerate(self._stats.shape) if i != n)
            got = tuple(s for i, s in enumerate(x.shape) if i != n)
            if len(x.shape) != len(self._stats.shape) or want != got:
                raise DataError(f"{self.name}: a batch of shape {tuple(x.shape)} after batches of shape "
                                f"{self._stats.shape}; batches must agree on every axis but N")
        self._stats = part if self._stats is None else self._stats.merge(part)
        if hist is not None:
            self._hist = hist if self._hist is None else self._hist.merge(hist)
        self.batches += 1
        return self

    def _count(self, x: np.ndarray, plan):
        """The histogram (with its moments) of one batch, by ``bnstat.hist``."""
        from bnstat import hist

        options = dict(self.options)
        if plan.assumed:  # assumed (and said) once, by update
            options.update(layout=plan.letters, channel_axis=None)
        (h,) = hist({self.name: x}, ddof=self.ddof, bins=self.bins, range=self.range,
                    threads=self.threads, nan=self.nan, **options).values()
        return h

    __call__ = update

    @property
    def stats(self):
        """The statistics so far, a ``bnstat.stats.Stats``. Raises DataError before any update."""
        if self._stats is None:
            raise DataError(f"{self.name}: no batch added yet", "Call update(batch) first.")
        return self._stats

    @property
    def hist(self):
        """The histograms so far, a ``bnstat.histogram.Histogram`` (edges, counts, amax...).
        Raises DataError without ``bins``/``range`` or before any update."""
        if self.bins is None:
            raise DataError(f"{self.name}: this accumulator counts no histogram",
                            "Make it with bins= and range=(LO, HI).")
        if self._hist is None:
            raise DataError(f"{self.name}: no batch added yet", "Call update(batch) first.")
        return self._hist

    def merge(self, other: Accumulator) -> Accumulator:
        """A new accumulator holding both (e.g. from two workers), exact. Raises DataError
        when their histograms differ in bins or range."""
        if (self.bins, self.range) != (other.bins, other.range):
            raise DataError(f"{self.name}: cannot merge accumulators with histograms of "
                            f"{self.bins} bins over {self.range} and {other.bins} over {other.range}")
        out = Accumulator(ddof=self.ddof, higher=self.higher, nan=self.nan, name=self.name,
                          engine=self.engine, threads=self.threads, bins=self.bins,
                          range=self.range, **self.options)
        out._plan = self._plan or other._plan
        out._stats = _join(self._stats, other._stats)
        out._hist = _join(self._hist, other._hist)
        out.batches = self.batches + other.batches
        return out

    def save(self, path, *, force=False) -> None:
        """Write the statistics as a stats file (``bnstat show`` / ``merge`` read it), atomically;
        with histograms, a histogram file (``bnstat show``, ``merge``, ``plot`` read it)."""
        if self.bins is None:
            from bnstat import save_stats

            save_stats({self.name: self.stats}, os.fspath(path), force=force)
            return
        from bnstat.histogram import save_hist
        from bnstat.io.atomic import atomic_open

        hist = self.hist
        with atomic_open(os.fspath(path), "wb", force=force) as fh:
            save_hist({self.name: hist}, fh)

    def __repr__(self) -> str:
        shape = None if self._stats is None else self._stats.unit_shape
        return f"Accumulator(name={self.name!r}, batches={self.batches}, unit_shape={shape})"


def _join(a, b):
    """The merge of two optional parts (Stats or Histogram)."""
    return b if a is None else a if b is None else a.merge(b)
