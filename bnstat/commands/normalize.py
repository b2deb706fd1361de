"""bnstat normalize: arrays normalized as BN / LayerNorm / InstanceNorm / GroupNorm would."""

from __future__ import annotations

import click

from bnstat import options


@click.command("normalize")
@click.argument("input_path", metavar="PATH")
@click.option("--stats", "stats_file", type=str, default=None, metavar="STATS.npz",
              help="Normalize with statistics saved by `bnstat moments -o` (matched by array name).")
@click.option("--model", type=str, default=None, metavar="MODEL",
              help="A model file (.npz, HDF5, .safetensors; PyTorch or Keras naming) whose BN layer to apply.")
@click.option("--bn", "bn_name", type=str, default=None, metavar="NAME",
              help="The BatchNorm layer of --model, e.g. features.1 or batch_normalization.")
@click.option("--eps", type=click.FloatRange(min=0), default=None,
              help="Added to the variance. [default: 1e-5; with a Keras --model, 1e-3]")
@click.option("--per-batch", type=click.IntRange(min=1), default=None, metavar="B",
              help="Normalize each run of B samples along N with its own statistics (BN training).")
@options.layout_options
@options.dataset_option
@options.name_option
@options.skip_crc_option
@options.nan_option
@options.common_options
@options.compute_options
def command(input_path, stats_file, model, bn_name, eps, per_batch, layout, channel_axis, norm,
            groups, reduce, datasets, name, skip_crc, nan_policy, output, force, quiet, threads, chunk_size):
    """Write PATH normalized: y = (x - mean) / sqrt(var + eps) * gamma + beta.

    The output has the input's format (.npy, .npz members, HDF5 datasets with
    their paths, chunks and compression) and dtype (integers become float32);
    '-o -' writes a .npy stream. Without --stats/--model the input's own
    statistics are used (batch norm reads the file twice). Memory is bounded
    by --chunk-size; the output appears only when complete.

    \b
    Examples:
      bnstat normalize acts.npy -o normed.npy --layout NCHW
      bnstat normalize acts.h5 -o normed.h5 --norm group --groups 8
      bnstat normalize acts.npy -o normed.npy --stats stats.npz
      bnstat normalize shard2.npy -o normed2.npy --stats stats.npz --name act
      bnstat normalize acts.npy -o normed.npy --per-batch 32
      bnstat normalize acts.npy -o - --model model.npz --bn features.1 | ...
    """
    from bnstat.io import open_sources
    from bnstat.normalizing import normalize
    from bnstat.render import progress

    if output is None:
        raise click.UsageError("normalize needs -o OUTPUT ('-' for standard output)")
    spec = options.layout_spec(layout, channel_axis, norm, groups, reduce)
    if norm is None:
        spec["norm"] = None  # let a stats file's layout apply
    if (model is None) != (bn_name is None):
        raise click.UsageError("--model and --bn go together")
    from bnstat.io.atomic import check_output

    check_output(output, force=force, inputs=[input_path, *filter(None, (stats_file, model))])
    # the progress total only: the library opens (and checks, and warns about) the input itself
    total = sum(s.nbytes for s in open_sources([input_path], datasets, check=False)) \
        if input_path != "-" else 0
    passes = 2 if (stats_file is None and model is None and per_batch is None) else 1
    with progress(total * passes, "normalize", enabled=not quiet and total > 0) as advance:
        normalize(input_path, output, stats=stats_file, model=model, bn=bn_name, eps=eps,
                  per_batch=per_batch, dataset=datasets, chunk_size=chunk_size, threads=threads,
                  nan=nan_policy, force=force, progress=advance, check_crc=not skip_crc, name=name, **spec)
