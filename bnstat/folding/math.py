"""The folding arithmetic, pure float64 math on arrays (like ``torch.nn.utils.fusion``).

With s = gamma / sqrt(var + eps)::

    W' = W * s   along W's output channels
    b' = (b - mean) * s + beta      (b = 0 where the layer had no bias)

No file knowledge, no names, no casting back: the caller casts the results
to the weight's dtype (bnstat.folding.apply does, warning about overflow).
"""

from __future__ import annotations

import numpy as np

__all__ = ["fold_weights", "bn_scale_shift"]


def bn_scale_shift(mean, var, eps: float, gamma=None, beta=None) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of a BatchNorm in inference mode, y = x * s + t, in float64.

    ``gamma``/``beta`` None mean 1 and 0 (``affine=False``).
    """
    mean = np.asarray(mean, np.float64).ravel()
    var = np.asarray(var, np.float64).ravel()
    gamma = np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64).ravel()
    beta = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64).ravel()
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def fold_weights(weight, bias, mean, var, eps: float, gamma=None, beta=None, *, axis: int = 0,
                 index=None) -> tuple[np.ndarray, np.ndarray]:
    """The weight and bias of a layer followed by a BatchNorm, folded into one layer (float64).

    ``weight``: any layout; its output channels are along ``axis`` (0 for a
    PyTorch/ONNX Conv or Linear, -1 for a Keras kernel), or, for layouts
    where an output channel is spread over two axes (a grouped ConvTranspose
    (in, out/groups, k...), a Keras depthwise kernel (k..., C, M) with output
    channel c*M+m), ``index``: an integer array broadcastable to
    ``weight.shape`` giving each element's output channel. ``bias``: the
    layer's bias (C values) or None. ``mean``, ``var``, ``gamma``, ``beta``,
    ``eps``: the BN's (gamma/beta None: 1 and 0).

    Returns ``(weight', bias')`` as float64 arrays: ``weight'`` of the weight's
    shape, ``bias'`` of C values. Raises ValueError when the channel counts
    differ.
    """
    w = np.asarray(weight, np.float64)
    s, _ = bn_scale_shift(mean, var, eps, gamma, beta)
    C = s.size
    b = np.zeros(C) if bias is None else np.asarray(bias, np.float64).ravel()
    if b.size != C:
        raise ValueError(f"the bias has {b.size} values, the BN {C} channels")
    if index is None:
        ax = axis % w.ndim
        if w.shape[ax] != C:
            raise ValueError(f"the weight has {w.shape[ax]} output channels on axis {axis}, "
                             f"the BN {C}")
        index = np.arange(C).reshape((C,) + (1,) * (w.ndim - 1 - ax))
    else:
        index = np.asarray(index)
        if index.size and (index.max() >= C or index.min() < 0):
            raise ValueError(f"the weight's channel index reaches {int(index.max())}, the BN has {C}")
    beta = np.zeros(C) if beta is None else np.asarray(beta, np.float64).ravel()
    return w * s[index], (b - np.asarray(mean, np.float64).ravel()) * s + beta
