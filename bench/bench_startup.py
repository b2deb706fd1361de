"""Whole-process figures of `bnstat moments`: the first run, the warm run, the cold run, start-up.

    python bench/bench_startup.py [--size-mb 1024] [--reps 3] [--dir DIR] [--no-cold]

One run measures, on a float32 NCHW .npy of --size-mb (page-cached unless said):

- `cat FILE > /dev/null` and the numpy script a user would write (`np.load(mmap_mode="r")`,
  `mean` and `var` over (0, 2, 3)), whole processes;
- `bnstat moments FILE --layout NCHW --format json -q`: first run (an empty NUMBA_CACHE_DIR
  for each repetition; the detached compiler it starts is waited for before the next
  measurement), warm run (cache filled);
- cold (caches dropped before each run, as root): cat, the numpy script, bnstat warm;
- start-up: `python -c "import numpy, numba, h5py, rich"` against bnstat on a tiny file with
  the Numba engine (BNSTAT_ENGINE=numba) and with the default engine;
- in process: `bnstat.moments(path, engine="numba")` after a warm-up call, against the numpy
  script's work (the in-process ratio of bench/run.py's "work" columns).

Each figure is the median of --reps with the range; ratios are of medians. Figures go to
bench/README.md with the command and the load average.

Every process runs with Python's bytecode cache on (PYTHONDONTWRITEBYTECODE dropped, the cache
in a folder of this run: PYTHONPYCACHEPREFIX), as for an installed package;
``--no-bytecode-cache`` keeps the caller's setting (with PYTHONDONTWRITEBYTECODE=1 every
process compiles bnstat's sources again, about 0.1 s).

    python bench/bench_startup.py --startup-only --compare /work/main [--reps 9]

measures the start-up rows alone, for this tree and the other one (PYTHONPATH), interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

PY = sys.executable
NUMPY_SCRIPT = ("import sys, numpy as np\n"
                "x = np.load(sys.argv[1], mmap_mode='r')\n"
                "m = x.mean(axis=(0, 2, 3)); v = x.var(axis=(0, 2, 3))\n")
IN_PROCESS = ("import sys, time, numpy as np, bnstat\n"
              "bnstat.moments(np.ones((64, 4, 4, 4), np.float32), layout='NCHW', engine='numba')\n"
              "bnstat.moments(sys.argv[2], layout='NCHW', engine='numba')\n"
              "t0 = time.perf_counter()\n"
              "bnstat.moments(sys.argv[1], layout='NCHW', engine='numba')\n"
              "t1 = time.perf_counter()\n"
              "x = np.load(sys.argv[1], mmap_mode='r')\n"
              "m = x.mean(axis=(0, 2, 3)); v = x.var(axis=(0, 2, 3))\n"
              "print(t1 - t0, time.perf_counter() - t1)\n")


def wall(cmd, env=None, stdout=subprocess.DEVNULL) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=stdout, stderr=subprocess.DEVNULL, check=True,
                   stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def compilers() -> list[int]:
    """Pids of running detached compilers (``python -m bnstat.kernels.loader``)."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if b"bnstat.kernels.loader" in fh.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


def wait_compilers(limit=600.0) -> None:
    t0 = time.monotonic()
    while compilers() and time.monotonic() - t0 < limit:
        time.sleep(0.2)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def series(fn, reps, before=None):
    out = []
    for _ in range(reps):
        if before is not None:
            before()
        out.append(fn())
    return out


def show(rows, size):
    print(f"{'case':58} {'median s':>9} {'range':>15} {'GB/s':>6}")
    for name, xs in rows.items():
        med = statistics.median(xs)
        rate = f"{size / med / 1e9:6.2f}" if size else ""
        print(f"{name:58} {med:9.3f} {min(xs):7.3f}..{max(xs):<7.3f} {rate}")


def startup_only(d: str, reps: int, compare: str | None) -> int:
    """The start-up rows, this tree's bnstat (and ``compare``'s) interleaved, run by run."""
    tiny = os.path.join(d, "tiny.npy")
    np.save(tiny, np.random.default_rng(1).standard_normal((4, 8, 5, 5), np.float32))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("BNSTAT_ENGINE", None)
    env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="bnstat-numba-cache-")
    trees = {"this tree": here}
    if compare:
        trees[f"{compare}"] = os.path.abspath(compare)
    cases = {"python -c 'import numpy, numba, h5py, rich'":
             ([PY, "-c", "import numpy, numba, h5py, rich"], env)}
    for layout, shape in (("NCHW", None), ("NC", (32, 25))):
        path = tiny if shape is None else os.path.join(d, "tiny-nc.npy")
        if shape is not None:
            np.save(path, np.random.default_rng(2).standard_normal(shape, np.float32))
        for name, tree in trees.items():
            e = dict(env, PYTHONPATH=tree)
            cmd = ["bnstat", "moments", path, "--layout", layout, "--format", "json", "-q"]
            cases[f"{name}: moments tiny {layout}, numba"] = (cmd, dict(e, BNSTAT_ENGINE="numba"))
            if layout == "NCHW":
                cases[f"{name}: moments tiny {layout}, default (numpy)"] = (cmd, e)
    for cmd, e in cases.values():  # caches filled (numba's, the bytecode), then waited for
        wall(cmd, env=e)
        wait_compilers()
        wall(cmd, env=e)
    load0 = os.getloadavg()[0]
    rows: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, (cmd, e) in cases.items():
            rows[k].append(wall(cmd, env=e))
    print(f"start-up rows, interleaved, {reps} runs each; load average {load0:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    show(rows, 0)
    ref = statistics.median(rows["python -c 'import numpy, numba, h5py, rich'"])
    for k, xs in rows.items():
        if "numba" in k and k.startswith(tuple(trees)):
            print(f"{k + ' / imports':58} {statistics.median(xs) / ref:6.2f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder for the data (default: a temp folder)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold rows")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--startup-only", action="store_true", help="the start-up rows alone")
    ap.add_argument("--compare", default=None, metavar="TREE",
                    help="with --startup-only: also bnstat from this source tree (PYTHONPATH), "
                         "interleaved with this one")
    ap.add_argument("--no-bytecode-cache", action="store_true",
                    help="keep the caller's PYTHONDONTWRITEBYTECODE / PYTHONPYCACHEPREFIX")
    args = ap.parse_args(argv)
    d = args.dir or tempfile.mkdtemp(prefix="bnstat-startup-")
    os.makedirs(d, exist_ok=True)
    if not args.no_bytecode_cache:
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(d, "pycache")
    if args.startup_only:
        return startup_only(d, max(5, args.reps), args.compare)
    path = os.path.join(d, f"nchw-{int(args.size_mb)}mb.npy")
    n = max(1, int(args.size_mb * 1e6) // (64 * 56 * 56 * 4))
    if not os.path.exists(path):
        arr = np.lib.format.open_memmap(path, "w+", np.float32, (n, 64, 56, 56))
        rng = np.random.default_rng(0)
        for i in range(0, n, 64):
            arr[i:i + 64] = rng.standard_normal(arr[i:i + 64].shape, np.float32) * 2 + 3
        arr.flush()
        del arr
    tiny = os.path.join(d, "tiny.npy")
    np.save(tiny, np.random.default_rng(1).standard_normal((4, 8, 5, 5), np.float32))
    size = os.path.getsize(path)
    env = dict(os.environ)
    env.pop("BNSTAT_ENGINE", None)
    cache = tempfile.mkdtemp(prefix="bnstat-numba-cache-")
    env["NUMBA_CACHE_DIR"] = cache  # this run's own cache: "warm" is after this run filled it
    bn = ["bnstat", "moments", path, "--layout", "NCHW", "--format", "json", "-q"]
    npy = [PY, "-c", NUMPY_SCRIPT, path]
    cat = ["sh", "-c", f"cat '{path}' > /dev/null"]
    rows: dict[str, list[float]] = {}
    wall(cat)  # page cache warmed

    def first_run():
        wait_compilers()
        e = dict(env, NUMBA_CACHE_DIR=tempfile.mkdtemp(prefix="bnstat-numba-empty-"))
        return wall(bn, env=e)

    rows["cat FILE > /dev/null (page-cached)"] = series(lambda: wall(cat), args.reps)
    rows["numpy script: mmap, mean+var (0,2,3)"] = series(lambda: wall(npy), args.reps)
    rows["bnstat moments, first run (empty Numba cache)"] = series(first_run, args.reps)
    wait_compilers()
    wall(bn, env=env)  # fills this run's cache (the first run above had caches of their own)
    wait_compilers()
    wall(bn, env=env)
    rows["bnstat moments, warm (cache filled)"] = series(lambda: wall(bn, env=env), args.reps)
    imports = [PY, "-c", "import numpy, numba, h5py, rich"]
    small = ["bnstat", "moments", tiny, "--layout", "NCHW", "--format", "json", "-q"]
    wall(imports)
    reps_small = max(5, args.reps)
    rows["python -c 'import numpy, numba, h5py, rich'"] = series(lambda: wall(imports), reps_small)
    e_numba = dict(env, BNSTAT_ENGINE="numba")
    wall(small, env=e_numba)
    rows["bnstat moments tiny.npy, BNSTAT_ENGINE=numba"] = series(
        lambda: wall(small, env=e_numba), reps_small)
    rows["bnstat moments tiny.npy, default engine (numpy)"] = series(
        lambda: wall(small, env=env), reps_small)
    cold = not args.no_cold and drop_caches()
    if cold:
        rows["cold: cat FILE > /dev/null"] = series(lambda: wall(cat), args.reps, drop_caches)
        rows["cold: numpy script"] = series(lambda: wall(npy), args.reps, drop_caches)
        rows["cold: bnstat moments (warm cache)"] = series(lambda: wall(bn, env=env), args.reps,
                                                         drop_caches)
    wall(cat)
    inproc = [subprocess.run([PY, "-c", IN_PROCESS, path, tiny], env=env, capture_output=True,
                             text=True, check=True).stdout.split() for _ in range(args.reps)]
    rows["in process: bnstat.moments(engine='numba') after warm-up"] = [float(a) for a, _ in inproc]
    rows["in process: numpy mean+var (0,2,3)"] = [float(b) for _, b in inproc]

    print(f"file: {size / 1e9:.2f} GB float32 NCHW .npy; load average "
          f"{os.getloadavg()[0]:.2f}; reps {args.reps} (start-up rows {reps_small})")
    show(rows, size)
    med = {k: statistics.median(v) for k, v in rows.items()}
    warm = med["bnstat moments, warm (cache filled)"]
    ratios = {
        "first run / warm (target <= 2)":
            med["bnstat moments, first run (empty Numba cache)"] / warm,
        "numpy script / bnstat warm (target >= 3)":
            med["numpy script: mmap, mean+var (0,2,3)"] / warm,
        "bnstat tiny numba / imports (target <= 1.3)":
            med["bnstat moments tiny.npy, BNSTAT_ENGINE=numba"]
            / med["python -c 'import numpy, numba, h5py, rich'"],
        "in process: numpy / bnstat":
            med["in process: numpy mean+var (0,2,3)"]
            / med["in process: bnstat.moments(engine='numba') after warm-up"],
    }
    if cold:
        ratios["cold: bnstat throughput / cat's (target >= 0.8)"] = (
            med["cold: cat FILE > /dev/null"] / med["cold: bnstat moments (warm cache)"])
        ratios["cold: numpy script / bnstat"] = (
            med["cold: numpy script"] / med["cold: bnstat moments (warm cache)"])
    for k, v in ratios.items():
        print(f"{k:58} {v:6.2f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "ratios": ratios, "size": size}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
