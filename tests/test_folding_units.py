"""bnstat.folding's pieces one by one: the pure math, the BN vocabulary.

References: torch.nn.utils.fusion (where torch is installed) and the BN
formula in inference mode written out in numpy float64.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnstat.errors import DataError


def _bn(rng, c):
    return (rng.standard_normal(c), rng.random(c) + 0.1, rng.standard_normal(c),
            rng.standard_normal(c))


def test_fold_weights_equals_layer_then_bn_for_a_linear_layer(rng):
    from bnstat.folding.math import fold_weights

    w, b = rng.standard_normal((5, 3)), rng.standard_normal(5)
    mean, var, gamma, beta = _bn(rng, 5)
    x = rng.standard_normal((7, 3))
    ref = (x @ w.T + b - mean) / np.sqrt(var + 1e-3) * gamma + beta
    w2, b2 = fold_weights(w, b, mean, var, 1e-3, gamma, beta)
    np.testing.assert_allclose(x @ w2.T + b2, ref, rtol=1e-12, atol=1e-12)
    # Keras Dense (in, out): output channels on the last axis; no bias, no affine
    w2, b2 = fold_weights(w.T, None, mean, var, 1e-3, axis=-1)
    np.testing.assert_allclose(x @ w2 + b2, (x @ w.T - mean) / np.sqrt(var + 1e-3), rtol=1e-12)


def test_fold_weights_with_an_index_and_its_refusals(rng):
    from bnstat.folding.math import fold_weights

    mean, var, gamma, beta = _bn(rng, 6)
    w = rng.standard_normal((3, 3, 2, 3))  # Keras depthwise (kh, kw, C=2, M=3): channel c*3+m
    idx = np.arange(2)[:, None] * 3 + np.arange(3)[None, :]
    w2, _ = fold_weights(w, None, mean, var, 1e-5, gamma, beta, index=idx)
    s = gamma / np.sqrt(var + 1e-5)
    for c in range(2):
        for m in range(3):
            np.testing.assert_allclose(w2[..., c, m], w[..., c, m] * s[c * 3 + m], rtol=1e-14)
    with pytest.raises(ValueError, match="5 output channels on axis 0, the BN 6"):
        fold_weights(rng.standard_normal((5, 2)), None, mean, var, 1e-5)
    with pytest.raises(ValueError, match="the bias has 4 values, the BN 6"):
        fold_weights(rng.standard_normal((6, 2)), np.zeros(4), mean, var, 1e-5)


def test_fold_weights_matches_torch_fusion(rng):
    torch = pytest.importorskip("torch", reason="torch is the reference for the fusion formula")
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    from bnstat.folding.math import fold_weights

    w, b = rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6)
    mean, var, gamma, beta = _bn(rng, 6)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    tw, tb = fuse_conv_bn_weights(t(w), t(b), t(mean), t(var), 1e-5, t(gamma), t(beta))
    w2, b2 = fold_weights(w, b, mean, var, 1e-5, gamma, beta)
    np.testing.assert_allclose(w2, tw.detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(b2, tb.detach().numpy(), rtol=1e-13, atol=1e-14)


def test_bn_layers_and_bn_params_in_both_namings(rng):
    from bnstat.folding.layers import bn_layers, bn_params

    arrays = {"features.1.weight": np.full(3, 2.0), "features.1.bias": np.ones(3),
              "features.1.running_mean": np.arange(3.0), "features.1.running_var": np.full(3, 4.0),
              "features.0.weight": np.ones((3, 2)),
              "model_weights/bn/bn/moving_mean:0": np.zeros(2),
              "model_weights/bn/bn/moving_variance:0": np.ones(2),
              "model_weights/bn/bn/beta:0": np.ones(2),
              "half.running_mean": np.zeros(2)}  # no variance: not a BN
    assert bn_layers(arrays) == {
        "features.1": {"running_mean": "features.1.running_mean",
                       "running_var": "features.1.running_var", "weight": "features.1.weight",
                       "bias": "features.1.bias"},
        "model_weights/bn/bn": {"moving_mean": "model_weights/bn/bn/moving_mean:0",
                                "moving_variance": "model_weights/bn/bn/moving_variance:0",
                                "beta": "model_weights/bn/bn/beta:0"}}
    p = bn_params(arrays, "features.1")
    assert (p.convention, p.eps, p.layer) == ("pytorch", 1e-5, "features.1")
    np.testing.assert_array_equal(p.mean, [0, 1, 2])
    np.testing.assert_array_equal(p.gamma, [2, 2, 2])
    k = bn_params(arrays, "bn/bn", eps=0.5)  # a trailing part of the path
    assert (k.convention, k.eps, k.gamma) == ("keras", 0.5, None)
    np.testing.assert_array_equal(k.beta, [1, 1])
    assert bn_params(arrays, "bn").eps == 1e-3


def test_bn_params_refusals():
    from bnstat.folding.layers import bn_params

    arrays = {"a.bn.running_mean": np.zeros(2), "a.bn.running_var": np.array([1.0, -1.0]),
              "b.running_mean": np.array([np.nan, 0]), "b.running_var": np.ones(2)}
    with pytest.raises(DataError, match=r"m.npz: unknown BatchNorm layer 'zz'; the file has: a.bn, b"):
        bn_params(arrays, "zz", where="m.npz")
    with pytest.raises(DataError, match="BatchNorm a.bn: running variance is negative or NaN"):
        bn_params(arrays, "a.bn")
    with pytest.raises(DataError, match="BatchNorm b: running mean has NaN values"):
        bn_params(arrays, "b")
    with pytest.raises(DataError, match="no BatchNorm layer found"):
        bn_params({"x.weight": np.ones(2)}, "x")
