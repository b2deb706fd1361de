"""bnstat hist benchmark: histograms and exact quantiles against moments and np.quantile.

    python bench/bench_hist.py [--size-mb 1024] [--tmp DIR] [--threads N]

Writes a float32 NCHW .npy of the given size (64 channels of 56 x 56), reads
it once (page cache warm), then runs each case in its own process: the
bnstat CLI (wall time, peak RSS by /usr/bin/time) and, for the work time, a
library call timed inside a process that first warmed the kernels on a tiny
file. np.quantile per channel runs on the array loaded in memory, against
bnstat.hist(array, quantiles=...) on the same array in memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

PY = sys.executable
Q = "0.001,0.5,0.999,0.9999"
C, H, W = 64, 56, 56

CHILD = r"""
import sys, time, json, numpy as np, bnstat
mode, path, tiny, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) or None
q = [0.001, 0.5, 0.999, 0.9999]
kw = dict(layout="NCHW", threads=threads)
def run(src):
    if mode == "moments":
        return bnstat.moments(src, engine="numba", **kw)
    if mode == "hist":
        return bnstat.hist(src, **kw)
    if mode == "quantiles":
        return bnstat.hist(src, bins=1, quantiles=q, **kw)
    if mode == "np.quantile":
        x = src if isinstance(src, np.ndarray) else np.load(src)
        return np.quantile(x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1), q, axis=1)
run(tiny)
src = path
if mode == "np.quantile" or sys.argv[5:] == ["memory"]:
    src = np.load(path)
t = time.perf_counter()
run(src)
print("@@work", time.perf_counter() - t)
"""


def child(mode, path, tiny, threads, memory=False):
    cmd = ["/usr/bin/time", "-f", "@@maxrss %M", PY, "-c", CHILD, mode, path, tiny, str(threads or 0)]
    if memory:
        cmd.append("memory")
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr)
    work = float([ln for ln in p.stdout.splitlines() if ln.startswith("@@work")][-1].split()[1])
    rss = int([ln for ln in p.stderr.splitlines() if ln.startswith("@@maxrss")][-1].split()[1]) / 1024
    return wall, work, rss


def cli(args, threads):
    cmd = ["/usr/bin/time", "-f", "@@maxrss %M", PY, "-m", "bnstat", *args, "-q", "--format", "json",
           "-o", "/tmp/bench_hist_out.json", "--force"]
    if threads:
        cmd += ["--threads", str(threads)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr)
    rss = int([ln for ln in p.stderr.splitlines() if ln.startswith("@@maxrss")][-1].split()[1]) / 1024
    return wall, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=float, default=1024)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    d = a.tmp or tempfile.mkdtemp(prefix="bnstat-bench-hist-")
    os.makedirs(d, exist_ok=True)
    n = max(1, int(a.size_mb * 1e6 // (C * H * W * 4)))
    path, tiny = os.path.join(d, "acts.npy"), os.path.join(d, "tiny.npy")
    rng = np.random.default_rng(0)
    mm = np.lib.format.open_memmap(path, "w+", np.float32, (n, C, H, W))
    for i in range(0, n, 64):
        mm[i:i + 64] = rng.standard_normal((min(64, n - i), C, H, W), np.float32)
    mm.flush()
    del mm
    np.save(tiny, rng.standard_normal((4, C, 4, 4)).astype(np.float32))
    nbytes = os.path.getsize(path)
    with open(path, "rb") as fh:  # page cache warm
        while fh.read(1 << 26):
            pass
    gb = nbytes / 1e9
    rows = []
    for mode, args in (("moments", ["moments", path, "--layout", "NCHW"]),
                       ("hist", ["hist", path, "--layout", "NCHW"]),
                       ("quantiles", ["hist", path, "--layout", "NCHW", "--bins", "1", "--quantiles", Q])):
        wall, rss = cli(args, a.threads)
        _, work, _ = child(mode, path, tiny, a.threads)
        rows.append((f"bnstat {' '.join(args[:1] + args[3:])}", gb / wall, gb / work, rss))
    _, mem_b, rss_b = child("quantiles", path, tiny, a.threads, memory=True)
    _, mem_n, rss_n = child("np.quantile", path, tiny, a.threads)
    print(f"{gb:.2f} GB float32 NCHW ({n} x {C} x {H} x {W}), page-cached, threads {a.threads or 'all'}")
    print("| case | CLI GB/s | work GB/s | x moments (work) | peak RSS MB |")
    print("|---|---|---|---|---|")
    base = rows[0][2]
    for name, g, w, r in rows:
        print(f"| {name} | {g:.2f} | {w:.2f} | {w / base:.2f} | {r:.0f} |")
    print(f"| in memory: bnstat.hist(array, quantiles) | | {gb / mem_b:.2f} | | {rss_b:.0f} |")
    print(f"| in memory: np.quantile per channel | | {gb / mem_n:.2f} | {mem_n / mem_b:.1f}x slower | {rss_n:.0f} |")


if __name__ == "__main__":
    main()
