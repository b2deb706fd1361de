"""bnstat merge: exact merge of saved statistics."""

from __future__ import annotations

import click

from bnstat import options


@click.command("merge")
@click.argument("stats_files", nargs=-1, required=True, metavar="STATS.npz...")
@options.format_option
@options.allow_duplicates_option
@options.common_options
def command(stats_files, fmt, allow_duplicates, output, force, quiet):
    """Merge stats files into one, exactly (as one run over all the data).

    The files hold statistics of parts of one data set split along N (for
    example one file per shard). Arrays are matched by name; their layouts
    and reduced axes must agree.

    \b
    Examples:
      bnstat merge shard*.npz -o all.npz
      bnstat merge a.npz b.npz --format json
    """
    from bnstat.commands._output import check_target, emit
    from bnstat.stats import merge_files

    if output is None and fmt is None:
        raise click.UsageError("give -o OUT.npz (or --format json|csv|table for standard output)")
    fmt = options.format_for(fmt, output)
    check_target(output, fmt, force, stats_files)
    from bnstat.histogram import kind_of_files

    if kind_of_files(stats_files) == "histogram":  # histogram files (bnstat hist): counts added
        from bnstat.histogram import load_hist, merge_hists
        from bnstat.render.hist import emit as emit_hist

        merged = merge_files(stats_files, load=load_hist, merge=merge_hists,
                             allow_duplicates=allow_duplicates)
        emit_hist(merged, fmt, output, force=force, inputs=stats_files)
        return
    emit(merge_files(stats_files, allow_duplicates=allow_duplicates), fmt, output, force=force, inputs=stats_files)
