"""Reports of ``running``, ``recalibrate`` and ``diff``: rich tables, JSON, CSV, .npz.

Tables go through bnstat.render (emit_rich, fmt_num); JSON floats round-trip
and NaN is written as NaN, as for ``moments`` (SPEC 4).
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from bnstat._version import __version__
from bnstat.render import emit_rich, fmt_num

SMALL_TABLE = 32
DEFAULT_TOP = 20


def _floats(a) -> list:
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def _dump(doc: dict) -> str:
    return json.dumps(doc) + "\n"


def _rows(n: int, key: np.ndarray | None, top: int | None, show_all: bool) -> tuple[np.ndarray, int]:
    """Row order: by ``key`` descending (NaN first: a NaN is news), all or the first ``top``."""
    if key is None:
        order = np.arange(n)
    else:
        k = np.asarray(key, np.float64).ravel()
        order = np.argsort(-np.where(np.isnan(k), np.inf, k), kind="stable")
    if show_all or (top is None and n <= SMALL_TABLE):
        return order, 0
    limit = top or DEFAULT_TOP
    return order[:limit], n - min(n, limit)


def _worst(values: np.ndarray, label: str) -> str:
    """``label VALUE (unit I)`` of the largest |value| (a NaN first: it is news)."""
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        return f"{label} -"
    nan = np.flatnonzero(np.isnan(v))
    i = int(nan[0]) if nan.size else int(np.argmax(np.abs(v)))
    return f"{label} {fmt_num(float(v[i]))} (unit {i})"


def write_report(fmt: str, output: str | None, *, force=False, inputs=(), to_json=None,
                 to_csv=None, to_npz=None, to_table=None) -> None:
    """Write a report in ``fmt`` to ``output`` (None or '-': stdout), atomically."""
    import sys

    from bnstat.io.atomic import atomic_open

    target = output or "-"
    if fmt == "npz":
        if to_npz is None:
            raise ValueError("no .npz form of this report")
        buf = io.BytesIO()
        to_npz(buf)
        with atomic_open(target, "wb", force=force, inputs=inputs) as fh:
            fh.write(buf.getvalue())
        if target == "-":
            sys.stdout.buffer.flush()
        return
    with atomic_open(target, "w", force=force, inputs=inputs) as fh:
        if fmt == "json":
            fh.write(to_json())
        elif fmt == "csv":
            to_csv(fh)
        else:
            to_table(fh)


# ---- running --------------------------------------------------------------------

def running_record(r) -> dict:
    s = r.stats
    return {"name": r.name, "framework": r.framework, "momentum": r.momentum,
            "cumulative": r.momentum is None, "batch_size": r.batch_size, "batches": r.batches,
            "epochs": r.epochs, "drop_last": r.drop_last, "num_batches_tracked": r.num_batches_tracked,
            "initial": r.initial, "sources": s.sources, "shape": list(s.shape), "dtype": s.dtype,
            "layout": s.layout, "unit_shape": list(s.unit_shape),
            "count": [int(c) for c in s.count.ravel()],
            "running_mean": _floats(r.running_mean), "running_var": _floats(r.running_var),
            "mean": _floats(r.mean), "var": _floats(r.var), "std": _floats(np.sqrt(r.var)),
            "mean_gap": _floats(r.mean_gap), "var_ratio": _floats(r.var_ratio)}


RUNNING_CSV = ["name", "unit", "count", "running_mean", "running_var", "mean", "var", "mean_gap",
               "var_ratio"]


def running_json(results: dict) -> str:
    return _dump({"bnstat": __version__, "arrays": [running_record(r) for r in results.values()]})


def running_csv(results: dict, fh) -> None:
    w = csv.writer(fh, lineterminator="\n")
    w.writerow(RUNNING_CSV)
    for r in results.values():
        cols = [r.stats.count.ravel(), r.running_mean, r.running_var, r.mean, r.var, r.mean_gap, r.var_ratio]
        for i in range(r.running_mean.size):
            w.writerow([r.name, i, int(cols[0][i])] + [repr(float(c[i])) for c in cols[1:]])


def running_npz(results: dict, fh) -> None:
    """A stats file of the population statistics (``bnstat show`` reads it) plus
    ``NAME/running_mean``, ``NAME/running_var``, ``NAME/mean_gap``, ``NAME/var_ratio`` and
    the run's settings under ``"running"`` in each array's metadata."""
    extra = {}
    for r in results.values():
        rec = running_record(r)
        extra[r.name] = ({k: np.asarray(rec[k]) for k in ("running_mean", "running_var", "mean_gap",
                                                           "var_ratio")},
                         {k: rec[k] for k in ("framework", "momentum", "cumulative", "batch_size",
                                              "batches", "epochs", "drop_last", "num_batches_tracked",
                                              "initial")})
    save_with_extra({r.name: r.stats for r in results.values()}, extra, "running", fh)


def save_with_extra(stats: dict, extra: dict, key: str, fh) -> None:
    """A stats file (bnstat.stats.save_stats) with more arrays per name and metadata under ``key``."""
    from bnstat.stats import STATS_KEY, save_stats

    buf = io.BytesIO()
    save_stats(stats, buf)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays[STATS_KEY][()]))
    for m in meta["arrays"]:
        more, info = extra[m["name"]]
        m[key] = info
        for k, v in more.items():
            arrays[f"{m['name']}/{k}"] = v
    arrays[STATS_KEY] = np.array(json.dumps(meta))
    np.savez(fh, **arrays)


def running_tables(results: dict, *, file=None, top=None, show_all=False) -> None:
    from rich.table import Table

    def draw(console):
        for n, r in enumerate(results.values()):
            if n:
                console.print()
            mom = "cumulative (momentum=None)" if r.momentum is None else f"momentum {r.momentum:g}"
            console.print(f"[bold]{r.name}[/bold]  {tuple(r.stats.shape)} {r.stats.dtype} · layout "
                          f"{r.stats.layout} · {r.framework} {mom} · batches of {r.batch_size}: "
                          f"{r.batches} per epoch x {r.epochs} epoch(s)"
                          f"{' (last dropped)' if r.drop_last else ''} · start {r.initial}")
            gap, ratio = r.mean_gap, r.var_ratio
            rows, hidden = _rows(gap.size, np.abs(gap) if gap.size > SMALL_TABLE else None, top, show_all)
            caption = " · ".join([_worst(gap, "largest mean gap (in population std)"),
                                  _worst(np.log(ratio), "largest |log var ratio|")])
            caption += f" · num_batches_tracked {r.num_batches_tracked}"
            if hidden:
                caption += f"\n{hidden:,} more channels not shown (--all shows every one; --top N)"
            t = Table(caption=caption, caption_justify="left", show_edge=False, pad_edge=False)
            for head in ("c", "running_mean", "mean", "mean gap", "running_var", "var", "var ratio"):
                t.add_column(head, justify="right", style="cyan" if head == "c" else None)
            for i in rows:
                t.add_row(str(int(i)), *(fmt_num(float(v[i])) for v in
                                         (r.running_mean, r.mean, gap, r.running_var, r.var, ratio)))
            console.print(t)

    emit_rich(draw, file=file)
