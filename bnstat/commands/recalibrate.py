"""bnstat recalibrate: precise BN, a model's BN running statistics set from activations."""

from __future__ import annotations

import click

from bnstat import options


@click.command("recalibrate")
@click.argument("model", metavar="MODEL")
@click.argument("inputs", nargs=-1, metavar="[ACTS...]")
@click.option("--stats", "stats_file", type=str, default=None, metavar="STATS.npz",
              help="Saved statistics (bnstat moments -o, bnstat merge) instead of activations.")
@click.option("--map", "maps", multiple=True, metavar="ACT=BN",
              help="Array ACT holds the input of BN layer BN (repeatable).")
@click.option("--map-file", type=str, default=None, metavar="FILE",
              help="A map: a JSON object {act: bn}, or lines ACT=BN ('#' comments).")
@click.option("--estimator", type=click.Choice(["population", "batch-mean"]), default="population",
              show_default=True,
              help="population: the exact statistics of all the data; batch-mean: the mean of "
              "per-batch statistics, as torch.optim.swa_utils.update_bn (needs --batch-size).")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=None, metavar="B",
              help="Samples per batch, with --estimator batch-mean.")
@click.option("--drop-last", is_flag=True, help="batch-mean: leave out a last batch shorter than B.")
@click.option("--dry-run", is_flag=True, help="Show the changes; write no model.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="The report on standard output.")
@options.layout_options
@options.dataset_option
@options.skip_crc_option
@options.common_options
@options.compute_options
def command(model, inputs, stats_file, maps, map_file, estimator, batch_size, drop_last, dry_run, fmt,
            layout, channel_axis, norm, groups, reduce, datasets, skip_crc, output, force, quiet,
            threads, chunk_size):
    """Set the running mean and variance of MODEL's BatchNorm layers to the exact
    population statistics of the activations at their inputs ("precise BN").

    ACTS are activation files (their per-channel moments computed as `moments`
    does, several files one data set), or --stats a saved stats file (merge
    shards first with `bnstat merge`). Arrays map to BN layers by name ('/'
    and '.' are one separator; NAME, NAME:input, NAME.input, NAME_input or a
    path ending in the layer's name), or by --map. A BN without activations
    keeps its values. The output has MODEL's format; every other array is
    unchanged.

    \b
    Examples:
      bnstat recalibrate model.npz acts.h5 -o model_pbn.npz --layout NCHW
      bnstat recalibrate model.npz --stats all.npz -o model_pbn.npz
      bnstat recalibrate model.npz acts.npy --map acts=features.1 -o out.npz
      bnstat recalibrate model.npz acts.npy --estimator batch-mean -b 32 --dry-run
    """
    from bnstat.render import training as tr
    from bnstat.recalibration import recalibrate

    if norm not in (None, "batch") or groups is not None or reduce is not None:
        raise click.UsageError("BatchNorm statistics are per channel: drop --norm/--groups/--reduce")
    layout = options.layout_spec(layout, channel_axis, None, None, None)["layout"]
    if output is None and not dry_run:
        raise click.UsageError("recalibrate needs -o OUTPUT (or --dry-run)")
    if output == "-":
        raise click.UsageError("-o -: recalibrate writes a model file and prints a report; give a path")
    if bool(inputs) == bool(stats_file):
        raise click.UsageError("give activation files or --stats STATS.npz, one of the two")
    result = recalibrate(model, list(inputs) or None, stats=stats_file, output=None if dry_run else output,
                         map=maps, map_file=map_file, estimator=estimator, batch_size=batch_size,
                         drop_last=drop_last, layout=layout, channel_axis=channel_axis, dataset=datasets,
                         chunk_size=chunk_size, threads=threads, force=force, check_crc=not skip_crc)
    tr.write_report(fmt, "-", to_json=lambda: tr.recal_json(result),
                    to_table=lambda fh: tr.recal_table(result, file=fh))
