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
