"""Atomic output files (README "Exit codes" and "Nothing lost").

An output is written to a temporary file beside its target and renamed into
place only when complete. Any exception (KeyboardInterrupt and the
SystemExit raised for SIGTERM included) removes the temporary file and
leaves an existing target untouched.

The rules of README "Nothing lost":

- an output is never one of the inputs, primary or secondary (a stats file,
  a model, a plan), whatever path names it (a symlink, a hard link, ``..``)
  and standard input included when it is redirected from a regular file: the
  inputs are compared by device and inode, even with ``force``;
- an existing target that is not a regular file (``/dev/null``, a FIFO, a
  terminal, a character device) is written straight into, without a
  temporary file or a rename and without needing ``force``; a directory is
  refused;
- a symlink to a file is written through: the temporary file is created
  beside the file it points to, which the rename replaces (as ``cp`` would
  write into it), and the link stays;
- HDF5 outputs go through :func:`hdf5_file`, so that a full disk is an
  OutputError and never a crash in the HDF5 library.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator

from bnstat.errors import OutputError, check_interrupt

STDOUT = "-"

# the temporary name is ".NAME.XXXXXXXX.bnstat-tmp": 21 bytes more than NAME
_TMP_SUFFIX = ".bnstat-tmp"
_NAME_MAX = 255


def _stat(path: str, fd: int | None = None) -> os.stat_result | None:
    try:
        return os.fstat(fd) if fd is not None else os.stat(path)
    except (OSError, ValueError):
        return None


def is_special(path: str) -> bool:
    """True for an existing output target that is not a regular file or a directory."""
    if path == STDOUT:
        return False
    st = _stat(path)
    return st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode)


def _input_stat(src) -> os.stat_result | None:
    if src == STDOUT:  # standard input: only a regular file can be written over
        st = _stat("", 0)
        return st if st is not None and stat.S_ISREG(st.st_mode) else None
    return _stat(os.fspath(src))


def check_output(path: str, *, force: bool = False, inputs: Iterable = ()) -> None:
    """Refuse an output that is one of the inputs (always) or exists (without force).

    ``inputs``: every file the run reads (``-`` is standard input). A target
    that is not a regular file (a device, a FIFO) needs no ``force``.
    Raises OutputError.
    """
    if path == STDOUT:
        return
    target = _stat(path)
    if target is not None:
        for src in inputs:
            st = _input_stat(src)
            if st is not None and (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                what = "standard input" if src == STDOUT else "one of the inputs"
                raise OutputError(
                    f"{path}: the output is {what}; refusing to overwrite it (even with --force)",
                    "Write to another path.",
                )
        if stat.S_ISDIR(target.st_mode):
            raise OutputError(f"{path}: the output is a directory", "Give a file name.")
        if stat.S_ISREG(target.st_mode) and not force:
            raise OutputError(
                f"{path}: the output exists; nothing was written",
                "Use --force to replace it, or choose another path.",
            )
        return
    parent = os.path.dirname(os.path.abspath(_resolved(path)))
    if not os.path.isdir(parent):
        raise OutputError(f"{path}: the folder {parent} does not exist")


def _resolved(path: str) -> str:
    """The file a symlink points to (the rename must replace it, not the link)."""
    return os.path.realpath(path) if os.path.islink(path) else path


def _tmp_prefix(base: str) -> str:
    """``.BASE.``, BASE shortened so that the temporary name fits in NAME_MAX bytes."""
    room = _NAME_MAX - (2 + 8 + len(_TMP_SUFFIX))
    raw = os.fsencode(base)
    if len(raw) > room:
        base = os.fsdecode(raw[:room])  # a cut UTF-8 sequence stays bytes (surrogateescape)
    return f".{base}."


@contextlib.contextmanager
def atomic_path(path: str, *, force: bool = False, inputs: Iterable = ()) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The caller writes the whole output to the yielded path (opening it
    without O_EXCL: the file exists, empty). On any exception the temporary
    file is removed and the exception propagates; an existing ``path`` is
    never touched before the final rename. A target that is not a regular
    file is yielded itself, to be written straight into. Raises OutputError.
    """
    inputs = list(inputs)
    check_output(path, force=force, inputs=inputs)
    if is_special(path):
        yield path
        check_interrupt()
        return
    real = _resolved(path)
    directory = os.path.dirname(os.path.abspath(real))
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(os.path.basename(real)), suffix=_TMP_SUFFIX,
                                   dir=directory)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create a file in {directory}: {exc.strerror}") from exc
    os.close(fd)
    try:
        yield tmp
        check_interrupt()  # a signal swallowed on the way must not let the output land
        check_output(path, force=force, inputs=inputs)  # an input moved there meanwhile
        try:
            if os.path.exists(real):
                # keep the permissions of the file being replaced
                os.chmod(tmp, os.stat(real).st_mode & 0o7777)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, real)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write: {exc.strerror}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", *, force: bool = False,
                inputs: Iterable = ()) -> Iterator:
    """Open a file object for an atomic output (``-`` is standard output).

    Write errors (a full disk) become OutputError naming the path.
    """
    if path == STDOUT:
        import sys

        if sys.stdout is None:  # started with stdout closed (`>&-`)
            raise OutputError("<stdout>: standard output is closed", "Give -o FILE, or redirect it.")
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


class StreamOnly:
    """A write-only view of ``fh`` that cannot seek: zipfile then writes a stream.

    For a special target (a FIFO cannot seek; /dev/null seeks but its offset
    stays 0, which breaks the offsets zipfile patches in).
    """

    def __init__(self, fh):
        self._fh = fh

    def write(self, b):
        return self._fh.write(b)

    def flush(self):
        self._fh.flush()

    def tell(self):
        import io

        raise io.UnsupportedOperation("not seekable")


# ---- HDF5 ----------------------------------------------------------------------

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


class _GuardedFile:
    """The file object HDF5 writes through (h5py's ``fileobj`` driver).

    HDF5 does not survive a failed write: after ENOSPC its objects cannot be
    closed, and freeing them crashes the interpreter (SIGSEGV). This file
    records the first failed write and swallows it and every later one, so
    that HDF5 always sees success and closes cleanly; :meth:`check` (called
    after each chunk, and on close) raises the recorded error. The file
    written is then garbage and removed, as any failed output.
    """

    def __init__(self, path: str, mode: str):
        self._fh = open(path, mode)  # noqa: SIM115 - closed by close()
        self.error: OSError | None = None

    def readinto(self, b):
        return self._fh.readinto(b)

    def read(self, n=-1):
        return self._fh.read(n)

    def write(self, b):
        n = len(memoryview(b).cast("B"))
        if self.error is None:
            try:
                self._fh.write(b)
            except OSError as exc:
                if exc.errno not in _FULL:
                    raise
                self.error = exc
        return n

    def seek(self, offset, whence=0):
        return self._fh.seek(offset, whence)

    def tell(self):
        return self._fh.tell()

    def truncate(self, size=None):
        if self.error is None:
            try:
                return self._fh.truncate(size)
            except OSError as exc:
                if exc.errno not in _FULL and exc.errno != errno.EINVAL:
                    raise
        return size

    def flush(self):
        if self.error is None:
            try:
                self._fh.flush()
            except OSError as exc:
                if exc.errno not in _FULL:
                    raise
                self.error = exc

    def close(self):
        with contextlib.suppress(OSError):
            self._fh.close()

    def check(self, where: str | None) -> None:
        if self.error is not None:
            if where is None:
                raise self.error
            raise OutputError(f"{where}: cannot write: {self.error.strerror or self.error}")


@contextlib.contextmanager
def hdf5_file(tmp: str, path: str | None = None, mode: str = "w") -> Iterator:
    """``h5py.File`` on the temporary file ``tmp`` of the output ``path``.

    ``mode`` "w" (a new file) or "r+" (a copy being edited). Yields
    ``(f, check)``: ``check()`` raises OutputError naming ``path`` (without
    ``path``: the OSError) once a write failed (a full disk); it is called
    again on close, after HDF5 has closed every object, so that nothing of
    HDF5 outlives the file removed by atomic_path.
    """
    import h5py

    guard = _GuardedFile(tmp, "r+b")
    try:
        f = h5py.File(guard, mode)
    except BaseException:
        guard.close()
        raise
    try:
        try:
            yield f, lambda: guard.check(path)
        finally:
            f.close()  # HDF5 closes every dataset and group still open in the file
            guard.close()
        guard.check(path)
    except OSError as exc:
        if path is None:
            raise
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
