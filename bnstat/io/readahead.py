"""Reading ahead of the consumer: the pages of the next window are brought in by a thread.

A memory-mapped ``.npy`` window used to be brought in by the consumer itself
(``MADV_POPULATE_READ`` on the window, then the kernels), with
``MADV_WILLNEED`` on the next window. Cold, that left the disk idle while the
kernels ran and the kernel's own readahead interleaved with the WILLNEED
requests: 4 GB read at 1.0-1.7 GB/s where ``cat`` read 1.7-2.7 GB/s, and
populating alone (no WILLNEED) read at ``cat``'s speed (bench/README.md,
"Cold reads"). Here a thread populates the map in steps of ``STEP`` bytes,
in file order, never more than ``ahead`` bytes past the end of the window in
use, so the disk stays busy while the kernels compute and resident memory
stays the window plus ``ahead`` (the consumer drops each window after use).

``MADV_POPULATE_READ`` (Linux 5.14+) reports a page it cannot read (a file
truncated under the map) as an error instead of SIGBUS, so the thread itself
is safe; the consumer keeps its own checks (bnstat/io/guard.py). When the
call is missing or fails, the thread stops and the consumer populates each
window itself, as before.
"""

from __future__ import annotations

import threading

MADV_POPULATE_READ = 22  # Linux 5.14+ (not in Python's mmap module)
# Bytes per populate call: the device's readahead size here (8 MiB). CPython's
# mmap.madvise keeps the GIL during the call, so the consumer's Python code (not the
# kernels, which run without it) may wait for one step: a few ms cold, well under 1 ms
# page-cached. A madvise through ctypes would release it (not measured yet).
STEP = 8 << 20


class MapPrefetcher:
    """Populates ``mm[start:end]`` ahead of a consumer that reads it in order.

    ``wait(hi)`` blocks until the bytes below ``hi`` are populated and says
    whether they are (False: the thread stopped on an error or was closed;
    populate the window yourself). ``advance(lo)`` tells the thread the
    consumer is done with everything below ``lo`` (it may then read up to
    ``lo + window + ahead``). ``close()`` stops and joins the thread; call it
    before closing the map. Offsets are page-aligned by the caller.
    """

    def __init__(self, mm, start: int, end: int, *, window: int, ahead: int, page: int):
        self.mm = mm
        self.end = end
        self.page = page
        self.window = window
        self.ahead = ahead
        self.ready = start  # populated below this offset
        self.limit = start + window + ahead
        self.failed = False
        self.stopped = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="bnstat-readahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.stopped and self.ready >= self.limit and self.ready < self.end:
                        self.cond.wait()
                    if self.stopped or self.ready >= self.end:
                        return
                    lo = self.ready
                    hi = min(self.end, self.limit, lo + STEP)
                self.mm.madvise(MADV_POPULATE_READ, lo, hi - lo)
                with self.cond:
                    self.ready = hi
                    self.cond.notify_all()
        except (OSError, ValueError):  # an old kernel, a page past a new end of file, a closed map
            with self.cond:
                self.failed = True
                self.cond.notify_all()

    def wait(self, hi: int) -> bool:
        with self.cond:
            while self.ready < hi and not (self.failed or self.stopped):
                self.cond.wait()
            return self.ready >= hi

    def advance(self, lo: int) -> None:
        with self.cond:
            self.limit = max(self.limit, lo - lo % self.page + self.window + self.ahead)
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join()
