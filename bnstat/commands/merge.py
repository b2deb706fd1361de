"""bnstat merge: exact merge of saved statistics."""

from __future__ import annotations

import click

from bnstat import options


@click.command("merge")
@click.argument("stats_files", nargs=-1, required=True, metavar="STATS.npz...")
@options.format_option
@options.common_options
def command(stats_files, fmt, output, force, quiet, threads, chunk_size):
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
    from bnstat.errors import DataError
    from bnstat.stats import load_stats, merge_all

    if output is None and fmt is None:
        raise click.UsageError("give -o OUT.npz (or --format json|csv|table for standard output)")
    fmt = options.format_for(fmt, output)
    check_target(output, fmt, force, stats_files)
    from bnstat.histogram import kind_of_files

    if kind_of_files(stats_files) == "histogram":  # histogram files: counts added (bnstat hist)
        from bnstat.histogram import load_hist as load_stats
        from bnstat.histogram import merge_hists as merge_all
        from bnstat.render_hist import emit
    loaded = [(path, load_stats(path)) for path in stats_files]
    names = list(dict.fromkeys(name for _, st in loaded for name in st))
    merged = {}
    for name in names:
        parts = [st[name] for _, st in loaded if name in st]
        missing = [path for path, st in loaded if name not in st]
        if missing:
            raise DataError(f"{name}: in some stats files but not in {', '.join(missing)}",
                            "Merge files that hold the same arrays.")
        try:
            merged[name] = merge_all(parts)
        except DataError as exc:
            raise DataError(f"{', '.join(stats_files)}: {exc.message}", exc.hint) from None
    emit(merged, fmt, output, force=force, inputs=stats_files)
