"""Writing a statistics report (table, JSON, CSV, stats file) to stdout or a file."""

from __future__ import annotations

import io
import sys

import click


def check_target(output: str | None, fmt: str, force: bool, inputs) -> None:
    """Refuse a bad output before any work is done (OutputError, UsageError)."""
    from bnstat.io.atomic import check_output

    if fmt == "npz" and (output is None or output == "-") and sys.stdout.isatty():
        raise click.UsageError("a stats file is binary: give -o FILE.npz, or redirect standard output")
    if output is not None:
        check_output(output, force=force, inputs=inputs)


def emit(stats: dict, fmt: str, output: str | None, *, force: bool = False, inputs=(),
         sort: str = "unit", top=None, show_all: bool = False, summary: bool = False) -> None:
    """Render ``stats`` in ``fmt`` to ``output`` (None or '-': stdout), atomically."""
    from bnstat import render
    from bnstat.io.atomic import atomic_open
    from bnstat.stats import save_stats

    from bnstat.io.atomic import is_special

    target = output or "-"
    if fmt == "npz":
        if target == "-" or is_special(target):
            # np.savez seeks back (and /dev/null's offset stays 0); a stats file is small
            buf = io.BytesIO()
            save_stats(stats, buf)
            with atomic_open(target, "wb", force=force, inputs=inputs) as fh:
                fh.write(buf.getvalue())
            return
        with atomic_open(target, "wb", force=force, inputs=inputs) as fh:
            save_stats(stats, fh)
        return
    with atomic_open(target, "w", force=force, inputs=inputs) as fh:
        if fmt == "json":
            fh.write(render.to_json(stats))
        elif fmt == "csv":
            render.write_csv(stats, fh)
        else:
            render.print_tables(stats, file=fh, sort=sort, top=top, show_all=show_all, summary=summary)
