"""bnstat hist: exact per-unit histograms, quantiles and calibration ranges."""

from __future__ import annotations

import click

from bnstat import options


def _bins(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"{value}: needs at least one bin", ctx=ctx, param=param)
    return value


def _parse_range(value):
    from bnstat.histogram import parse_range

    return parse_range(value)


def _check_quantiles(value):
    from bnstat.quantiles import check_quantiles

    return check_quantiles(value)


_range = options._checked(_parse_range)
_quantiles = options._checked(_check_quantiles)


def _amax(ctx, param, value):
    from bnstat.amax import check_method
    from bnstat.errors import UsageProblem

    try:
        return [check_method(v) for v in value]
    except UsageProblem as exc:
        raise click.BadParameter(exc.message.split(": ", 1)[-1], ctx=ctx, param=param) from None


@click.command("hist")
@options.inputs_argument
@options.layout_options
@options.ddof_option
@options.selection_options
@options.name_option
@options.skip_crc_option
@options.nan_option
@click.option("--bins", type=int, default=2048, show_default=True, callback=_bins, metavar="N",
              help="Number of bins per unit.")
@click.option("--range", "range_", default="auto", show_default=True, callback=_range, metavar="auto|abs|LO:HI",
              help="auto: each unit's exact min..max (two passes); abs: |x| over 0..max |x|; "
                   "LO:HI: fixed edges, one pass, values outside counted as under/overflow.")
@click.option("--quantiles", default=None, callback=_quantiles, metavar="Q,...",
              help="Exact per-unit quantiles (np.quantile, method linear), e.g. 0.001,0.5,0.999.")
@click.option("--amax", "amax", multiple=True, callback=_amax, metavar="METHOD",
              help="Calibration range: max, percentile:P, mse or entropy (pytorch-quantization's "
                   "HistogramCalibrator; implies --range abs). Repeatable.")
@click.option("--per-tensor", is_flag=True, help="One histogram (and amax) for the whole array.")
@click.option("--num-bits", type=click.IntRange(2, 16), default=8, show_default=True,
              help="Quantization bits for --amax mse/entropy.")
@click.option("--unsigned", is_flag=True, help="Unsigned quantization (non-negative data) for --amax.")
@options.format_option
@options.table_options
@options.scheduler_option
@options.common_options
@options.compute_options
def command(inputs, layout, channel_axis, norm, groups, reduce, ddof, datasets, per_file, name, skip_crc,
            nan_policy, bins, range_, quantiles, amax, per_tensor, num_bits, unsigned, fmt, sort, top,
            show_all, summary, scheduler, output, force, quiet, threads, chunk_size):
    """Exact per-unit histograms, quantiles and INT8 calibration ranges.

    Counts are exact integers in the bins np.histogram would use (the last
    bin closed); NaN and +-inf are counted apart. The histogram file (-o
    FILE.npz) holds NAME/edges and NAME/counts beside the moments; `bnstat
    merge` adds files with the same edges, `bnstat show` renders them.

    \b
    Examples:
      bnstat hist acts.npy --layout NCHW --quantiles 0.001,0.5,0.999
      bnstat hist acts.h5 --amax entropy --amax percentile:99.99 -o calib.json
      bnstat hist acts.npy --range -4:4 --bins 64 -o hist.npz
      bnstat hist acts.npy --per-tensor --amax mse --unsigned
      bnstat hist shards/*.h5 --layout NCHW --quantiles 0.5 --scheduler local:2 -o hist.npz
    """
    from bnstat.commands._output import check_target
    from bnstat.histrun import compute_hist
    from bnstat.io import open_sources
    from bnstat.render import progress
    from bnstat.render.hist import emit

    spec = options.layout_spec(layout, channel_axis, norm, groups, reduce)
    if amax and range_ == "auto":
        range_ = "abs"
    fmt = options.format_for(fmt, output)
    options.check_summary(summary, fmt, sort, top, show_all)
    check_target(output, fmt, force, inputs)
    sources = open_sources(inputs, datasets, check_crc=not skip_crc, name=name)
    total = sum(s.nbytes for s in sources)
    with progress(total, "hist", enabled=not quiet) as advance:
        hists = compute_hist(sources, ddof=ddof, bins=bins, range=range_, quantiles=quantiles,
                             amax=amax, per_tensor=per_tensor, num_bits=num_bits, unsigned=unsigned,
                             nan_policy=nan_policy, chunk_size=chunk_size, threads=threads,
                             per_file=per_file, progress=advance, scheduler=scheduler,
                             check_crc=not skip_crc, **spec)
    emit(hists, fmt, output, force=force, inputs=inputs, sort=sort, top=top, show_all=show_all,
         summary=summary)
