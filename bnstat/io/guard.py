"""An input changed by another program while bnstat reads it (README "Nothing lost").

A memory map of a file that another program truncates (``truncate``, or
``np.save`` over it, which opens it with O_TRUNC) kills the reader with
SIGBUS at its next access to a page past the new end. Python cannot catch
that signal: the faulting load is in numpy or a Numba kernel, and returning
from a handler runs it again. So the map is protected before the fact:

- a Linux read lease (``fcntl F_SETLEASE``) is taken on the file while it is
  mapped. A program opening it for writing or truncating it then waits (up
  to /proc/sys/fs/lease-break-time, 45 s by default) and the kernel sends
  SIGIO; the handler records it, the reader stops at its next window with
  "the input changed while it was read", releases the lease, and the writer
  goes on. The lease costs one fcntl per file;
- without a lease (another user's file without CAP_LEASE, a file open for
  writing somewhere, not the main thread, not Linux) the file is read with
  ``readinto`` into a buffer instead of being mapped (a copy of each window,
  no SIGBUS possible), and its size and modification time are compared
  before each window and at the end.
"""

from __future__ import annotations

import os
import threading

from bnstat.errors import InputError

_broken = [0]  # leases broken so far (SIGIO does not say which file: any break stops the read)
_installed = [False]


def _on_sigio(signum, frame) -> None:
    _broken[0] += 1


def changed(where: str) -> InputError:
    return InputError(f"{where}: the input changed while it was read (another program wrote "
                      "or truncated it); nothing was written",
                      "Run bnstat again once the file is complete.")


class Watch:
    """Watches the open file ``fd``; ``check()`` raises InputError once it changed.

    ``leased`` says whether a read lease protects a memory map of it; without
    one, do not map the file. ``release()`` (idempotent) lets writers go on.
    """

    def __init__(self, fd: int, where: str, *, lease: bool = True):
        self.fd = fd
        self.where = where
        self.leased = lease and _take_lease(fd)
        self._generation = _broken[0]
        self._stat = _signature(fd)

    def check(self) -> None:
        if self.leased:
            if _broken[0] != self._generation:
                raise changed(self.where)
        elif _signature(self.fd) != self._stat:
            raise changed(self.where)

    def release(self) -> None:
        if self.leased:
            import fcntl

            self.leased = False
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            except OSError:
                pass


def _signature(fd: int):
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def _take_lease(fd: int) -> bool:
    try:
        import fcntl
        import signal
    except ImportError:  # not a Unix
        return False
    if not hasattr(fcntl, "F_SETLEASE") or threading.current_thread() is not threading.main_thread():
        return False
    if not _installed[0]:
        try:
            previous = signal.getsignal(signal.SIGIO)
            if previous not in (signal.SIG_DFL, None, _on_sigio):
                return False  # the program uses SIGIO itself: leave it alone
            signal.signal(signal.SIGIO, _on_sigio)
        except (ValueError, OSError):
            return False
        _installed[0] = True
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # EACCES (another user's file), EAGAIN (open for writing somewhere)
        return False
    return True
