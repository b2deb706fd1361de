"""bnstat info: the arrays of files."""

from __future__ import annotations

import click

from bnstat import options


@click.command("info")
@options.inputs_argument
@options.dataset_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@click.option("--config", "keras_config", default=None, metavar="FILE",
              help="The graph (config.json or a .keras) of Keras 3 .weights.h5 inputs.")
@options.common_options
def command(inputs, datasets, fmt, keras_config, output, force, quiet):
    """List every array of the files: name, shape, dtype, order, chunks,
    compression, size; for model files, the layers that `fold` would pair.

    \b
    Examples:
      bnstat info acts.h5
      bnstat info model.npz
      bnstat info a.npy b.npz --format json
    """
    from bnstat import render
    from bnstat.io import open_sources
    from bnstat.io.atomic import atomic_open, check_output

    if output is not None:
        check_output(output, force=force, inputs=inputs)
    from bnstat.io.models.keras3 import config_from, is_keras_archive
    from bnstat.folding.onnx import describe_onnx, is_onnx

    # ONNX models and .keras zips are model files only: no array rows, their layers below
    onnx_lines = [ln for path in inputs if is_onnx(path) for ln in describe_onnx(path)]
    arrays_in = [p for p in inputs if not is_onnx(p) and not (p != "-" and is_keras_archive(p))]
    skipped: list = []
    sources = open_sources(arrays_in, datasets, check=False, skipped=skipped) if arrays_in else []
    rows = _rows(sources, skipped, arrays_in)
    unusable = [f"{r['name']} ({r['skip']})" for r in rows if r["skip"]]
    with config_from(keras_config):
        model_lines = onnx_lines + _model_lines([p for p in inputs if not is_onnx(p)])
    with atomic_open(output or "-", "w", force=force, inputs=inputs) as fh:
        if fmt == "json":
            from bnstat.render.records import dumps

            fh.write(dumps({"arrays": rows, "fold": model_lines}, indent=1))
        else:
            if rows:
                render.print_info(rows, file=fh)
            if unusable:
                render.print_lines([f"moments cannot use (skipped without -d, an error when "
                                    f"selected or alone): {', '.join(unusable)}"], file=fh)
            if model_lines:
                render.print_lines(["", "layers fold would see:"] + [f"  {ln}" for ln in model_lines],
                                   file=fh)


def _rows(sources, skipped, paths) -> list[dict]:
    """Every array of the files, in command-line order, each with ``skip``: why moments
    cannot use it (None when they can)."""
    from bnstat.io.base import dtype_problem, shape_problem

    rows = [{**s.describe(), "skip": shape_problem(s.shape) or dtype_problem(s.dtype)} for s in sources]
    rows += [s.describe() for s in skipped]
    order = {p: i for i, p in enumerate(paths)}
    return sorted(rows, key=lambda r: order.get(r["path"], len(order)))


def _model_lines(inputs) -> list[str]:
    """What `fold` would see in model files; nothing for activation files."""
    try:
        from bnstat.folding import describe_model
    except ImportError:
        return []
    lines: list[str] = []
    for path in inputs:
        if path == "-":
            continue
        try:
            lines.extend(describe_model(path))
        except Exception:  # an activation file is no model: nothing to describe
            continue
    return lines
