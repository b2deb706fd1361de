"""bnstat on Dask against bnstat alone, and against dask's own reductions, in one run.

    python bench/bench_dask.py [--shards 8] [--shard-mb 256] [--reps 3] [--tmp DIR]
                               [--cases moments,hist]

Three comparisons (README "On a Dask cluster"; figures in bench/README.md):

1. Whole processes on the same shards (page cache warmed first):
   ``bnstat moments shard*.npy --layout NCHW`` (local, 2 threads) against
   ``bnstat moments ... --scheduler local:2`` (a LocalCluster of 2 worker
   processes started by the run, 1 kernel thread each), the two runs
   interleaved. The ratio is the cost of the cluster: importing distributed,
   its start-up, the task round trips and the per-worker kernel warm-up.
2. In one process, on one dask array of the same data (memory-mapped shards
   concatenated, chunks of 64 samples, the threaded scheduler):
   ``bnstat.dask.moments(x)`` against ``dask.compute(x.mean(a), x.var(a),
   x.min(a), x.max(a))``, which is what a dask user writes for the same four
   statistics.
3. (``hist``) On the same dask array: ``bnstat.dask.hist(x)`` (per-channel
   histograms of 2048 bins over each channel's exact min..max, with the
   moments: two passes) against ``dask.array.histogram`` of the whole tensor
   over ``(da.min(x), da.max(x))`` (two passes too: dask has no per-channel
   histogram, so its figure is for one histogram where bnstat makes 64), and
   against ``bnstat.hist`` on the same data in memory (a numpy array, no
   dask); the three interleaved.

Each figure is the median of ``--reps`` runs, with the spread (min..max).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

C, H, W = 64, 28, 28


def _timed(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def _interleaved(fns, reps):
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [(statistics.median(ts), min(ts), max(ts)) for ts in times]


def _cli(args):
    def go():
        subprocess.run([sys.executable, "-m", "bnstat", *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return go


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-mb", type=float, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--cases", default="moments,hist", help="moments, hist or both")
    args = ap.parse_args(argv)
    cases = set(args.cases.split(","))
    import dask
    import dask.array as da

    import bnstat.dask

    n = max(1, int(args.shard_mb * 1e6 / (C * H * W * 4)))
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.shards):
            p = os.path.join(d, f"shard{i}.npy")
            np.save(p, rng.standard_normal((n, C, H, W), dtype=np.float32))
            paths.append(p)
        total = sum(os.path.getsize(p) for p in paths)
        subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)  # page cache
        base = ["moments", *paths, "--layout", "NCHW", "--format", "json", "-q", "-o", os.devnull,
                "--force"]
        arrays = [np.load(p, mmap_mode="r") for p in paths]
        x = da.concatenate([da.from_array(a, chunks=(64, C, H, W)) for a in arrays])
        if "moments" in cases:
            _cli(base)()  # numba cache warm
            # interleaved, so that the load of a shared machine falls on both alike
            local, cluster = _interleaved([_cli(base), _cli(base + ["--scheduler", "local:2"])],
                                          args.reps)
            axes = (0, 2, 3)
            bnstat.dask.moments(x[:64], layout="NCHW")  # kernels loaded
            ours = _timed(lambda: bnstat.dask.moments(x, layout="NCHW"), args.reps)
            theirs = _timed(lambda: dask.compute(x.mean(axes), x.var(axes), x.min(axes),
                                                 x.max(axes)), args.reps)
        if "hist" in cases:
            import bnstat

            def dask_histogram():
                lo, hi = dask.compute(x.min(), x.max())
                return da.histogram(x, bins=2048, range=(float(lo), float(hi)))[0].compute()

            in_memory = np.concatenate(arrays)  # read into memory
            bnstat.dask.hist(x[:64], layout="NCHW")  # kernels loaded
            bnstat.hist(in_memory[:64], layout="NCHW")
            h_ours, h_dask, h_mem = _interleaved(
                [lambda: bnstat.dask.hist(x, layout="NCHW"), dask_histogram,
                 lambda: bnstat.hist(in_memory, layout="NCHW")], args.reps)
            del in_memory
    gb = total / 1e9
    print(f"{args.shards} shards of {n} x {C}x{H}x{W} float32, {gb:.2f} GB in all, "
          f"{os.cpu_count()} cores, median of {args.reps} (min..max)\n")
    print("| what | seconds | GB/s | ratio |")
    print("|---|---|---|---|")

    def row(what, t, ref=None):
        ratio = "" if ref is None else f"{t[0] / ref[0]:.2f}x"
        print(f"| {what} | {t[0]:.2f} ({t[1]:.2f}..{t[2]:.2f}) | {gb / t[0]:.2f} | {ratio} |")

    if "moments" in cases:
        row("bnstat moments (local, whole process)", local)
        row("bnstat moments --scheduler local:2 (whole process)", cluster, local)
        row("bnstat.dask.moments(x) (in process)", ours)
        row("dask mean+var+min+max (in process)", theirs, ours)
    if "hist" in cases:
        row(f"bnstat.dask.hist(x): {C} per-channel histograms, 2048 bins, range auto", h_ours)
        row("dask: da.histogram(x) per tensor, 2048 bins, range da.min..da.max", h_dask, h_ours)
        row("bnstat.hist(numpy array in memory), per channel", h_mem, h_ours)

if __name__ == "__main__":
    main()
