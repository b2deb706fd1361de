"""A progress bar on stderr (rich), only on a terminal and only after half a second."""

from __future__ import annotations

import contextlib
import sys
import time

from bnstat.render.console import make_console


class _Progress:
    """A rich progress bar on stderr that appears only after ``delay`` seconds."""

    def __init__(self, total: int, label: str, delay: float = 0.5):
        self.total = total
        self.label = label
        self.delay = delay
        self.start = time.monotonic()
        self.done = 0
        self.bar = None
        self.task = None

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is None and time.monotonic() - self.start >= self.delay:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(),
                                console=make_console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextlib.contextmanager
def progress(total: int, label: str, enabled: bool):
    """A callback ``advance(nbytes)``; a bar only when ``enabled`` and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    bar = _Progress(total, label)
    try:
        yield bar
    finally:
        bar.close()
