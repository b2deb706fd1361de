"""A corpus of crafted bad files through every command that reads them (issue 17).

Each file is generated here (a few KB at most). Every (file, command) pair
must end with exit 1 or 2 (as README "Exit codes" says), a message naming
the file, no traceback and no "internal error", the folder byte-identical
(no output, no temporary file), and -- for the memory bombs -- a peak RSS
under the chunk bound plus a fixed allowance.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import _env
from test_bad_inputs import snapshot

MAGIC1 = b"\x93NUMPY\x01\x00"


def npy_with_header(text: str, data: bytes = b"", version: int = 1) -> bytes:
    """A .npy file whose header dictionary is ``text`` (padded as numpy pads it)."""
    head = text.encode("latin1")
    size_len = 2 if version == 1 else 4
    pad = -(len(MAGIC1) + size_len + len(head) + 1) % 64
    head = head + b" " * pad + b"\n"
    magic = b"\x93NUMPY" + bytes([version, 0])
    return magic + (struct.pack("<H", len(head)) if version == 1 else struct.pack("<I", len(head))) + head + data


def header(shape, descr="<f4") -> str:
    return f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"


# name -> bytes of a .npy file
NPY = {
    "neg_dim.npy": npy_with_header(header("(-1, 16)"), b"\0" * 64),
    "neg_dims.npy": npy_with_header(header("(4, -3)"), b"\0" * 64),
    "dims33.npy": npy_with_header(header("(" + "1, " * 33 + ")"), b"\0" * 4),
    "dims70.npy": npy_with_header(header("(" + "1, " * 70 + ")"), b"\0" * 4),
    "token.npy": npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2, "),
    "token2.npy": npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), '''}"),
    "huge_header.npy": npy_with_header(header("(2, 3)")[:-1] + " 'x': '" + "a" * 200_000 + "'}", version=2),
    "overflow.npy": npy_with_header(header(f"({2**40}, {2**40})")),
    "overflow_big.npy": npy_with_header(header(f"({2**70}, 2)")),
    "shape_float.npy": npy_with_header(header("(2.5, 3)")),
    "shape_str.npy": npy_with_header(header("('a', 3)")),
    "not_dict.npy": npy_with_header("[1, 2, 3]"),
    "bad_descr.npy": npy_with_header(header("(2, 3)", descr="<zz")),
    "deep.npy": npy_with_header("{'descr': " + "[" * 5000 + "]" * 5000 + ", 'fortran_order': False, 'shape': (2,3)}",
                                version=2),
}


def npz_bytes(members: dict[str, bytes], method=zipfile.ZIP_STORED) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def npy_bytes(a) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


NPZ = {
    "neg_member.npz": npz_bytes({"x.npy": NPY["neg_dim.npy"]}),
    "token_member.npz": npz_bytes({"x.npy": NPY["token.npy"]}),
    "dims70_member.npz": npz_bytes({"x.npy": NPY["dims70.npy"]}),
    "overflow_member.npz": npz_bytes({"x.npy": NPY["overflow.npy"]}, zipfile.ZIP_DEFLATED),
}

COMMANDS = [
    ["moments", "{f}", "--layout", "NC"],
    ["normalize", "{f}", "-o", "{d}/out{ext}"],
    ["info", "{f}"],
    ["show", "{f}"],
]


def run(args, cwd, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "bnstat", *map(str, args)], capture_output=True,
                          cwd=cwd, env=_env(), timeout=timeout)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def check(folder, args, codes=(1, 2), must=None):
    before = snapshot(folder)
    rc, out, err = run(args, folder)
    assert rc in codes, f"{args}: exit {rc}\n{err}"
    assert "Traceback" not in err and "internal error" not in err, f"{args}\n{err}"
    assert err.startswith("bnstat: error:") or "Error:" in err, err
    lines = [ln for ln in err.splitlines() if ln and not ln.startswith("bnstat: warning")]
    assert len(lines) <= 4, f"a message is short: {err!r}"
    if must:
        assert must in err, err
    assert snapshot(folder) == before, f"{args}: files changed"
    return err


@pytest.mark.parametrize("name", sorted(NPY) + sorted(NPZ))
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_bad_arrays(tmp_path, name, command):
    data = NPY.get(name) or NPZ[name]
    (tmp_path / name).write_bytes(data)
    ext = os.path.splitext(name)[1]
    args = [a.replace("{f}", str(tmp_path / name)).replace("{d}", str(tmp_path)).replace("{ext}", ext)
            for a in command]
    err = check(tmp_path, args)
    assert name in err, err


@pytest.mark.parametrize("name", ["neg_dim.npy", "dims70.npy", "token.npy", "overflow.npy"])
def test_bad_header_on_stdin(tmp_path, name):
    proc = subprocess.run([sys.executable, "-m", "bnstat", "moments", "-"], input=NPY[name],
                          capture_output=True, env=_env(), timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "<stdin>" in err or "stdin" in err, err
    assert "Traceback" not in err and "internal error" not in err


# ---- stats files -------------------------------------------------------------------------------


def stats_file(tmp_path, meta: str | bytes | None, extra=None):
    """A stats file whose __bnstat__ member holds ``meta``."""
    members = {}
    if meta is not None:
        members["__bnstat__.npy"] = npy_bytes(np.array(meta))
    for k, v in (extra or {}).items():
        members[k + ".npy"] = npy_bytes(v)
    path = tmp_path / "s.npz"
    path.write_bytes(npz_bytes(members))
    return path


@pytest.mark.parametrize("case", ["empty_file", "empty_zip", "deep_json", "not_json", "json_list",
                                  "array_file"])
@pytest.mark.parametrize("command", ["show", "merge", "normalize"])
def test_bad_stats_files(tmp_path, case, command):
    if case == "empty_file":
        path = tmp_path / "s.npz"
        path.write_bytes(b"")
    elif case == "empty_zip":
        path = stats_file(tmp_path, None)
    elif case == "deep_json":
        path = stats_file(tmp_path, "[" * 100_000 + "]" * 100_000)
    elif case == "not_json":
        path = stats_file(tmp_path, "{nope")
    elif case == "json_list":
        path = stats_file(tmp_path, json.dumps([1, 2]))
    else:  # an activations file given where a stats file is expected
        path = tmp_path / "s.npz"
        np.savez(path, x=np.ones((4, 3), np.float32))
    np.save(tmp_path / "x.npy", np.ones((4, 3), np.float32))
    args = {"show": ["show", path], "merge": ["merge", path, path, "-o", tmp_path / "m.npz"],
            "normalize": ["normalize", tmp_path / "x.npy", "--stats", path, "-o", tmp_path / "y.npy"]}[command]
    err = check(tmp_path, args)
    assert "s.npz" in err, err


def test_show_of_an_activation_file(tmp_path):
    np.save(tmp_path / "acts.npy", np.ones((4, 3), np.float32))
    err = check(tmp_path, ["show", tmp_path / "acts.npy"])
    assert "not a bnstat stats file (a .npy array)" in err, err
    assert "context manager" not in err


# ---- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts, code", [
    (["--chunk-size", "9" * 200], 2),
    (["--chunk-size", "1" + "0" * 30 + "GB"], 2),
    (["--threads", "-1"], 2),
])
def test_absurd_options(tmp_path, opts, code):
    np.save(tmp_path / "x.npy", np.ones((4, 3), np.float32))
    check(tmp_path, ["moments", tmp_path / "x.npy", "--layout", "NC", *opts], codes=(code,))


def test_threads_are_capped(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(12, dtype=np.float32).reshape(4, 3))
    rc, out, err = run(["moments", tmp_path / "x.npy", "--layout", "NC", "--threads", "10000",
                        "--format", "json"], tmp_path)
    assert rc == 0, err
    assert "--threads 10000" in err and "warning" in err
    assert json.loads(out)["arrays"][0]["mean"] == [4.5, 5.5, 6.5]


# ---- HDF5 ---------------------------------------------------------------------------------------


def h5_cycles(path):
    import h5py

    with h5py.File(path, "w") as f:
        g = f.create_group("g")
        g["x"] = np.arange(12, dtype=np.float32).reshape(4, 3)
        g["soft"] = h5py.SoftLink("/g")  # soft link cycle
        g["hard"] = g                    # hard link cycle
        f["self"] = h5py.ExternalLink(path.name, "/")  # external link to itself


@pytest.mark.parametrize("command", [["moments", "--format", "json"], ["info", "--format", "json"]])
def test_hdf5_link_cycles_are_walked_once(tmp_path, command):
    """Soft, hard and external links back to a group: each dataset once (once RecursionError)."""
    h5_cycles(tmp_path / "cyc.h5")
    rc, out, err = run([command[0], tmp_path / "cyc.h5", *command[1:]], tmp_path)
    assert rc == 0, err
    assert "Traceback" not in err and "internal error" not in err
    doc = json.loads(out)
    if command[0] == "moments":
        assert [a["name"] for a in doc["arrays"]] == ["g/x"]
        assert doc["arrays"][0]["mean"] == [4.5, 5.5, 6.5]
    else:
        assert "g/x" in out and "g/soft" not in out


def h5_bad(tmp_path, case):
    import h5py

    path = tmp_path / f"{case}.h5"
    if case == "unknown_filter":
        with h5py.File(path, "w") as f:
            ds = f.create_dataset("x", shape=(8, 3), dtype="f4", chunks=(8, 3), compression=32001,
                                  allow_unknown_filter=True)
            ds.id.write_direct_chunk((0, 0), np.ones((8, 3), "f4").tobytes())
    elif case == "corrupt_header":
        with h5py.File(path, "w") as f:
            f["x"] = np.ones((8, 3), "f4")
            addr = h5py.h5o.get_info(f["x"].id).addr
        raw = bytearray(path.read_bytes())
        raw[addr:addr + 48] = b"\xa5" * 48
        path.write_bytes(bytes(raw))
    elif case == "truncated":
        with h5py.File(path, "w") as f:
            f["x"] = np.ones((800, 3), "f4")
        path.write_bytes(path.read_bytes()[:3000])
    elif case == "broken_soft":
        with h5py.File(path, "w") as f:
            f["x"] = np.ones((8, 3), "f4")
            f["gone"] = h5py.SoftLink("/nowhere")
    elif case == "scalar_selected":
        with h5py.File(path, "w") as f:
            f["s"] = np.float32(3)
            f.create_dataset("n", data=h5py.Empty("f4"))
    return path


HDF5_CASES = ["unknown_filter", "corrupt_header", "truncated", "broken_soft", "scalar_selected"]


@pytest.mark.parametrize("case", HDF5_CASES)
@pytest.mark.parametrize("command", ["moments", "normalize", "info"])
def test_bad_hdf5(tmp_path, case, command):
    path = h5_bad(tmp_path, case)
    args = {"moments": ["moments", path, "--layout", "NC"],
            "normalize": ["normalize", path, "--layout", "NC", "-o", tmp_path / "o.h5"],
            "info": ["info", path]}[command]
    if case == "scalar_selected":
        args += ["-d", "s"]
    if case in ("broken_soft", "scalar_selected") and command == "info":
        pytest.skip("info lists such datasets with a note: covered by test_readers")
    err = check(tmp_path, args)
    assert path.name in err, err
    if case == "unknown_filter":
        assert "Blosc (id 32001)" in err and "hdf5plugin" in err


# ---- models and plans ---------------------------------------------------------------------------


def bn_model(path, c_conv=3, **bn):
    arrays = {"0.weight": np.ones((c_conv, 2), "f4"), "0.bias": np.zeros(c_conv, "f4")}
    params = {"weight": np.ones(3, "f4"), "bias": np.zeros(3, "f4"), "running_mean": np.zeros(3, "f4"),
              "running_var": np.ones(3, "f4")}
    params.update(bn)
    arrays.update({f"1.{k}": v for k, v in params.items()})
    np.savez(path, **arrays)
    return path


MODELS = {
    "scalars": dict(weight=np.float32(1), bias=np.float32(0), running_mean=np.float32(0),
                    running_var=np.float32(1)),
    "mixed_lengths": dict(bias=np.zeros(4, "f4"), running_var=np.ones((3, 1), "f4")),
    "wrong_length": dict(weight=np.ones(5, "f4"), bias=np.zeros(5, "f4"), running_mean=np.zeros(5, "f4"),
                         running_var=np.ones(5, "f4")),
}


@pytest.mark.parametrize("case", sorted(MODELS))
def test_normalize_with_a_bad_bn(tmp_path, case):
    model = bn_model(tmp_path / "m.npz", **MODELS[case])
    np.save(tmp_path / "x.npy", np.ones((4, 3), "f4"))
    err = check(tmp_path, ["normalize", tmp_path / "x.npy", "--layout", "NC", "--model", model, "--bn", "1",
                           "-o", tmp_path / "y.npy"])
    assert "BatchNorm 1" in err, err


@pytest.mark.parametrize("case", ["mixed_lengths"])
def test_fold_with_a_bad_bn(tmp_path, case):
    model = bn_model(tmp_path / "m.npz", **MODELS[case])
    err = check(tmp_path, ["fold", model, "--pair", "0=1", "-o", tmp_path / "f.npz"])
    assert "1" in err, err


def deep_safetensors(path, text):
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


@pytest.mark.parametrize("text", ['{"a":' * 50_000 + "1" + "}" * 50_000, "[" * 100_000 + "]" * 100_000],
                         ids=["objects", "arrays"])
def test_deep_json_headers(tmp_path, text):
    st = deep_safetensors(tmp_path / "m.safetensors", text)
    err = check(tmp_path, ["fold", st, "-o", tmp_path / "f.safetensors"])
    assert "m.safetensors" in err, err
    (tmp_path / "plan.json").write_text(text)
    model = bn_model(tmp_path / "m.npz")
    err = check(tmp_path, ["fold", model, "--plan", tmp_path / "plan.json", "-o", tmp_path / "f.npz"])
    assert "plan.json: not a JSON plan" in err, err


# ---- signals ------------------------------------------------------------------------------------


def test_three_quick_sigints(tmp_path):
    """The second and third Ctrl-C land in the cleanup of the first: still exit 130, no traceback."""
    import signal
    import time

    from test_faults import start, temp_files, wait_until_working

    a = np.lib.format.open_memmap(tmp_path / "v.npy", "w+", np.float32, (60_000, 1000))
    a[:] = 1
    a.flush()
    del a
    proc = start(["normalize", tmp_path / "v.npy", "--layout", "NC", "--chunk-size", "256KiB", "--threads", "1",
                  "-o", tmp_path / "o.npy"])
    wait_until_working(proc, tmp_path, tmp_path / "v.npy", want_temp=True, min_read=1 << 62)
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert temp_files(tmp_path) == [] and not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("entry", ["python -m bnstat", "console script"])
def test_sigint_before_the_handlers(tmp_path, entry):
    """A Ctrl-C while Python still imports click and the commands: exit 130, no traceback.

    The signal is sent right after the first module of the entry point ran, which
    is where a real one lands in the first milliseconds.
    """
    if entry == "python -m bnstat":
        code = "import os, signal, time, bnstat.__main__; os.kill(os.getpid(), signal.SIGINT); time.sleep(5)"
    else:
        code = ("import os, signal, sys, time; sys.argv = ['/usr/bin/bnstat']; import bnstat.cli; "
                "os.kill(os.getpid(), signal.SIGINT); time.sleep(5)")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_importing_bnstat_keeps_the_programs_sigint(tmp_path):
    code = ("import signal, bnstat.cli, bnstat; "
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()


def test_signal_wrapped_by_a_library(tmp_path, monkeypatch):
    """SIGTERM while Numba compiles came out as numba's own error ("internal error"): now 143."""
    from conftest import run_inproc

    from bnstat import errors, stream

    np.save(tmp_path / "x.npy", np.ones((4, 3), "f4"))

    def compiling(*args, **kw):
        import signal

        errors.pending_signal = signal.SIGTERM  # what cli's handler records...
        raise RuntimeError("no compiled object yet")  # ...and what numba raised instead

    monkeypatch.setattr(stream, "compute_stats", compiling)
    monkeypatch.setattr("bnstat.commands.moments.compute_stats", compiling, raising=False)
    rc, out, err = run_inproc("moments", tmp_path / "x.npy", "--layout", "NC")
    assert rc == 143, err
    assert "internal error" not in err


# ---- memory bombs -------------------------------------------------------------------------------

ALLOWANCE = 150 << 20  # the interpreter, numpy, h5py (about 60 MB here) and some slack


def peak_rss(args, cwd, stdin=None):
    """(exit code, stderr, peak RSS in bytes) of ``bnstat ARGS`` run in a fresh wrapper."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], stdin=sys.stdin); "
               "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    env = _env()
    env["BNSTAT_ENGINE"] = "numpy"  # the same bounds, without numba's 150 MB of compiler
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as fh:
        proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "bnstat", *map(str, args)],
                              stdin=fh, capture_output=True, cwd=cwd, env=env, timeout=300)
    rc, kb = proc.stdout.decode().split()[-2:]
    return int(rc), proc.stderr.decode(), int(kb) * 1024


def test_member_with_hundreds_of_mb_after_its_array(tmp_path):
    """A deflated member: a (4, 3) array then 300 MB of zeros (300 KB compressed). Its CRC
    covers them: they are inflated in blocks, never held at once (once 660 MB of RSS)."""
    with zipfile.ZipFile(tmp_path / "t.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", npy_bytes(np.ones((4, 3), "f4")) + b"\0" * (300 << 20))
    rc, err, rss = peak_rss(["moments", tmp_path / "t.npz", "--layout", "NC", "--chunk-size", "1MiB",
                             "-o", tmp_path / "s.json"], tmp_path)
    assert rc == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["arrays"][0]["mean"] == [1.0, 1.0, 1.0]
    assert rss < (1 << 20) + ALLOWANCE, rss


def test_stats_member_inflating_to_a_gigabyte(tmp_path):
    """A stats file whose mean member declares 1 GB (1 MB deflated): refused before np.load."""
    np.save(tmp_path / "x.npy", np.ones((4, 3), "f4"))
    rc, _, err = run(["moments", tmp_path / "x.npy", "--layout", "NC", "-o", tmp_path / "good.npz"], tmp_path)
    assert rc == 0, err
    with zipfile.ZipFile(tmp_path / "good.npz") as src, \
            zipfile.ZipFile(tmp_path / "s.npz", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "x/mean.npy":
                data = npy_bytes(np.zeros(3)) + b"\0" * (1 << 30)
            dst.writestr(info.filename, data)
    os.unlink(tmp_path / "good.npz")
    before = snapshot(tmp_path)
    rc, err, rss = peak_rss(["show", tmp_path / "s.npz"], tmp_path)
    assert rc == 1, err
    assert re.search(r"s\.npz:x/mean: declares 10737419\d\d bytes, more than statistics", err), err
    assert rss < ALLOWANCE, rss
    assert snapshot(tmp_path) == before


def test_stdin_header_claiming_a_trillion_elements(tmp_path):
    (tmp_path / "claim.npy").write_bytes(npy_with_header(header("(10000000, 100000)"), b"\0" * 4096))
    rc, err, rss = peak_rss(["moments", "-", "--layout", "NC", "--chunk-size", "1MiB"], tmp_path,
                            stdin=tmp_path / "claim.npy")
    assert rc == 1, err
    assert "stdin: truncated: the data ends after 4096 of 4000000000000 bytes" in err, err
    assert rss < (1 << 20) + ALLOWANCE, rss


def sparse_h5(path, shape):
    import h5py

    with h5py.File(path, "w") as f:  # no chunk written: the file is a few KB
        f.create_dataset("x", shape=shape, dtype="f4", chunks=(1, 1 << 20))
    return path


def test_a_row_larger_than_memory_is_refused_before_allocation(tmp_path):
    from bnstat.stream import available_memory

    cols = available_memory() // 4 + (1 << 30)  # one row: more than the memory available
    path = sparse_h5(tmp_path / "sparse.h5", (2, cols))
    err = check(tmp_path, ["moments", path, "--layout", "CN", "--chunk-size", "64MiB"])
    assert "sparse.h5:x: one slab of 1 row(s)" in err and "more than --chunk-size" in err, err


def test_billions_of_units_are_refused_before_allocation(tmp_path):
    """--layout NC on a (2, 2.5e9) dataset: 2.5e9 channels, 240 GB of statistics."""
    path = sparse_h5(tmp_path / "sparse.h5", (2, 2_500_000_000))
    rc, err, rss = peak_rss(["moments", path, "--layout", "NC"], tmp_path)
    assert rc == 1, err
    assert "2,500,000,000 units (layout NC) need" in err, err
    assert rss < ALLOWANCE, rss
