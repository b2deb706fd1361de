"""Calibration ranges (amax) from exact |x| histograms, as pytorch-quantization computes them.

NVIDIA's pytorch-quantization ``HistogramCalibrator.compute_amax`` on the
histogram of |x| with edges ``linspace(0, max|x|, bins + 1)`` (its
``calibrate_weights`` per channel; ``collect`` per tensor on the first batch):

- ``max``: max |x| (MaxCalibrator), here of the finite values;
- ``percentile:P``: ``edges[searchsorted(cumsum(counts / total), P / 100)]``;
- ``mse``: the center c_i (i from start_bin 128) minimising the mean over bins of
  (fake_quant(c, c_i) - c)^2 * counts, fake_quant with num_bits, narrow range;
- ``entropy``: the edge e_i (i from 128) minimising the KL divergence between the
  histogram clipped at i and its quantization into 2^(num_bits-1+unsigned) levels,
  the last of equal minima; bin 0 is given bin 1's count, as the original does.

Computed in float64 with numpy's pairwise sums (README "Calibration ranges").
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from bnstat.errors import UsageProblem

METHODS = ("max", "percentile", "mse", "entropy")
START_BIN = 128
STRIDE = 1


def check_method(method: str) -> str:
    """Normalise ``max|percentile:P|mse|entropy``. Raises UsageProblem."""
    text = str(method).strip().lower()
    name, _, arg = text.partition(":")
    if name not in METHODS or (name == "percentile") != bool(arg):
        raise UsageProblem(f"--amax/amax={method!r}: give max, percentile:P (e.g. percentile:99.99), "
                           "mse or entropy")
    if name == "percentile":
        try:
            p = float(arg)
        except ValueError:
            p = float("nan")
        if not 0.0 <= p <= 100.0:
            raise UsageProblem(f"--amax/amax={method!r}: the percentile must be between 0 and 100")
        return f"percentile:{arg}"
    return name


@lru_cache(maxsize=4)
def _digits(n: int, nbins: int, start: int, stride: int):
    """np.digitize(range(i), linspace(0, i, nbins + 1)) - 1 for every candidate i, concatenated."""
    parts, offs, off = [], [], 0
    for i in range(start, n + 1, stride):
        space = np.linspace(0, i, num=nbins + 1)
        parts.append(np.digitize(range(i), space) - 1)
        offs.append(off)
        off += i
    return np.concatenate(parts).astype(np.int64), np.array(offs, np.int64)


def compute_amax(hist, method: str) -> np.ndarray:
    """amax of every unit of an |x| histogram (``bnstat.histogram.Histogram``), shape unit_shape.

    Raises UsageProblem when there are too few bins for mse/entropy (start_bin 128).
    """
    from bnstat.kernels import calibration

    method = check_method(method)
    shape = hist.unit_shape
    counts = hist.counts.reshape(-1, hist.bins)
    edges = hist.edges.reshape(-1, hist.bins + 1)
    total = counts.sum(axis=1)
    out = np.full(counts.shape[0], np.nan)
    if method == "max":
        out = np.where(total > 0, edges[:, -1], np.nan)
        dead = (total > 0) & (hist.zero_count.reshape(-1) == total)
        return np.where(dead, 0.0, out).reshape(shape)
    if method.startswith("percentile"):
        p = float(method.partition(":")[2])
        for u in np.flatnonzero(total > 0):
            cdf = np.cumsum(counts[u] / total[u])
            out[u] = edges[u, min(int(np.searchsorted(cdf, p / 100)), hist.bins)]
        return out.reshape(shape)
    n = hist.bins
    if n <= START_BIN:
        raise UsageProblem(f"--amax/amax={method}: needs more than {START_BIN} bins (start_bin), "
                           f"got --bins {n}", "Use the default --bins 2048.")
    unsigned = bool(hist.unsigned)
    live = np.flatnonzero(total > 0)
    if method == "entropy":
        nbins = 1 << (hist.num_bits - 1 + int(unsigned))
        digit, off = _digits(n, nbins, START_BIN, STRIDE)
        div = np.zeros((live.size, off.size))
        calibration.entropy_all(np.ascontiguousarray(counts[live]), START_BIN, STRIDE, nbins, digit, off, div)
        last = div.shape[1] - 1 - np.argmin(div[:, ::-1], axis=1)  # the last of equal minima
        out[live] = edges[live, last * STRIDE + START_BIN]
        return out.reshape(shape)
    max_bound = 2.0 ** (hist.num_bits - 1 + int(unsigned)) - 1.0
    min_bound = 0.0 if unsigned else -max_bound
    centers = (edges[:, 1:] + edges[:, :-1]) / 2
    k = len(range(START_BIN, n, STRIDE))
    err = np.zeros((live.size, k))
    calibration.mse_all(np.ascontiguousarray(counts[live]).astype(np.float64),
                         np.ascontiguousarray(centers[live]), START_BIN, STRIDE, max_bound, min_bound, err)
    best = np.argmin(err, axis=1)
    out[live] = centers[live, START_BIN + best * STRIDE]
    return out.reshape(shape)
