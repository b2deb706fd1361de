"""bnstat plot: pictures of stats and histogram files (the plot extra, matplotlib)."""

from __future__ import annotations

import click

from bnstat import options


def _units(ctx, param, value):
    if value is None:
        return ()
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give unit indices separated by commas, e.g. 0,5,17",
                                 ctx=ctx, param=param) from None


@click.command("plot")
@click.argument("stats_file", metavar="FILE")
@click.option("-o", "--output", required=True, metavar="PICTURE", help="The picture: .png, .svg or .pdf.")
@click.option("--format", "fmt", type=click.Choice(["png", "svg", "pdf"]), default=None,
              help="Picture format (default: from the extension of -o).")
@click.option("--units", default=None, callback=_units, metavar="U,...",
              help="Histogram files: the units whose histograms are drawn (default: the most unusual).")
@options.dataset_option
@options.force_option
@options.quiet_option
def command(stats_file, output, fmt, units, datasets, force, quiet):
    """Plot a stats file (moments), a histogram file (hist) or a diff report (diff --format json).

    A stats file: per array, the per-unit mean with a ±std band and min/max
    whiskers against the unit index (envelopes past 512 units). A histogram
    file: a units x bins heat map of log counts and the histograms of
    --units. A diff report: per array, the shift and log variance ratio per
    unit, with the --fail-over thresholds it was made with. Needs matplotlib:
    pip install 'bnstat[plot]'.

    \b
    Examples:
      bnstat plot stats.npz -o stats.png
      bnstat plot hist.npz -o hist.svg --units 0,7
      bnstat diff a.npz b.npz --format json -o d.json; bnstat plot d.json -o d.png
    """
    from bnstat.plotting import plot_file

    plot_file(stats_file, output, fmt=fmt, units=units, dataset=datasets, force=force)
