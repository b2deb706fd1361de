"""Rich tables: the statistics of each array, the arrays of files, plain lines."""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np

from bnstat.render.console import emit_rich
from bnstat.stats import Stats

SMALL_TABLE = 32  # arrays with at most this many units show every unit
DEFAULT_TOP = 20
DESCENDING = {"mean", "var", "std", "max", "nan", "absmean"}


def fmt_num(v: float) -> str:
    if isinstance(v, float | np.floating):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.6g}"
    return f"{v:,}"


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


def summary_line(s: Stats, f: np.ndarray) -> str:
    cols = s.columns()
    mean = np.asarray(cols["mean"], float)
    std = np.asarray(cols["std"], float)
    n = int(np.prod(s.unit_shape))
    parts = [f"{n:,} units of {int(np.asarray(s.count).max(initial=0)):,} values"]
    # np.nanmin/nanmax of an all-NaN column (every unit empty) warn "All-NaN slice": a
    # RuntimeWarning that reached the user as a bnstat warning (an error under -W error)
    with np.errstate(all="ignore"), warnings.catch_warnings(), contextlib.suppress(ValueError):
        warnings.simplefilter("ignore", RuntimeWarning)
        if np.isfinite(mean).any():
            parts.append(f"mean {fmt_num(float(np.nanmin(mean)))} .. {fmt_num(float(np.nanmax(mean)))}")
        if np.isfinite(std).any():
            parts.append(f"std {fmt_num(float(np.nanmin(std)))} .. {fmt_num(float(np.nanmax(std)))}")
        parts.append(f"min {fmt_num(float(np.nanmin(cols['min'])))}, max {fmt_num(float(np.nanmax(cols['max'])))}")
    counts = {name: sum(1 for x in f if name in x.split(",")) for name in ("const", "nan", "inf", "mean", "empty")}
    labels = {"const": "zero variance", "nan": "with NaN", "inf": "with inf", "mean": "extreme mean",
              "empty": "empty"}
    flagged = [f"{c} {labels[k]}" for k, c in counts.items() if c]
    parts.append("flags: " + (", ".join(flagged) if flagged else "none"))
    return " · ".join(parts)


def stats_table(s: Stats, sort: str = "unit", top: int | None = None, show_all: bool = False):
    from rich.table import Table
    from rich.text import Text

    layout = s.layout + (" (assumed, PyTorch default)" if s.assumed_layout else "")
    title = (f"[bold]{s.name}[/bold]  {tuple(s.shape)} {s.dtype} · layout {layout} · reduce "
             f"{s.reduce} · {s.elements:,} elements")
    f = flags(s)
    rows, hidden = select_rows(s, f, sort, top, show_all)
    caption = summary_line(s, f)
    if hidden:
        caption += (f"\n{not_shown(hidden)} (--all shows every unit; --sort var|mean|... "
                    "--top N choose)")
    table = Table(caption=caption, caption_justify="left", show_edge=False, pad_edge=False)
    unit_head = "/".join(a.lower() for a in s.unit_axes) if len(s.unit_axes) > 1 else s.unit_axes[0].lower()
    table.add_column(unit_head, justify="right", style="cyan")
    names = ["count", "mean", "std", "var", "min", "max", "nan_count"]
    if s.higher:
        names += ["skew", "kurtosis"]
    heads = {"nan_count": "NaN"}
    for name in names:
        table.add_column(heads.get(name, name), justify="right")
    table.add_column("flags", style="yellow")
    cols = {k: np.asarray(v).ravel() for k, v in s.columns().items()}
    for i in rows:
        cells = [unit_label(s, int(i))]
        for name in names:
            v = cols[name][i]
            cells.append(fmt_num(int(v)) if name in ("count", "nan_count") else fmt_num(float(v)))
        cells.append(Text(f[i]))
        table.add_row(*cells)
    return title, table


def print_tables(stats: dict[str, Stats], *, file=None, sort="unit", top=None, show_all=False,
                 table_of=None) -> None:
    """One table per array (``table_of(item, sort, top, show_all) -> (title, table)``,
    ``stats_table`` by default; histograms pass theirs)."""
    table_of = table_of or stats_table

    def draw(console):
        for i, s in enumerate(stats.values()):
            if i:
                console.print()
            title, table = table_of(s, sort, top, show_all)
            console.print(title)
            console.print(table)

    emit_rich(draw, file=file)


def print_info(rows: list[dict], *, file=None) -> None:
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False)
    for head in ("file", "array", "shape", "dtype", "order", "chunks", "compression", "size"):
        table.add_column(head, justify="right" if head == "size" else "left")
    for r in rows:
        table.add_row(r["path"], r["name"], "x".join(map(str, r["shape"])) or "()", r["dtype"],
                      r.get("order", "C"), "x".join(map(str, r["chunks"])) if r.get("chunks") else "-",
                      r.get("compression") or "-", human_size(r["nbytes"]))
    emit_rich(lambda console: console.print(table), file=file)


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
