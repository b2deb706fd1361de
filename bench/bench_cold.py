"""Cold reads: bnstat against `cat` on files that are not in the page cache (issue 16).

    python bench/bench_cold.py                       # 4 GB .npy + 4 GB chunked HDF5, 3 rounds
    python bench/bench_cold.py --dir /tmp/cold --keep   # reuse (and keep) the files
    python bench/bench_cold.py --gzip-gb 0.5         # also a gzip HDF5 (0.5 GB of data)
    python bench/bench_cold.py --pythonpath /work/main  # another checkout's bnstat

Needs root: the page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``)
before every timed command, and the limited run goes into a child memory cgroup
(cgroup v1, ``memory.limit_in_bytes``) of this process's own. Each round runs, per
file: ``cat FILE > /dev/null``, ``bnstat moments FILE --layout NCHW --format json -q``
(a whole process), a numpy script (``np.load(mmap_mode="r")``, ``mean`` and ``var``
over (0, 2, 3); .npy only) and the same bnstat command under the memory limit.
Rounds interleave the commands, so a burst of load on the shared machine hits one
run of each, and rotate their order. Printed: the median of the rounds with their spread, GB/s, the ratio
to ``cat`` (median over rounds of the ratio within a round), peak RSS
(``/usr/bin/time -f %M``) and, for the limited run, the cgroup's peak usage (page
cache included) and whether its output equals the unlimited run's.
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

NUMPY_SCRIPT = ("import sys, numpy as np; a = np.load(sys.argv[1], mmap_mode='r'); "
                "m = a.mean(axis=(0, 2, 3)); v = a.var(axis=(0, 2, 3)); print(float(m.sum() + v.sum()))")


def drop_caches(warm: list[str] | None = None, env: dict | None = None) -> None:
    """Drop the page cache; then run ``warm`` (untimed): bnstat on a tiny file of the same
    kind, which reads the interpreter, the libraries and the Numba cache back in."""
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")
    if warm:
        subprocess.run(warm, env=dict(env, BNSTAT_ENGINE="numba"), stdout=subprocess.DEVNULL,
                       check=True)


def cached_bytes(path: str) -> int:
    """The bytes of ``path`` in the page cache (util-linux ``fincore``), -1 if unknown."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return -1


def make_npy(path: str, nbytes: int) -> tuple[int, ...]:
    shape = (max(1, nbytes // (64 * 56 * 56 * 4)), 64, 56, 56)
    if os.path.exists(path) and np.load(path, mmap_mode="r").shape == shape:
        return shape
    rng = np.random.default_rng(0)
    tmp = path + ".tmp"
    a = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    for i in range(0, shape[0], 100):
        k = min(100, shape[0] - i)
        a[i:i + k] = rng.standard_normal((k,) + shape[1:], dtype=np.float32) * 2 + 1
    a.flush()
    del a
    os.replace(tmp, path)
    return shape


def make_h5(path: str, npy: str, rows: int | None = None, gzip: bool = False) -> None:
    import h5py

    a = np.load(npy, mmap_mode="r")
    n = a.shape[0] if rows is None else min(rows, a.shape[0])
    if os.path.exists(path):
        with h5py.File(path, "r") as f:
            if f["x"].shape == (n,) + a.shape[1:]:
                return
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        # chunks of 5 samples (4 MB) as bench/run.py; gzip: one sample per chunk, level 1
        opts = {"chunks": (1,) + a.shape[1:], "compression": "gzip", "compression_opts": 1} if gzip \
            else {"chunks": (5,) + a.shape[1:]}
        d = f.create_dataset("x", shape=(n,) + a.shape[1:], dtype=a.dtype, **opts)
        for i in range(0, n, 100):
            d[i:i + 100] = a[i:min(n, i + 100)]
    os.replace(tmp, path)


def own_memory_cgroup() -> str | None:
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, controllers, rel = line.strip().split(":", 2)
            if "memory" in controllers.split(","):
                root = "/sys/fs/cgroup/memory" + rel
                return root if os.path.isdir(root) else None
    return None


class Limited:
    """A child memory cgroup (v1) with ``memory.limit_in_bytes``; removed on exit."""

    def __init__(self, limit: str):
        parent = own_memory_cgroup()
        if parent is None:
            raise SystemExit("no cgroup v1 memory controller here: cannot run the limited case")
        self.path = os.path.join(parent, f"bnstat-cold-{os.getpid()}")
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, "memory.limit_in_bytes"), "w") as fh:
            fh.write(limit)

    def reset_peak(self) -> None:
        with open(os.path.join(self.path, "memory.max_usage_in_bytes"), "w") as fh:
            fh.write("0")

    def peak(self) -> int:
        with open(os.path.join(self.path, "memory.max_usage_in_bytes")) as fh:
            return int(fh.read())

    def prefix(self) -> list[str]:
        procs = os.path.join(self.path, "cgroup.procs")
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"]

    def close(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def timed(cmd: list[str], env: dict, stdout=subprocess.DEVNULL) -> tuple[float, int, bytes]:
    """Wall seconds, peak RSS (KiB) and stdout of ``cmd`` run under /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        full = ["/usr/bin/time", "-o", tf.name, "-f", "%M"] + cmd
        t = time.perf_counter()
        proc = subprocess.run(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        dt = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
        rss = int(tf.read().strip().splitlines()[-1])
    return dt, rss, proc.stdout


def uptime() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bnstat-bench-cold"))
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--gzip-gb", type=float, default=0.0, help="also a gzip HDF5 of this many GB of data")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", default="1G", help="memory.limit_in_bytes of the limited run ('' = none)")
    ap.add_argument("--pythonpath", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the bnstat checkout to run (default: this one)")
    ap.add_argument("--compare", default="",
                    help="another checkout: its bnstat runs too, in the same rounds (before/after)")
    ap.add_argument("--only", default="", help="comma-separated file kinds: npy,h5,gzip")
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy script")
    ap.add_argument("--libs-cold", action="store_true",
                    help="do not read the libraries back in after dropping the page cache")
    ap.add_argument("--keep", action="store_true", help="keep the data files (else they are deleted)")
    ap.add_argument("--out", help="also write every run as JSON here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_cold.py drops the page cache: run it as root")
    args.dir = os.path.abspath(args.dir)
    args.pythonpath = os.path.abspath(args.pythonpath)
    args.compare = os.path.abspath(args.compare) if args.compare else ""
    args.out = os.path.abspath(args.out) if args.out else None
    os.makedirs(args.dir, exist_ok=True)
    # `python -m bnstat` puts the working directory first on sys.path, before PYTHONPATH: run
    # from the data folder, so that PYTHONPATH (--pythonpath, --compare) picks the bnstat measured
    os.chdir(args.dir)
    npy = os.path.join(args.dir, "cold.npy")
    h5 = os.path.join(args.dir, "cold.h5")
    gz = os.path.join(args.dir, "cold_gzip.h5")
    print(f"writing / checking the data in {args.dir} ...", file=sys.stderr)
    shape = make_npy(npy, int(args.size_gb * 1e9))
    files = [("npy", npy), ("h5", h5)]
    make_h5(h5, npy)
    if args.gzip_gb:
        make_h5(gz, npy, rows=max(1, int(args.gzip_gb * 1e9) // (64 * 56 * 56 * 4)), gzip=True)
        files.append(("gzip", gz))
    if args.only:
        files = [f for f in files if f[0] in args.only.split(",")]
    tiny = {"npy": os.path.join(args.dir, "tiny.npy"), "h5": os.path.join(args.dir, "tiny.h5")}
    tiny["gzip"] = tiny["h5"]
    np.save(tiny["npy"], np.ones((4, 64, 8, 8), np.float32))
    import h5py

    with h5py.File(tiny["h5"], "w") as f:
        f.create_dataset("x", data=np.ones((4, 64, 8, 8), np.float32), chunks=(1, 64, 8, 8))
    env = dict(os.environ, PYTHONPATH=args.pythonpath, KERAS_BACKEND="torch")
    env.pop("BNSTAT_ENGINE", None)
    bnstat = [sys.executable, "-m", "bnstat", "moments"]
    # the Numba cache filled (a warm run first, untimed): these are cold *reads*
    subprocess.run(bnstat + [npy, "--layout", "NCHW", "--format", "json", "-q"], env=env,
                   stdout=subprocess.DEVNULL, check=True)
    limited = Limited(args.limit) if args.limit else None
    runs: list[dict] = []
    loads = [uptime()]
    try:
        for rep in range(args.reps):
            for kind, path in files:
                cases = [("cat", ["sh", "-c", 'cat "$1" > /dev/null', "sh", path]),
                         ("bnstat", bnstat + [path, "--layout", "NCHW", "--format", "json", "-q"])]
                if kind == "npy" and not args.no_numpy:
                    cases.append(("numpy mean+var (mmap)", [sys.executable, "-c", NUMPY_SCRIPT, path]))
                if limited is not None:
                    cases.append((f"cat, {args.limit} memory limit", limited.prefix() + cases[0][1]))
                    cases.append((f"bnstat, {args.limit} memory limit", limited.prefix() + cases[1][1]))
                if args.compare:
                    cases.append((f"bnstat of {args.compare}", cases[1][1]))
                    if limited is not None:
                        cases.append((f"bnstat of {args.compare}, {args.limit} memory limit",
                                      limited.prefix() + cases[1][1]))
                # a different order each round: a run's speed here depends on what ran before it
                # (the free pages the VM has returned to the host, bench/README.md "Cold reads")
                k = rep % len(cases)
                for name, cmd in cases[k:] + cases[:k]:
                    warm = None
                    if not args.libs_cold and name != "cat":
                        warm = bnstat + [tiny[kind], "--layout", "NCHW", "--format", "json", "-q"]
                        if name.startswith("numpy"):
                            warm = [sys.executable, "-c", NUMPY_SCRIPT, tiny[kind]]
                    drop_caches(warm, env)
                    before = cached_bytes(path)
                    if limited is not None:
                        limited.reset_peak()
                    cenv = dict(env, PYTHONPATH=args.compare) if " of " in name else env
                    dt, rss, out = timed(cmd, cenv)
                    row = {"file": kind, "tool": name, "rep": rep, "seconds": dt, "rss_kib": rss,
                           "load": uptime(), "cached_before": before}
                    if name.startswith("bnstat"):
                        row["result"] = json.loads(out)["arrays"][0]["mean"][:4]
                        row["out"] = out.decode()
                    if "limit" in name and name.startswith("bnstat"):
                        row["cgroup_peak"] = limited.peak()
                    runs.append(row)
                    print(f"  {kind} {name} round {rep + 1}: {dt:.2f} s, {rss // 1024} MiB, "
                          f"load {row['load']}", file=sys.stderr)
            loads.append(uptime())
    finally:
        if limited is not None:
            limited.close()
        if not args.keep:
            for path in [npy, h5, gz, tiny["npy"], tiny["h5"]]:
                if os.path.exists(path):
                    os.remove(path)
            if not os.listdir(args.dir):
                os.rmdir(args.dir)
    report(runs, files, shape, args, loads)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"runs": [{k: v for k, v in r.items() if k != "out"} for r in runs],
                       "loads": loads}, fh, indent=1)


def report(runs, files, shape, args, loads) -> None:
    size = {"npy": np.prod(shape) * 4}
    size["h5"] = size["npy"]
    size["gzip"] = int(args.gzip_gb * 1e9) // (64 * 56 * 56 * 4) * 64 * 56 * 56 * 4 if args.gzip_gb else 0
    libs = "" if args.libs_cold else (" (then the libraries read back in by a run on a tiny file: "
                                      "the data file alone is cold)")
    print(f"{size['npy'] / 1e9:.2f} GB float32 NCHW {shape}, page cache dropped before every run"
          f"{libs}, {args.reps} rounds; load average {' -> '.join(loads)}; data file bytes cached "
          f"before a run: at most {max(r['cached_before'] for r in runs):,}\n")
    print("| file | tool | median s | min-max s | GB/s | x cat | peak RSS MiB | note |")  # x cat: median of the rounds' ratios
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for kind, _ in files:
        mine = [r for r in runs if r["file"] == kind]
        cat = {r["rep"]: r["seconds"] for r in mine if r["tool"] == "cat"}
        cat_limited = {r["rep"]: r["seconds"] for r in mine if r["tool"].startswith("cat,")}
        unlimited = {r["rep"]: r.get("out") for r in mine if r["tool"] == "bnstat"}  # this checkout's
        for tool in dict.fromkeys(r["tool"] for r in mine):
            rows = [r for r in mine if r["tool"] == tool]
            secs = [r["seconds"] for r in rows]
            med = statistics.median(secs)
            base = cat_limited if "limit" in tool else cat  # limited rows: against the limited cat
            ratio = statistics.median(base[r["rep"]] / r["seconds"] for r in rows)
            note = ""
            if "limit" in tool and tool.startswith("bnstat"):
                same = all(r["out"] == unlimited[r["rep"]] for r in rows)
                note = (f"cgroup peak {max(r['cgroup_peak'] for r in rows) / 2**20:.0f} MiB (page cache "
                        f"included); output {'identical to' if same else 'DIFFERS from'} the unlimited run")
            elif " of " in tool:
                same = all(r["out"] == unlimited[r["rep"]] for r in rows)
                note = f"output {'identical to' if same else 'DIFFERS from'} this checkout's"
            print(f"| {kind} | {tool} | {med:.2f} | {min(secs):.2f}-{max(secs):.2f} | "
                  f"{size[kind] / med / 1e9:.2f} | {ratio:.2f} | {max(r['rss_kib'] for r in rows) // 1024} | {note} |")


if __name__ == "__main__":
    main()
