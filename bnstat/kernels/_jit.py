"""Every numba flag of the kernels, and the process set-up they need, done explicitly.

Importing this module (or any module of ``bnstat.kernels``) changes nothing
outside it: no environment variable, no ``sys.modules`` entry. The set-up is
a call:

- ``setup(cli=True)``: by ``bnstat.cli.main``, first thing; imports nothing
  (``bnstat --help`` stays fast).
- ``ready()``: by every kernel entry point (``entry``) and ``set_threads``,
  before numba first runs anything; ``setup()`` and the load of numba's CPU
  target, once per process.
"""

from __future__ import annotations

import functools
import os
import sys

# cached, no GIL, no blanket fastmath (nnan/ninf would delete the NaN tests)
JIT = dict(cache=True, nogil=True)
# The row sums only: reassociation lets LLVM keep 4-8 partial sums in vector
# registers (the only way a float reduction vectorizes) and contract lets it
# fuse d*d + s2. Partial sums are at least as accurate as one running sum; the
# NaN tests (v == v) stay because nnan is not in the set. This is the subset
# numbagg uses minus arcp/afn, which nothing here needs. Measured in memory, one
# thread, 64 MiB float32 NCHW: 2.2 GB/s before, see bench/README.md for after.
SUMS_JIT = dict(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})
# the kernels that split their work over threads (prange)
PARALLEL_JIT = dict(JIT, parallel=True)


class _Setup:
    """What ``setup`` and ``ready`` did in this process (numba's state is per process)."""

    cli = False
    target_loaded = False


def setup(cli: bool = False) -> None:
    """Set the process up for the kernels; cheap, imports nothing.

    OMP_WAIT_POLICY=passive unless the user set it: numba's OpenMP threading
    layer (libgomp) reads it when it is loaded, at the first parallel kernel
    or ``set_threads``. Its default keeps idle workers spinning, and normalize
    calls a kernel between write() calls, which then competed with the
    spinning worker: 513 MB normalized at 0.33-0.42 GB/s by default, 1.0-1.5
    GB/s passive, `cp` 2.4-3.1 in the same minutes (bench/README.md). The
    moments kernels run one parallel region per 64 MiB chunk: the wake-up
    costs them nothing.

    ``cli=True`` marks the process as the command line tool: numba's CPU
    target will then be loaded without its probe of scipy's BLAS (``ready``).
    A library user's own numba code in the same process may want np.dot, so
    the API never asks for that.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    if cli:
        _Setup.cli = True


def ready() -> None:
    """``setup()``, then numba's CPU target loaded (once per process).

    A cached kernel still needs numba's target context, whose first load
    imports every numba.np implementation module; numba.np.arraymath probes
    for scipy.linalg.cython_blas there (for np.dot and friends, which no kernel
    here uses). Where scipy is installed that import alone took 0.25 s of a
    1.2 s run (bench/README.md). The probe takes an ImportError as "no BLAS",
    which is what it gets while scipy.linalg is blocked; the block is lifted
    as soon as the target is loaded. Only after ``setup(cli=True)``; nothing
    is blocked when scipy.linalg or numba's array module is already imported.
    """
    if _Setup.target_loaded:
        return
    setup()
    block = (_Setup.cli and "scipy.linalg" not in sys.modules
             and "numba.np.arraymath" not in sys.modules)
    if block:
        sys.modules["scipy.linalg"] = None
    try:
        from numba.core.registry import cpu_target

        cpu_target.target_context.refresh()
    finally:
        if block and "scipy.linalg" in sys.modules and sys.modules["scipy.linalg"] is None:
            del sys.modules["scipy.linalg"]
    _Setup.target_loaded = True


def entry(kernel):
    """The public entry point of a jitted ``kernel``: ``ready()`` first, then the kernel.

    The dispatcher stays reachable as ``.kernel`` (for its signatures, cache
    and flags).
    """
    @functools.wraps(kernel.py_func)
    def call(*args):
        if not _Setup.target_loaded:
            ready()
        return kernel(*args)

    call.kernel = kernel
    return call


def set_threads(threads: int | None) -> int:
    """Set numba's thread count (None: all it has); returns the count in use."""
    ready()  # launching numba's threads loads the OpenMP layer, which reads OMP_WAIT_POLICY
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(max(1, min(threads or limit, limit)))
    return numba.get_num_threads()
