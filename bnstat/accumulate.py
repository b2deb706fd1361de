"""An incremental accumulator of exact statistics, for a training loop or a forward hook.

    acc = bnstat.Accumulator(layout="NCHW")
    for batch in loader:
        acc.update(batch)          # a numpy array, or anything with __array__
    acc.stats.mean, acc.stats.var  # a bnstat Stats: merges and saves like the others

Each update computes the batch's moments with the kernels (float64) and
merges them exactly into the total (Chan), so the result is the same as
``bnstat.moments`` over all the batches stacked along N.
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
                 ddof=0, higher=False, nan="omit", name="array", engine=None, threads=None):
        if nan not in ("omit", "propagate"):
            raise UsageProblem(f"nan={nan!r}: the accumulator takes 'omit' or 'propagate'")
        self.options = dict(layout=layout, channel_axis=channel_axis, norm=norm or "batch",
                            groups=groups, reduce=reduce)
        self.ddof, self.higher, self.nan, self.name = int(ddof), bool(higher), nan, name
        self.engine, self.threads = engine, threads
        self._plan = None
        self._stats = None
        self.batches = 0

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
        engine = pick_engine(x.nbytes, self.engine)
        threads = set_threads(self.threads) if engine == "numba" else 1
        moments = source_moments(src, plan, chunk_size=DEFAULT_CHUNK_SIZE, higher=self.higher,
                                 threads=threads, engine=engine)
        part = Stats(name=self.name, moments=moments, shape=tuple(x.shape), dtype=x.dtype.name,
                     layout=plan.letters, reduce=plan.reduce_letters, unit_axes=plan.unit_axes,
                     ddof=self.ddof, sources=["<batches>"], norm=plan.norm, groups=plan.groups,
                     assumed_layout=plan.assumed, nan_policy=self.nan)
        if self._stats is not None:
            n = plan.n_axis if plan.n_axis is not None else 0
            want = tuple(s for i, s in enumerate(self._stats.shape) if i != n)
            got = tuple(s for i, s in enumerate(x.shape) if i != n)
            if len(x.shape) != len(self._stats.shape) or want != got:
                raise DataError(f"{self.name}: a batch of shape {tuple(x.shape)} after batches of shape "
                                f"{self._stats.shape}; batches must agree on every axis but N")
        self._stats = part if self._stats is None else self._stats.merge(part)
        self.batches += 1
        return self

    __call__ = update

    @property
    def stats(self):
        """The statistics so far, a ``bnstat.stats.Stats``. Raises DataError before any update."""
        if self._stats is None:
            raise DataError(f"{self.name}: no batch added yet", "Call update(batch) first.")
        return self._stats

    def merge(self, other: Accumulator) -> Accumulator:
        """A new accumulator holding both (e.g. from two workers), exact."""
        out = Accumulator(ddof=self.ddof, higher=self.higher, nan=self.nan, name=self.name,
                          engine=self.engine, threads=self.threads, **self.options)
        out._plan = self._plan or other._plan
        out._stats = (other._stats if self._stats is None else
                      self._stats if other._stats is None else self._stats.merge(other._stats))
        out.batches = self.batches + other.batches
        return out

    def save(self, path, *, force=False) -> None:
        """Write the statistics as a stats file (``bnstat show`` / ``merge`` read it), atomically."""
        from bnstat import save_stats

        save_stats({self.name: self.stats}, os.fspath(path), force=force)

    def __repr__(self) -> str:
        shape = None if self._stats is None else self._stats.unit_shape
        return f"Accumulator(name={self.name!r}, batches={self.batches}, unit_shape={shape})"
