"""bnstat moments: exact per-unit statistics of arrays in files."""

from __future__ import annotations

import click

from bnstat import options


@click.command("moments")
@options.inputs_argument
@options.layout_options
@options.ddof_option
@options.selection_options
@options.name_option
@options.skip_crc_option
@options.nan_option
@options.higher_option
@options.format_option
@options.table_options
@options.scheduler_option
@options.allow_duplicates_option
@options.common_options
@options.compute_options
def command(inputs, layout, channel_axis, norm, groups, reduce, ddof, datasets, per_file, name,
            skip_crc, nan_policy, higher, fmt, sort, top, show_all, summary, scheduler,
            allow_duplicates, output, force, quiet, threads, chunk_size):
    """Exact per-unit count, mean, var, std, min, max and NaN count.

    PATH is a .npy, .npz or HDF5 file, or '-' for a .npy stream on standard
    input. Several paths are one data set split along N (arrays of the same
    name are merged). Statistics are accumulated in float64, chunk by chunk:
    memory is bounded by --chunk-size, not by the file size.

    \b
    Examples:
      bnstat moments acts.h5 --layout NCHW
      bnstat moments acts.npy --layout NHWC --norm group --groups 8
      bnstat moments tokens.npy --layout NLC --reduce C --format csv
      bnstat moments part1.h5 part2.h5 -d 'features/*' -o stats.npz
      bnstat moments shard1.npy shard2.npy --name act -o stats.npz
      python make.py | bnstat moments - --format json
      bnstat moments shards/*.h5 --scheduler local:2 -o stats.npz
    """
    from bnstat.commands._output import check_target, emit
    from bnstat.io import open_sources, refuse_same_file_twice
    from bnstat.render import progress
    from bnstat.stream import compute_stats

    spec = options.layout_spec(layout, channel_axis, norm, groups, reduce)
    fmt = options.format_for(fmt, output)
    options.check_summary(summary, fmt, sort, top, show_all)
    check_target(output, fmt, force, inputs)
    refuse_same_file_twice(inputs, allow_duplicates)
    sources = open_sources(inputs, datasets, check_crc=not skip_crc, name=name)
    total = sum(s.nbytes for s in sources)
    kwargs = dict(ddof=ddof, higher=higher, nan_policy=nan_policy, chunk_size=chunk_size,
                  threads=threads, per_file=per_file, **spec)
    with progress(total, "moments", enabled=not quiet) as advance:
        if scheduler is not None:
            from bnstat.dask import compute_stats_distributed

            stats = compute_stats_distributed(scheduler, sources, progress=advance,
                                              check_crc=not skip_crc, **kwargs)
        else:
            stats = compute_stats(sources, progress=advance, **kwargs)
    emit(stats, fmt, output, force=force, inputs=inputs, sort=sort, top=top, show_all=show_all,
         summary=summary)
