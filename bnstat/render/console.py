"""The rich console and the one way text rendered by rich reaches a file."""

from __future__ import annotations

import os
import sys


def make_console(file=None, stderr=False, width=140):
    """A rich console for ``file``: the terminal's width, else $COLUMNS, else ``width``."""
    from rich.console import Console

    target = file if file is not None else (sys.stderr if stderr else sys.stdout)
    if not (hasattr(target, "isatty") and target.isatty()):
        width = int(os.environ.get("COLUMNS", 0) or 0) or width
    else:
        width = None
    return Console(file=target, width=width, highlight=False, soft_wrap=False)


def emit_rich(draw, *, file=None, width=140) -> None:
    """Render with ``draw(console)``, then write the text with a plain ``write``.

    rich's own writes turn a broken pipe into ``SystemExit(1)``
    (``Console.on_broken_pipe``); bnstat.cli ends a broken pipe quietly with
    its own status (141, as a Unix tool killed by SIGPIPE). Write errors
    propagate as OSError.
    """
    target = file if file is not None else sys.stdout
    console = make_console(target, width=width)
    with console.capture() as captured:
        draw(console)
    # rich pads lines to the console's width; trailing blanks only get in the way of diff and grep
    target.write("\n".join(line.rstrip(" ") for line in captured.get().split("\n")))
    target.flush()
