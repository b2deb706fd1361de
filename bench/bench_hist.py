"""bnstat hist benchmark: histograms and exact quantiles against moments, np.histogram, np.quantile.

    python bench/bench_hist.py [--size-mb 1024] [--tmp DIR] [--threads N] [--reps 5] [--no-threads-check]

Writes a float32 NCHW .npy of the given size (64 channels of 56 x 56) and
reads it once (page cache warm). Then:

- the bnstat CLI once per case (wall time and peak RSS by /usr/bin/time);
- the work times, in ONE child process that warmed every kernel on a tiny
  file first, case after case, ``--reps`` rounds: ``bnstat.moments``,
  ``bnstat.hist`` (2048 bins, --range auto) and ``bnstat.hist(bins=1,
  quantiles=...)`` on the file, and a plain read of it (a numba sum: the
  floor of any pass; with the moments pass, the ceiling of a two-pass
  run's ratio); with the threads check, hist and quantiles on one thread
  as well; then on the array in memory the quantiles against
  np.quantile per channel, and hist against np.histogram per channel (2048
  bins over each channel's range). Every round gives its own ratios (the
  cases of a round ran within seconds of each other on the same shared
  machine); the table shows the median work GB/s and the median ratio,
  with min..max over the rounds.
"""

from __future__ import annotations

import argparse
import json
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
import json, sys, time, warnings, numpy as np, bnstat
path, tiny, threads, reps, check = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None, int(sys.argv[4]), sys.argv[5] == "1"
warnings.simplefilter("ignore")
q = [0.001, 0.5, 0.999, 0.9999]
def moments(src, th): return bnstat.moments(src, engine="numba", layout="NCHW", threads=th)
def hist(src, th): return bnstat.hist(src, layout="NCHW", threads=th)
def quant(src, th): return bnstat.hist(src, layout="NCHW", bins=1, quantiles=q, threads=th)
def np_quantile(x, th):
    return np.quantile(x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1), q, axis=1)
def np_histogram(x, th):
    return [np.histogram(x[:, c], bins=2048) for c in range(x.shape[1])]
from numba import njit, prange, set_num_threads
@njit(parallel=True, fastmath=True)
def _sum(x, parts):  # a plain read: float32 lanes, nothing kept (no pass can read faster)
    out = np.zeros(parts * 16, np.float32)
    for t in prange(parts):
        s = np.float32(0.0)
        for i in range(x.shape[0] * t // parts, x.shape[0] * (t + 1) // parts):
            s += x[i]
        out[t * 16] = s
    return out.sum()
def read(src, th):
    if th:
        set_num_threads(th)
    return _sum(np.load(src, mmap_mode="r").reshape(-1), 8)
file_cases = [("moments", moments, threads), ("hist", hist, threads), ("quantiles", quant, threads),
              ("read", read, threads)]
if check:
    file_cases += [("hist, 1 thread", hist, 1), ("quantiles, 1 thread", quant, 1)]
for _, f, th in file_cases:
    f(tiny, th)
times = {}
for r in range(reps):
    for name, f, th in file_cases:
        t = time.perf_counter()
        f(path, th)
        times.setdefault(name, []).append(time.perf_counter() - t)
x = np.load(path)
mem_cases = [("in memory: bnstat.hist(array, quantiles)", quant), ("in memory: np.quantile per channel", np_quantile),
             ("in memory: bnstat.hist(array)", hist), ("in memory: np.histogram per channel", np_histogram)]
for r in range(reps):
    for name, f in mem_cases:
        if name == "in memory: np.quantile per channel" and r >= 3:
            continue  # slow; three rounds are enough
        t = time.perf_counter()
        f(x, threads)
        times.setdefault(name, []).append(time.perf_counter() - t)
print("@@times", json.dumps(times))
print("@@bnstat", bnstat.__file__)
"""


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


def spread(values, fmt="{:.2f}"):
    v = np.asarray(values, dtype=float)
    return f"{fmt.format(np.median(v))} ({fmt.format(v.min())}..{fmt.format(v.max())})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=float, default=1024)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-threads-check", action="store_true", help="skip the 1-thread rows")
    a = ap.parse_args()
    d = os.path.abspath(a.tmp or tempfile.mkdtemp(prefix="bnstat-bench-hist-"))
    os.makedirs(d, exist_ok=True)
    # `python -m`/`-c` put the working directory first on sys.path, before PYTHONPATH: run from
    # the data folder, so that PYTHONPATH=TREE measures that tree's bnstat (not a checkout here)
    os.chdir(d)
    n = max(1, int(a.size_mb * 1e6 // (C * H * W * 4)))
    path, tiny = os.path.join(d, "acts.npy"), os.path.join(d, "tiny.npy")
    rng = np.random.default_rng(0)
    if not (os.path.exists(path) and np.load(path, mmap_mode="r").shape == (n, C, H, W)):
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
    load0 = os.getloadavg()
    clis = {}
    for mode, args in (("moments", ["moments", path, "--layout", "NCHW"]),
                       ("hist", ["hist", path, "--layout", "NCHW"]),
                       ("quantiles", ["hist", path, "--layout", "NCHW", "--bins", "1", "--quantiles", Q])):
        cli(args, a.threads)  # a first run compiles or loads the kernels' cache
        clis[mode] = cli(args, a.threads)
    p = subprocess.run([PY, "-c", CHILD, path, tiny, str(a.threads or 0), str(a.reps),
                        "0" if a.no_threads_check else "1"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if p.returncode:
        raise SystemExit(p.stderr)
    where = [ln.split(None, 1)[1] for ln in p.stdout.splitlines() if ln.startswith("@@bnstat")][-1]
    print(f"bnstat measured: {os.path.dirname(os.path.dirname(where))}")
    times = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("@@times")][-1].split(None, 1)[1])
    load1 = os.getloadavg()
    print(f"{gb:.2f} GB float32 NCHW ({n} x {C} x {H} x {W}), page-cached, threads {a.threads or 'all'}, "
          f"{a.reps} rounds; load average {load0[0]:.2f} before, {load1[0]:.2f} after")
    print("| case | CLI GB/s | CLI peak RSS MB | work GB/s, median (min..max) | ratio, median (min..max) |")
    print("|---|---|---|---|---|")
    m = np.asarray(times["moments"])

    def per_round(name, ref, invert=False):
        t = np.asarray(times[name])
        r = np.asarray(times[ref])[:t.size]
        return (t[:r.size] / r) if invert else (r / t[:r.size])

    labels = {"moments": "bnstat moments NCHW", "hist": "bnstat hist NCHW (2048 bins, --range auto)",
              "quantiles": f"bnstat hist NCHW --bins 1 --quantiles {Q}",
              "read": "a plain read of the file (a numba sum, in process)"}
    for name, t in times.items():
        t = np.asarray(t)
        cli_cols = ("", "")
        if name in clis:
            wall, rss = clis[name]
            cli_cols = (f"{gb / wall:.2f}", f"{rss:.0f}")
        ratio = ""
        if not name.startswith("in memory"):
            ratio = f"{spread(m[:t.size] / t)} x moments" if name != "moments" else "1"
            if name.endswith("1 thread"):
                base = name.split(",")[0]
                ratio += f"; 2 threads {spread(t / np.asarray(times[base])[:t.size])} x faster"
        elif name == "in memory: np.quantile per channel":
            ratio = f"bnstat {spread(per_round(name, 'in memory: bnstat.hist(array, quantiles)', True), '{:.1f}')}x faster"
        elif name == "in memory: np.histogram per channel":
            ratio = f"bnstat {spread(per_round(name, 'in memory: bnstat.hist(array)', True), '{:.1f}')}x faster"
        label = labels.get(name, name)
        if name.endswith("1 thread"):
            label = labels[name.split(",")[0]] + ", 1 thread"
        print(f"| {label} | {cli_cols[0]} | {cli_cols[1]} | {spread(gb / t)} | {ratio} |")
    # a run that reads the file twice (the moments pass, then a pass that counts) takes at
    # least a moments pass and a plain read: its best ratio to moments, round by round
    rd = np.asarray(times["read"])
    print(f"two passes' ceiling, moments / (moments + read): {spread(m[:rd.size] / (m[:rd.size] + rd))}")


if __name__ == "__main__":
    main()
