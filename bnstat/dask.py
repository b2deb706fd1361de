"""bnstat on Dask: ``--scheduler`` for files, and the moments of dask arrays.

Two ways in, one arithmetic (the kernels and the exact merges of bnstat.stats):

- ``compute_stats_distributed(address, sources, ...)``, behind ``--scheduler``:
  every named array is cut into tasks, slabs of whole chunks along axis 0 of
  about ``--chunk-size`` bytes (HDF5 slabs aligned to the dataset's chunk
  rows). A task is described by (path, array, rows): the worker opens the file
  itself (h5py objects do not pickle) and returns the slab's moments, a few
  arrays of the unit shape. The client merges the partials in a fixed
  pairwise tree over the task index, so the result depends only on the
  tasks, never on which worker ran which task or in what order they finished:
  it is bit-identical for any number of workers and across runs (at the same
  ``--chunk-size`` and ``--threads``). The task size therefore does not
  depend on the number of workers. A lost worker's tasks are run again by
  Dask (futures are recomputed); a task that fails on bad data fails the run
  with bnstat's message.
- ``bnstat running --scheduler``: the per-batch moments, tasks of whole batches
  (bnstat.dask_batches), run through ``run_tasks`` like the above.
- ``bnstat hist --scheduler``: each pass of the histogram (moments, range,
  counts, quantiles) a round of the same tasks on one ``session``
  (bnstat.dask_hist).
- ``local``/``local:N`` fork the worker processes from this one where that is
  safe (``start_method``), after loading what their tasks import.
- ``moments(x, ...)`` and ``hist(x, ...)`` for a ``dask.array.Array`` or an
  ``xarray.DataArray`` (bnstat.dask_array, bnstat.dask_array_hist).

dask and distributed are imported here only, inside the functions: the core
never imports them (the ``dask`` extra).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from bnstat.dask_array import hist, moments
from bnstat.errors import BnstatError, UsageProblem

__all__ = ["moments", "hist", "compute_stats_distributed", "connect", "run_tasks", "tree_merge"]

EXTRA = "Install the dask extra: pip install 'bnstat[dask]'"
CONNECT_TIMEOUT = 5  # seconds before an unreachable scheduler is an error


def _require(what: str):
    try:
        import dask  # noqa: F401
        if what == "distributed":
            import distributed  # noqa: F401
    except ImportError as exc:
        raise BnstatError(f"{what} is not installed: bnstat needs it for this", EXTRA) from exc


def tree_merge(parts: list, merge=None):
    """Merge ``parts`` pairwise, in index order, as a fixed tree: ``merge(a, b)`` (default
    ``a.merge(b)``), also a ``dask.delayed`` one that builds the tree as a graph."""
    while len(parts) > 1:
        parts = [(parts[i].merge(parts[i + 1]) if merge is None else merge(parts[i], parts[i + 1]))
                 if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


# ---- clusters ------------------------------------------------------------------

def parse_address(address: str) -> tuple[str, int | None]:
    """('local', workers or None) or ('remote', None). Raises UsageProblem."""
    if address == "local":
        return "local", None
    if address.startswith("local:"):
        text = address[len("local:"):]
        if not text.isdigit() or int(text) < 1:
            raise UsageProblem(f"--scheduler/scheduler={address!r}: local:N needs N >= 1 workers")
        return "local", int(text)
    if "://" in address:
        return "remote", None
    raise UsageProblem(f"--scheduler/scheduler={address!r}: give tcp://HOST:PORT, local or local:N")


@contextmanager
def connect(address: str, *, preload=None):
    """A distributed Client for ``address``, closed (and a local cluster stopped) on exit.

    A local cluster's worker processes are forked from this one where that is safe
    (``start_method``), after ``preload()`` (the imports and numba's target the
    workers will need: loaded once here instead of once per worker). Raises
    BnstatError when distributed is missing or the scheduler cannot be reached.
    """
    kind, workers = parse_address(address)
    _require("distributed")
    import dask
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if kind == "local":
            method = start_method()
            if method == "fork" and preload is not None:
                preload()
            with dask.config.set({"distributed.worker.multiprocessing-method": method}):
                cluster = LocalCluster(n_workers=workers or os.cpu_count() or 1,
                                       threads_per_worker=1, processes=True,
                                       dashboard_address=None,
                                       # a task's error is bnstat's message on the client
                                       silence_logs=logging.CRITICAL,
                                       scheduler_port=0)
            client = Client(cluster, timeout=CONNECT_TIMEOUT * 6)
        else:
            client = Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise BnstatError(f"--scheduler {address}: cannot reach the Dask scheduler ({exc})",
                          "Start one with: dask scheduler (and dask worker ADDRESS), or use local.") from exc
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def start_method() -> str:
    """How a local cluster starts its worker processes: "fork" (POSIX), unless numba's
    threads already run in this process (GNU OpenMP then aborts a forked child), else
    "spawn" (a fresh interpreter per worker).

    Forked workers inherit the parent's imports and numba's loaded target: measured on
    2 GB (bench/README.md, Dask), the cluster started in 0.25 s instead of 1.0-1.6 s,
    the kernels loaded in the workers in 0.17 s instead of 0.6-0.9 s, and it closed in
    0.06 s instead of 1.4 s.
    """
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    if "numba" in sys.modules:
        from numba.np.ufunc import parallel

        if getattr(parallel, "_is_initialized", True):  # unknown: the safe way
            return "spawn"
    return "fork"


def _preload(sources, *, hist: bool):
    """What the workers' tasks import, and numba's target, loaded in this process."""
    def load():
        import bnstat.kernels.moments  # noqa: F401
        from bnstat.kernels._jit import ready

        if hist:
            import bnstat.kernels.hist  # noqa: F401
        if any(s.kind == "hdf5" for s in sources):
            from bnstat.io.hdf5 import _h5py

            _h5py()
        ready()
    return load


# ---- tasks ----------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """One slab of one array: what a worker needs to open and read it."""

    index: int
    group: int  # index of the named array (ArrayGroup) it belongs to
    path: str  # absolute, for workers in another directory
    shown: str  # the path as the user gave it, for messages
    name: str
    rows: tuple[int, int] | None  # None: the whole array (not splittable)
    shape: tuple[int, ...]  # of the slab, as stored
    nbytes: int


def check_shared(sources) -> None:
    """Every source must be a file the workers can open. Raises UsageProblem (stdin)."""
    for src in sources:
        if not getattr(src, "repeatable", True):
            raise UsageProblem(f"{src.where}: standard input cannot be read by the workers of "
                               "--scheduler", "Save it to a file first (on the shared filesystem).")


def plan_tasks(groups, plans, chunk_size: int) -> list[Task]:
    """Tasks of every source of every group, in group, source and row order.
    Raises UsageProblem for standard input (``check_shared``)."""
    from bnstat.io.slabs import splittable
    from bnstat.stream import plan_rows

    check_shared([s for g in groups for s in g.sources])
    tasks: list[Task] = []
    for gi, (group, gplans) in enumerate(zip(groups, plans)):
        for src, plan in zip(group.sources, gplans):
            whole_groups = plan.groups is not None and plan.channel_axis == 0
            axis0_ok = plan.letters[0] == "N" or (plan.n_axis is None and 0 in plan.reduce)
            if splittable(src) and axis0_ok and not whole_groups:
                spans = [(s.start, s.stop) for s in plan_rows(src.shape[0], src.row_bytes, chunk_size,
                                                               multiple_of=src.row_align)]
            else:
                spans = [None]
            for span in spans:
                n = src.shape[0] if span is None else span[1] - span[0]
                shape = (n,) + tuple(src.shape[1:])
                tasks.append(Task(len(tasks), gi, os.path.abspath(src.path), src.path, src.key,
                                  span, shape, int(np.prod(shape)) * src.dtype.itemsize))
    return tasks


def run_task(task: Task, plan, *, higher: bool, threads: int, engine: str, check_crc: bool,
             chunk_size: int):
    """In a worker: the Moments of one task's slab. Raises BnstatError naming the file."""
    from bnstat.stream import set_threads, source_moments

    with task_errors(task):
        src = open_task(task, check_crc)
        if engine == "numba":
            set_threads(threads)
        return source_moments(src, plan, chunk_size=chunk_size, higher=higher, threads=threads,
                              engine=engine)


def open_task(task: Task, check_crc: bool):
    """In a worker: the source of one task (its slab in memory, or the whole array)."""
    from bnstat.io import MemorySource, open_path
    from bnstat.io.slabs import exact_pattern, read_rows, select

    src = select(open_path(task.path, [exact_pattern(task.name)], check_crc=check_crc), task.name)
    return src if task.rows is None else MemorySource(read_rows(src, *task.rows), task.name)


@contextmanager
def task_errors(task: Task):
    """A task's BnstatError names the file as the user gave it."""
    try:
        yield
    except BnstatError as exc:
        if task.path != task.shown:
            exc.message = exc.message.replace(task.path, task.shown)
            exc.args = (exc.message,)
        raise


def _warm(dtypes: list[str], moments: bool = True, hist: bool = False) -> bool:
    """In a worker: load (or compile) the kernels for ``dtypes`` once."""
    from bnstat.layout import make_plan
    from bnstat.stream import chunk_moments

    for dt in dtypes:
        x = np.zeros((2, 2, 2), dtype=dt)
        if moments:
            chunk_moments(x, make_plan(x.shape, layout="NCL"), threads=1, engine="numba")
        if hist:
            from bnstat.histrun import warm_kernels

            warm_kernels(np.dtype(dt))
    return True


def compute_stats_distributed(address: str, sources, *, layout=None, channel_axis=None,
                              norm="batch", groups=None, reduce=None, ddof=0, higher=False,
                              nan_policy="omit", chunk_size=None, threads=None, per_file=False,
                              progress=None, engine=None, check_crc=True) -> dict:
    """``bnstat.stream.compute_stats`` run on a Dask cluster (see the module docstring).

    ``threads``: kernel threads per task (default 1; the workers are the parallelism).
    Raises BnstatError (a task's own error, or the scheduler's).
    """
    from bnstat.stream import DEFAULT_CHUNK_SIZE, pick_engine, plan_groups

    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    array_groups, plans = plan_groups(sources, layout=layout, channel_axis=channel_axis, norm=norm,
                                      groups=groups, reduce=reduce, per_file=per_file)
    engine = pick_engine(sum(s.nbytes for s in sources), engine)
    threads = max(1, threads or 1)
    tasks = plan_tasks(array_groups, plans, chunk_size)
    source_plan = source_plans(array_groups, plans)
    kwargs = dict(higher=higher, threads=threads, engine=engine, check_crc=check_crc,
                  chunk_size=chunk_size)
    results = run_tasks(address, tasks, run_task, lambda t: (source_plan[(t.group, t.shown, t.name)],),
                        kwargs, sources=sources, warm=engine == "numba", progress=progress)
    return group_stats(array_groups, plans, tasks, results, ddof=ddof, nan_policy=nan_policy)


def source_plans(array_groups, plans) -> dict:
    """The plan of every source, by (group index, path as given, array name in the file)."""
    return {(g, s.path, s.key): p for g, (grp, ps) in enumerate(zip(array_groups, plans))
            for s, p in zip(grp.sources, ps)}


def group_stats(array_groups, plans, tasks: list[Task], moments: dict, *, ddof: int,
                nan_policy: str) -> dict:
    """``{name: Stats}`` of every group: the Moments of its tasks (by task index) merged in
    the fixed tree over the task index, then the checks of ``finish_group`` (--nan)."""
    from bnstat.stats import Stats
    from bnstat.stream import finish_group

    source_plan = source_plans(array_groups, plans)
    out = {}
    for gi, group in enumerate(array_groups):
        parts = []
        for t in tasks:
            if t.group != gi:
                continue
            plan = source_plan[(gi, t.shown, t.name)]
            parts.append(Stats(name=group.name, moments=moments[t.index], shape=t.shape,
                               dtype=np.dtype(group.sources[0].dtype).name, layout=plan.letters,
                               reduce=plan.reduce_letters, unit_axes=plan.unit_axes, ddof=ddof,
                               sources=[t.shown], norm=plan.norm, groups=plan.groups,
                               assumed_layout=plan.assumed, nan_policy=nan_policy))
        out[group.name] = finish_group(tree_merge(parts), nan_policy)
    return out


def run_tasks(cluster, tasks: list[Task], fn, args, kwargs: dict, *, sources=(), warm=False,
              progress=None) -> dict:
    """``fn(task, *args(task), **kwargs)`` of every task, results by task index. Raises the
    first failed task's error.

    ``cluster``: an address, connected for this call (the workers warmed first for the
    dtypes of ``sources`` when ``warm``), or a Client of ``session`` (a command of several
    passes, each a call on the same cluster).
    """
    if isinstance(cluster, str):
        with session(cluster, sources=sources, warm=warm) as client:
            return run_tasks(client, tasks, fn, args, kwargs, progress=progress)
    client = cluster
    tag = uuid.uuid4().hex[:12]  # a pass's keys are its own: a later pass's tasks are new work
    futures = [client.submit(fn, t, *args(t), pure=False, key=f"bnstat-{tag}-{t.index}", **kwargs)
               for t in tasks]
    return _gather(client, futures, tasks, progress)


@contextmanager
def session(address: str, *, sources=(), warm: bool = False, hist: bool = False):
    """``connect(address)``, the workers warmed (kernels loaded) for the dtypes of ``sources``
    when ``warm`` (and the histogram kernels too when ``hist``)."""
    preload = _preload(sources, hist=hist) if warm or hist else None
    check = _CrcCheck(sources)
    with connect(address, preload=preload) as client:
        if warm or hist:
            client.run(_warm, sorted({np.dtype(s.dtype).newbyteorder("=").str for s in sources}),
                       moments=warm, hist=hist)
        yield client
    check.result()


class _CrcCheck:
    """The CRC-32 of every stored .npz member among ``sources``, checked by the client in a
    thread while the cluster computes: the workers read slabs of a member, and a CRC covers
    the whole member. ``result()`` raises the InputError of a damaged one (before any output
    is written)."""

    def __init__(self, sources):
        import threading

        self.members = [s for s in sources if getattr(s, "crc", None) is not None
                        and hasattr(s, "verify_crc")]
        self.error = None
        self.thread = None
        if self.members:
            self.thread = threading.Thread(target=self._run, name="bnstat-crc-check", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            for src in self.members:
                src.verify_crc()
        except BaseException as exc:
            self.error = exc

    def result(self) -> None:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error


def _gather(client, futures, tasks, progress) -> dict:
    """Results by task index; the first failed task's error is raised, the rest cancelled."""
    from distributed import as_completed

    results = {}
    by_key = {f.key: t for f, t in zip(futures, tasks)}
    try:
        for fut in as_completed(futures):
            task = by_key[fut.key]
            results[task.index] = fut.result()  # re-raises the task's exception
            if progress is not None:
                progress(task.nbytes)
    except BaseException:
        client.cancel(futures)
        raise
    return results
