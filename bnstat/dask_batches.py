"""``bnstat running --scheduler``: the per-batch moments of the data, on a Dask cluster.

Batches are runs of B samples along N in file order and may span two files
(README.md, "bnstat running"). The tasks of one array (``plan_batch_tasks``)
are slabs of whole batches of each file: a file whose first rows complete a
batch begun in the previous file starts with a task of those rows alone, the
rest is cut by ``bnstat.stream.plan_rows(..., multiple_of=B)``, so that only a
file's last task may end in a short batch. Each worker returns the
per-batch moments of its slab (``bnstat.batches.batch_moments`` on the slab
read by ``bnstat.io.slabs.read_rows``); the client joins them in task order
with the local collector (``add_batches``): the short batch at the end of a
file is merged with the first rows of the next exactly as in a local run,
and the replay of the framework's updates is the local code. The result
depends only on the tasks (``--chunk-size``, ``--batch-size``), never on the
number of workers.

dask and distributed are imported by ``bnstat.dask`` only, inside functions.
"""

from __future__ import annotations

import os

import numpy as np

from bnstat.dask import Task, check_shared, open_task, run_tasks, task_errors


def plan_batch_tasks(groups, batch_size: int, chunk_size: int) -> tuple[list[Task], list[int]]:
    """The tasks of every file of every group in order, and each task's ``start``: the rows
    of its first batch that belong to the files before (0 but for a file's first task)."""
    from bnstat.io.slabs import splittable
    from bnstat.stream import plan_rows

    check_shared([s for g in groups for s in g.sources])
    tasks: list[Task] = []
    starts: list[int] = []
    for gi, group in enumerate(groups):
        offset = 0  # rows of the group's files before this one
        for src in group.sources:
            n = src.shape[0]
            head = min((batch_size - offset % batch_size) % batch_size, n)
            if splittable(src):
                spans = [(0, head)] if head else []
                spans += [(head + s.start, head + s.stop)
                          for s in plan_rows(n - head, src.row_bytes, chunk_size,
                                             multiple_of=batch_size)] if n > head else []
            else:
                spans = [None]
            for span in spans:
                rows = n if span is None else span[1] - span[0]
                shape = (rows,) + tuple(src.shape[1:])
                tasks.append(Task(len(tasks), gi, os.path.abspath(src.path), src.path, src.key,
                                  span, shape, int(np.prod(shape)) * src.dtype.itemsize))
                first = offset + (0 if span is None else span[0])
                starts.append(first % batch_size)
            offset += n
    return tasks, starts


def run_batch_task(task: Task, plan, start: int, *, batch_size: int, threads: int, engine: str,
                   check_crc: bool, chunk_size: int):
    """In a worker: the BatchMoments of one task's slab. Raises BnstatError naming the file."""
    from bnstat.batches import batch_moments
    from bnstat.stream import set_threads

    with task_errors(task):
        src = open_task(task, check_crc)
        if engine == "numba":
            set_threads(threads)
        return batch_moments([src], plan, batch_size, chunk_size=chunk_size, threads=threads,
                             engine=engine, start=start)


def batch_moments_distributed(address: str, groups, plans, batch_size: int, *, chunk_size: int,
                              threads=None, engine: str, progress=None, check_crc=True) -> list:
    """The BatchMoments of every group (as ``bnstat.batches.batch_moments`` per group), its
    tasks run on the Dask cluster at ``address``. ``threads``: kernel threads per task
    (default 1). Raises BnstatError (a task's own error, or the scheduler's)."""
    from bnstat.batches import check_c_order, collector

    sources = [s for g in groups for s in g.sources]
    for src in sources:
        check_c_order(src)
    threads = max(1, threads or 1)
    tasks, starts = plan_batch_tasks(groups, batch_size, chunk_size)
    kwargs = dict(batch_size=batch_size, threads=threads, engine=engine, check_crc=check_crc,
                  chunk_size=chunk_size)
    results = run_tasks(address, tasks, run_batch_task,
                        lambda t: (plans[t.group], starts[t.index]), kwargs,
                        sources=sources, warm=engine == "numba", progress=progress)
    out = []
    for gi, plan in enumerate(plans):
        join = collector(plan, batch_size)
        for t in tasks:
            if t.group == gi:
                join.add_batches(results[t.index])
        out.append(join.finish())
    return out
