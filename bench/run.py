"""bnstat benchmark: bnstat against the tools people use instead, in one run.

    python bench/run.py [--quick] [--size-mb N] [--out results.json]

Generates its data in a temporary folder, runs every command in its own
process (page cache warmed first: each file is read once before it is
timed), and prints one table: GB/s on wall time, bnstat's speed as a
multiple of each alternative's ("bnstat x": above 1 bnstat is faster; against
`cat` it is the fraction of the read limit reached), and the peak RSS of the
process (``os.wait4`` rusage of that child alone). Small cases take the best
of 3 runs. Results go to JSON as well (``--out``).

bnstat's wall time includes its start-up (importing numpy, numba, h5py and
loading the cached kernels, about 1 s); the "net" column subtracts the
start-up measured on a tiny file, which is what the throughput targets of
issue 5 are about.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

PY = sys.executable
C, H, W = 64, 56, 56  # a ResNet stage: 802816 bytes per float32 sample
SAMPLE = C * H * W * 4


TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None


def run(cmd, *, env=None, stdout=subprocess.DEVNULL):
    """Wall time (s), peak RSS (MB) and exit code of one child process.

    Peak RSS comes from /usr/bin/time -f %M when it exists: a child's own
    ru_maxrss (os.wait4) also counts the pages it shared with this process
    between fork and exec, so it can never be lower than this process's RSS.
    """
    wrapped = [TIME, "-f", "@@maxrss %M", *cmd] if TIME else cmd
    t0 = time.perf_counter()
    p = subprocess.Popen(wrapped, env=env, stdout=stdout, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    rc = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / 1024
    if TIME:
        lines = err.rstrip().splitlines()
        if lines and lines[-1].startswith("@@maxrss"):
            rss = int(lines[-1].split()[1]) / 1024
            err = "\n".join(lines[:-1])
        if rc != 0 and "Command exited with non-zero status" in err:
            err = "\n".join(line for line in err.splitlines() if "Command exited with" not in line)
    return dt, rss, rc, err


def best_of(cmd, reps, **kw):
    best = None
    for _ in range(reps):
        dt, rss, rc, err = run(cmd, **kw)
        if rc != 0:
            return None, rss, rc, err
        best = dt if best is None else min(best, dt)
    return best, rss, 0, ""


# ---- the alternatives, as small Python programs run with `python -c` ---------------

NUMPY_MMAP = """
import numpy as np, sys
a = np.load(sys.argv[1], mmap_mode='r')
axes = tuple(int(x) for x in sys.argv[2].split(','))
m = a.mean(axis=axes); v = a.var(axis=axes); lo = a.min(axis=axes); hi = a.max(axis=axes)
"""

NUMPY_MMAP_MEANVAR = """
import numpy as np, sys
a = np.load(sys.argv[1], mmap_mode='r')
axes = tuple(int(x) for x in sys.argv[2].split(','))
m = a.mean(axis=axes); v = a.var(axis=axes)
"""

NUMPY_CHUNKED = """
import numpy as np, sys
a = np.load(sys.argv[1], mmap_mode='r')
axes = tuple(int(x) for x in sys.argv[2].split(','))
rows = max(1, int(sys.argv[3]) // (a[0].nbytes))
n = 0; mean = 0.0; m2 = 0.0
for i in range(0, a.shape[0], rows):
    c = np.asarray(a[i:i + rows], dtype=np.float64)
    ch = [i for i in range(4) if i not in axes][0]; k = c.size // c.shape[ch]
    cm = c.mean(axis=axes); cq = ((c - np.expand_dims(cm, axes)) ** 2).sum(axis=axes)
    d = cm - mean; tot = n + k
    mean = mean + d * (k / tot); m2 = m2 + cq + d * d * (n * k / tot); n = tot
"""

TORCH = """
import numpy as np, sys, warnings, torch
warnings.simplefilter('ignore')
torch.set_num_threads(int(sys.argv[4]))
a = torch.from_numpy(np.load(sys.argv[1], mmap_mode='r'))
axes = tuple(int(x) for x in sys.argv[2].split(','))
if sys.argv[3] == 'var_mean':
    v, m = torch.var_mean(a, dim=axes, unbiased=False)
else:
    x = a if axes == (0, 2, 3) else a.permute(0, 3, 1, 2)
    y = torch.nn.functional.batch_norm(x, None, None, training=True)
"""

DASK = """
import numpy as np, sys, dask.array as da
a = da.from_array(np.load(sys.argv[1], mmap_mode='r'), chunks=(max(1, int(sys.argv[3]) // (np.load(sys.argv[1], mmap_mode='r')[0].nbytes)),) + (-1,) * 3)
axes = tuple(int(x) for x in sys.argv[2].split(','))
da.compute(a.mean(axis=axes), a.var(axis=axes))
"""

DASK_H5 = """
import h5py, sys, dask.array as da
with h5py.File(sys.argv[1], 'r') as f:
    ds = f['x']
    a = da.from_array(ds, chunks=ds.chunks or 'auto')
    axes = tuple(int(x) for x in sys.argv[2].split(','))
    da.compute(a.mean(axis=axes), a.var(axis=axes))
"""

H5_RAW = """
import h5py, numpy as np, sys
with h5py.File(sys.argv[1], 'r') as f:
    ds = f['x']
    rows = max(1, int(sys.argv[2]) // (ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
    if ds.chunks:
        rows = max(ds.chunks[0], rows - rows % ds.chunks[0])
    buf = np.empty((min(rows, ds.shape[0]),) + ds.shape[1:], ds.dtype)
    for r0 in range(0, ds.shape[0], rows):
        r1 = min(ds.shape[0], r0 + rows)
        ds.read_direct(buf, np.s_[r0:r1], np.s_[0:r1 - r0])
"""

NUMPY_NORMALIZE = """
import numpy as np, sys
a = np.load(sys.argv[1], mmap_mode='r')
rows = max(1, int(sys.argv[3]) // a[0].nbytes)
n = 0; mean = 0.0; m2 = 0.0
for i in range(0, a.shape[0], rows):
    c = np.asarray(a[i:i + rows], dtype=np.float64); k = c.shape[0] * c.shape[2] * c.shape[3]
    cm = c.mean(axis=(0, 2, 3)); cq = ((c - cm[:, None, None]) ** 2).sum(axis=(0, 2, 3))
    d = cm - mean; tot = n + k; mean = mean + d * (k / tot); m2 = m2 + cq + d * d * (n * k / tot); n = tot
scale = 1 / np.sqrt(m2 / n + 1e-5)
with open(sys.argv[2], 'wb') as fh:
    np.lib.format.write_array_header_1_0(fh, {'descr': '<f4', 'fortran_order': False, 'shape': a.shape})
    for i in range(0, a.shape[0], rows):
        c = (np.asarray(a[i:i + rows], dtype=np.float64) - mean[:, None, None]) * scale[:, None, None]
        fh.write(c.astype(np.float32).tobytes())
"""


def make_data(d, size, quick):
    """The input files; returns {name: path}."""
    import h5py

    rng = np.random.default_rng(0)
    n = max(8, size // SAMPLE)
    files = {}

    def gen(shape):
        out = np.empty(shape, np.float32)
        step = max(1, (32 << 20) // (out[0].nbytes or 1))
        for i in range(0, shape[0], step):
            out[i:i + step] = rng.standard_normal((min(step, shape[0] - i),) + shape[1:], np.float32) * 2 + 3
        return out

    a = gen((n, C, H, W))
    files["nchw"] = os.path.join(d, "nchw.npy")
    np.save(files["nchw"], a)
    files["nhwc"] = os.path.join(d, "nhwc.npy")
    np.save(files["nhwc"], np.ascontiguousarray(a.transpose(0, 2, 3, 1)))
    rows = max(1, (4 << 20) // SAMPLE)  # HDF5 chunks of about 4 MB, whole samples
    files["h5"] = os.path.join(d, "plain.h5")
    with h5py.File(files["h5"], "w") as f:
        f.create_dataset("x", data=a, chunks=(rows, C, H, W))
    # gzip: zlib decompresses about 0.12 GB/s per core (PERF-NOTES): a smaller file
    ng = max(8, n // (8 if not quick else 4))
    files["gzip"] = os.path.join(d, "gzip.h5")
    with h5py.File(files["gzip"], "w") as f:
        f.create_dataset("x", data=a[:ng], chunks=(1, C, H, W), compression="gzip", compression_opts=1)
    files["npz_stored"] = os.path.join(d, "stored.npz")
    np.savez(files["npz_stored"], x=a)
    files["npz_deflated"] = os.path.join(d, "deflated.npz")
    np.savez_compressed(files["npz_deflated"], x=a[:ng])
    files["tiny"] = os.path.join(d, "tiny.npy")
    np.save(files["tiny"], rng.standard_normal((4, 8, 5, 5), np.float32))
    files["gzip_npy"] = os.path.join(d, "gzip_part.npy")  # the same data as .npy, for ratios
    np.save(files["gzip_npy"], a[:ng])
    del a
    return files


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_make-data"]:  # the child that writes the data
        print(json.dumps(make_data(argv[1], int(argv[2]), argv[3] == "1")))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small files, done in under 2 minutes")
    ap.add_argument("--size-mb", type=float, default=None, help="size of the main arrays (MB)")
    ap.add_argument("--chunk-size", default="64MiB")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None, help="best of N for small cases (3)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--tmp", default=None, help="folder for the data (default: a temp folder)")
    args = ap.parse_args(argv)
    size = int((args.size_mb or (100 if args.quick else 1024)) * 1e6)
    reps = args.reps or (2 if args.quick else 3)
    big_reps = 1 if size > 2e9 else reps
    chunk = args.chunk_size
    chunk_bytes = parse_size(chunk)
    threads = args.threads or os.cpu_count()
    d = tempfile.mkdtemp(prefix="bnstat-bench-", dir=args.tmp)
    rows = []
    t_start = time.perf_counter()
    try:
        print(f"generating {size / 1e6:.0f} MB arrays in {d} ...", file=sys.stderr)
        gen = subprocess.run([PY, os.path.abspath(__file__), "--_make-data", d, str(size),
                              "1" if args.quick else "0"], capture_output=True, text=True)
        if gen.returncode:
            raise SystemExit(f"data generation failed: {gen.stderr[-2000:]}")
        files = json.loads(gen.stdout)
        for f in files.values():
            run(["cat", f], stdout=subprocess.DEVNULL)  # warm the page cache
        bn = [PY, "-m", "bnstat"]
        env = dict(os.environ)
        have_torch = run([PY, "-c", "import torch"])[2] == 0
        have_dask = run([PY, "-c", "import dask.array"])[2] == 0
        have_normalize = run(bn + ["normalize", "--help"])[2] == 0

        def add(case, tool, cmd, nbytes, reps_=reps, note="", **kw):
            dt, rss, rc, err = best_of(cmd, reps_, **kw)
            row = {"case": case, "tool": tool, "bytes": nbytes, "seconds": dt, "peak_rss_mb": rss,
                   "gbps": (nbytes / dt / 1e9) if dt else None, "note": note}
            if rc:
                row["note"] = (note + " " if note else "") + f"failed (exit {rc}): {err.strip()[-200:]}"
            rows.append(row)
            print(f"  {case:14s} {tool:28s} {fmt(row['gbps'])} GB/s {rss:7.0f} MB {row['note']}",
                  file=sys.stderr)
            return row

        def skip(case, tool, why):
            rows.append({"case": case, "tool": tool, "bytes": 0, "seconds": None, "peak_rss_mb": None,
                         "gbps": None, "note": why})

        # ---- start-up --------------------------------------------------------------
        add("startup", "bnstat --help", bn + ["--help"], 0, 5)
        add("startup", "python -c 'import click'", [PY, "-c", "import click"], 0, 5)
        cache = tempfile.mkdtemp(prefix="numba-cache-", dir=d)
        out_json = os.path.join(d, "out.json")
        tiny = bn + ["moments", files["tiny"], "--layout", "NCHW", "--format", "json", "-o", out_json,
                     "--force", "--quiet"]
        numba_env = {**env, "BNSTAT_ENGINE": "numba"}
        add("startup", "bnstat moments (tiny file)", tiny, 0, 5,
            note="under 32 MiB: numpy engine, no Numba")
        add("startup", "bnstat moments, Numba 1st (compile)", tiny, 0, 1,
            env={**numba_env, "NUMBA_CACHE_DIR": cache}, note="BNSTAT_ENGINE=numba, fresh NUMBA_CACHE_DIR")
        add("startup", "bnstat moments, Numba 2nd (cached)", tiny, 0, 5,
            env={**numba_env, "NUMBA_CACHE_DIR": cache}, note="BNSTAT_ENGINE=numba")
        add("startup", "import numpy,numba,h5py,rich", [PY, "-c", "import numpy, numba, h5py, rich"], 0, 5)
        run(tiny, env=numba_env)  # make sure the repo's own numba cache is warm for what follows
        startup = rows[-2]["seconds"]  # the fixed cost of a run on the kernels

        def net(nb, seconds):
            """Throughput without start-up, when start-up is not most of the run."""
            if not seconds or seconds - startup < 0.25 * seconds:
                return None
            return nb / (seconds - startup) / 1e9

        def moments(path, layout, extra=()):
            return bn + ["moments", path, "--layout", layout, "--format", "json", "-o", out_json,
                         "--force", "--quiet", "--chunk-size", chunk, "--threads", str(threads), *extra]

        def npy_cases(case, path, layout, axes):
            nb = os.path.getsize(path)
            r = add(case, "bnstat", moments(path, layout), nb)
            r["net_gbps"] = net(nb, r["seconds"])
            add(case, "cat", ["cat", path], nb)
            add(case, "numpy mean+var (mmap)", [PY, "-c", NUMPY_MMAP_MEANVAR, path, axes], nb)
            add(case, "numpy mean+var+min+max", [PY, "-c", NUMPY_MMAP, path, axes], nb)
            add(case, "numpy chunked float64", [PY, "-c", NUMPY_CHUNKED, path, axes, str(chunk_bytes)], nb)
            if have_torch:
                add(case, "torch.var_mean", [PY, "-c", TORCH, path, axes, "var_mean", str(threads)], nb)
                add(case, "F.batch_norm (forward)", [PY, "-c", TORCH, path, axes, "bn", str(threads)], nb)
            else:
                skip(case, "torch", "torch not installed")
            if have_dask:
                add(case, "dask mean+var", [PY, "-c", DASK, path, axes, str(chunk_bytes)], nb)
            else:
                skip(case, "dask", "dask not installed")
            return r

        print("timing ...", file=sys.stderr)
        npy_cases("npy NCHW", files["nchw"], "NCHW", "0,2,3")
        r1 = add("npy NCHW", "bnstat --threads 1", moments(files["nchw"], "NCHW", ("--threads", "1")),
                 os.path.getsize(files["nchw"]))
        r1["net_gbps"] = net(r1["bytes"], r1["seconds"])
        npy_cases("npy NHWC", files["nhwc"], "NHWC", "0,1,2")

        nb = os.path.getsize(files["h5"])
        r = add("hdf5", "bnstat", moments(files["h5"], "NCHW"), nb)
        r["net_gbps"] = net(nb, r["seconds"])
        add("hdf5", "h5py read_direct (raw)", [PY, "-c", H5_RAW, files["h5"], str(chunk_bytes)], nb)
        add("hdf5", "cat", ["cat", files["h5"]], nb)

        nb = os.path.getsize(files["gzip_npy"])  # uncompressed bytes
        r = add("hdf5 gzip", "bnstat", moments(files["gzip"], "NCHW"), nb)
        r["net_gbps"] = net(nb, r["seconds"])
        add("hdf5 gzip", "bnstat --threads 1", moments(files["gzip"], "NCHW", ("--threads", "1")), nb)
        add("hdf5 gzip", "h5py read_direct (1 thread)", [PY, "-c", H5_RAW, files["gzip"], str(chunk_bytes)], nb)
        if have_dask:
            add("hdf5 gzip", "dask mean+var", [PY, "-c", DASK_H5, files["gzip"], "0,2,3"], nb)
        else:
            skip("hdf5 gzip", "dask", "dask not installed")

        nb = os.path.getsize(files["nchw"])
        r = add("npz stored", "bnstat", moments(files["npz_stored"], "NCHW"), nb)
        r["net_gbps"] = net(nb, r["seconds"])
        add("npz stored", "bnstat on the .npy", moments(files["nchw"], "NCHW"), nb)
        nb = os.path.getsize(files["gzip_npy"])
        r = add("npz deflated", "bnstat", moments(files["npz_deflated"], "NCHW"), nb)
        r["net_gbps"] = net(nb, r["seconds"])
        add("npz deflated", "numpy np.load + mean/var",
            [PY, "-c", "import numpy as np, sys; a = np.load(sys.argv[1])['x']; a.mean((0, 2, 3)); a.var((0, 2, 3))",
             files["npz_deflated"]], nb)

        # a file 100 times the chunk size
        nb = os.path.getsize(files["nchw"])
        small_chunk = str(max(SAMPLE, nb // 100))
        r = add("100x chunk", "bnstat", bn + ["moments", files["nchw"], "--layout", "NCHW", "--format", "json",
                                              "-o", out_json, "--force", "--quiet", "--chunk-size", small_chunk],
                nb, note=f"--chunk-size {small_chunk}")
        r["net_gbps"] = net(nb, r["seconds"])
        add("100x chunk", "cat", ["cat", files["nchw"]], nb)

        # normalize
        out_npy = os.path.join(d, "normed.npy")
        if have_normalize:
            r = add("normalize", "bnstat", bn + ["normalize", files["nchw"], "-o", out_npy, "--layout", "NCHW",
                                                 "--force", "--quiet", "--chunk-size", chunk], nb, big_reps)
            r["net_gbps"] = net(nb, r["seconds"])
        else:
            skip("normalize", "bnstat", "`bnstat normalize` not available yet")
        add("normalize", "cp", ["cp", files["nchw"], out_npy], nb, big_reps)
        add("normalize", "numpy chunked", [PY, "-c", NUMPY_NORMALIZE, files["nchw"], out_npy, str(chunk_bytes)],
            nb, big_reps)
    finally:
        if not os.environ.get("BNSTAT_BENCH_KEEP"):
            shutil.rmtree(d, ignore_errors=True)
    total = time.perf_counter() - t_start
    table(rows)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "size_bytes": size,
              "chunk_size": chunk, "threads": threads, "quick": args.quick, "seconds": total, "rows": rows}
    print(f"\n{len(rows)} rows in {total:.0f} s", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def parse_size(text: str) -> int:
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    t = text.strip().lower()
    for u, f in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * f)
    return int(t)


def fmt(x, w=6, p=2):
    return f"{x:{w}.{p}f}" if x is not None else " " * (w - 1) + "-"


def table(rows):
    """Markdown table: per case, bnstat's speed as a multiple of each tool's."""
    """Markdown table: per case, bnstat's speed as a multiple of each tool's.

    "bnstat x" compares whole processes (each tool's own start-up included);
    "net x" compares the tool's whole process with bnstat's run less its
    fixed start-up (``net GB/s``: the Numba kernels' loading, about 0.6 s,
    measured by the "Numba 2nd (cached)" start-up row).
    """
    print("| case | tool | GB/s | net GB/s | bnstat x | net x | peak RSS MB | note |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    bnstat_of, net_of = {}, {}
    for r in rows:
        if r["tool"] == "bnstat" and r["seconds"]:
            bnstat_of[r["case"]] = r["seconds"]
            if r.get("net_gbps"):
                net_of[r["case"]] = r["bytes"] / r["net_gbps"] / 1e9
    for r in rows:
        ratio = net_ratio = ""
        b = bnstat_of.get(r["case"])
        if b and r["seconds"] and r["tool"] != "bnstat":
            ratio = f"{r['seconds'] / b:.2f}"
            if r["case"] in net_of:
                net_ratio = f"{r['seconds'] / net_of[r['case']]:.2f}"
        secs = f"{r['seconds']:.3f} s" if r["case"] == "startup" and r["seconds"] else fmt(r["gbps"]).strip()
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else ""
        net = fmt(r.get("net_gbps")).strip() if r.get("net_gbps") else ""
        print(f"| {r['case']} | {r['tool']} | {secs} | {net} | {ratio} | {net_ratio} | {rss} | {r['note']} |")


def machine():
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                            if line.startswith("Model name")), "")
    except OSError:
        pass
    try:
        import numba

        info["numpy"] = np.__version__
        info["numba"] = numba.__version__
    except ImportError:
        pass
    return info


if __name__ == "__main__":
    sys.exit(main())
