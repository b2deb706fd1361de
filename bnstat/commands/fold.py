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
              help="Run every folded pair against layer-then-BN on random inputs; exit 1 when one "
              "is over tolerance.")
@options.common_options
def command(model, pairs, plan, dry_run, eps, bn_mode, check, output, force, quiet):
    """Fold every BatchNorm of MODEL into the conv, conv-transpose or linear
    layer that feeds it: W' = W * gamma/sqrt(var+eps), b' = (b - mean) *
    gamma/sqrt(var+eps) + beta.

    MODEL is a .npz, HDF5 or .safetensors file in PyTorch state_dict naming
    or Keras naming; the output has the same format (or the one -o's
    extension names). BNs that names and shapes do not pair unambiguously
    are listed and left alone: settle them with --pair or a plan.

    \b
    Examples:
      bnstat fold model.npz -o folded.npz --check
      bnstat fold model.npz --dry-run
      bnstat fold model.npz --dry-run --plan plan.json    # edit it, then:
      bnstat fold model.npz -o folded.npz --plan plan.json
      bnstat fold model.npz -o folded.npz --pair stem=norm1 --eps 1e-3
      bnstat fold weights.h5 -o folded.h5 --bn identity
    """
    from bnstat import fold_render
    from bnstat.folding import FoldCheckError, fold

    if output is None and not dry_run:
        raise click.UsageError("fold needs -o OUTPUT (or --dry-run to see the plan)")
    if output == "-":
        raise click.UsageError("-o -: fold writes a model file and prints the plan; give a path")
    try:
        result = fold(model, output=output, pairs=pairs,
                      plan=None if dry_run else plan, plan_output=plan if dry_run else None,
                      eps=eps, bn=bn_mode, check=check, dry_run=dry_run, force=force)
    except FoldCheckError as exc:
        fold_render.print_plan(exc.result)
        raise
    fold_render.print_plan(result)
