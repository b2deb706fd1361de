"""Chunk planning and the drivers that feed the kernels.

A source yields C-contiguous chunks along its first axis; each chunk becomes
the 4-D kernel view of ``layout.Plan.kernel_view``, the kernel returns
per-task partial moments, and those are merged (Chan) into the running
state of the array: merged into every unit when the first axis is reduced,
written into the units the chunk covers when it is kept.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from bnstat.errors import DataError, InputError, UsageProblem, check_interrupt, warn
from bnstat.io import zlibx
from bnstat.io.base import ArraySource
from bnstat.layout import Plan, array_layout, make_plan
from bnstat.kernels._jit import planned_threads, set_threads
from bnstat.kernels.numpy_engine import numpy_moments
from bnstat.stats import Moments, Stats, merge_all, warn_degenerate

DEFAULT_CHUNK_SIZE = 64 * 1024**2
TASKS_PER_THREAD = 4
# Inputs smaller than this are computed with numpy (float64, two passes per
# block) instead of the Numba kernels: loading the cached kernels costs about
# 1.5 s on these machines (numba's target registries, bench/README.md), more
# than numpy needs for 32 MiB. BNSTAT_ENGINE=numba|numpy overrides.
SMALL_INPUT = 32 * 1024**2
ENGINES = ("numba", "numpy")


def slab_rows(n: int, row_bytes: int, chunk_size: int, *, multiple_of: int = 1,
              buffers: int = 1) -> int:
    """Rows per slab: as many as fit in ``chunk_size // buffers`` bytes, rounded down to a
    multiple of ``multiple_of`` but at least one multiple (and at least one row), at most ``n``.

    ``buffers``: a reader that fills a second buffer while the first is in use (HDF5)
    gets half the rows, so that both stay within the chunk size (README, --chunk-size).
    """
    rows = max(1, (chunk_size // max(1, buffers)) // max(1, row_bytes))
    if multiple_of > 1:
        rows = max(multiple_of, rows - rows % multiple_of)
    return min(rows, max(1, n))


class _Slabs(Sequence):
    """Lazy: a header may claim 10**7 rows, whose slices must not be made up front."""

    def __init__(self, n: int, rows: int):
        self.n, self.rows = n, max(1, rows)
        self._starts = range(0, n, self.rows)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r0 = self._starts[i]
        return slice(r0, min(self.n, r0 + self.rows))

    def __eq__(self, other) -> bool:  # equal to the list of the same slices
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"slabs(n={self.n}, rows={self.rows})"


def slabs(n: int, rows: int) -> Sequence[slice]:
    """``range(n)`` cut into slices of ``rows`` rows, the last one ragged (a lazy sequence)."""
    return _Slabs(n, rows)


def plan_rows(n: int, row_bytes: int, chunk_size: int, *, multiple_of: int = 1,
              buffers: int = 1) -> Sequence[slice]:
    """The one row planner: ``range(n)`` as slabs of about ``chunk_size`` bytes each.

    Every slab but the last holds a multiple of ``multiple_of`` rows (an HDF5
    dataset's chunk rows, whole groups, whole batches); a row larger than the
    chunk size still makes a slab of one multiple. A task splitter (Dask) calls
    it with the task size as ``chunk_size`` and the dataset's chunk rows as
    ``multiple_of``: each task is then a slab of whole HDF5 chunks.
    """
    return slabs(n, slab_rows(n, row_bytes, chunk_size, multiple_of=multiple_of, buffers=buffers))


def source_rows(source: ArraySource, chunk_size: int, *, multiple_of: int = 1) -> int:
    """Rows per chunk of ``source``: whole HDF5 chunks (``row_align``) and a multiple of
    ``multiple_of`` (whole groups or batches); both when their common multiple fits the
    chunk size, else ``multiple_of`` only."""
    buffers = 2 if source.double_buffered else 1
    align = source.row_align
    if multiple_of > 1:
        both = math.lcm(align, multiple_of)
        align = both if both * source.row_bytes <= chunk_size // buffers else multiple_of
    rows = slab_rows(source.read_shape[0], source.row_bytes, chunk_size, multiple_of=align,
                     buffers=buffers)
    need = rows * source.row_bytes * buffers
    if need > chunk_size and need > available_memory():  # refused before it is allocated
        raise DataError(
            f"{source.where}: one slab of {rows} row(s) is {need:,} bytes, more than --chunk-size "
            f"({chunk_size:,}) and than the memory available ({available_memory():,})",
            "A row is the smallest piece bnstat reads; reshape the array so that axis 0 is longer.")
    return rows


def available_memory() -> int:
    """MemAvailable of /proc/meminfo (else the physical memory), in bytes."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def pick_engine(nbytes: int, engine: str | None = None, *, switch: bool = False) -> str:
    """The engine for ``nbytes`` of input: ``engine`` if given, else BNSTAT_ENGINE, else by size.

    ``switch``: the caller takes "auto" for a large input: the Numba kernels once they are
    loaded, numpy while they are compiled the first time (``kernels.loader``).
    """
    engine = engine or os.environ.get("BNSTAT_ENGINE") or "auto"
    if engine in ENGINES:
        return engine
    if engine != "auto":
        raise UsageProblem(f"BNSTAT_ENGINE={engine}: must be numba, numpy or auto")
    if nbytes < SMALL_INPUT:
        return "numpy"
    return "auto" if switch else "numba"


def start_threads(threads: int | None, engine: str) -> int:
    """The kernels' thread count for ``engine``, set in numba for "numba" (which loads it);
    for "auto" the count numba will take, without loading it."""
    if engine == "numba":
        return set_threads(threads)
    if engine == "auto":
        _Auto.threads = planned_threads(threads)
        return _Auto.threads
    return 1


class _Auto:
    """The thread count ``start_threads`` planned for "auto", set in numba at the switch."""

    threads: int | None = None


def kernel_engine(kernel: str, x: np.ndarray, engine: str, threads: int | None = None,
                  out: np.ndarray | None = None) -> str:
    """"numba" or "numpy" for one chunk's kernel view ``x``: "auto" is numba once the kernel is
    loaded (with ``threads``, or those ``start_threads`` planned, set in numba), numpy while it
    is compiled the first time."""
    if engine != "auto":
        return engine
    from bnstat.kernels import loader

    if not loader.loaded(loader.Spec.of(kernel, x, out)):
        return "numpy"
    set_threads(threads or _Auto.threads)
    return "numba"


def split_tasks(shape4: tuple[int, int, int, int], threads: int) -> tuple[int, int]:
    """How many ranges of A (sa) and of U (su) to cut the work into.

    Enough tasks for every thread (a few each, for balance) but no more: each
    range of A costs a merge, each range of U shortens the NHWC inner loop.
    """
    P, A, U, B = shape4
    target = TASKS_PER_THREAD * threads if threads > 1 else 1
    if P >= target:
        return 1, 1
    need = -(-target // P)
    if B > 1:
        su = max(1, min(U, need))
        sa = max(1, min(A, -(-need // su)))
    else:
        sa = max(1, min(A, need))
        su = 1
        if sa < need and U >= 256:
            su = max(1, min(U // 128, -(-need // sa)))
    return sa, su


def read_only(x: np.ndarray) -> np.ndarray:
    """``x``, as a read-only view if it is writable.

    Numba compiles a kernel once per signature, and writability is part of an
    array's type: memory-mapped files are read-only, in-memory arrays writable.
    The kernels only read their input, so giving it to them read-only always
    halves the variants to compile (and to keep in the cache)."""
    if x.flags.writeable:
        x = x.view()
        x.flags.writeable = False
    return x


def kernel_input(chunk: np.ndarray, plan: Plan) -> np.ndarray:
    """The (P, A, U, B) view of a chunk, in a dtype the kernels take."""
    shape4, perm = plan.kernel_view(chunk.shape)
    if perm is None:
        x = chunk.reshape(shape4)
    else:
        exp, _ = plan.expanded(chunk.shape)
        x = np.ascontiguousarray(chunk.reshape(exp).transpose(perm)).reshape(shape4)
    if x.dtype == np.float16:
        x = x.astype(np.float32)  # numba has no float16 arithmetic; exact widening
    elif x.dtype.kind == "f" and x.dtype.itemsize > 8:
        x = x.astype(np.float64)
    return x


def chunk_moments(chunk: np.ndarray, plan: Plan, *, higher: bool = False,
                  threads: int = 1, engine: str = "numba") -> Moments:
    """Moments of every unit a chunk covers, flat in C order over (P, U)."""
    return view_moments(kernel_input(chunk, plan), higher=higher, threads=threads, engine=engine)


def count_infs(x: np.ndarray, part: Moments) -> Moments:
    """``part`` with the +-inf values of each unit of the (P, A, U, B) view ``x`` counted.

    Only a unit whose min is -inf or max is +inf can hold one: those units
    alone are counted, with numpy; clean data pays two comparisons per unit.
    """
    suspect = np.flatnonzero((part.min == -np.inf) | (part.max == np.inf))
    if suspect.size:
        U = x.shape[2]
        inf = part.inf_count.copy()
        for i in suspect:
            p, u = divmod(int(i), U)
            inf[i] = np.count_nonzero(np.isinf(x[p, :, u, :]))
        part = replace(part, inf_count=inf)
    return part


def view_moments(x: np.ndarray, *, higher: bool = False, threads: int = 1,
                 engine: str = "numba") -> Moments:
    """Moments of every unit of a (P, A, U, B) kernel view, flat in C order over (P, U)."""
    from bnstat.kernels.loader import moments_kernel

    x = read_only(x)
    engine = kernel_engine(moments_kernel(x, higher), x, engine, threads)
    if engine == "numpy":
        return count_infs(x, numpy_moments(x, higher))
    from bnstat.kernels import moments as kernels

    sa, su = split_tasks(x.shape, threads)
    if higher:
        return kernel_moments(x, sa, True, lambda cnt, mean, m2, mn, mx, nan, m3, m4:
                              kernels.moments4_higher(x, sa, su, cnt, mean, m2, m3, m4, mn, mx, nan))
    return kernel_moments(x, sa, False, lambda cnt, mean, m2, mn, mx, nan:
                          kernels.moments4(x, sa, su, cnt, mean, m2, mn, mx, nan))


def kernel_moments(x: np.ndarray, sa: int, higher: bool, run) -> Moments:
    """The moments a kernel writes for the (P, A, U, B) view ``x``: ``run(cnt, mean, m2, mn,
    mx, nan)`` (and ``m3, m4`` with ``higher``) fills those (sa, P, U) outputs, slot i the
    moments of the i-th of ``sa`` ranges of A; merged, with the +-inf counted."""
    P, _, U, _ = x.shape
    shape = (sa, P, U)
    outs = [np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape), np.full(shape, np.inf),
            np.full(shape, -np.inf), np.zeros(shape, np.int64)]
    extra = [np.zeros(shape), np.zeros(shape)] if higher else []
    run(*outs, *extra)
    cnt, mean, m2, mn, mx, nan = outs
    m3, m4 = extra or (None, None)
    parts = [Moments(cnt[i].ravel(), mean[i].ravel(), m2[i].ravel(), mn[i].ravel(), mx[i].ravel(),
                     nan[i].ravel(), None if m3 is None else m3[i].ravel(),
                     None if m4 is None else m4[i].ravel()) for i in range(sa)]
    out = parts[0]
    for part in parts[1:]:
        out = out.merge(part)
    return count_infs(x, out)


def chunk_plan(splan: Plan, read_shape: tuple[int, ...], rows: int) -> Plan:
    """The plan of a chunk of ``rows`` rows of an array of ``read_shape``.

    Group norm with C as the first axis read: a chunk holds whole groups
    (``rows`` a multiple of C/G), so it has ``rows // (C/G)`` of them.
    """
    if splan.groups is not None and splan.channel_axis == 0 and rows != read_shape[0]:
        return replace(splan, groups=rows // (read_shape[0] // splan.groups))
    return splan


def source_moments(source: ArraySource, plan: Plan, *, chunk_size: int, higher: bool = False,
                   threads: int = 1, progress: Callable[[int], None] | None = None,
                   engine: str = "numba", visit: Callable | None = None,
                   moments: bool = True) -> Moments | None:
    """Moments of one source, of shape ``plan.unit_shape(source.shape)``.

    ``visit(x, lo, hi)``, when given, also sees every chunk's (P, A, U, B)
    kernel view ``x`` covering the units ``lo:hi`` (flat, in the order of the
    transposed plan for a Fortran-ordered source); ``moments=False`` skips
    the moments (and returns None): a pass for ``visit`` alone. A visitor with
    ``visit.with_moments(x, lo, hi, threads, engine)`` may do both at once: it
    returns the moments ``view_moments`` would (bit for bit), or None to be called apart.
    """
    splan = plan.transposed() if source.fortran else plan
    shape = source.read_shape
    n_units = math.prod(splan.unit_shape(shape))
    group_rows = 1
    if splan.groups is not None and splan.channel_axis == 0:
        group_rows = shape[0] // splan.groups  # a chunk must hold whole groups
    # 6 float64 accumulators per unit (8 with --higher), and as many for a chunk's partials
    state_bytes = n_units * 8 * (8 if higher else 6) * 2
    if state_bytes > max(chunk_size, available_memory()):
        raise DataError(f"{source.where}: {n_units:,} units (layout {splan.letters}) need "
                        f"{state_bytes:,} bytes of statistics, more than the memory available",
                        "Check the layout: is C the axis you meant?")
    rows = source_rows(source, chunk_size, multiple_of=group_rows)
    first_kept = 0 not in splan.reduce or group_rows > 1
    per_row = n_units * group_rows // shape[0] if first_kept else 0
    state = Moments.empty((n_units,), higher)
    row_bytes = source.row_bytes
    # A reader with a thread of its own (HDF5: read_direct or inflating the next slab)
    # gets a core: the kernels run on one thread fewer, instead of a parallel region
    # waiting for a thread that shares its core with the reader (bench/README.md).
    spare = engine in ("numba", "auto") and threads > 1 and source.double_buffered
    kthreads = threads - 1 if spare else threads
    spare = spare and engine == "numba"  # "auto" sets numba's count per chunk (kernel_engine)
    if spare:
        set_threads(kthreads)
    try:
        for r0, chunk in source.iter_chunks(rows):
            check_interrupt()
            cplan = chunk_plan(splan, shape, chunk.shape[0])
            lo = (r0 // group_rows) * per_row if first_kept else 0
            part = None
            if visit is None:
                part = chunk_moments(chunk, cplan, higher=higher, threads=kthreads, engine=engine)
            else:
                x = kernel_input(chunk, cplan)
                hi = lo + x.shape[0] * x.shape[2] if first_kept else n_units
                # a visitor that computes the moments with its own work (histrun: in one walk)
                both = getattr(visit, "with_moments", None) if moments and not higher else None
                part = both(x, lo, hi, kthreads, engine) if both is not None else None
                if part is None:
                    visit(x, lo, hi)
                    if moments:
                        part = view_moments(x, higher=higher, threads=kthreads, engine=engine)
            if part is None:
                pass
            elif first_kept:
                for key, value in part.arrays().items():
                    getattr(state, key)[lo:lo + part.count.size] = value
            else:
                state = state.merge(part)
            if progress is not None:
                progress(chunk.shape[0] * row_bytes)
    finally:
        if spare:
            set_threads(threads)
    if not moments:
        return None
    state = state.map(lambda a: a.reshape(splan.unit_shape(shape)))
    if source.fortran:
        state = state.map(lambda a: np.ascontiguousarray(a.transpose()))
    return state


@dataclass
class ArrayGroup:
    """The sources of one named array (several files split along N)."""

    name: str
    sources: list[ArraySource]


def group_sources(sources: list[ArraySource], *, per_file: bool = False) -> list[ArrayGroup]:
    """Arrays of the same name across files become one group, unless ``per_file``."""
    groups: dict[str, ArrayGroup] = {}
    multi_file = len({s.path for s in sources}) > 1
    for src in sources:
        key = f"{src.path}:{src.name}" if (per_file and multi_file) else src.name
        if key in groups:
            groups[key].sources.append(src)
        else:
            groups[key] = ArrayGroup(key, [src])
    return list(groups.values())


def check_group_shapes(group: ArrayGroup, plans: list[Plan]) -> None:
    """Arrays merged along N must agree on every other axis. Raises InputError."""
    first = group.sources[0]
    for src, plan in zip(group.sources[1:], plans[1:]):
        n = plan.n_axis if plan.n_axis is not None else 0
        a = tuple(s for i, s in enumerate(first.shape) if i != n)
        b = tuple(s for i, s in enumerate(src.shape) if i != n)
        if len(first.shape) != len(src.shape) or a != b:
            raise InputError(
                f"{group.name}: {first.path} has shape {first.shape} but {src.path} has shape "
                f"{src.shape}; arrays of one name are merged along {plan.letters[n]} and must agree "
                "on the other axes", "Use --per-file/per_file=True to keep them apart.")


def plan_groups(sources: list[ArraySource], *, layout=None, channel_axis=None, norm="batch",
                groups=None, reduce=None, per_file=False) -> tuple[list[ArrayGroup], list[list[Plan]]]:
    """The named arrays and every source's plan, before any reading (a layout that does not
    fit fails first); warns once per layout that was assumed. Raises BnstatError."""
    array_groups = group_sources(sources, per_file=per_file)
    plans = []
    for g in array_groups:
        ps = [make_plan(s.shape, layout=array_layout(s, layout, channel_axis), channel_axis=channel_axis,
                        norm=norm, groups=groups,
                        reduce=reduce, name=s.where) for s in g.sources]
        check_group_shapes(g, ps)
        plans.append(ps)
    by_letters: dict[str, list[str]] = {}
    for g, ps in zip(array_groups, plans):
        if ps[0].assumed:
            by_letters.setdefault(ps[0].letters, []).append(g.name)
    for letters, names in by_letters.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warn(f"no --layout/layout= given: assuming the PyTorch layout {letters} (channel axis 1) for {shown}")
    return array_groups, plans


def finish_group(stats: Stats, nan_policy: str) -> Stats:
    """The last checks of one array's statistics: --nan, degenerate units."""
    check_nans(stats, nan_policy)
    warn_degenerate(stats)
    return stats


def compute_stats(sources: list[ArraySource], *, layout=None, channel_axis=None, norm="batch",
                  groups=None, reduce=None, ddof=0, higher=False, nan_policy="omit",
                  chunk_size=None, threads=None, per_file=False,
                  progress: Callable[[int], None] | None = None,
                  engine: str | None = None, visit: Callable | None = None) -> dict[str, Stats]:
    """Statistics of every named array. Raises BnstatError subclasses.

    ``engine``: "numba", "numpy" or None (``pick_engine`` by the input size).
    ``visit(name, i, source, plan)``, when given, returns the ``visit`` callback of
    ``source_moments`` for the i-th source of the array ``name`` (or None).
    """
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    array_groups, plans = plan_groups(sources, layout=layout, channel_axis=channel_axis, norm=norm,
                                      groups=groups, reduce=reduce, per_file=per_file)
    engine = pick_engine(sum(s.nbytes for s in sources), engine, switch=True)
    zlibx.set_threads(threads)  # the readers' helper threads (CRC-32, gzip inflate)
    n_threads = start_threads(threads, engine)
    results = {}
    for g, ps in zip(array_groups, plans):
        parts = []
        for i, (src, plan) in enumerate(zip(g.sources, ps)):
            moments = source_moments(src, plan, chunk_size=chunk_size, higher=higher,
                                     threads=n_threads, progress=progress, engine=engine,
                                     visit=visit(g.name, i, src, plan) if visit else None)
            parts.append(Stats(name=g.name, moments=moments, shape=tuple(src.shape),
                               dtype=np.dtype(src.dtype).name, layout=plan.letters,
                               reduce=plan.reduce_letters, unit_axes=plan.unit_axes, ddof=ddof,
                               sources=[src.path], norm=plan.norm, groups=plan.groups,
                               assumed_layout=plan.assumed, nan_policy=nan_policy))
        results[g.name] = finish_group(merge_all(parts), nan_policy)
    return results


def check_nans(stats: Stats, nan_policy: str) -> None:
    """Apply --nan: raise (DataError naming the first unit) or warn about omitted NaNs."""
    total = int(stats.nan_count.sum())
    if not total:
        return
    units = int(np.count_nonzero(stats.nan_count))
    if nan_policy == "raise":
        first = np.unravel_index(int(np.flatnonzero(stats.nan_count.ravel())[0]), stats.unit_shape)
        unit = ", ".join(f"{a}={i}" for a, i in zip(stats.unit_axes, first))
        raise DataError(f"{stats.name}: {total} NaN value(s), the first in unit ({unit})",
                        "Use --nan/nan= omit to leave them out, or propagate.")
    if nan_policy == "omit":
        warn(f"{stats.name}: {total} NaN value(s) in {units} unit(s) counted and left out")
    else:
        warn(f"{stats.name}: {total} NaN value(s) in {units} unit(s); their statistics are NaN")
