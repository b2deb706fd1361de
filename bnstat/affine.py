"""Per-unit affine maps applied to chunks: y = (x - mean) * scale + shift.

:class:`UnitParams` holds the per-unit float64 vectors; :func:`apply_params`
writes one chunk through the kernel (or numpy) into a buffer; ``unit_range``
says which units a run of rows covers; ``write_pipeline`` hands pieces to a
writer thread. Used by :mod:`bnstat.normalizing`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from bnstat.layout import Plan

# Bytes of output normalized and written at a time: a piece this size is still in
# the CPU's cache (L3: 32-48 MiB on these machines) when write() copies it into the page cache.
# Whole 64 MiB chunks wrote at about half the speed (bench/README.md).
WRITE_PIECE = 4 << 20


@dataclass
class UnitParams:
    """Per-unit mean, scale = gamma/sqrt(var+eps) and shift = beta, float64, of unit_shape."""

    mean: np.ndarray
    scale: np.ndarray
    shift: np.ndarray

    @classmethod
    def from_moments(cls, mean, var, eps, gamma=None, beta=None) -> UnitParams:
        mean = np.asarray(mean, np.float64)
        var = np.asarray(var, np.float64)
        gamma = np.ones_like(var) if gamma is None else np.broadcast_to(np.asarray(gamma, np.float64), var.shape)
        beta = np.zeros_like(var) if beta is None else np.broadcast_to(np.asarray(beta, np.float64), var.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = gamma / np.sqrt(var + eps)
        return cls(mean, scale, np.array(beta, np.float64))

    def map(self, fn) -> UnitParams:
        return UnitParams(fn(self.mean), fn(self.scale), fn(self.shift))


def out_dtype(dtype: np.dtype) -> np.dtype:
    """float16/32/64 keep their dtype; integers become float32 (README, `bnstat normalize`)."""
    dtype = np.dtype(dtype).newbyteorder("=")
    if dtype.kind == "f" and dtype.itemsize <= 8:
        return dtype
    if dtype.kind == "f":
        return np.dtype(np.float64)
    return np.dtype(np.float32)


@contextlib.contextmanager
def write_pipeline(write, nbytes: int, n_threads: int):
    """A BackgroundWriter for ``write`` (None: no pipeline, yields None).

    While it runs, the kernels use one thread fewer: the writer thread has a
    core of its own (on 2 cores: one computes, one writes).
    """
    if write is None:
        yield None
        return
    from bnstat.io.writers import BackgroundWriter
    from bnstat.stream import set_threads

    if n_threads > 1:
        set_threads(n_threads - 1)
    try:
        with BackgroundWriter(write, nbytes) as pipe:
            yield pipe
    finally:
        if n_threads > 1:
            set_threads(n_threads)


def unit_range(splan: Plan, read_shape, r0: int, rows: int, n_units: int):
    """The flat units a chunk of rows [r0, r0+rows) covers (None: all units)."""
    if 0 in splan.reduce and not (splan.groups is not None and splan.channel_axis == 0):
        return None
    if splan.groups is not None and splan.channel_axis == 0:
        per = read_shape[0] // splan.groups
        per_group = n_units // splan.groups
        return (r0 // per) * per_group, ((r0 + rows) // per) * per_group
    per_row = n_units // read_shape[0]
    return r0 * per_row, (r0 + rows) * per_row


def apply_params(chunk: np.ndarray, splan: Plan, params: UnitParams, out: np.ndarray,
           engine: str = "numba") -> np.ndarray:
    """Normalize one chunk with flat per-unit params of its units into ``out`` (a buffer)."""
    from bnstat.kernels.numpy_engine import blocks
    from bnstat.stream import kernel_engine, kernel_input, read_only

    shape4, perm = splan.kernel_view(chunk.shape)
    x4 = kernel_input(chunk, splan)
    P, _, U, _ = x4.shape
    kdtype = np.float32 if out.dtype == np.float16 else out.dtype
    result = out[:chunk.size].reshape(chunk.shape)
    target = result if (perm is None and kdtype == out.dtype) else np.empty(shape4, kdtype)
    mean, scale, shift = (a.reshape(P, 1, U, 1) for a in (params.mean, params.scale, params.shift))
    x4 = read_only(x4)
    engine = kernel_engine("normalize4", x4, engine, out=target)
    if engine == "numpy":  # the kernel's arithmetic, in float64, a block at a time
        t4 = target.reshape(shape4)
        tmp = None  # one float64 block, reused: in place, 5x the speed of temporaries per block
        for ps, as_ in blocks(shape4):
            xb = x4[ps, as_]
            if tmp is None or tmp.shape != xb.shape:
                tmp = np.empty(xb.shape, np.float64)
            np.subtract(xb, mean[ps], out=tmp)
            tmp *= scale[ps]
            tmp += shift[ps]
            t4[ps, as_] = tmp
    else:
        from bnstat.kernels import normalize as kernels

        kernels.normalize4(x4, params.mean.reshape(P, U), params.scale.reshape(P, U),
                           params.shift.reshape(P, U), target.reshape(shape4))
    if perm is None and target is result:
        return result
    if perm is not None:
        exp, _ = splan.expanded(chunk.shape)
        inv = np.argsort(perm)
        target = target.reshape(tuple(exp[i] for i in perm)).transpose(inv).reshape(chunk.shape)
    result[...] = target.reshape(chunk.shape)
    return result
