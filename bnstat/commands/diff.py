"""bnstat diff: per-unit drift between two stats, activation or model files."""

from __future__ import annotations

import click

from bnstat import options


@click.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--fail-over", "fail_over", multiple=True, metavar="METRIC=X",
              help="Exit 3 when |METRIC| exceeds X in any unit: shift, logvar, kl, changed "
              "(number of flags changed). Repeatable.")
@click.option("--map", "maps", multiple=True, metavar="A=B",
              help="Compare array (or BN layer) A of the first file with B of the second. Repeatable.")
@click.option("--sort", type=click.Choice(["unit", "shift", "logvar", "kl"]), default="unit",
              show_default=True, help="Order of the table rows (by absolute value, largest first).")
@click.option("--top", type=click.IntRange(min=1), default=None, metavar="N",
              help="Show N rows per array (default: all up to 32, else 20).")
@click.option("--all", "show_all", is_flag=True, help="Show every unit.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default=None,
              help="Output format (default: table; with -o FILE, from its extension).")
@options.layout_options
@options.dataset_option
@options.skip_crc_option
@options.common_options
@options.compute_options
def command(a, b, fail_over, maps, sort, top, show_all, fmt, layout, channel_axis, norm, groups, reduce,
            datasets, skip_crc, output, force, quiet, threads, chunk_size):
    """Compare A and B unit by unit: both means and stds, the standardized mean
    shift (mean_b - mean_a) / std_a, the log variance ratio ln(var_b / var_a),
    KL(a || b) of the two Gaussians, and the flags (empty, nan, const) that
    changed; a summary line per array with its worst units.

    A and B are each a stats file, an activation file (moments computed with
    the layout options) or a model file (its BN running statistics). Arrays
    are matched by name (BN layers to arrays as in `recalibrate`), or --map.
    Exit status 3 when a --fail-over threshold is exceeded.

    \b
    Examples:
      bnstat diff train.npz val.npz --sort shift
      bnstat diff model.npz acts.h5 --layout NCHW --map features.1=features/block1/conv
      bnstat diff model.npz model_pbn.npz --format json
      bnstat diff ref.npz today.npz --fail-over shift=3 --fail-over kl=0.5
    """
    from bnstat.render import training as tr
    from bnstat.commands._output import check_target
    from bnstat.drift import diff, parse_fail_over
    from bnstat.errors import UsageProblem

    spec = options.layout_spec(layout, channel_axis, norm, groups, reduce)
    try:
        parse_fail_over(fail_over)
    except UsageProblem as exc:
        raise click.BadParameter(str(exc), param_hint="--fail-over") from None
    fmt = options.format_for(fmt, output)
    if fmt == "npz":
        raise click.UsageError("diff writes a table, JSON or CSV")
    check_target(output, fmt, force, [a, b])
    result = diff(a, b, map=maps, fail_over=fail_over, dataset=datasets, check_crc=not skip_crc,
                  chunk_size=chunk_size, threads=threads, **spec)
    tr.write_report(fmt, output, force=force, inputs=[a, b], to_json=lambda: tr.diff_json(result),
                    to_csv=lambda fh: tr.diff_csv(result, fh),
                    to_table=lambda fh: tr.diff_tables(result, file=fh, sort=sort, top=top,
                                                       show_all=show_all))
    over = result.exceeded()
    if over:
        for name, metric, limit, units, worst in over:
            click.echo(f"bnstat: drift: {name}: {units} unit(s) over --fail-over {metric}={limit:g} "
                       f"(worst {worst:.6g})", err=True)
        raise click.exceptions.Exit(3)
