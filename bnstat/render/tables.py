"""Rich tables: the statistics of each array, the arrays of files, plain lines."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

from bnstat.render.console import emit_rich
from bnstat.render.fit import Column, draw_table, fmt_num
from bnstat.stats import Stats

SMALL_TABLE = 32  # arrays with at most this many units show every unit
DEFAULT_TOP = 20
DESCENDING = {"mean", "var", "std", "max", "nan", "absmean"}


def not_shown(hidden: int, noun: str = "unit") -> str:
    """"1 more unit not shown", "2 more units not shown": the note under a cut table."""
    return f"{hidden:,} more {noun}{'' if hidden == 1 else 's'} not shown"


def unit_label(s: Stats, flat: int) -> str:
    idx = np.unravel_index(flat, s.unit_shape)
    if len(idx) == 1:
        return str(int(idx[0]))
    return " ".join(f"{a.lower()}{int(i)}" for a, i in zip(s.unit_axes, idx))


def flags(s: Stats) -> np.ndarray:
    """Per-unit flags: const (zero variance), nan, inf, empty, mean (a mean far from the others)."""
    mean = np.asarray(s.mean, dtype=float).ravel()
    var = np.asarray(s.moments.m2, dtype=float).ravel()
    count = np.asarray(s.count).ravel()
    nan = np.asarray(s.nan_count).ravel()
    inf = np.asarray(s.inf_count).ravel()
    out = np.full(mean.shape, "", dtype=object)
    finite = np.isfinite(mean)
    extreme = np.zeros(mean.shape, bool)
    if finite.sum() >= 8:
        med = np.median(mean[finite])
        mad = np.median(np.abs(mean[finite] - med)) * 1.4826
        if mad > 0:
            extreme = finite & (np.abs(mean - med) > 6 * mad)
    for i in range(mean.size):
        f = []
        if count[i] == 0:
            f.append("empty")
        elif var[i] == 0 and count[i] > 1:
            f.append("const")
        if nan[i]:
            f.append("nan")
        if inf[i]:
            f.append("inf")
        if extreme[i]:
            f.append("mean")
        out[i] = ",".join(f)
    return out


def select_rows(s: Stats, unit_flags: np.ndarray, sort: str = "unit", top: int | None = None,
                show_all: bool = False):
    """The flat unit indices to show, and how many are left out."""
    n = int(np.prod(s.unit_shape))
    cols = s.columns()
    key = {"unit": None, "mean": cols["mean"], "var": cols["var"], "std": cols["std"],
           "min": cols["min"], "max": cols["max"], "nan": cols["nan_count"],
           "absmean": np.abs(cols["mean"])}[sort]
    if key is None:
        order = np.arange(n)
    else:
        k = np.asarray(key, dtype=float).ravel()
        k = np.where(np.isnan(k), -np.inf if sort in DESCENDING else np.inf, k)
        order = np.argsort(-k if sort in DESCENDING else k, kind="stable")
    if show_all or (top is None and n <= SMALL_TABLE):
        return order, 0
    limit = top or DEFAULT_TOP
    chosen = list(order[:limit])
    if top is None:  # the default view adds the flagged units beyond the first rows
        chosen += [i for i in order[limit:] if unit_flags[i]][:limit]
    return np.array(chosen, dtype=int), n - len(chosen)


FLAG_LABELS = {"const": "zero variance", "nan": "with NaN", "inf": "with inf", "mean": "extreme mean",
               "empty": "empty", "dead": "dead (all zero)"}


def flag_counts(f: np.ndarray) -> str:
    """How many units carry each flag: "1 zero variance, 2 with NaN", or "none"."""
    counts = {k: sum(1 for x in f if k in x.split(",")) for k in FLAG_LABELS}
    return ", ".join(f"{c} {FLAG_LABELS[k]}" for k, c in counts.items() if c) or "none"


def value_range(values) -> str | None:
    """"lo .. hi" of the values that are not NaN, or None when every one is NaN or inf."""
    v = np.asarray(values, float).ravel()
    if not np.isfinite(v).any():
        return None
    v = v[~np.isnan(v)]
    return f"{fmt_num(float(v.min()))} .. {fmt_num(float(v.max()))}"


def summary_line(s: Stats, f: np.ndarray) -> str:
    """The caption of a table: units, values, mean and std ranges, min and max, flags."""
    cols = s.columns()
    n = int(np.prod(s.unit_shape))
    parts = [f"{n:,} units of {int(np.asarray(s.count).max(initial=0)):,} values"]
    for name in ("mean", "std"):
        if (r := value_range(cols[name])) is not None:
            parts.append(f"{name} {r}")
    # np.nanmin/nanmax of an all-NaN column (every unit empty) warn "All-NaN slice": a
    # RuntimeWarning that reached the user as a bnstat warning (an error under -W error)
    with np.errstate(all="ignore"), warnings.catch_warnings(), contextlib.suppress(ValueError):
        warnings.simplefilter("ignore", RuntimeWarning)
        parts.append(f"min {fmt_num(float(np.nanmin(cols['min'])))}, max {fmt_num(float(np.nanmax(cols['max'])))}")
    parts.append("flags: " + flag_counts(f))
    return " · ".join(parts)


def unit_column(s: Stats, rows) -> Column:
    """The key column of a table: the unit labels (``n0 c3``) under the unit axes' letters."""
    head = "/".join(a.lower() for a in s.unit_axes)
    return Column(head, [unit_label(s, int(i)) for i in rows], kind="text", key=True, style="cyan")


def stats_table(s: Stats, sort: str = "unit", top: int | None = None, show_all: bool = False):
    """``(title, columns, caption)`` of the table of one array."""
    from rich.markup import escape

    layout = s.layout + (" (assumed, PyTorch default)" if s.assumed_layout else "")
    title = (f"[bold]{escape(s.name)}[/bold]  {tuple(s.shape)} {s.dtype} · layout {layout} · reduce "
             f"{s.reduce} · {s.elements:,} elements")
    f = flags(s)
    rows, hidden = select_rows(s, f, sort, top, show_all)
    caption = summary_line(s, f)
    if hidden:
        caption += (f"\n{not_shown(hidden)} (--all shows every unit; --sort var|mean|... "
                    "--top N choose)")
    names = ["count", "mean", "std", "var", "min", "max", "nan_count"]
    if s.higher:
        names += ["skew", "kurtosis"]
    heads = {"nan_count": "NaN"}
    cols = {k: np.asarray(v).ravel() for k, v in s.columns().items()}
    columns = [unit_column(s, rows)]
    columns += [Column(heads.get(k, k), cols[k][rows], kind="int" if k in ("count", "nan_count") else "float")
                for k in names]
    columns.append(Column("flags", list(f[rows]), kind="text", style="yellow", justify="left"))
    return title, columns, caption


def print_tables(stats: dict, *, file=None, sort="unit", top=None, show_all=False, summary=False,
                 table_of=None, flags_of=None) -> None:
    """One table per array (``table_of(item, sort, top, show_all) -> (title, columns, caption)``,
    ``stats_table`` by default; histograms pass theirs), or with ``summary`` one line per
    array (``flags_of(item) -> (Stats, flags)``)."""
    if summary:
        print_summary(stats, file=file, flags_of=flags_of)
        return
    from rich.markup import escape

    table_of = table_of or stats_table

    def draw(console):
        for i, s in enumerate(stats.values()):
            if i:
                console.print()
            title, columns, caption = table_of(s, sort, top, show_all)
            console.print(title)
            draw_table(console, columns, escape(caption))

    emit_rich(draw, file=file)


SUMMARY_HEADS = ("array", "shape", "layout", "reduce", "units", "mean", "std", "flags")


def summary_row(s: Stats, f: np.ndarray) -> list[str]:
    """One array in a line (README, `bnstat moments`: --summary)."""
    cols = s.columns()
    return [s.name, "x".join(map(str, s.shape)) or "()", s.layout, s.reduce,
            f"{int(np.prod(s.unit_shape)):,}", value_range(cols["mean"]) or "-",
            value_range(cols["std"]) or "-", flag_counts(f)]


def print_summary(items: dict, *, file=None, flags_of=None) -> None:
    """A header and one line per array, its columns aligned; plain text, never wrapped, so
    N arrays are N + 1 lines."""
    import sys

    flags_of = flags_of or (lambda s: (s, flags(s)))
    rows = [list(SUMMARY_HEADS)] + [summary_row(*flags_of(item)) for item in items.values()]
    widths = [max(len(r[k]) for r in rows) for k in range(len(SUMMARY_HEADS))]
    right = {SUMMARY_HEADS.index("units")}
    lines = ["  ".join(c.rjust(w) if k in right else c.ljust(w) for k, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    target = file if file is not None else sys.stdout
    target.write("".join(line.rstrip() + "\n" for line in lines))
    target.flush()


INFO_HEADS = ("file", "array", "shape", "dtype", "order", "chunks", "compression", "size")


def print_info(rows: list[dict], *, file=None) -> None:
    """The arrays of the files, one row each, fitted to the width as the statistics tables
    (file and array lead every piece of a wrapped table)."""
    cells = {"file": [r["path"] for r in rows], "array": [r["name"] for r in rows],
             "shape": ["x".join(map(str, r["shape"])) or "()" for r in rows],
             "dtype": [r["dtype"] for r in rows], "order": [r.get("order", "C") for r in rows],
             "chunks": ["x".join(map(str, r["chunks"])) if r.get("chunks") else "-" for r in rows],
             "compression": [r.get("compression") or "-" for r in rows],
             "size": [human_size(r["nbytes"]) for r in rows]}
    columns = [Column(h, cells[h], kind="text", key=h in ("file", "array"),
                      justify="right" if h == "size" else "left") for h in INFO_HEADS]
    emit_rich(lambda console: draw_table(console, columns), file=file)


def print_lines(lines: list[str], *, file=None) -> None:
    def draw(console):
        for line in lines:
            console.print(line)

    emit_rich(draw, file=file)


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
