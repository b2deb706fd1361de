"""Every numba flag of the kernels, and the process set-up they need, done explicitly.

Importing this module (or any module of ``bnstat.kernels``) changes nothing
outside it: no environment variable, no ``sys.modules`` entry. The set-up is
a call:

- ``setup(cli=True)``: by ``bnstat.cli.main``, first thing; imports nothing
  (``bnstat --help`` stays fast).
- ``ready()``: by every kernel entry point (``entry``) and ``set_threads``,
  before numba first runs anything; ``setup()`` and numba made to load
  cached kernels without loading its whole CPU target (and, for the command
  line, without its scan for extensions), once per process.
"""

from __future__ import annotations

import functools
import os
import sys
import threading

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


_READY = threading.Lock()


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
    target will then be loaded without its probe of scipy's BLAS
    (``_no_blas_probe``), and kernels without its scan for extensions
    (``_no_extension_scan``).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    if cli:
        _Setup.cli = True


def ready() -> None:
    """``setup()``, then numba made to load cached kernels without its whole target (once).

    Numba's load of a cached kernel first refreshes its CPU target, which
    imports and installs every numba.np implementation module (the typing and
    lowering of all of NumPy's API), about 0.15-0.25 s of a small run
    (bench/README.md, start-up); a kernel loaded from the cache is machine
    code and needs none of it, only numba's runtime (NRT). So the refresh
    that ``Cache.load_overload`` asks for initializes the NRT alone; every
    other refresh, the compiler's among them, is numba's own. Where numba's
    internals are not as expected, nothing is changed.
    """
    if _Setup.target_loaded:
        return
    with _READY:  # the threads of a dask scheduler: numba imported by one (its import has cycles)
        if _Setup.target_loaded:
            return
        setup()
        with _collector_paused():
            _light_cache_loads()
            if _Setup.cli:
                _no_extension_scan()
        _Setup.target_loaded = True


class _collector_paused:
    """After ``setup(cli=True)``: Python's cyclic garbage collector paused while numba is
    imported, and the objects then alive frozen (``gc.freeze``) before it resumes.

    Numba's import makes about 300,000 objects; the collector scans them again
    at every full collection, the first one during the import itself: 0.02-0.04
    s of a small run (bench/README.md, start-up). Frozen objects are never
    scanned (nor freed: numba's modules live as long as the process anyway;
    its import leaves about 400 unreachable objects behind). Only for the
    command line, whose objects are all its own: a library user's process
    keeps its collector as it is.
    """

    def __enter__(self):
        import gc

        self.paused = _Setup.cli and gc.isenabled()
        if self.paused:
            gc.disable()

    def __exit__(self, *exc):
        if self.paused:
            import gc

            gc.freeze()
            gc.enable()


def _light_cache_loads() -> None:
    try:
        from numba.core import caching
        from numba.core.registry import cpu_target
        from numba.core.runtime import rtsys

        ctx = cpu_target.target_context
        loading = caching.Cache.load_overload.__code__
        full = type(ctx).refresh
    except (ImportError, AttributeError):  # another numba: its own refresh everywhere
        return

    def refresh():
        if sys._getframe(1).f_code is loading:
            rtsys.initialize(ctx)
        else:
            with _no_blas_probe():
                full(ctx)

    ctx.refresh = refresh


def _no_extension_scan() -> None:
    """After ``setup(cli=True)``: numba's scan for third-party extensions marked as done.

    Before it first compiles or loads a function, numba reads the entry points
    of every installed distribution to run the ``numba_extensions`` ones
    (``numba.core.entrypoints.init_all``): 0.02-0.03 s of a small run where
    about 150 distributions are installed (bench/README.md, start-up). An
    extension adds types and functions for code that uses them; the kernels
    use none. Only for the command line, whose process runs bnstat's kernels
    alone: a library user's own numba code may need its extensions.
    """
    try:
        from numba.core import entrypoints
    except ImportError:
        return
    if getattr(entrypoints, "_already_initialized", None) is False:
        entrypoints._already_initialized = True


class _no_blas_probe:
    """scipy.linalg blocked while numba loads its target, after ``setup(cli=True)``.

    The first full refresh of numba's target imports every numba.np module;
    numba.np.arraymath probes for scipy.linalg.cython_blas there (for np.dot
    and friends, which no kernel here uses). Where scipy is installed that
    import alone took 0.25 s (bench/README.md). The probe takes an ImportError
    as "no BLAS", which is what it gets while scipy.linalg is blocked; the
    block is lifted as soon as the target is loaded. Only for the command line:
    a library user's own numba code in the same process may want np.dot, so
    the API never asks for that; nothing is blocked when scipy.linalg or
    numba's array module is already imported.
    """

    def __enter__(self):
        self.block = (_Setup.cli and "scipy.linalg" not in sys.modules
                      and "numba.np.arraymath" not in sys.modules)
        if self.block:
            sys.modules["scipy.linalg"] = None

    def __exit__(self, *exc):
        if self.block and "scipy.linalg" in sys.modules and sys.modules["scipy.linalg"] is None:
            del sys.modules["scipy.linalg"]


def entry(kernel):
    """The public entry point of a jitted ``kernel``: ``ready()`` first, then the kernel.

    The dispatcher stays reachable as ``.kernel`` (for its signatures, cache
    and flags); it types plain arrays without numpy.ma (``_plain_array_typeof``).
    """
    _plain_array_typeof(kernel)

    @functools.wraps(kernel.py_func)
    def call(*args):
        if not _Setup.target_loaded:
            ready()
        return kernel(*args)

    call.kernel = kernel
    return call


# the names numba's array rule (numba.core.typing.typeof._typeof_ndarray) uses, as mirrored below
_NDARRAY_RULE_NAMES = frozenset((
    "Array", "MaskedArray", "NumbaNotImplementedError", "NumbaTypeError", "NumbaValueError",
    "dtype", "errors", "flags", "from_dtype", "isinstance", "ma", "map_layout", "ndim", "np",
    "numpy_support", "types", "writeable"))


def _plain_array_typeof(dispatcher) -> None:
    """``dispatcher`` made to type an argument of type exactly ``np.ndarray`` as numba does,
    without importing numpy.ma.

    Numba's dispatcher types the first array of each kind (and every
    read-only one) in Python, with ``typeof``, whose array rule first asks
    ``isinstance(val, np.ma.MaskedArray)``: numpy imports numpy.ma for that
    (0.01-0.02 s of a small run, bench/README.md, start-up). An argument whose
    type is ``np.ndarray`` itself is no MaskedArray, so the rest of the rule
    gives its type; every other value, and any array that rule fails on, goes
    to numba's own ``typeof_pyval``. Where numba's rule for arrays is not the
    one this mirrors (the names it uses differ: another numba), nothing is changed.
    """
    try:
        import numpy as np
        from numba.core import types
        from numba.core.typing import typeof as numba_typeof
        from numba.np import numpy_support

        rule = numba_typeof.typeof_impl.dispatch(np.ndarray)
        generic = dispatcher.typeof_pyval
        dispatcher._types_active_call.add  # noqa: B018 - numba's record of the call's types
    except (ImportError, AttributeError):
        return
    if rule is not getattr(numba_typeof, "_typeof_ndarray", None) or \
            frozenset(rule.__code__.co_names) != _NDARRAY_RULE_NAMES:
        return

    def typeof_pyval(val):
        if type(val) is np.ndarray:
            try:
                tp = types.Array(numpy_support.from_dtype(val.dtype), val.ndim,
                                 numpy_support.map_layout(val), readonly=not val.flags.writeable)
            except Exception:  # a dtype numba does not take: numba's own answer
                return generic(val)
            dispatcher._types_active_call.add(tp)
            return tp
        return generic(val)

    dispatcher.typeof_pyval = typeof_pyval


def planned_threads(threads: int | None) -> int:
    """What ``set_threads(threads)`` will return, without loading numba: numba's default
    count is NUMBA_NUM_THREADS or the cores this process may use."""
    try:
        limit = int(os.environ["NUMBA_NUM_THREADS"])
    except (KeyError, ValueError):
        try:
            limit = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            limit = os.cpu_count() or 1
    return max(1, min(threads or limit, limit))


def set_threads(threads: int | None) -> int:
    """Set numba's thread count (None: all it has); returns the count in use."""
    ready()  # launching numba's threads loads the OpenMP layer, which reads OMP_WAIT_POLICY
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(max(1, min(threads or limit, limit)))
    return numba.get_num_threads()
