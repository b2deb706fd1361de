"""``bnstat plot``: pictures of stats and histogram files with matplotlib (the ``plot`` extra).

matplotlib is imported here only, lazily, with the non-interactive Agg
backend. A stats file gives, per array, the per-unit mean with a +-std band
and min/max whiskers against the unit index; past ``ENVELOPE_AT`` units the
units are grouped into ``ENVELOPE_CELLS`` runs drawn as envelopes (the
extremes of each run), so that 4096 units stay legible. A histogram file
gives a units x bins heat map of log10(1 + count) and the histograms of
chosen units (README "Plots").
"""

from __future__ import annotations

import numpy as np

from bnstat.errors import BnstatError, UsageProblem

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


def plot_file(path: str, output: str, *, fmt: str | None = None, units=(), dataset=None,
              force: bool = False) -> None:
    """Draw the stats or histogram file ``path`` into ``output`` (atomically). Raises BnstatError."""
    import fnmatch

    from bnstat.histogram import kind_of_files, load_hist
    from bnstat.io.atomic import atomic_open
    from bnstat.stats import load_stats

    fmt = plot_format(output, fmt)
    hist = kind_of_files([path]) == "histogram"
    items = load_hist(path) if hist else load_stats(path)
    if dataset:
        pats = [dataset] if isinstance(dataset, str) else list(dataset)
        items = {k: v for k, v in items.items() if any(fnmatch.fnmatchcase(k, p) for p in pats)}
        if not items:
            raise UsageProblem(f"{path}: no array matches -d {' '.join(pats)}")
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
    try:
        with atomic_open(output, "wb", force=force, inputs=[path]) as fh:
            fig.savefig(fh, format=fmt)
    finally:
        plt.close(fig)
