"""Precise BN: a model's BN running statistics replaced by the data's.

Each BN whose input activations are given gets the exact, count-weighted
population statistics of those activations, in the model's convention
(PyTorch ``running_var`` = m2/(count-1), Keras ``moving_variance`` =
m2/count); ``estimator="batch-mean"`` gives what
``torch.optim.swa_utils.update_bn`` computes instead (the equal-weight mean
of per-batch means and per-batch variances). Every other array, and
``num_batches_tracked``, is written back unchanged, in the model's format,
atomically (README.md, "bnstat recalibrate").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from bnstat.bn_models import BNLayer, find_bns, match_names, parse_maps, resolve_bn
from bnstat.errors import DataError, UsageProblem, warn

ESTIMATORS = ("population", "batch-mean")


@dataclass
class BNChange:
    """What recalibration did to one BN (``source`` None: no activations, kept)."""

    layer: BNLayer
    source: str | None
    old_mean: np.ndarray
    old_var: np.ndarray
    new_mean: np.ndarray | None = None
    new_var: np.ndarray | None = None
    count: int | None = None  # values per channel
    batches: int | None = None

    @property
    def mean_shift(self) -> np.ndarray:
        """(new mean - old mean) / old std, per channel."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.new_mean - self.old_mean) / np.sqrt(self.old_var)

    @property
    def var_ratio(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.new_var / self.old_var


@dataclass
class RecalResult:
    model: str
    output: str | None
    estimator: str
    changes: list[BNChange]
    arrays: dict = field(repr=False, default_factory=dict)
    format: str | None = None

    @property
    def changed(self) -> list[BNChange]:
        return [c for c in self.changes if c.source is not None]

    @property
    def kept(self) -> list[BNChange]:
        return [c for c in self.changes if c.source is None]


def _per_channel(stats, where: str):
    """Check that saved or computed statistics are per channel (BatchNorm). Raises DataError."""
    if list(stats.unit_axes) != ["C"]:
        raise DataError(f"{where}: {stats.name}: statistics of layout {stats.layout} reducing "
                        f"{stats.reduce} (unit shape {tuple(stats.unit_shape)}); a BatchNorm needs "
                        "per-channel statistics", "Compute them with: bnstat moments --norm batch")
    return stats


def _population(stats, ddof: int, where: str):
    m = stats.moments
    if np.any(m.count <= ddof):
        c = int(np.flatnonzero(m.count <= ddof)[0])
        raise DataError(f"{where}: {stats.name}: channel {c} has {int(m.count[c])} value(s); "
                        f"the running variance needs more than {ddof}")
    if int(m.nan_count.sum()):
        warn(f"{where}: {stats.name}: {int(m.nan_count.sum())} NaN value(s) left out of the statistics")
    return m.mean.copy(), m.m2 / (m.count - ddof), int(m.count.min())


def _estimates(stats_file, source, estimator, batch_size, drop_last, kw):
    """{array name: callable(ddof) -> (mean, var, count, batches)} and the inputs read."""
    if estimator == "batch-mean":
        from bnstat.running_stats import batch_variance, collect_batches

        out = {}
        for name, _plan, _srcs, bm, used in collect_batches(source, batch_size, drop_last=drop_last, **kw):
            seen = bm.take(used)

            def est(ddof, seen=seen, name=name):
                var = batch_variance(seen, ddof == 1, name, "the model's convention")
                return seen.moments.mean.mean(axis=0), var.mean(axis=0), int(seen.moments.count.sum(0).min()), seen.batches
            out[name] = (est, int(bm.moments.count.shape[1]))
        return out
    if stats_file is not None:
        from bnstat.stats import load_stats

        loaded = load_stats(os.fspath(stats_file)) if not isinstance(stats_file, dict) else stats_file
        where = os.fspath(stats_file) if not isinstance(stats_file, dict) else "stats="
    else:
        from bnstat import moments

        loaded = moments(source, norm="batch", **kw)
        where = "activations"
    out = {}
    for name, st in loaded.items():
        _per_channel(st, where)
        out[name] = ((lambda ddof, st=st: (*_population(st, ddof, where), None)), st.unit_shape[0])
    return out


def recalibrate(model, source=None, *, stats=None, output=None, map=(), map_file=None,
                estimator="population", batch_size=None, drop_last=False, layout=None,
                channel_axis=None, dataset=None, chunk_size=None, threads=None, engine=None,
                force=False, check_crc=True, progress=None) -> RecalResult:
    """Set the BN running statistics of ``model`` from activations and write ``output``.

    ``source``: activation file(s) or arrays (their statistics computed as ``moments``
    would); or ``stats``: a stats file (``bnstat moments -o``, ``bnstat merge``). ``map``:
    ``ACT=BN`` strings; ``map_file``: a JSON object or ACT=BN lines. ``output`` None: nothing
    written (the result holds the arrays). Raises UsageProblem and DataError (no BN, an
    activation that maps to no BN, a channel-count mismatch, per-sample statistics).
    """
    from bnstat.io.atomic import check_output
    from bnstat.io.models import read_model, write_model

    if (source is None) == (stats is None):
        raise UsageProblem("give activations or --stats/stats=, one of the two")
    if estimator not in ESTIMATORS:
        raise UsageProblem(f"--estimator/estimator= {estimator!r}: one of {', '.join(ESTIMATORS)}")
    if estimator == "batch-mean" and (batch_size is None or stats is not None):
        raise UsageProblem("--estimator/estimator= batch-mean needs activations and --batch-size/batch_size=")
    if estimator == "population" and batch_size is not None:
        raise UsageProblem("--batch-size/batch_size= goes with --estimator/estimator= batch-mean")
    path = os.fspath(model)
    inputs = [path] + ([os.fspath(stats)] if isinstance(stats, str | os.PathLike) else [])
    if isinstance(source, str | os.PathLike):
        inputs.append(os.fspath(source))
    elif isinstance(source, list | tuple):
        inputs += [os.fspath(s) for s in source if isinstance(s, str | os.PathLike)]
    if output is not None:
        check_output(os.fspath(output), force=force, inputs=inputs)
    mf = read_model(path)
    layers = find_bns(mf.arrays, path)
    explicit = {act: resolve_bn(act, bn, list(layers), path)  # before reading any data
                for act, bn in parse_maps(map, map_file).items()}
    kw = dict(layout=layout, channel_axis=channel_axis, dataset=dataset, chunk_size=chunk_size,
              threads=threads, engine=engine, check_crc=check_crc, progress=progress)
    estimates = _estimates(stats, source, estimator, batch_size, drop_last, kw)
    mapping = match_names(list(estimates), list(layers), explicit, path)
    lost = [a for a in estimates if a not in mapping]
    if lost:
        raise DataError(f"{path}: no BatchNorm layer for {', '.join(lost)} (the layers: {', '.join(layers)})",
                        "Name them like the layer (features.1, features.1:input) or use --map ACT=BN.")
    by_bn = {bn: act for act, bn in mapping.items()}
    arrays = dict(mf.arrays)
    changes = []
    for name, layer in layers.items():
        old_mean, old_var = layer.values(mf.arrays)
        act = by_bn.get(name)
        change = BNChange(layer, act, old_mean, old_var)
        if act is not None:
            est, channels = estimates[act]
            if channels != old_mean.size:
                raise DataError(f"{path}: BatchNorm {name} has {old_mean.size} channels, {act} has {channels}",
                                "Map each activation to the BN it feeds (--map ACT=BN).")
            mean, var, count, batches = est(1 if layer.convention == "pytorch" else 0)
            for key, value in ((layer.mean_key, mean), (layer.var_key, var)):
                old = np.asarray(mf.arrays[key])
                arrays[key] = mf.round_stored(key, np.asarray(value, old.dtype).reshape(old.shape))
            change.new_mean, change.new_var, change.count, change.batches = mean, var, count, batches
        changes.append(change)
    fmt = None
    if output is not None:
        fmt = write_model(os.fspath(output), arrays, template=mf, force=force, inputs=inputs)
    return RecalResult(path, None if output is None else os.fspath(output), estimator, changes,
                       arrays, fmt)
