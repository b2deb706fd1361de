"""The running statistics a BN layer would hold after training on the data.

Per framework (README.md, "Training and inference statistics"):

| framework | update per batch | variance fed in | momentum |
|---|---|---|---|
| pytorch | r = (1 - m) r + m s | unbiased m2/(n-1) | 0.1 (None: cumulative, 1/k) |
| keras | r = m r + (1 - m) s | biased m2/n | 0.99 |
| tf-fused | r = m r + (1 - m) s | unbiased | 0.99 |
| mxnet | r = m r + (1 - m) s | biased | 0.9 |

n is the number of values per channel in the batch. The statistics of each
batch come from one streamed pass (``bnstat.batches``); later epochs replay
the update over the kept per-batch moments.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from bnstat.batches import BatchMoments, batch_moments, batch_plan
from bnstat.errors import DataError, UsageProblem
from bnstat.io.base import ArraySource
from bnstat.stats import Stats


@dataclass(frozen=True)
class Convention:
    name: str
    momentum: float  # the default
    eps: float
    unbiased: bool
    new_weight: bool  # True: momentum is the weight of the new batch (PyTorch)


FRAMEWORKS = {
    "pytorch": Convention("pytorch", 0.1, 1e-5, True, True),
    "keras": Convention("keras", 0.99, 1e-3, False, False),
    "tf-fused": Convention("tf-fused", 0.99, 1e-3, True, False),
    "mxnet": Convention("mxnet", 0.9, 1e-5, False, False),
}


@dataclass
class RunningResult:
    """Running statistics of one array beside its population statistics."""

    name: str
    framework: str
    momentum: float | None  # None: cumulative (PyTorch momentum=None)
    batch_size: int
    batches: int  # per epoch
    epochs: int
    drop_last: bool
    running_mean: np.ndarray
    running_var: np.ndarray
    stats: Stats  # population statistics (biased variance)
    num_batches_tracked: int
    initial: str = "mean 0, var 1"
    extra: dict = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        return self.stats.mean

    @property
    def var(self) -> np.ndarray:
        return self.stats.var_with(0)

    @property
    def mean_gap(self) -> np.ndarray:
        """(running mean - population mean) / population std."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.running_mean - self.mean) / np.sqrt(self.var)

    @property
    def var_ratio(self) -> np.ndarray:
        """running var / population var (biased)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.running_var / self.var


def batch_variance(bm: BatchMoments, unbiased: bool, where: str, framework: str) -> np.ndarray:
    """Per-batch variances (batches, C) as the framework feeds them in. Raises DataError
    for an unbiased variance of a single value (PyTorch: "Expected more than 1 value per
    channel when training")."""
    m = bm.moments
    dof = m.count - (1 if unbiased else 0)
    bad = np.flatnonzero((dof <= 0).any(axis=1))
    if bad.size:
        b = int(bad[0])
        raise DataError(f"{where}: batch {b} has {int(m.count[b].min())} value(s) per channel; "
                        f"{framework} needs more than 1 for its unbiased running variance",
                        "Use --drop-last to skip a short last batch, or a larger --batch-size.")
    return m.m2 / dof


def replay(means: np.ndarray, variances: np.ndarray, *, momentum: float | None, new_weight: bool,
           epochs: int, mean0: np.ndarray, var0: np.ndarray, tracked0: int = 0):
    """The running (mean, var, batches tracked) after ``epochs`` passes over the batches.

    ``momentum`` None: the cumulative average r_k = r_{k-1} + (s - r_{k-1}) / k, k counted
    from ``tracked0`` (PyTorch's num_batches_tracked).
    """
    rm = np.array(mean0, np.float64)
    rv = np.array(var0, np.float64)
    k = tracked0
    for _ in range(epochs):
        for i in range(means.shape[0]):
            k += 1
            f = 1.0 / k if momentum is None else (momentum if new_weight else 1.0 - momentum)
            rm = (1.0 - f) * rm + f * means[i]
            rv = (1.0 - f) * rv + f * variances[i]
    return rm, rv, k


def initial_values(from_model, bn, channels: int, where: str):
    """(mean0, var0, tracked0, description) from a model's BN, else mean 0, var 1."""
    if from_model is None:
        return np.zeros(channels), np.ones(channels), 0, "mean 0, var 1"
    from bnstat.bn_models import find_bns, find_layer
    from bnstat.io.models import read_model

    path = os.fspath(from_model)
    model = read_model(path)
    layers = find_bns(model.arrays, path)
    layer = find_layer(layers, bn, path)
    mean0, var0 = layer.values(model.arrays)
    if mean0.size != channels:
        raise DataError(f"{path}: BatchNorm {layer.name} has {mean0.size} channels, {where} has {channels}")
    return mean0, var0, layer.tracked(model.arrays) or 0, f"{path}:{layer.name}"


def check_options(framework: str, momentum, cumulative: bool, epochs: int, batch_size) -> Convention:
    """The framework's convention; raises UsageProblem for options that do not go together."""
    if framework not in FRAMEWORKS:
        raise UsageProblem(f"--framework/framework= {framework!r}: one of {', '.join(FRAMEWORKS)}")
    conv = FRAMEWORKS[framework]
    if cumulative and framework != "pytorch":
        raise UsageProblem("--cumulative/cumulative= is PyTorch's momentum=None; use it with "
                           "--framework pytorch")
    if cumulative and momentum is not None:
        raise UsageProblem("give --momentum/momentum= or --cumulative/cumulative=, not both")
    if momentum is not None and not 0.0 <= float(momentum) <= 1.0:
        raise UsageProblem(f"--momentum/momentum= {momentum}: must be between 0 and 1")
    if batch_size is None or int(batch_size) < 1:
        raise UsageProblem(f"--batch-size/batch_size= {batch_size}: must be a positive integer")
    if int(epochs) < 1:
        raise UsageProblem(f"--epochs/epochs= {epochs}: must be at least 1")
    return conv


def collect_batches(source, batch_size: int, *, drop_last=False, layout=None, channel_axis=None,
                    dataset=None, chunk_size=None, threads=None, engine=None, progress=None,
                    check_crc=True, scheduler=None, name=None):
    """[(name, plan, group sources, BatchMoments of all batches, batches used)] per array.

    ``scheduler``: a Dask address (``--scheduler``): the batches are computed there
    (``bnstat.dask_batches``; ``threads`` is then the kernel threads per task).

    Raises UsageProblem when B exceeds the samples (N) of an array.
    """
    from bnstat.io import zlibx
    from bnstat.io import open_any
    from bnstat.layout import array_layout
    from bnstat.stream import (DEFAULT_CHUNK_SIZE, check_group_shapes, group_sources, pick_engine,
                               start_threads)

    if isinstance(source, list | tuple) and source and all(isinstance(s, ArraySource) for s in source):
        sources = list(source)  # opened already (the command, for its progress bar)
    else:
        sources = open_any(source, dataset, check_crc=check_crc, name=name)
    groups = group_sources(sources)
    plans = []
    for g in groups:
        ps = [batch_plan(s.shape, layout=array_layout(s, layout, channel_axis), channel_axis=channel_axis,
                         name=s.where) for s in g.sources]
        check_group_shapes(g, ps)
        n = sum(s.shape[0] for s in g.sources)
        if batch_size > n:
            raise UsageProblem(f"{g.name}: --batch-size/batch_size= {batch_size} is larger than the "
                               f"{n} samples along N", "Give a smaller --batch-size.")
        plans.append(ps[0])
    assumed = [g.name for g, p in zip(groups, plans) if p.assumed]
    if assumed:
        from bnstat.errors import warn

        warn(f"no --layout given: assuming the PyTorch layout (channel axis 1) for {', '.join(assumed)}")
    engine = pick_engine(sum(s.nbytes for s in sources), engine, switch=scheduler is None)
    if scheduler is None:
        zlibx.set_threads(threads)
        n_threads = start_threads(threads, engine)
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    if scheduler is not None:
        from bnstat.dask_batches import batch_moments_distributed

        bms = batch_moments_distributed(scheduler, groups, plans, batch_size, chunk_size=chunk_size,
                                        threads=threads, engine=engine, progress=progress,
                                        check_crc=check_crc)
    else:
        bms = [batch_moments(g.sources, plan, batch_size, chunk_size=chunk_size, threads=n_threads,
                             engine=engine, progress=progress) for g, plan in zip(groups, plans)]
    out = []
    for g, plan, bm in zip(groups, plans, bms):
        nan = np.flatnonzero(bm.moments.nan_count.sum(axis=1))
        if nan.size:
            raise DataError(f"{g.name}: NaN values in batch {int(nan[0])}; the framework's running "
                            "statistics would be NaN", "Remove the NaNs from the data first.")
        used = bm.batches - 1 if drop_last and bm.sizes[-1] < batch_size else bm.batches
        out.append((g.name, plan, g.sources, bm, used))
    return out


def population_stats(name: str, plan, sources, bm: BatchMoments) -> Stats:
    """The exact population statistics (all the data) as a Stats of unit shape (C,)."""
    first = sources[0]
    shape = list(first.shape)
    shape[0] = sum(s.shape[0] for s in sources)
    return Stats(name=name, moments=bm.population(), shape=tuple(shape),
                 dtype=np.dtype(first.dtype).name, layout=plan.letters, reduce=plan.reduce_letters,
                 unit_axes=plan.unit_axes, ddof=0, sources=list(dict.fromkeys(s.path for s in sources)),
                 assumed_layout=plan.assumed)


def running(source, *, batch_size, framework="pytorch", momentum=None, cumulative=False, epochs=1,
            drop_last=False, from_model=None, bn=None, layout=None, channel_axis=None, dataset=None,
            chunk_size=None, threads=None, engine=None, progress=None,
            check_crc=True, scheduler=None, name=None) -> dict[str, RunningResult]:
    """Running mean/var of a BN trained on ``source`` in batches of ``batch_size`` along N.

    ``source``: a path, a list of paths (one data set, batches spanning files), a numpy
    array or a dict of arrays. ``momentum`` None: the framework's default (or, with
    ``cumulative=True``, PyTorch's momentum=None). ``from_model`` + ``bn``: start from that
    BN's running statistics (and num_batches_tracked). ``name``: the array of each input is
    called ``name`` (shards of one array, ``--name``). ``scheduler``: run the pass on a Dask
    cluster (``tcp://HOST:PORT``, ``local``, ``local:N``). Returns ``{name: RunningResult}``.
    Raises UsageProblem (options, B > N, layout) and DataError (NaN, a batch of one value
    under an unbiased convention, a BN of another channel count).
    """
    conv = check_options(framework, momentum, cumulative, epochs, batch_size)
    if (from_model is None) != (bn is None):
        raise UsageProblem("--from-model/from_model= and --bn/bn= go together")
    m = None if cumulative else (conv.momentum if momentum is None else float(momentum))
    results = {}
    for name, plan, srcs, bm, used in collect_batches(
            source, int(batch_size), drop_last=drop_last, layout=layout, channel_axis=channel_axis,
            dataset=dataset, chunk_size=chunk_size, threads=threads, engine=engine,
            progress=progress, check_crc=check_crc, scheduler=scheduler, name=name):
        stats = population_stats(name, plan, srcs, bm)
        seen = bm.take(used)
        variances = batch_variance(seen, conv.unbiased, name, framework)
        c = stats.unit_shape[0]
        mean0, var0, tracked0, initial = initial_values(from_model, bn, c, name)
        rm, rv, k = replay(seen.moments.mean, variances, momentum=m, new_weight=conv.new_weight,
                           epochs=int(epochs), mean0=mean0, var0=var0, tracked0=tracked0)
        results[name] = RunningResult(name, framework, m, int(batch_size), used, int(epochs),
                                      bool(drop_last), rm, rv, stats, k, initial)
    return results
