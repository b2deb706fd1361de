"""bnstat running: the running mean/var a BN layer would hold after training on the data."""

from __future__ import annotations

import click

from bnstat import options

FRAMEWORK_CHOICES = ("pytorch", "keras", "tf-fused", "mxnet")


@click.command("running")
@options.inputs_argument
@click.option("--batch-size", "-b", type=click.IntRange(min=1), required=True, metavar="B",
              help="Samples per batch, along N in file order (batches span files).")
@click.option("--framework", type=click.Choice(FRAMEWORK_CHOICES), default="pytorch", show_default=True,
              help="Whose update rule and variance: pytorch (unbiased, momentum = weight of the new "
              "batch), keras (biased), tf-fused (unbiased), mxnet (biased).")
@click.option("--momentum", type=click.FloatRange(0, 1), default=None, metavar="M",
              help="The framework's momentum. [default: pytorch 0.1, keras/tf-fused 0.99, mxnet 0.9]")
@click.option("--cumulative", is_flag=True,
              help="PyTorch's momentum=None: the cumulative average over batches (1/k).")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, metavar="E",
              help="Passes over the data (the file is read once; later epochs replay the batches).")
@click.option("--drop-last", is_flag=True, help="Leave out a last batch shorter than B.")
@click.option("--from-model", type=str, default=None, metavar="MODEL",
              help="Start from the running statistics of a model's BN (with --bn) instead of mean 0, var 1.")
@click.option("--bn", "bn_name", type=str, default=None, metavar="NAME",
              help="The BatchNorm layer of --from-model, e.g. features.1.")
@options.layout_options
@options.dataset_option
@options.name_option
@options.skip_crc_option
@options.format_option
@options.scheduler_option
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="N",
              help="Show N channels per array (default: all up to 32, else the 20 largest mean gaps).")
@click.option("--all", "show_all", is_flag=True, help="Show every channel.")
@options.common_options
@options.compute_options
def command(inputs, batch_size, framework, momentum, cumulative, epochs, drop_last, from_model,
            bn_name, layout, channel_axis, norm, groups, reduce, datasets, name, skip_crc, fmt, scheduler, top,
            show_all, output, force, quiet, threads, chunk_size):
    """Per channel, the running mean and variance FRAMEWORK's BatchNorm would hold
    after E epochs of batches of B samples, beside the exact population mean and
    variance and the gap between them (mean gap in population std, var ratio).

    PATH... is one data set split along N, in the order given: a batch may
    take the end of one file and the start of the next. The data is read
    once, at the speed of `moments`; each batch's statistics are exact
    (float64), the update is the framework's own arithmetic.

    \b
    Examples:
      bnstat running acts.h5 -d 'features/block1/conv' --layout NCHW -b 32
      bnstat running acts.npy -b 64 --framework keras --epochs 3
      bnstat running acts.npy -b 64 --cumulative --format csv
      bnstat running acts.npy -b 64 --from-model model.npz --bn features.1 -o run.npz
      bnstat running shards/*.h5 -d acts --layout NCHW -b 64 --scheduler local:2
    """
    from bnstat.render import training as tr
    from bnstat.commands._output import check_target
    from bnstat.render import progress
    from bnstat.running_stats import running

    if norm not in (None, "batch") or groups is not None or reduce is not None:
        raise click.UsageError("running statistics are per channel (BatchNorm): drop --norm/--groups/--reduce")
    if cumulative and momentum is not None:
        raise click.UsageError("give --momentum or --cumulative, not both")
    if (from_model is None) != (bn_name is None):
        raise click.UsageError("--from-model and --bn go together")
    layout = options.layout_spec(layout, channel_axis, None, None, None)["layout"]
    fmt = options.format_for(fmt, output)
    check_target(output, fmt, force, list(inputs) + ([from_model] if from_model else []))
    from bnstat.io import open_sources

    sources = open_sources(inputs, datasets, check_crc=not skip_crc, name=name)
    with progress(sum(s.nbytes for s in sources), "running", enabled=not quiet) as advance:
        results = running(sources, batch_size=batch_size, framework=framework, momentum=momentum,
                          cumulative=cumulative, epochs=epochs, drop_last=drop_last,
                          from_model=from_model, bn=bn_name, layout=layout, channel_axis=channel_axis,
                          dataset=datasets, chunk_size=chunk_size, threads=threads, progress=advance,
                          check_crc=not skip_crc, scheduler=scheduler)
    tr.write_report(fmt, output, force=force, inputs=list(inputs) + ([from_model] if from_model else []),
                    to_json=lambda: tr.running_json(results),
                    to_csv=lambda fh: tr.running_csv(results, fh),
                    to_npz=lambda fh: tr.running_npz(results, fh),
                    to_table=lambda fh: tr.running_tables(results, file=fh, top=top, show_all=show_all))
