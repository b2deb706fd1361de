"""Reports of ``running``, ``recalibrate`` and ``diff``: rich tables, JSON, CSV, .npz.

Tables go through bnstat.render (emit_rich, fmt_num); JSON floats round-trip, and
non-finite values are written as null, as for ``moments`` (README "Output formats").
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from bnstat._version import __version__
from bnstat.render import emit_rich
from bnstat.render.records import dumps
from bnstat.render.fit import Column, draw_table, fmt_num
from bnstat.render.tables import not_shown

SMALL_TABLE = 32
DEFAULT_TOP = 20


def _floats(a) -> list:
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def _dump(doc: dict) -> str:
    return dumps(doc)


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
    from rich.markup import escape

    def draw(console):
        for n, r in enumerate(results.values()):
            if n:
                console.print()
            mom = "cumulative (momentum=None)" if r.momentum is None else f"momentum {r.momentum:g}"
            console.print(f"[bold]{escape(r.name)}[/bold]  {tuple(r.stats.shape)} {r.stats.dtype} · layout "
                          f"{r.stats.layout} · {r.framework} {mom} · batches of {r.batch_size}: "
                          f"{r.batches} per epoch x {r.epochs} epoch(s)"
                          f"{' (last dropped)' if r.drop_last else ''} · start {r.initial}")
            gap, ratio = r.mean_gap, r.var_ratio
            rows, hidden = _rows(gap.size, np.abs(gap) if gap.size > SMALL_TABLE else None, top, show_all)
            caption = " · ".join([_worst(gap, "largest mean gap (in population std)"),
                                  _worst(np.log(ratio), "largest |log var ratio|")])
            caption += f" · num_batches_tracked {r.num_batches_tracked}"
            if hidden:
                caption += f"\n{not_shown(hidden, 'channel')} (--all shows every one; --top N)"
            columns = [Column("c", [str(int(i)) for i in rows], kind="text", key=True, style="cyan")]
            columns += [Column(head, np.asarray(v).ravel()[rows]) for head, v in
                        (("running_mean", r.running_mean), ("mean", r.mean), ("mean gap", gap),
                         ("running_var", r.running_var), ("var", r.var), ("var ratio", ratio))]
            draw_table(console, columns, caption)

    emit_rich(draw, file=file)


# ---- recalibrate ------------------------------------------------------------------

def recal_record(result) -> dict:
    layers = []
    for c in result.changes:
        rec = {"bn": c.layer.name, "convention": c.layer.convention, "source": c.source,
               "changed": c.source is not None, "channels": int(c.old_mean.size),
               "old_mean": _floats(c.old_mean), "old_var": _floats(c.old_var)}
        if c.source is not None:
            rec.update(count=c.count, batches=c.batches, new_mean=_floats(c.new_mean),
                       new_var=_floats(c.new_var), mean_shift=_floats(c.mean_shift),
                       var_ratio=_floats(c.var_ratio))
        layers.append(rec)
    return {"bnstat": __version__, "model": result.model, "output": result.output,
            "estimator": result.estimator, "layers": layers}


def recal_json(result) -> str:
    return _dump(recal_record(result))


def recal_table(result, *, file=None) -> None:
    what = ("population statistics" if result.estimator == "population"
            else "batch-mean (torch.optim.swa_utils.update_bn)")
    title = (f"{result.model}: {len(result.changed)} BatchNorm layer(s) recalibrated with the "
             f"{what}, {len(result.kept)} kept")
    note = ("running_var in each model's convention (PyTorch m2/(count-1), Keras m2/count); "
            "num_batches_tracked left as is"
            + (f"; written to {result.output}" if result.output else "; nothing written"))
    rows = [_recal_row(c) for c in result.changes]
    heads = ("bn", "convention", "activations", "channels", "values/channel",
             "largest mean change: old -> new", "largest var change: old -> new")
    columns = [Column(h, [r[k] for r in rows], kind="text", key=h == "bn", wrap=k >= 5,
                      justify="right" if h in ("channels", "values/channel") else "left")
               for k, h in enumerate(heads)]

    def draw(console):
        console.print(title, soft_wrap=True)
        draw_table(console, columns)
        console.print(note, soft_wrap=True)

    emit_rich(draw, file=file)


def _recal_row(c) -> list[str]:
    """One BN of the recalibrate table: the largest mean shift and variance ratio with the
    channel where each is."""
    if c.source is None:
        return [c.layer.name, c.layer.convention, "none: kept", str(c.old_mean.size), "-", "-", "-"]
    shift, ratio = c.mean_shift, c.var_ratio
    with np.errstate(invalid="ignore", divide="ignore"):
        lr = np.abs(np.log(ratio))
    i = int(np.nanargmax(np.abs(shift))) if not np.isnan(shift).all() else 0
    j = int(np.nanargmax(lr)) if not np.isnan(lr).all() else 0
    return [c.layer.name, c.layer.convention, c.source, str(c.old_mean.size), fmt_num(c.count),
            f"c {i}: {fmt_num(float(c.old_mean[i]))} -> {fmt_num(float(c.new_mean[i]))} "
            f"({fmt_num(float(shift[i]))} old std)",
            f"c {j}: {fmt_num(float(c.old_var[j]))} -> {fmt_num(float(c.new_var[j]))} "
            f"(x {fmt_num(float(ratio[j]))})"]


# ---- diff -------------------------------------------------------------------------

DIFF_CSV = ["name", "unit", "mean_a", "std_a", "mean_b", "std_b", "shift", "log_var_ratio", "kl", "changed"]
_LABEL = {"shift": "shift", "logvar": "log_var_ratio", "kl": "kl", "changed": "changed"}


def _worst_units(values: np.ndarray, k: int = 3) -> list[dict]:
    v = np.abs(np.asarray(values, np.float64).ravel())
    order = np.argsort(-np.where(np.isnan(v), -np.inf, v), kind="stable")[:k]
    return [{"unit": int(i), "value": float(np.asarray(values).ravel()[i])} for i in order]


def diff_record(d) -> dict:
    m = d.metrics()
    return {"name": d.name, "name_a": d.name_a, "name_b": d.name_b, "unit_shape": list(d.unit_shape),
            "mean_a": _floats(d.mean_a), "std_a": _floats(np.sqrt(d.var_a)),
            "mean_b": _floats(d.mean_b), "std_b": _floats(np.sqrt(d.var_b)),
            "shift": _floats(m["shift"]), "log_var_ratio": _floats(m["logvar"]), "kl": _floats(m["kl"]),
            "changed": d.changes(),
            "worst": {_LABEL[k]: _worst_units(m[k]) for k in ("shift", "logvar", "kl")}}


def diff_json(result) -> str:
    return _dump({"bnstat": __version__,
                  "a": {"path": result.a.path, "kind": result.a.kind},
                  "b": {"path": result.b.path, "kind": result.b.kind},
                  "arrays": [diff_record(d) for d in result.arrays],
                  "unmatched_a": result.unmatched_a, "unmatched_b": result.unmatched_b,
                  "fail_over": result.fail_over,
                  "exceeded": [{"name": n, "metric": m, "threshold": t, "units": u, "worst": w}
                               for n, m, t, u, w in result.exceeded()]})


def diff_csv(result, fh) -> None:
    w = csv.writer(fh, lineterminator="\n")
    w.writerow(DIFF_CSV)
    for d in result.arrays:
        m = d.metrics()
        cols = [d.mean_a, np.sqrt(d.var_a), d.mean_b, np.sqrt(d.var_b), m["shift"], m["logvar"], m["kl"]]
        changes = d.changes()
        for i in range(d.mean_a.size):
            w.writerow([d.name, i] + [repr(float(c[i])) for c in cols] + [changes[i]])


def diff_summary(d) -> str:
    m = d.metrics()
    parts = [f"{d.mean_a.size:,} units"]
    for key, label in (("shift", "worst shift"), ("logvar", "worst log var ratio"), ("kl", "worst KL")):
        parts.append(f"{label} " + ", ".join(f"{fmt_num(w['value'])} (unit {w['unit']})"
                                             for w in _worst_units(m[key], 3)))
    n = int((m["changed"] > 0).sum())
    parts.append(f"flags changed in {n} unit(s)" if n else "no flag changed")
    return " · ".join(parts)


def diff_tables(result, *, file=None, sort="unit", top=None, show_all=False) -> None:
    from rich.markup import escape

    def draw(console):
        console.print(f"A: {result.a.path} ({result.a.kind}) · B: {result.b.path} ({result.b.kind})")
        for label, names in (("only in A", result.unmatched_a), ("only in B", result.unmatched_b)):
            if names:
                console.print(f"{label}: {', '.join(names)}")
        same = [d.name for d in result.arrays if d.identical()]
        if same and not show_all:
            console.print(f"identical in A and B: {', '.join(same)}")
        for d in result.arrays:
            if d.name in same and not show_all:
                continue
            console.print()
            m = d.metrics()
            key = None if sort == "unit" else np.abs(m[sort])
            rows, hidden = _rows(d.mean_a.size, key, top, show_all)
            caption = diff_summary(d)
            if hidden:
                caption += f"\n{not_shown(hidden)} (--all shows every one; --sort, --top N)"
            console.print(f"[bold]{escape(d.name)}[/bold]")
            changes = d.changes()
            columns = [Column("unit", [str(int(i)) for i in rows], kind="text", key=True, style="cyan")]
            columns += [Column(head, np.asarray(v).ravel()[rows]) for head, v in
                        (("mean A", d.mean_a), ("mean B", d.mean_b), ("std A", np.sqrt(d.var_a)),
                         ("std B", np.sqrt(d.var_b)), ("shift", m["shift"]),
                         ("log var ratio", m["logvar"]), ("KL", m["kl"]))]
            columns.append(Column("changed", [changes[i] for i in rows], kind="text", justify="left"))
            draw_table(console, columns, escape(caption))
        for n, metric, limit, units, worst in result.exceeded():
            console.print(f"{n}: {units} unit(s) over --fail-over {metric}={limit:g} (worst {fmt_num(worst)})")

    emit_rich(draw, file=file)
