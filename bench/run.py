"""bnstat benchmark: bnstat against the tools people use instead, in one run.

    python bench/run.py [--quick] [--size-mb N] [--out results.json]

Generates its data in a temporary folder, runs every command in its own
process (page cache warmed first: each file is read once before it is
timed), and prints one table with two throughput measures:

- "GB/s": bytes / wall time of the whole process (start-up included), and
  "bnstat x": the other tool's wall time / the `bnstat` CLI row's.
- "work GB/s": bytes / the time the process spends on the data after its
  imports and warm-up, measured inside the process (a last stdout line
  ``@@work SECONDS``); for bnstat a library call (``bnstat.moments`` /
  ``bnstat.normalize`` with engine="numba") on the same file with the same
  options as the CLI row, after a warm-up call on a tiny array and a tiny
  file of the same kind; for numpy / torch / dask / h5py the timer starts
  after their imports (torch and dask also run a tiny warm-up op); for cat
  and cp it is the wall time. "work x": the other tool's work time / the
  bnstat library row's work time in that case (above 1: bnstat is faster;
  against `cat` / `cp` it is the fraction of the read / copy limit reached).

Every case also has whole-process rows of a user's other situations: "bnstat,
first run (empty Numba cache)" (its "bnstat x": first run / the warm CLI run,
the detached compiler of each run waited for before the next) and, as root,
"cold: ..." rows (the page cache dropped before each run, then the libraries
and the Numba cache read back in by bnstat on a tiny file of the same kind:
only the data file is cold; "bnstat x" against the cold bnstat row, so "cold:
cat" gives the fraction of cold cat's throughput bnstat reaches).
``--no-first-run`` / ``--no-cold`` skip them.

and the peak RSS of the process (/usr/bin/time -f %M, max over the reps).
Small cases take the best of 3 runs (each measure its own best). Results go
to JSON as well (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from bench_cold import drop_caches as _drop_and_warm
from bench_startup import wait_compilers

PY = sys.executable
C, H, W = 64, 56, 56  # a ResNet stage: 802816 bytes per float32 sample
SAMPLE = C * H * W * 4


TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None


def run(cmd, *, env=None, stdout=subprocess.DEVNULL, work=False):
    """Wall time (s), peak RSS (MB), exit code, stderr and work time of one child.

    Peak RSS comes from /usr/bin/time -f %M when it exists: a child's own
    ru_maxrss (os.wait4) also counts the pages it shared with this process
    between fork and exec, so it can never be lower than this process's RSS.
    With ``work`` the child's stdout is kept and its last ``@@work SECONDS``
    line is the work time (else None). stdout and stderr go to temporary
    files, not pipes: a child that writes a lot cannot block.
    """
    wrapped = [TIME, "-f", "@@maxrss %M", *cmd] if TIME else cmd
    with tempfile.TemporaryFile() as errf, tempfile.TemporaryFile() as outf:
        t0 = time.perf_counter()
        p = subprocess.Popen(wrapped, env=env, stdout=outf if work else stdout, stderr=errf)
        _, status, usage = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # already reaped
        errf.seek(0)
        err = errf.read().decode(errors="replace")
        outf.seek(0)
        out = outf.read().decode(errors="replace") if work else ""
    rc = p.returncode
    rss = usage.ru_maxrss / 1024
    if TIME:
        lines = err.rstrip().splitlines()
        if lines and lines[-1].startswith("@@maxrss"):
            rss = int(lines[-1].split()[1]) / 1024
            err = "\n".join(lines[:-1])
        if rc != 0 and "Command exited with non-zero status" in err:
            err = "\n".join(line for line in err.splitlines() if "Command exited with" not in line)
    wt = None
    for line in out.splitlines():
        if line.startswith("@@work "):
            wt = float(line.split()[1])
    return dt, rss, rc, err, wt


def best_of(cmd, reps, before=None, **kw):
    """Best wall time, max peak RSS, exit code, stderr, best work time over ``reps`` runs
    (``before()``, if given, runs before each, untimed)."""
    best = work = None
    peak = 0.0
    for _ in range(reps):
        if before is not None:
            before()
        dt, rss, rc, err, wt = run(cmd, **kw)
        peak = max(peak, rss)
        if rc != 0:
            return None, peak, rc, err, None
        best = dt if best is None else min(best, dt)
        if wt is not None:
            work = wt if work is None else min(work, wt)
    return best, peak, 0, "", work


# ---- the alternatives, as small Python programs run with `python -c` ---------------
# Each starts its timer after its imports (and warm-up) and prints "@@work SECONDS"
# last: the "work" measure.

WORK_START = "\nimport time as _t\n_t0 = _t.perf_counter()\n"
WORK_END = "\nprint('@@work %.6f' % (_t.perf_counter() - _t0))\n"

NUMPY_MMAP = """
import numpy as np, sys
""" + WORK_START + """
a = np.load(sys.argv[1], mmap_mode='r')
axes = tuple(int(x) for x in sys.argv[2].split(','))
m = a.mean(axis=axes); v = a.var(axis=axes); lo = a.min(axis=axes); hi = a.max(axis=axes)
""" + WORK_END

NUMPY_MMAP_MEANVAR = """
import numpy as np, sys
""" + WORK_START + """
a = np.load(sys.argv[1], mmap_mode='r')
axes = tuple(int(x) for x in sys.argv[2].split(','))
m = a.mean(axis=axes); v = a.var(axis=axes)
""" + WORK_END

NUMPY_CHUNKED = """
import numpy as np, sys
""" + WORK_START + """
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
""" + WORK_END

NUMPY_NPZ = """
import numpy as np, sys
""" + WORK_START + """
a = np.load(sys.argv[1])['x']; a.mean((0, 2, 3)); a.var((0, 2, 3))
""" + WORK_END

TORCH = """
import numpy as np, sys, warnings, torch
warnings.simplefilter('ignore')
torch.set_num_threads(int(sys.argv[4]))
w = torch.ones((2, 3, 4, 4))
torch.var_mean(w, dim=(0, 2, 3), unbiased=False); torch.nn.functional.batch_norm(w, None, None, training=True)
""" + WORK_START + """
a = torch.from_numpy(np.load(sys.argv[1], mmap_mode='r'))
axes = tuple(int(x) for x in sys.argv[2].split(','))
if sys.argv[3] == 'var_mean':
    v, m = torch.var_mean(a, dim=axes, unbiased=False)
else:
    x = a if axes == (0, 2, 3) else a.permute(0, 3, 1, 2)
    y = torch.nn.functional.batch_norm(x, None, None, training=True)
""" + WORK_END

DASK = """
import numpy as np, sys, dask.array as da
w = da.ones((4, 4), chunks=2); da.compute(w.mean(axis=0), w.var(axis=0))
""" + WORK_START + """
a = da.from_array(np.load(sys.argv[1], mmap_mode='r'), chunks=(max(1, int(sys.argv[3]) // (np.load(sys.argv[1], mmap_mode='r')[0].nbytes)),) + (-1,) * 3)
axes = tuple(int(x) for x in sys.argv[2].split(','))
da.compute(a.mean(axis=axes), a.var(axis=axes))
""" + WORK_END

DASK_H5 = """
import h5py, sys, dask.array as da
w = da.ones((4, 4), chunks=2); da.compute(w.mean(axis=0), w.var(axis=0))
""" + WORK_START + """
with h5py.File(sys.argv[1], 'r') as f:
    ds = f['x']
    a = da.from_array(ds, chunks=ds.chunks or 'auto')
    axes = tuple(int(x) for x in sys.argv[2].split(','))
    da.compute(a.mean(axis=axes), a.var(axis=axes))
""" + WORK_END

H5_RAW = """
import h5py, numpy as np, sys
""" + WORK_START + """
with h5py.File(sys.argv[1], 'r') as f:
    ds = f['x']
    rows = max(1, int(sys.argv[2]) // (ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
    if ds.chunks:
        rows = max(ds.chunks[0], rows - rows % ds.chunks[0])
    buf = np.empty((min(rows, ds.shape[0]),) + ds.shape[1:], ds.dtype)
    for r0 in range(0, ds.shape[0], rows):
        r1 = min(ds.shape[0], r0 + rows)
        ds.read_direct(buf, np.s_[r0:r1], np.s_[0:r1 - r0])
""" + WORK_END

NUMPY_NORMALIZE = """
import numpy as np, sys
""" + WORK_START + """
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
""" + WORK_END

# bnstat's library on one file, after a warm-up on a tiny array and a tiny file of the
# same kind (imports h5py / zipfile, loads the cached kernels): the time of the call
# that does the same as the CLI row.
# argv: mode (moments|normalize) path layout chunk_bytes threads(0: default) warm_file kwargs_json
#       [out warm_out]
BNSTAT_LIB = """
import json, sys
import numpy as np, bnstat
mode, path, layout, chunk, threads, warm, kw = sys.argv[1:8]
chunk = int(chunk); threads = int(threads) or None; kw = json.loads(kw)
bnstat.moments(np.ones((4, 4), np.float32), layout='NC', engine='numba')
if mode == 'normalize':
    out, warm_out = sys.argv[8:10]
    bnstat.normalize(warm, warm_out, layout=layout, force=True, engine='numba', **kw)
else:
    bnstat.moments(warm, layout=layout, threads=threads, engine='numba', **kw)
""" + WORK_START + """
if mode == 'normalize':
    bnstat.normalize(path, out, layout=layout, force=True, chunk_size=chunk, threads=threads, engine='numba',
                     **kw)
else:
    bnstat.moments(path, layout=layout, chunk_size=chunk, threads=threads, engine='numba', **kw)
""" + WORK_END


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
    t = rng.standard_normal((4, 8, 5, 5), np.float32)
    np.save(files["tiny"], t)
    # tiny files of every kind: the warm-up of the library ("work") runs
    files["tiny_h5"] = os.path.join(d, "tiny.h5")
    with h5py.File(files["tiny_h5"], "w") as f:
        f.create_dataset("x", data=t, chunks=(1, 8, 5, 5))
    files["tiny_gzip"] = os.path.join(d, "tiny_gzip.h5")
    with h5py.File(files["tiny_gzip"], "w") as f:
        f.create_dataset("x", data=t, chunks=(1, 8, 5, 5), compression="gzip", compression_opts=1)
    files["tiny_npz"] = os.path.join(d, "tiny.npz")
    np.savez(files["tiny_npz"], x=t)
    files["tiny_deflated"] = os.path.join(d, "tiny_deflated.npz")
    np.savez_compressed(files["tiny_deflated"], x=t)
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
    ap.add_argument("--no-first-run", action="store_true",
                    help="skip the first-run rows (an empty Numba cache per run)")
    ap.add_argument("--no-cold", action="store_true",
                    help="skip the cold rows (page cache dropped before each run; needs root)")
    ap.add_argument("--only", default=None, type=lambda t: set(t.split(",")), metavar="CASE,...",
                    help="run only these cases (e.g. 'npz stored,normalize')")
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

        def add(case, tool, cmd, nbytes, reps_=reps, note="", work=None, role=None, **kw):
            """One row. work: None (not measured), "wall" (work time = wall time: cat, cp)
            or "stdout" (the child prints "@@work SECONDS"). role: "cli" for the bnstat CLI
            row of the case ("bnstat x" reference), "lib" for its library row ("work x")."""
            if args.only and case not in args.only:
                return None
            dt, rss, rc, err, wt = best_of(cmd, reps_, work=work == "stdout", **kw)
            if work == "wall":
                wt = dt
            row = {"case": case, "tool": tool, "bytes": nbytes, "seconds": dt, "peak_rss_mb": rss,
                   "gbps": (nbytes / dt / 1e9) if dt and nbytes else None,
                   "work_seconds": wt, "work_gbps": (nbytes / wt / 1e9) if wt and nbytes else None,
                   "role": role, "note": note}
            if rc:
                row["note"] = (note + " " if note else "") + f"failed (exit {rc}): {err.strip()[-200:]}"
            elif work == "stdout" and wt is None:
                row["note"] = (note + " " if note else "") + "no @@work line"
            rows.append(row)
            print(f"  {case:14s} {tool:30s} {fmt(row['gbps'])} GB/s  work {fmt(row['work_gbps'])} GB/s "
                  f"{rss:7.0f} MB {row['note']}", file=sys.stderr)
            return row

        def skip(case, tool, why):
            if args.only and case not in args.only:
                return
            rows.append({"case": case, "tool": tool, "bytes": 0, "seconds": None, "peak_rss_mb": None,
                         "gbps": None, "work_seconds": None, "work_gbps": None, "role": None, "note": why})

        first_cache = os.path.join(d, "numba-first-run")
        can_drop = not args.no_cold and os.access("/proc/sys/vm/drop_caches", os.W_OK)

        def first_run(case, cmd, nb, before=None):
            """The CLI row again with an empty Numba cache before each run (the detached
            compiler of the run before waited for, untimed): a user's first run."""
            if args.no_first_run:
                return

            def empty():
                wait_compilers()
                shutil.rmtree(first_cache, ignore_errors=True)
                os.makedirs(first_cache)
                if before is not None:
                    before()
            add(case, "bnstat, first run (empty Numba cache)", cmd, nb, reps, role="first",
                env={**env, "NUMBA_CACHE_DIR": first_cache}, before=empty)
            wait_compilers()  # nothing compiling under the rows that follow

        def cold_rows(case, tools, nb, warm, before=None):
            """``tools`` ((name, cmd, work) with bnstat's CLI first) with the page cache dropped
            before each run, then the libraries and the Numba cache read back in by bnstat on
            ``warm`` (a tiny file of the same kind): only the data file is cold."""
            if not can_drop:
                skip(case, "cold rows", "not root, or --no-cold: the page cache cannot be dropped")
                return

            def drop():
                if before is not None:
                    before()
                drop_caches(warm)
            for i, (tool, cmd, work) in enumerate(tools):
                add(case, f"cold: {tool}", cmd, nb, reps, work=work, before=drop,
                    role="cold-cli" if i == 0 else "cold")
            run(["cat", *{f for f in files.values()}])  # page-cached again for the rows that follow

        # ---- start-up --------------------------------------------------------------
        sreps = 3 if args.quick else 5
        add("startup", "bnstat --help", bn + ["--help"], 0, sreps)
        add("startup", "python -c 'import click'", [PY, "-c", "import click"], 0, sreps)
        cache = tempfile.mkdtemp(prefix="numba-cache-", dir=d)
        out_json = os.path.join(d, "out.json")
        tiny = bn + ["moments", files["tiny"], "--layout", "NCHW", "--format", "json", "-o", out_json,
                     "--force", "--quiet"]
        numba_env = {**env, "BNSTAT_ENGINE": "numba"}
        add("startup", "bnstat moments (tiny file)", tiny, 0, sreps,
            note="under 32 MiB: numpy engine, no Numba")
        add("startup", "bnstat moments, Numba 1st (compile)", tiny, 0, 1,
            env={**numba_env, "NUMBA_CACHE_DIR": cache}, note="BNSTAT_ENGINE=numba, fresh NUMBA_CACHE_DIR")
        add("startup", "bnstat moments, Numba 2nd (cached)", tiny, 0, sreps,
            env={**numba_env, "NUMBA_CACHE_DIR": cache}, note="BNSTAT_ENGINE=numba")
        add("startup", "import numpy,numba,h5py,rich", [PY, "-c", "import numpy, numba, h5py, rich"], 0, sreps)
        run(tiny, env=numba_env)  # make sure the repo's own numba cache is warm for what follows

        def engine_note(nb):
            return "CLI: numpy engine (input under 32 MiB)" if nb < 32 * 1024**2 else ""

        def moments(path, layout, extra=()):
            return bn + ["moments", path, "--layout", layout, "--format", "json", "-o", out_json,
                         "--force", "--quiet", "--chunk-size", chunk, "--threads", str(threads), *extra]

        def lib(case, tool, path, layout, warm, nb, *, chunk_b=chunk_bytes, threads_=threads,
                role=None, mode="moments", out=None, reps_=reps, note="", kw=None, before=None):
            """bnstat's library on ``path`` after a warm-up on ``warm`` (a tiny file of the same kind)."""
            cmd = [PY, "-c", BNSTAT_LIB, mode, path, layout, str(chunk_b), str(threads_ or 0), warm,
                   json.dumps(kw or {})]
            if mode == "normalize":
                cmd += [out, os.path.join(d, "warm_out.npy")]
            return add(case, tool, cmd, nb, reps_, note=note, work="stdout", role=role, before=before)

        def npy_cases(case, path, layout, axes):
            nb = os.path.getsize(path)
            add(case, "bnstat", moments(path, layout), nb, role="cli")
            lib(case, "bnstat (library)", path, layout, files["tiny"], nb, role="lib")
            lib(case, "bnstat --threads 1 (library)", path, layout, files["tiny"], nb, threads_=1)
            add(case, "cat", ["cat", path], nb, work="wall")
            add(case, "numpy mean+var (mmap)", [PY, "-c", NUMPY_MMAP_MEANVAR, path, axes], nb, work="stdout")
            add(case, "numpy mean+var+min+max", [PY, "-c", NUMPY_MMAP, path, axes], nb, work="stdout")
            add(case, "numpy chunked float64", [PY, "-c", NUMPY_CHUNKED, path, axes, str(chunk_bytes)], nb,
                work="stdout")
            if have_torch:
                treps = 1 if args.quick else reps  # 2 s of imports each: one run in --quick
                add(case, "torch.var_mean", [PY, "-c", TORCH, path, axes, "var_mean", str(threads)], nb,
                    treps, work="stdout")
                add(case, "F.batch_norm (forward)", [PY, "-c", TORCH, path, axes, "bn", str(threads)], nb,
                    treps, work="stdout")
            else:
                skip(case, "torch", "torch not installed")
            if have_dask:
                add(case, "dask mean+var", [PY, "-c", DASK, path, axes, str(chunk_bytes)], nb, work="stdout")
            else:
                skip(case, "dask", "dask not installed")
            first_run(case, moments(path, layout), nb)
            cold_rows(case, [("bnstat", moments(path, layout), None), ("cat", ["cat", path], "wall"),
                             ("numpy mean+var (mmap)", [PY, "-c", NUMPY_MMAP_MEANVAR, path, axes], "stdout")],
                      nb, warm_cmd(files["tiny"], layout))

        def warm_cmd(tiny_path, layout):
            return bn + ["moments", tiny_path, "--layout", layout, "--format", "json", "-q"]

        print("timing ...", file=sys.stderr)
        npy_cases("npy NCHW", files["nchw"], "NCHW", "0,2,3")
        add("npy NCHW", "bnstat --threads 1", moments(files["nchw"], "NCHW", ("--threads", "1")),
            os.path.getsize(files["nchw"]))
        npy_cases("npy NHWC", files["nhwc"], "NHWC", "0,1,2")

        nb = os.path.getsize(files["h5"])
        add("hdf5", "bnstat", moments(files["h5"], "NCHW"), nb, role="cli")
        lib("hdf5", "bnstat (library)", files["h5"], "NCHW", files["tiny_h5"], nb, role="lib")
        add("hdf5", "h5py read_direct (raw)", [PY, "-c", H5_RAW, files["h5"], str(chunk_bytes)], nb,
            work="stdout")
        add("hdf5", "cat", ["cat", files["h5"]], nb, work="wall")
        first_run("hdf5", moments(files["h5"], "NCHW"), nb)
        cold_rows("hdf5", [("bnstat", moments(files["h5"], "NCHW"), None), ("cat", ["cat", files["h5"]], "wall"),
                           ("h5py read_direct (raw)", [PY, "-c", H5_RAW, files["h5"], str(chunk_bytes)], "stdout")],
                  nb, warm_cmd(files["tiny_h5"], "NCHW"))

        nb = os.path.getsize(files["gzip_npy"])  # uncompressed bytes
        add("hdf5 gzip", "bnstat", moments(files["gzip"], "NCHW"), nb, role="cli", note=engine_note(nb))
        lib("hdf5 gzip", "bnstat (library)", files["gzip"], "NCHW", files["tiny_gzip"], nb, role="lib")
        add("hdf5 gzip", "bnstat --threads 1", moments(files["gzip"], "NCHW", ("--threads", "1")), nb,
            note=engine_note(nb))
        lib("hdf5 gzip", "bnstat --threads 1 (library)", files["gzip"], "NCHW", files["tiny_gzip"], nb,
            threads_=1)
        add("hdf5 gzip", "h5py read_direct (1 thread)", [PY, "-c", H5_RAW, files["gzip"], str(chunk_bytes)], nb,
            work="stdout")
        if have_dask:
            add("hdf5 gzip", "dask mean+var", [PY, "-c", DASK_H5, files["gzip"], "0,2,3"], nb, work="stdout")
        else:
            skip("hdf5 gzip", "dask", "dask not installed")
        first_run("hdf5 gzip", moments(files["gzip"], "NCHW"), nb)
        cold_rows("hdf5 gzip", [("bnstat", moments(files["gzip"], "NCHW"), None),
                                ("cat", ["cat", files["gzip"]], "wall")], nb, warm_cmd(files["tiny_gzip"], "NCHW"))

        nb = os.path.getsize(files["nchw"])
        add("npz stored", "bnstat", moments(files["npz_stored"], "NCHW"), nb, role="cli")
        lib("npz stored", "bnstat (library)", files["npz_stored"], "NCHW", files["tiny_npz"], nb, role="lib")
        add("npz stored", "bnstat --skip-crc", moments(files["npz_stored"], "NCHW", ("--skip-crc",)), nb)
        lib("npz stored", "bnstat --skip-crc (library)", files["npz_stored"], "NCHW", files["tiny_npz"], nb,
            kw={"check_crc": False})
        add("npz stored", "bnstat on the .npy", moments(files["nchw"], "NCHW"), nb)
        lib("npz stored", "bnstat on the .npy (library)", files["nchw"], "NCHW", files["tiny"], nb)
        first_run("npz stored", moments(files["npz_stored"], "NCHW"), nb)
        cold_rows("npz stored", [("bnstat", moments(files["npz_stored"], "NCHW"), None),
                                 ("cat", ["cat", files["npz_stored"]], "wall")], nb,
                  warm_cmd(files["tiny_npz"], "NCHW"))
        nb = os.path.getsize(files["gzip_npy"])
        add("npz deflated", "bnstat", moments(files["npz_deflated"], "NCHW"), nb, role="cli",
            note=engine_note(nb))
        lib("npz deflated", "bnstat (library)", files["npz_deflated"], "NCHW", files["tiny_deflated"], nb,
            role="lib")
        add("npz deflated", "numpy np.load + mean/var", [PY, "-c", NUMPY_NPZ, files["npz_deflated"]], nb,
            work="stdout")
        first_run("npz deflated", moments(files["npz_deflated"], "NCHW"), nb)
        cold_rows("npz deflated", [("bnstat", moments(files["npz_deflated"], "NCHW"), None),
                                   ("cat", ["cat", files["npz_deflated"]], "wall"),
                                   ("numpy np.load + mean/var", [PY, "-c", NUMPY_NPZ, files["npz_deflated"]],
                                    "stdout")], nb, warm_cmd(files["tiny_deflated"], "NCHW"))

        # a file 100 times the chunk size
        nb = os.path.getsize(files["nchw"])
        small_chunk = max(SAMPLE, nb // 100)
        add("100x chunk", "bnstat", bn + ["moments", files["nchw"], "--layout", "NCHW", "--format", "json",
                                          "-o", out_json, "--force", "--quiet", "--chunk-size", str(small_chunk)],
            nb, role="cli", note=f"--chunk-size {small_chunk}")
        lib("100x chunk", "bnstat (library)", files["nchw"], "NCHW", files["tiny"], nb, chunk_b=small_chunk,
            threads_=None, role="lib", note=f"chunk_size={small_chunk}")
        add("100x chunk", "cat", ["cat", files["nchw"]], nb, work="wall")
        small = bn + ["moments", files["nchw"], "--layout", "NCHW", "--format", "json", "-o", out_json,
                      "--force", "--quiet", "--chunk-size", str(small_chunk)]
        first_run("100x chunk", small, nb)
        cold_rows("100x chunk", [("bnstat", small, None), ("cat", ["cat", files["nchw"]], "wall")], nb,
                  warm_cmd(files["tiny"], "NCHW"))

        # normalize: every run writes a new file (the previous output is removed first, untimed).
        # Writing over an existing output measures the kernel's writeback of the old and new
        # pages instead (ext4 flushes a file renamed over another, and one truncated by cp, at
        # that moment); the "over an existing output" case below shows it.
        out_npy = os.path.join(d, "normed.npy")

        def fresh():  # and no writeback of the previous run's output left to overlap this one
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out_npy)
            run(["sync"])

        def exists():
            if not os.path.exists(out_npy):
                shutil.copyfile(files["nchw"], out_npy)
            run(["sync"])

        for case, before in (("normalize", fresh), ("normalize over existing", exists)):
            if have_normalize:
                add(case, "bnstat", bn + ["normalize", files["nchw"], "-o", out_npy, "--layout", "NCHW",
                                          "--force", "--quiet", "--chunk-size", chunk], nb, big_reps,
                    role="cli", before=before)
                lib(case, "bnstat (library)", files["nchw"], "NCHW", files["tiny"], nb, threads_=None,
                    role="lib", mode="normalize", out=out_npy, reps_=big_reps, before=before)
                normalize = bn + ["normalize", files["nchw"], "-o", out_npy, "--layout", "NCHW", "--force",
                                  "--quiet", "--chunk-size", chunk]
                first_run(case, normalize, nb, before=before)
                cold_rows(case, [("bnstat", normalize, None), ("cp", ["cp", files["nchw"], out_npy], "wall")],
                          nb, warm_cmd(files["tiny"], "NCHW"), before=before)
            else:
                skip(case, "bnstat", "`bnstat normalize` not available yet")
            add(case, "cp", ["cp", files["nchw"], out_npy], nb, big_reps, work="wall", before=before)
            add(case, "numpy chunked", [PY, "-c", NUMPY_NORMALIZE, files["nchw"], out_npy, str(chunk_bytes)],
                nb, big_reps, work="stdout", before=before)
    finally:
        if not os.environ.get("BNSTAT_BENCH_KEEP"):
            shutil.rmtree(d, ignore_errors=True)
    total = time.perf_counter() - t_start
    ratios(rows)
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


def drop_caches(warm=None) -> bool:
    """Drop the page cache (then run ``warm``, untimed); False when that is not allowed."""
    try:
        _drop_and_warm(warm, dict(os.environ))
    except OSError:
        return False
    return True


def fmt(x, w=6, p=2):
    return f"{x:{w}.{p}f}" if x is not None else " " * (w - 1) + "-"


def ratios(rows):
    """Set "bnstat_x" (other wall / the case's bnstat CLI wall) and "work_x" (other work time /
    the case's bnstat library work time) on every row: above 1, bnstat is faster."""
    cli = {r["case"]: r["seconds"] for r in rows if r.get("role") == "cli" and r["seconds"]}
    cold = {r["case"]: r["seconds"] for r in rows if r.get("role") == "cold-cli" and r["seconds"]}
    lib = {r["case"]: r["work_seconds"] for r in rows if r.get("role") == "lib" and r["work_seconds"]}
    for r in rows:
        r["bnstat_x"] = r["work_x"] = None
        c = r["case"]
        if r.get("role") == "cold":  # cold rows against the cold bnstat row
            if c in cold and r["seconds"]:
                r["bnstat_x"] = r["seconds"] / cold[c]
        elif c in cli and r["seconds"] and r.get("role") not in ("cli", "cold-cli") \
                and not r["tool"].endswith("(library)"):
            r["bnstat_x"] = r["seconds"] / cli[c]
        if c in lib and r["work_seconds"] and r.get("role") not in ("lib", "first", "cold", "cold-cli"):
            r["work_x"] = r["work_seconds"] / lib[c]


def table(rows):
    """Markdown table: both throughput measures and bnstat's speed as a multiple of each tool's.

    "GB/s" and "bnstat x" are whole processes (start-up included; for the
    library rows, whose process also runs a warm-up, only "work" is shown);
    "work GB/s" and "work x" are the time on the data after imports and
    warm-up, measured in the process.
    """
    print("| case | tool | GB/s | work GB/s | bnstat x | work x | peak RSS MB | note |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["case"] == "startup":
            wall = f"{r['seconds']:.3f} s" if r["seconds"] else "-"
        elif r["tool"].endswith("(library)"):
            wall = ""
        else:
            wall = fmt(r["gbps"]).strip()
        work = fmt(r.get("work_gbps")).strip() if r.get("work_gbps") else ""
        bx = f"{r['bnstat_x']:.2f}" if r.get("bnstat_x") else ""
        wx = f"{r['work_x']:.2f}" if r.get("work_x") else ""
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else ""
        print(f"| {r['case']} | {r['tool']} | {wall} | {work} | {bx} | {wx} | {rss} | {r['note']} |")


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
