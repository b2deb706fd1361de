"""Edge cases for the kernels, in bottleneck's style: every dtype, memory layout and fill.

The kernels take C-contiguous (P, A, U, B) views (``layout.Plan.kernel_view``):
P and U index the units, A and B the values of a unit. ``cases()`` yields
``Case`` objects (an id, the 4-D array); ``memory_layouts(a)`` yields the same
values as C, Fortran, strided, reversed and zero-stride views, which only
the driver (``stream.chunk_moments``) takes. ``kernel_dtype`` is what the
driver hands the kernels: float16 widened to float32 (exact), every other
dtype as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOATS = (np.float16, np.float32, np.float64)
INTS = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
DTYPES = FLOATS + INTS

# (P, A, U, B): one value, one unit, NCHW-like (B > 1), NHWC-like (B == 1) with many
# units, units split in tasks (U >= 256), ragged blocks of the B > 1 loop (A not a
# multiple of BLOCK_COLS // B) and of the B == 1 loop (A over BLOCK_ROWS // U), no value
SHAPES = {
    "one-value": (1, 1, 1, 1),
    "one-unit": (1, 37, 1, 5),
    "nchw": (3, 4, 5, 6),
    "nhwc-many-units": (2, 9, 300, 1),
    "ragged-cols": (1, 2400, 2, 7),
    "ragged-rows": (1, 16384 + 77, 4, 1),
    "row-of-one": (2, 5, 3, 1),
    "empty": (2, 0, 3, 4),
}


@dataclass
class Case:
    id: str
    x: np.ndarray


def values(shape, dtype, rng, fill: str) -> np.ndarray:
    """Values of ``dtype``: "normal" (offset, spread), "extremes" (the dtype's min and max,
    zeros of both signs), "nan" (NaN, a unit all NaN), "inf" (±inf in some units)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if fill == "extremes":
            pool = np.array([info.min, info.max, 0, 1, info.max - 1], dtype=dtype)
            return rng.choice(pool, size=shape)
        lo, hi = max(info.min, -1000), min(info.max, 1000)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    x = (rng.standard_normal(n) * 3 + 50).reshape(shape).astype(dtype)
    if n == 0:
        return x
    flat = x.reshape(-1)
    if fill == "extremes":
        # the dtype's largest value, except for float64, whose squares the float64
        # accumulators (and the reference's skewness) cannot hold: there 1e100
        big = np.finfo(dtype).max if dtype.itemsize < 8 else 1e100
        flat[::3] = big
        flat[1::3] = -big
        flat[2::5] = -0.0
    elif fill == "nan":
        flat[::7] = np.nan
        x[0, :, 0, :] = np.nan  # a unit with no value
    elif fill == "inf":
        flat[::11] = np.inf
        if x.shape[2] > 1:
            x[..., 1, :] = -np.inf  # a unit of -inf only
        if n > 3:
            flat[3] = -np.inf  # a unit with both signs: NaN mean
    return x


def fills(dtype) -> tuple[str, ...]:
    return ("normal", "extremes") if np.dtype(dtype).kind in "iu" else ("normal", "extremes", "nan",
                                                                        "inf")


def cases(rng, dtypes=DTYPES, shapes=None):
    """Every (dtype, shape, fill) combination, as Cases."""
    for dtype in dtypes:
        for name, shape in (shapes or SHAPES).items():
            for fill in fills(dtype):
                yield Case(f"{np.dtype(dtype).name}-{name}-{fill}", values(shape, dtype, rng, fill))


def kernel_dtype(x: np.ndarray) -> np.ndarray:
    """The array the driver hands the kernels (float16 widened to float32, exactly)."""
    return x.astype(np.float32) if x.dtype == np.float16 else x


def memory_layouts(a: np.ndarray):
    """(name, view) pairs with the values of ``a`` in other memory layouts."""
    yield "C", np.ascontiguousarray(a)
    yield "Fortran", np.asfortranarray(a)
    big = np.zeros(tuple(2 * s for s in a.shape), a.dtype)
    big[::2, ::2, ::2, ::2] = a
    yield "strided", big[::2, ::2, ::2, ::2]
    rev = np.ascontiguousarray(a[::-1, ::-1, ::-1, ::-1])
    yield "reversed", rev[::-1, ::-1, ::-1, ::-1]
    if a.size:
        row = a[:, :1, :, :]  # the first value of A repeated: a zero stride along A
        yield "zero-stride", np.broadcast_to(row, a.shape)
