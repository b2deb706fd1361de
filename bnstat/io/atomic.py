"""Atomic output files (SPEC 5).

An output is written to a temporary file beside its target and renamed into
place only when complete. Any exception (KeyboardInterrupt and the
SystemExit raised for SIGTERM included) removes the temporary file and
leaves an existing target untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator

from bnstat.errors import OutputError, check_interrupt

STDOUT = "-"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: str, *, force: bool = False, inputs: Iterable[str] = ()) -> None:
    """Refuse an output that is one of the inputs (always) or exists (without force).

    Raises OutputError.
    """
    if path == STDOUT:
        return
    for src in inputs:
        if src != STDOUT and os.path.exists(path) and _same_file(path, src):
            raise OutputError(
                f"{path}: the output is one of the inputs; refusing to overwrite it (even with --force)",
                "Write to another path.",
            )
    if os.path.isdir(path):
        raise OutputError(f"{path}: the output is a directory", "Give a file name.")
    if os.path.exists(path) and not force:
        raise OutputError(
            f"{path}: the output exists; nothing was written",
            "Use --force to replace it, or choose another path.",
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"{path}: the folder {parent} does not exist")


@contextlib.contextmanager
def atomic_path(path: str, *, force: bool = False, inputs: Iterable[str] = ()) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The caller writes the whole output to the yielded path. On any exception
    the temporary file is removed and the exception propagates; an existing
    ``path`` is never touched before the final rename. Raises OutputError.
    """
    check_output(path, force=force, inputs=inputs)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".bnstat-tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create a file in {directory}: {exc.strerror}") from exc
    os.close(fd)
    try:
        yield tmp
        check_interrupt()  # a signal swallowed on the way must not let the output land
        try:
            if os.path.exists(path):
                # keep the permissions of the file being replaced
                os.chmod(tmp, os.stat(path).st_mode & 0o7777)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", *, force: bool = False,
                inputs: Iterable[str] = ()) -> Iterator:
    """Open a file object for an atomic output (``-`` is standard output).

    Write errors (a full disk) become OutputError naming the path.
    """
    if path == STDOUT:
        import sys

        stream = sys.stdout.buffer if "b" in mode else sys.stdout
        try:
            yield stream
            stream.flush()
        except BrokenPipeError:
            raise  # `| head`: cli ends quietly
        except OSError as exc:  # a full disk behind `> FILE`, /dev/full
            raise OutputError(f"<stdout>: cannot write: {exc.strerror or exc}") from exc
        return
    with atomic_path(path, force=force, inputs=inputs) as tmp:
        try:
            with open(tmp, mode) as fh:
                yield fh
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
