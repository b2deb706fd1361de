"""bnstat fold: BatchNorm folded into the conv / conv-transpose / linear layer feeding it."""

from __future__ import annotations

import click

from bnstat import options


def _pair_callback(ctx, param, value):
    out = []
    for text in value:
        conv, sep, bn = text.partition("=")
        if not sep or not conv.strip() or not bn.strip():
            raise click.BadParameter(f"{text!r}: write CONV=BN, e.g. --pair features.0=features.1",
                                     ctx=ctx, param=param)
        out.append(f"{conv.strip()}={bn.strip()}")
    return tuple(out)


@click.command("fold")
@click.argument("model", metavar="MODEL")
@click.option("--pair", "pairs", multiple=True, metavar="CONV=BN", callback=_pair_callback,
              help="Fold BN into CONV, whatever names and shapes say. Repeatable.")
@click.option("--plan", "plan", type=str, default=None, metavar="FILE",
              help="A JSON plan to follow (with --dry-run: where to write the plan).")
@click.option("--dry-run", is_flag=True, help="Print the plan; write no model.")
@click.option("--eps", type=click.FloatRange(min=0), default=None, metavar="EPS",
              help="The BN epsilon, for every BN. [default: a Keras model's own (model_config), "
              "else PyTorch 1e-5, Keras 1e-3]")
@click.option("--bn", "bn_mode", type=click.Choice(["drop", "identity"]), default="drop",
              show_default=True,
              help="drop: remove the folded BN layers' arrays (the layers get a bias); identity: "
              "keep every key, the BN becoming an identity plus shift.")
@click.option("--check", is_flag=True,
              help="Run every folded pair against layer-then-BN on random inputs (the arithmetic "
              "under the plan's reading, not the pairing); exit 1 when one is over tolerance.")
@click.option("--strict", is_flag=True,
              help="Refuse to fold when a pair rests on an assumption (exit 1, nothing written).")
@click.option("--config", "keras_config", default=None, metavar="FILE",
              help="The graph (config.json or a .keras) of a Keras 3 .weights.h5 MODEL.")
@options.format_option
@options.model_output_options
def command(model, pairs, plan, dry_run, eps, bn_mode, check, strict, keras_config, fmt, output,
            force, quiet):
    """Fold every BatchNorm of MODEL into the conv, conv-transpose or linear
    layer that feeds it: W' = W * gamma/sqrt(var+eps), b' = (b - mean) *
    gamma/sqrt(var+eps) + beta.

    MODEL is a .npz, HDF5 or .safetensors file in PyTorch state_dict naming
    or Keras naming, a Keras 3 .keras / .weights.h5 (graph from --config or
    the .keras beside it) or an ONNX .onnx model (the onnx extra); the
    output has the same format (or the one -o's
    extension names). BNs that names and shapes do not pair unambiguously
    are listed and left alone: settle them with --pair or a plan. Each pair
    shows the evidence it rests on; a pair resting on an assumption (say a
    square weight that reads both as conv and conv-transpose) is folded the
    common way and warned about, or refused with --strict.

    \b
    Examples:
      bnstat fold model.npz -o folded.npz --check
      bnstat fold model.npz --dry-run
      bnstat fold model.npz --dry-run --plan plan.json    # edit it, then:
      bnstat fold model.npz -o folded.npz --plan plan.json
      bnstat fold model.npz -o folded.npz --pair stem=norm1 --eps 1e-3
      bnstat fold weights.h5 -o folded.h5 --bn identity
      bnstat fold model.safetensors --dry-run --format json --strict
      bnstat fold m.keras -o folded.keras
      bnstat fold m.weights.h5 --config config.json -o folded.weights.h5 --bn identity
      bnstat fold model.onnx -o folded.onnx --check
    """
    from bnstat.render import fold as fold_render
    from bnstat.folding import FoldAssumptionError, FoldCheckError, fold

    if fmt not in (None, "table", "json"):
        raise click.UsageError(f"--format {fmt}: fold prints its plan as a table or json")
    show = fold_render.print_json if fmt == "json" else fold_render.print_plan

    if output is None and not dry_run:
        raise click.UsageError("fold needs -o OUTPUT (or --dry-run to see the plan)")
    if output == "-":
        raise click.UsageError("-o -: fold writes a model file and prints the plan; give a path")
    from bnstat.folding.onnx import is_onnx

    if is_onnx(model):
        return _fold_onnx(model, output, pairs, plan, eps, bn_mode, check, dry_run, force, fmt)
    from bnstat.io.models.keras3 import config_from

    if keras_config and output and not dry_run:
        from bnstat.io.atomic import check_output

        check_output(output, force=force, inputs=[keras_config])  # never over the config
    try:
        with config_from(keras_config):
            result = fold(model, output=output, pairs=pairs,
                          plan=None if dry_run else plan, plan_output=plan if dry_run else None,
                          eps=eps, bn=bn_mode, check=check, dry_run=dry_run, force=force,
                          strict=strict)
    except (FoldCheckError, FoldAssumptionError) as exc:
        show(exc.result)
        raise
    show(result)


def _fold_onnx(model, output, pairs, plan, eps, bn_mode, check, dry_run, force, fmt):
    """fold on an ONNX model: the graph settles every pair (--strict has nothing to refuse)
    and each node has its epsilon."""
    import json

    from bnstat import render
    from bnstat.folding.onnx import fold_onnx

    for given, flag in ((pairs, "--pair"), (plan, "--plan"), (eps is not None, "--eps"),
                        (bn_mode != "drop", "--bn identity")):
        if given:
            raise click.UsageError(f"{flag}: an ONNX model is folded along its graph, with each "
                                   "BatchNormalization node's own epsilon; drop it")
    result = fold_onnx(model, output, dry_run=dry_run, check=check, force=force)
    if fmt == "json":
        click.echo(json.dumps(result.report_dict(), indent=1, allow_nan=False))
    else:
        render.print_lines(result.lines())
