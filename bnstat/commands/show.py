"""bnstat show: render a saved stats file."""

from __future__ import annotations

import click

from bnstat import options


@click.command("show")
@click.argument("stats_file", metavar="STATS.npz")
@options.format_option
@options.table_options
@options.common_options
def command(stats_file, fmt, sort, top, show_all, summary, output, force, quiet):
    """Render a stats file saved by `bnstat moments -o FILE.npz`.

    \b
    Examples:
      bnstat show stats.npz
      bnstat show stats.npz --format json > stats.json
      bnstat show stats.npz --sort var --top 10
    """
    from bnstat.commands._output import check_target, emit
    from bnstat.stats import load_stats

    fmt = options.format_for(fmt, output)
    options.check_summary(summary, fmt, sort, top, show_all)
    check_target(output, fmt, force, [stats_file])
    from bnstat.histogram import kind_of_files

    if kind_of_files([stats_file]) == "histogram":  # a histogram file (bnstat hist)
        from bnstat.histogram import load_hist as load_stats
        from bnstat.render.hist import emit
    stats = load_stats(stats_file)
    emit(stats, fmt, output, force=force, inputs=[stats_file], sort=sort, top=top, show_all=show_all,
         summary=summary)
