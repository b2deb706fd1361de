"""The inner loops of moments and hist in the L1 cache: what a value costs each, with no memory.

    python bench/bench_hist_loops.py [--reps 20000] [--rounds 5]

One row of 3136 float32 values (a 56 x 56 image plane, standard normal), 2048 bins over its
range, timed on one thread, the best of ``--rounds`` of ``--reps`` calls:

- the moments kernel's task over a block of 5 such rows (kernels.moments._units_task: sums,
  min and max, all a pass of ``bnstat moments`` does per value);
- hist's counting of a row (kernels.hist._hist_row), and its two loops alone: the guess of
  every value's bin (vectorized) and the scatter (one increment of a counter per value);
- the scatter with no test at all (``c[k] += 1``): one load and one store per value;
- the probe's interval test of a quantile pass (kernels.select._interval_hits, 4 intervals,
  counting below).

``hist --range auto`` is a moments pass then a counting pass over the same values, so its
ratio to ``moments`` is at most moments / (moments + counting); with every memory cost
removed, that is the first line of the printout's ratios. Where even the bare scatter costs
about what the moments loop does, no counting pass by increments reaches half of moments
(bench/README.md, "Eighth session").
"""

from __future__ import annotations

import argparse
import time

import numpy as np

B = 3136
NB = 2048


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from numba import njit, set_num_threads

    import bnstat.kernels.hist as kh
    import bnstat.kernels.moments as km
    import bnstat.kernels.select as ks

    set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((1, 5, 1, B)).astype(np.float32)
    row = np.ascontiguousarray(rows[0, 0, 0])
    lo, hi = float(row.min()), float(row.max())
    e = np.linspace(lo, hi, NB + 1)
    iv = NB / (hi - lo)
    g32 = np.array(kh.margin32(e, lo, iv), np.float32)
    buf = np.empty(B, np.uint32)
    c = np.zeros(NB + 5, np.uint32)
    small = np.zeros(37, np.int64)
    one = [np.zeros(1, np.int64), np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1), np.zeros(1, np.int64)]
    vl = np.quantile(row, [0.001, 0.499, 0.998, 0.9999]).astype(np.float64)
    vh = vl + 0.01
    hbuf = np.zeros(B, np.uint8)
    below = np.zeros(5, np.int64)

    @njit
    def moments(x, cnt, mean, m2, mn, mx, nanc, reps):
        for _ in range(reps):
            km._units_task(x, 0, 0, x.shape[1], 0, 1, cnt, mean, m2, mn, mx, nanc)

    @njit
    def count(row, e, c, buf, small, g32, reps):
        for _ in range(reps):
            kh._hist_row(row, False, e[0], e[-1], NB / (e[-1] - e[0]), 1.0, g32, e, c, buf, NB, small)

    @njit
    def guess(row, g32, buf, reps):
        for _ in range(reps):
            kh._hist_guess32(row, False, g32[0], g32[1], g32[2], g32[3], buf, NB, True)

    @njit
    def scatter(buf, c, reps):
        last = np.uint32(NB)
        for _ in range(reps):
            for b in range(buf.shape[0]):
                k = buf[b]
                if k == last:
                    c[0] += 1
                else:
                    c[k] += 1

    @njit
    def bare(buf, c, reps):
        for _ in range(reps):
            for b in range(buf.shape[0]):
                c[buf[b]] += 1

    @njit
    def probe(row, vl, vh, hbuf, below, reps):
        for _ in range(reps):
            ks._interval_hits(row, vl, vh, 4, hbuf, below, True)

    kh._hist_guess32(row, False, g32[0], g32[1], g32[2], g32[3], buf, NB, True)
    cases = [("moments, 5 rows", moments, (rows, *one), rows.size),
             ("hist counting, a row", count, (row, e, c, buf, small, g32), B),
             ("  its guess", guess, (row, g32, buf), B),
             ("  its scatter", scatter, (buf, c), B),
             ("bare scatter c[k] += 1", bare, (buf, c), B),
             ("probe intervals, 4", probe, (row, vl, vh, hbuf, below), B)]
    got = {}
    for name, f, fargs, n in cases:
        f(*fargs, 1)
        best = np.inf
        for _ in range(args.rounds):
            t = time.perf_counter()
            f(*fargs, args.reps)
            best = min(best, time.perf_counter() - t)
        got[name] = best / args.reps / n * 1e9
        print(f"{name:28s} {got[name]:.3f} ns a value (one thread, in L1)")
    m = got["moments, 5 rows"]
    print(f"moments / (moments + counting): {m / (m + got['hist counting, a row']):.2f}; "
          f"with the bare scatter as the whole counting: {m / (m + got['bare scatter c[k] += 1']):.2f}")


if __name__ == "__main__":
    main()
