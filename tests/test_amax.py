"""--amax against a float64 transcription of pytorch-quantization's HistogramCalibrator.

The reference below is written from the published algorithm (pytorch_quantization/calib/
histogram.py: _compute_amax_entropy, _compute_amax_mse, _compute_amax_percentile, and
tensor_quant's fake quantization with narrow range), in numpy float64, on the |x| histogram
``np.histogram(abs(x), bins=2048, range=(0, max|x|))`` that its calibrate_weights builds.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

import bnstat

pytest.importorskip("scipy", reason="the reference uses scipy.stats.entropy, as pytorch-quantization does")
from scipy.stats import entropy  # noqa: E402


def ref_entropy(calib_hist, edges, num_bits=8, unsigned=False, stride=1, start_bin=128):
    bins = calib_hist.copy()
    bins[0] = bins[1]
    total_data = np.sum(bins)
    divergences = []
    nbins = 1 << (num_bits - 1 + int(unsigned))
    new_density_counts = np.zeros(nbins, dtype=np.float64)
    for i in range(start_bin, len(bins) + 1, stride):
        new_density_counts.fill(0)
        space = np.linspace(0, i, num=nbins + 1)
        digitized_space = np.digitize(range(i), space) - 1
        digitized_space[bins[:i] == 0] = -1
        keep = digitized_space != -1
        # the original's loops, vectorized: sums of integer counts are exact in any order
        new_density_counts += np.bincount(digitized_space[keep], weights=bins[:i][keep], minlength=nbins)
        for key, val in Counter(digitized_space[keep].tolist()).items():
            new_density_counts[key] = new_density_counts[key] / val
        new_density = np.zeros(i, dtype=np.float64)
        new_density[keep] = new_density_counts[digitized_space[keep]]
        reference_density = np.array(bins[:len(digitized_space)])
        reference_density[-1] += np.sum(bins[i:])
        assert round(np.sum(new_density) + np.sum(bins[i:])) == total_data
        divergences.append(entropy(reference_density, new_density))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return edges[last_argmin * stride + start_bin]


def fake_quant(x, amax, num_bits=8, unsigned=False):
    max_bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    min_bound = 0 if unsigned else -max_bound
    scale = max_bound / amax
    tiny = amax <= 1.0 / (1 << 24)
    out = np.clip(np.round(x * (0.0 if tiny else scale)), min_bound, max_bound)
    return out / (1.0 if tiny else scale)


def ref_mse(calib_hist, edges, num_bits=8, unsigned=False, stride=1, start_bin=128):
    counts = calib_hist.astype(np.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    mses, arguments = [], []
    for i in range(start_bin, len(centers), stride):
        quant = fake_quant(centers, centers[i], num_bits, unsigned)
        mses.append(((quant - centers) ** 2 * counts).mean())
        arguments.append(i)
    return centers[arguments[int(np.argmin(mses))]]


def ref_percentile(calib_hist, edges, percentile):
    cdf = np.cumsum(calib_hist / calib_hist.sum())
    return edges[np.searchsorted(cdf, percentile / 100)]


_CACHE: dict = {}


def reference(values, method, num_bits=8, unsigned=False):
    key = (values.tobytes(), method, num_bits, unsigned)
    if key not in _CACHE:
        _CACHE[key] = _reference(values, method, num_bits, unsigned)
    return _CACHE[key]


def _reference(values, method, num_bits=8, unsigned=False):
    a = np.abs(values.astype(np.float64))
    hist, edges = np.histogram(a, bins=2048, range=(0, a.max()))
    if method == "max":
        return a.max()
    if method == "mse":
        return ref_mse(hist, edges, num_bits, unsigned)
    if method == "entropy":
        return ref_entropy(hist, edges, num_bits, unsigned)
    return ref_percentile(hist, edges, float(method.split(":")[1]))


METHODS = ["max", "percentile:99.9", "percentile:100", "mse", "entropy"]


@pytest.fixture(scope="module")
def acts():
    r = np.random.default_rng(7)
    x = r.standard_normal((64, 3, 16, 16)).astype(np.float32)
    x[:, 1] = np.maximum(x[:, 1], 0) * 3      # ReLU-like, non-negative
    x[:, 2] = r.laplace(size=x[:, 2].shape)   # heavy tails
    return x


def test_per_unit(acts):
    h = bnstat.hist(acts, layout="NCHW", range="abs", amax=METHODS)["array"]
    for c in range(3):
        v = acts[:, c]
        a = np.abs(v.astype(np.float64))
        ref_hist, ref_edges = np.histogram(a, bins=2048, range=(0, a.max()))
        np.testing.assert_array_equal(h.counts[c], ref_hist)
        np.testing.assert_array_equal(h.edges[c], ref_edges)
        for m in METHODS:
            assert h.amax(m)[c] == reference(np.ascontiguousarray(v), m), (c, m)


@pytest.mark.slow
def test_per_tensor_and_num_bits(acts):
    x = acts[:, 1:2]  # non-negative: unsigned quantization
    for bits, unsigned in ((8, True), (4, False)):
        h = bnstat.hist(x, layout="NCHW", range="abs", amax=["mse", "entropy"], per_tensor=True,
                        num_bits=bits, unsigned=unsigned)["array"]
        for m in ("mse", "entropy"):
            assert h.amax(m)[0] == reference(x.ravel(), m, bits, unsigned), (m, bits)
    h = bnstat.hist(acts, layout="NCHW", range="abs", amax=["entropy", "percentile:99.99"],
                    per_tensor=True)["array"]
    for m in ("entropy", "percentile:99.99"):
        assert h.amax(m)[0] == reference(acts.ravel(), m)


@pytest.mark.slow
def test_cli_json_and_stats_file(cli, tmp_path, acts):
    np.save(tmp_path / "a.npy", acts)
    code, out, err = cli("hist", tmp_path / "a.npy", "--layout", "NCHW", "--amax", "entropy",
                         "--amax", "percentile:99.9", "--format", "json")
    assert code == 0, err
    rec = json.loads(out)["arrays"][0]
    assert rec["range"] == "abs" and rec["num_bits"] == 8 and rec["unsigned"] is False
    for c in range(3):
        v = np.ascontiguousarray(acts[:, c])
        assert rec["amax"]["entropy"][c] == reference(v, "entropy")
        assert rec["amax"]["percentile:99.9"][c] == reference(v, "percentile:99.9")
    code, _, err = cli("hist", tmp_path / "a.npy", "--layout", "NCHW", "--amax", "mse", "-o", tmp_path / "c.npz")
    assert code == 0, err
    with np.load(tmp_path / "c.npz") as z:
        np.testing.assert_array_equal(z["a/amax"][:, 0],
                                      [reference(np.ascontiguousarray(acts[:, c]), "mse") for c in range(3)])
