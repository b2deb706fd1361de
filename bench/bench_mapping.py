"""What mapping a page-cached file costs, against the moments kernel on it (bench/README.md, "Eighth session").

    python bench/bench_mapping.py FILE.npy [--rounds 3] [--layout NCHW]

Per round, on a fresh read-only map of the whole file: ``MADV_POPULATE_READ`` over it in
8 MiB steps (the read-ahead thread's calls), ``MADV_DONTNEED`` over it, and a touch of one
byte a page (page faults); then the chunks of a ``moments`` run iterated with no kernel
(bnstat's reader: map, populate ahead, drop each window), and ``bnstat.moments`` with the
time its kernel took. Fast populating (a few ms a GB) means the page cache holds large
folios; tens of ms, 4 KiB pages (``echo 1 > /proc/sys/vm/drop_caches`` and reading the file
again brings the large ones back).
"""

from __future__ import annotations

import mmap
import os
import time

import numpy as np
from _args import file_args

STEP = 8 << 20


def main() -> None:
    args = file_args(3)

    import bnstat
    from bnstat.io import open_any
    from bnstat.kernels import moments as km
    from bnstat.stream import DEFAULT_CHUNK_SIZE, source_rows

    with open(args.path, "rb") as f:
        n = os.fstat(f.fileno()).st_size
        gb = n / 1e9
        for _ in range(args.rounds):
            mm = mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ)
            t0 = time.perf_counter()
            for lo in range(0, n - STEP, STEP):
                mm.madvise(22, lo, STEP)  # MADV_POPULATE_READ (Linux 5.14+)
            t1 = time.perf_counter()
            for lo in range(0, n - STEP, STEP):
                mm.madvise(mmap.MADV_DONTNEED, lo, STEP)
            t2 = time.perf_counter()
            a = np.frombuffer(mm, np.uint8)
            t3 = time.perf_counter()
            a[::4096].sum()
            t4 = time.perf_counter()
            del a
            mm.close()
            print(f"map of {gb:.2f} GB: populate {t1 - t0:.3f} s, drop {t2 - t1:.3f} s, "
                  f"a fault a page {t4 - t3:.3f} s")

    (src,) = list(open_any(args.path))
    rows = source_rows(src, DEFAULT_CHUNK_SIZE)
    kernel = km.moments4_units
    spent = []

    def timed(*a):
        t = time.perf_counter()
        kernel(*a)
        spent.append(time.perf_counter() - t)
    km.moments4_units = timed
    bnstat.moments(args.path, layout=args.layout)
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _r0, _chunk in src.iter_chunks(rows):
            pass
        t1 = time.perf_counter()
        spent.clear()
        bnstat.moments(args.path, layout=args.layout)
        t2 = time.perf_counter()
        print(f"chunks iterated alone {t1 - t0:.3f} s; bnstat.moments {t2 - t1:.3f} s, "
              f"its kernel {sum(spent):.3f} s")


if __name__ == "__main__":
    main()
