"""bnstat info: the arrays of files."""

from __future__ import annotations

import click

from bnstat import options


@click.command("info")
@options.inputs_argument
@options.dataset_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@options.common_options
def command(inputs, datasets, fmt, output, force, quiet):
    """List every array of the files: name, shape, dtype, order, chunks,
    compression, size; for model files, the layers that `fold` would pair.

    \b
    Examples:
      bnstat info acts.h5
      bnstat info model.npz
      bnstat info a.npy b.npz --format json
    """
    import json

    from bnstat import render
    from bnstat.io import open_sources
    from bnstat.io.atomic import atomic_open, check_output

    if output is not None:
        check_output(output, force=force, inputs=inputs)
    sources = open_sources(inputs, datasets, check=False)
    rows = [s.describe() for s in sources]
    model_lines = _model_lines(inputs)
    with atomic_open(output or "-", "w", force=force, inputs=inputs) as fh:
        if fmt == "json":
            fh.write(json.dumps({"arrays": rows, "fold": model_lines}, indent=1) + "\n")
        else:
            render.print_info(rows, file=fh)
            if model_lines:
                render.print_lines(["", "layers fold would see:"] + [f"  {ln}" for ln in model_lines],
                                   file=fh)


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
