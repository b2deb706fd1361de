"""Reports of histograms: the compact per-unit table (quantiles and a sparkline), JSON, CSV."""

from __future__ import annotations

import csv

import numpy as np

from bnstat._version import __version__
from bnstat.histogram import Histogram, fmt_range
from bnstat.render.records import _floats, _ints, coordinate_heads, coordinates, dumps, stats_record
from bnstat.render.fit import Column
from bnstat.render.tables import flags, not_shown, select_rows, unit_column

BLOCKS = " ▁▂▃▄▅▆▇█"
SPARK_WIDTH = 32


def sparkline(counts: np.ndarray, width: int = SPARK_WIDTH) -> str:
    """The counts summed into ``width`` cells, each a block of height count / max
    (a space for an empty cell, the lowest block for any non-empty one)."""
    counts = np.asarray(counts, dtype=np.int64)
    width = min(width, counts.size)
    cells = np.add.reduceat(counts, np.linspace(0, counts.size, width, endpoint=False).astype(int))
    top = cells.max(initial=0)
    if top == 0:
        return " " * width
    level = np.where(cells > 0, 1 + (cells * (len(BLOCKS) - 2)) // top, 0)
    return "".join(BLOCKS[i] for i in level)


def hist_flags(h: Histogram) -> np.ndarray:
    """The moments' flags plus ``dead`` (every value zero)."""
    f = flags(h.stats)
    dead = h.dead.ravel()
    return np.array([",".join([x for x in (f[i], "dead" if dead[i] else "") if x]) for i in range(f.size)],
                    dtype=object)


def hist_record(h: Histogram) -> dict:
    rec = stats_record(h.stats)
    n = int(np.prod(h.unit_shape))
    rec.update(bins=h.bins, range=list(h.range) if isinstance(h.range, tuple) else h.range,
               per_tensor=h.per_tensor,
               edges=[_floats(e) for e in h.edges.reshape(n, -1)],
               counts=[_ints(c) for c in h.counts.reshape(n, -1)],
               underflow=_ints(h.underflow), overflow=_ints(h.overflow),
               zero_count=_ints(h.zero_count), zero_fraction=_floats(h.zero_fraction))
    if h.quantile_values is not None:
        rec["quantiles"] = {"q": list(h.quantile_q),
                            "values": [_floats(v) for v in h.quantile_values.reshape(n, -1)]}
    if h.amax_values:
        rec["amax"] = {m: _floats(v) for m, v in h.amax_values.items()}
        rec["num_bits"] = h.num_bits
        rec["unsigned"] = h.unsigned
    return rec


def to_json(hists: dict[str, Histogram]) -> str:
    return dumps({"bnstat": __version__, "arrays": [hist_record(h) for h in hists.values()]})


def write_csv(hists: dict[str, Histogram], fh) -> None:
    """One row per unit: the moments, zero fraction, under/overflow, quantiles, amax (no counts),
    then the unit's coordinates as in ``records.write_csv``."""
    writer = csv.writer(fh, lineterminator="\n")
    first = next(iter(hists.values()))
    qcols = [f"q{q!r}" for q in first.quantile_q]
    acols = [f"amax_{m}" for m in first.amax_values]
    heads = coordinate_heads(h.stats for h in hists.values())
    writer.writerow(["name", "unit", "count", "mean", "std", "min", "max", "nan_count", "inf_count",
                     "zero_fraction", "underflow", "overflow"] + qcols + acols + heads)
    for h in hists.values():
        cols = {k: np.asarray(v).ravel() for k, v in h.stats.columns().items()}
        zf = h.zero_fraction.ravel()
        qv = None if h.quantile_values is None else h.quantile_values.reshape(zf.size, -1)
        for i, at in enumerate(coordinates(h.stats, heads)):
            row = [h.name, i, int(cols["count"][i])]
            row += [repr(float(cols[k][i])) for k in ("mean", "std", "min", "max")]
            row += [int(cols["nan_count"][i]), int(cols["inf_count"][i]), repr(float(zf[i])),
                    int(h.underflow.ravel()[i]), int(h.overflow.ravel()[i])]
            row += [repr(float(v)) for v in (qv[i] if qv is not None and len(qcols) == qv.shape[1] else [])]
            row += [repr(float(h.amax_values[m].ravel()[i])) for m in first.amax_values if m in h.amax_values]
            writer.writerow(row + at)


def _summary_q(h: Histogram) -> list[float]:
    return list(h.quantile_q) if h.quantile_values is not None else []


def _percent(v, digits) -> str:
    return f"{100 * v:.{min(digits, 3)}g}" if np.isfinite(v) else "-"


def hist_table(h: Histogram, sort="unit", top=None, show_all=False):
    """``(title, columns, caption)`` of the histogram table of one array."""
    from rich.markup import escape

    s = h.stats
    f = hist_flags(h)
    rows, hidden = select_rows(s, f, sort, top, show_all)
    title = (f"[bold]{escape(s.name)}[/bold]  {tuple(s.shape)} {s.dtype} · layout {s.layout} · reduce {s.reduce} · "
             f"{h.bins} bins, range {fmt_range(h.range)}" + (" · per tensor" if h.per_tensor else ""))
    dead = int(h.dead.sum())
    caption = (f"{int(np.prod(h.unit_shape)):,} units · {dead} dead (all zero) · "
               f"{int((np.asarray(s.inf_count) > 0).sum())} with inf · {int((np.asarray(s.nan_count) > 0).sum())} with NaN")
    if hidden:
        caption += f"\n{not_shown(hidden)} (--all shows every unit; --sort/--top choose)"
    cols = {k: np.asarray(v).ravel() for k, v in s.columns().items()}
    counts = h.counts.reshape(-1, h.bins)
    columns = [unit_column(s, rows), Column("count", cols["count"][rows], kind="int")]
    columns += [Column(k, cols[k][rows]) for k in ("min", "max")]
    if h.quantile_values is not None:
        qv = h.quantile_values.reshape(counts.shape[0], -1)
        columns += [Column(f"q{q:g}", qv[rows, k]) for k, q in enumerate(_summary_q(h))]
    columns += [Column(f"amax {m}", v.ravel()[rows]) for m, v in h.amax_values.items()]
    columns.append(Column("zero %", h.zero_fraction.ravel()[rows], fmt=_percent))
    columns.append(Column(f"counts ({fmt_range(h.range)})", [sparkline(counts[i]) for i in rows],
                          kind="text", justify="left"))
    columns.append(Column("flags", list(f[rows]), kind="text", style="yellow", justify="left"))
    return title, columns, caption


def print_tables(hists: dict[str, Histogram], *, file=None, sort="unit", top=None, show_all=False,
                 summary=False) -> None:
    from bnstat.render.tables import print_tables as print_each

    print_each(hists, file=file, sort=sort, top=top, show_all=show_all, summary=summary,
               table_of=hist_table, flags_of=lambda h: (h.stats, hist_flags(h)))


def emit(hists: dict[str, Histogram], fmt: str, output: str | None, *, force=False, inputs=(),
         sort="unit", top=None, show_all=False, summary=False) -> None:
    """Render ``hists`` in ``fmt`` (table, json, csv, npz) to ``output`` (None/'-': stdout), atomically."""
    import io
    import sys

    from bnstat.histogram import save_hist
    from bnstat.io.atomic import atomic_open

    target = output or "-"
    if fmt == "npz":
        if target == "-":
            buf = io.BytesIO()
            save_hist(hists, buf)
            sys.stdout.buffer.write(buf.getvalue())
            sys.stdout.buffer.flush()
            return
        with atomic_open(target, "wb", force=force, inputs=inputs) as fh:
            save_hist(hists, fh)
        return
    with atomic_open(target, "w", force=force, inputs=inputs) as fh:
        if fmt == "json":
            fh.write(to_json(hists))
        elif fmt == "csv":
            write_csv(hists, fh)
        else:
            print_tables(hists, file=fh, sort=sort, top=top, show_all=show_all, summary=summary)
