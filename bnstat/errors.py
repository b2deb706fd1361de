"""Errors and warnings of the bnstat library.

Library code raises :class:`BnstatError` (or a subclass); only ``bnstat.cli``
turns it into a message and an exit status. Nothing here imports click.
"""

from __future__ import annotations

import warnings


class BnstatError(Exception):
    """A data or runtime failure: unreadable input, incompatible shapes...

    ``message`` names the file, the array and what went wrong; ``hint`` (one
    line, optional) says what to do. The CLI exits with ``exit_code``.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"

    def __reduce__(self):
        # message and hint both survive pickling (a Dask worker's error reaches the client)
        return (type(self), (self.message, self.hint))


class InputError(BnstatError):
    """An input file is missing, unreadable, corrupt or of an unsupported kind."""


class OutputError(BnstatError):
    """An output cannot be written (exists without --force, is an input, disk full)."""


class DataError(BnstatError):
    """The data cannot be processed (NaN under --nan raise, bad model values)."""


class UsageProblem(BnstatError):
    """Options that do not fit the data (a layout of the wrong length...).

    Found only once a file is open, so it is raised by the library, but it is
    the user's call that is wrong: the CLI exits with 2, like click's usage
    errors.
    """

    exit_code = 2


class BnstatWarning(UserWarning):
    """Something the user should know: NaNs omitted, a layout assumed."""


def warn(message: str) -> None:
    """Emit a :class:`BnstatWarning` pointing at the caller of the library."""
    warnings.warn(message, BnstatWarning, stacklevel=3)


# Where notes go: set by the command line for its run (stderr when it is a terminal, or
# with -v); a library caller's notes go to the "bnstat" logger at level INFO.
note_printer = None


def note(message: str) -> None:
    """Say what bnstat is doing that is worth a line but is not a problem (a first compile)."""
    if note_printer is not None:
        note_printer(message)
    else:
        import logging

        logging.getLogger("bnstat").info(message)


class Terminated(BaseException):
    """Raised by the command line's SIGTERM handler so that cleanup runs (exit 143)."""


# The signal (SIGINT or SIGTERM) the command line's handler last saw, or None.
# Python ignores an exception raised while it runs a finalizer or a weakref
# callback ("Exception ignored in ..."): a signal that lands there would be
# lost and the run would go on to write its output and exit 0. The handler
# records the signal here too, and check_interrupt(), called between chunks
# and before an output is renamed into place, raises it again.
pending_signal: int | None = None


def check_interrupt() -> None:
    """Raise KeyboardInterrupt / Terminated for a signal that was swallowed."""
    if pending_signal is not None:
        import signal

        raise KeyboardInterrupt() if pending_signal == signal.SIGINT else Terminated()
