"""``bnstat plot``: pictures of stats and histogram files with matplotlib (the ``plot`` extra).

matplotlib is imported here only, lazily, with the non-interactive Agg
backend. A stats file gives, per array, the per-unit mean with a +-std band
and min/max whiskers against the unit index; past ``ENVELOPE_AT`` units the
units are grouped into ``ENVELOPE_CELLS`` runs drawn as envelopes (the
extremes of each run), so that 4096 units stay legible. A histogram file
gives a units x bins heat map of log10(1 + count) and the histograms of
chosen units. A diff report (``bnstat diff A B --format json -o D.json``)
gives, per array, the per-unit shift and log variance ratio with the
``--fail-over`` thresholds it was made with (README "Plots").
"""

from __future__ import annotations

import os

import numpy as np

from bnstat.errors import BnstatError, InputError, UsageProblem

FORMATS = ("png", "svg", "pdf")
ENVELOPE_AT = 512
ENVELOPE_CELLS = 512
MAX_ARRAYS = 32
DPI = 110


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise BnstatError("bnstat plot needs matplotlib, which is not installed",
                          "Install the plot extra: pip install 'bnstat[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_format(output: str, fmt: str | None) -> str:
    """--format, else the extension of -o. Raises UsageProblem."""
    if fmt:
        return fmt
    ext = output.rsplit(".", 1)[-1].lower() if "." in output else ""
    if ext not in FORMATS:
        raise UsageProblem(f"-o {output}: cannot tell the picture format from the extension",
                           "Use .png, .svg or .pdf, or --format png|svg|pdf.")
    return ext


def _runs(n: int) -> np.ndarray:
    """Start indices of ENVELOPE_CELLS runs of consecutive units covering 0..n."""
    return np.unique(np.linspace(0, n, ENVELOPE_CELLS, endpoint=False).astype(int))


def _title(path: str, s, extra: str = "") -> str:
    per_unit = int(np.asarray(s.count).max(initial=0))
    n = int(np.prod(s.unit_shape))
    return (f"{path} · {s.name} · layout {s.layout} (reduce {s.reduce}) · {n:,} units of "
            f"{per_unit:,} values{extra}")


def _stats_panel(ax, path: str, s) -> None:
    mean = np.asarray(s.mean, float).ravel()
    std = np.asarray(s.std, float).ravel()
    mn = np.asarray(s.min, float).ravel()
    mx = np.asarray(s.max, float).ravel()
    n = mean.size
    x = np.arange(n)
    if n <= ENVELOPE_AT:
        ax.vlines(x, mn, mx, color="0.6", linewidth=0.8 if n > 64 else 1.2, label="min..max")
        ax.fill_between(x, mean - std, mean + std, color="tab:blue", alpha=0.3, step="mid", label="mean ± std")
        ax.plot(x, mean, "o-" if n <= 64 else "-", color="tab:blue", markersize=3, linewidth=1, label="mean")
    else:  # envelopes of runs of units: every unit's extremes stay visible
        starts = _runs(n)
        with np.errstate(invalid="ignore"):
            lo = np.fmin.reduceat(mn, starts)
            hi = np.fmax.reduceat(mx, starts)
            blo = np.fmin.reduceat(mean - std, starts)
            bhi = np.fmax.reduceat(mean + std, starts)
            mlo = np.fmin.reduceat(mean, starts)
            mhi = np.fmax.reduceat(mean, starts)
        xs = starts + (np.diff(np.append(starts, n)) - 1) / 2
        ax.fill_between(xs, lo, hi, color="0.85", label="min..max (envelope)")
        ax.fill_between(xs, blo, bhi, color="tab:blue", alpha=0.3, label="mean ± std (envelope)")
        ax.fill_between(xs, mlo, mhi, color="tab:blue", alpha=0.9, linewidth=0.6, label="mean (range per run)")
        ax.set_xlim(-0.5, n - 0.5)
    ax.set_title(_title(path, s), fontsize=9, loc="left")
    ax.set_xlabel("unit (" + "/".join(a for a in s.unit_axes) + ", flat index)")
    ax.set_ylabel("value")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)


def _unusual(h, k: int = 4) -> list[int]:
    """Units worth a look: flagged ones (dead, inf, NaN) first, then the most extreme means/stds."""
    s = h.stats
    flagged = np.flatnonzero(h.dead.ravel() | (np.asarray(s.inf_count).ravel() > 0)
                             | (np.asarray(s.nan_count).ravel() > 0))
    score = np.zeros(h.dead.size)
    for col in (np.asarray(s.mean, float).ravel(), np.log(np.asarray(s.std, float).ravel() + 1e-300)):
        ok = np.isfinite(col)
        if ok.sum() > 1:
            med = np.median(col[ok])
            mad = np.median(np.abs(col[ok] - med)) or 1.0
            score = np.maximum(score, np.where(ok, np.abs(col - med) / mad, 0.0))
    order = [int(i) for i in flagged] + [int(i) for i in np.argsort(-score, kind="stable")]
    return list(dict.fromkeys(order))[:k]


def _hist_panels(ax_map, ax_units, path: str, h, units) -> None:
    counts = h.counts.reshape(-1, h.bins)
    n = counts.shape[0]
    img = np.log10(1.0 + counts.astype(np.float64))
    if n > 2 * ENVELOPE_CELLS:  # rows of the picture: the largest count of each run of units
        img = np.maximum.reduceat(img, _runs(n), axis=0)
    im = ax_map.imshow(img, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower",
                       extent=(-0.5, h.bins - 0.5, -0.5, n - 0.5))
    ax_map.figure.colorbar(im, ax=ax_map, label="log10(1 + count)")
    from bnstat.histogram import fmt_range

    ax_map.set_title(_title(path, h.stats, f" · {h.bins} bins, range {fmt_range(h.range)}"), fontsize=9,
                     loc="left")
    ax_map.set_xlabel("bin" + (" (each unit's own min..max)" if h.range == "auto" else ""))
    ax_map.set_ylabel("unit (flat index)")
    chosen = list(units) if units else _unusual(h)
    bad = [u for u in chosen if not 0 <= u < n]
    if bad:
        raise UsageProblem(f"--units {bad[0]}: {h.name} has units 0..{n - 1}")
    edges = h.edges.reshape(n, -1)
    for u in chosen:
        ax_units.stairs(counts[u], edges[u], label=f"unit {u}")
    ax_units.set_yscale("symlog", linthresh=1)
    ax_units.set_xlabel("|x|" if h.range == "abs" else "value")
    ax_units.set_ylabel("count")
    ax_units.set_title("units " + ", ".join(map(str, chosen)) + ("" if units else " (the most unusual)"),
                       fontsize=9, loc="left")
    ax_units.legend(fontsize=7)
    ax_units.grid(alpha=0.3)


# a diff report larger than this is not one bnstat wrote for a picture (4096 units of 32
# arrays take about 40 MB)
MAX_REPORT = 256 * 1024**2


def load_diff_report(path: str) -> dict | None:
    """The arrays of a ``bnstat diff --format json`` report at ``path``, or None when the file
    is not JSON (a stats or histogram file). Raises InputError for JSON that is not one."""
    import json

    from bnstat.io.base import input_error

    try:
        with open(path, "rb") as fh:
            if fh.read(1) != b"{":
                return None
            if os.fstat(fh.fileno()).st_size > MAX_REPORT:
                raise InputError(f"{path}: a JSON file of over {MAX_REPORT >> 20} MB is not a "
                                 "bnstat diff report")
            fh.seek(0)
            doc = json.loads(fh.read())
    except OSError as exc:
        raise input_error(path, exc) from None
    except (ValueError, RecursionError):
        doc = None
    keys = ("name", "unit_shape", "shift", "log_var_ratio")
    if not (isinstance(doc, dict) and "bnstat" in doc and isinstance(doc.get("arrays"), list)
            and all(isinstance(a, dict) and all(k in a for k in keys) for a in doc["arrays"])):
        raise InputError(f"{path}: a JSON file but not a bnstat diff report",
                         "bnstat plot draws stats and histogram files (.npz) and the JSON of "
                         "bnstat diff A B --format json.")
    return doc


def _metric(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], np.float64)


def _diff_panel(ax, doc: dict, arr: dict, key: str, label: str, metric: str) -> None:
    """One metric of one array of a diff report against the unit index, with its threshold."""
    y = _metric(arr[key])
    n = y.size
    x = np.arange(n)
    if n <= ENVELOPE_AT:
        ax.bar(x, y, width=1.0 if n > 64 else 0.8, color="tab:blue", alpha=0.8)
    else:
        starts = _runs(n)
        with np.errstate(invalid="ignore"):
            lo = np.fmin.reduceat(y, starts)
            hi = np.fmax.reduceat(y, starts)
        xs = starts + (np.diff(np.append(starts, n)) - 1) / 2
        ax.fill_between(xs, np.fmin(lo, 0), np.fmax(hi, 0), color="tab:blue", alpha=0.8,
                        label="range per run of units")
        ax.set_xlim(-0.5, n - 0.5)
    ax.axhline(0, color="0.3", linewidth=0.6)
    limit = (doc.get("fail_over") or {}).get(metric)
    if isinstance(limit, (int, float)):
        for sign in (1, -1):
            ax.axhline(sign * limit, color="tab:red", linestyle="--", linewidth=1,
                       label=f"--fail-over {metric}={limit:g}" if sign > 0 else None)
        over = int(np.count_nonzero(np.abs(np.nan_to_num(y)) > limit))
        label += f" · {over} unit(s) over {limit:g}"
    a, b = doc.get("a", {}), doc.get("b", {})
    ax.set_title(f"{arr['name']} · {label}\nA {a.get('path', '?')} ({a.get('kind', '?')}) · "
                 f"B {b.get('path', '?')} ({b.get('kind', '?')}) · {n:,} units", fontsize=9,
                 loc="left")
    ax.set_xlabel("unit (flat index)")
    ax.set_ylabel(label.split(" · ")[0])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)


def _select(path: str, items: dict, dataset) -> dict:
    import fnmatch

    if not dataset:
        return items
    pats = [dataset] if isinstance(dataset, str) else list(dataset)
    items = {k: v for k, v in items.items() if any(fnmatch.fnmatchcase(k, p) for p in pats)}
    if not items:
        raise UsageProblem(f"{path}: no array matches -d {' '.join(pats)}")
    return items


def _save(fig, plt, output: str, fmt: str, path: str, force: bool) -> None:
    from bnstat.io.atomic import atomic_open

    try:
        with atomic_open(output, "wb", force=force, inputs=[path]) as fh:
            fig.savefig(fh, format=fmt)
    finally:
        plt.close(fig)


def plot_diff(path: str, doc: dict, output: str, fmt: str, *, dataset=None,
              force: bool = False) -> None:
    """Per array of the diff report ``doc``: shift and log variance ratio per unit."""
    items = _select(path, {a["name"]: a for a in doc["arrays"]}, dataset)
    if not items:
        raise InputError(f"{path}: the diff report holds no matched array")
    names = list(items)[:MAX_ARRAYS]
    plt = _pyplot()
    fig = plt.figure(figsize=(13, 3.4 * len(names)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(names), 2, squeeze=False)
    for r, name in enumerate(names):
        _diff_panel(axes[r][0], doc, items[name], "shift", "shift (mean_b - mean_a) / std_a",
                    "shift")
        _diff_panel(axes[r][1], doc, items[name], "log_var_ratio", "log var ratio ln(var_b / var_a)",
                    "logvar")
    if len(items) > MAX_ARRAYS:
        fig.suptitle(f"the first {MAX_ARRAYS} of {len(items)} arrays (-d PATTERN chooses)", fontsize=9)
    _save(fig, plt, output, fmt, path, force)


def plot_file(path: str, output: str, *, fmt: str | None = None, units=(), dataset=None,
              force: bool = False) -> None:
    """Draw the stats, histogram or diff file ``path`` into ``output`` (atomically).
    Raises BnstatError."""
    from bnstat.histogram import kind_of_files, load_hist
    from bnstat.stats import load_stats

    fmt = plot_format(output, fmt)
    report = load_diff_report(path)
    if report is not None:
        return plot_diff(path, report, output, fmt, dataset=dataset, force=force)
    hist = kind_of_files([path]) == "histogram"
    items = _select(path, load_hist(path) if hist else load_stats(path), dataset)
    names = list(items)[:MAX_ARRAYS]
    plt = _pyplot()
    rows = len(names)
    fig = plt.figure(figsize=(13 if hist else 12, 3.4 * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, 2 if hist else 1, squeeze=False,
                        gridspec_kw={"width_ratios": [3, 2]} if hist else None)
    for r, name in enumerate(names):
        if hist:
            _hist_panels(axes[r][0], axes[r][1], path, items[name], units)
        else:
            _stats_panel(axes[r][0], path, items[name])
    if len(items) > MAX_ARRAYS:
        fig.suptitle(f"the first {MAX_ARRAYS} of {len(items)} arrays (-d PATTERN chooses)", fontsize=9)
    _save(fig, plt, output, fmt, path, force)
