"""Bad input corpus (issue 6): every broken, odd or huge input gives the exit
code and message of SPEC 4, never a traceback, and leaves the disk as it was.

Each case runs ``bnstat`` in this process (``run_inproc``: numba's kernels stay
loaded) with an output requested where the command takes one, and checks
four things: the exit status, a message naming the file and the problem, no
"Traceback" on stderr, and the folder afterwards (no output, no temporary
file, every input byte-for-byte unchanged). The unreadable-file case needs a
real process (it drops the capability that lets root read anything).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile

import h5py
import numpy as np
import pytest
from conftest import run_cli, run_inproc

# ---- helpers ---------------------------------------------------------------------------


def snapshot(folder) -> dict[str, str]:
    """{relative path: sha256} of every file below ``folder`` (hidden files included)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                out[os.path.relpath(path, folder)] = "link-or-special"
                continue
            try:
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
            except PermissionError:
                out[os.path.relpath(path, folder)] = "unreadable"
    return out


@contextlib.contextmanager
def leak_check():
    """Collect the files a run leaves open (their ResourceWarning, raised in __del__).

    Reported by an assertion of the test that leaked, rather than as a stray
    "unraisable exception" in whichever later test the garbage collector runs in.
    """
    leaked: list[str] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: leaked.append(f"{u.exc_type.__name__}: {u.exc_value}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            yield leaked
            gc.collect()
    finally:
        sys.unraisablehook = previous


def run_and_check(folder, args, code, pattern, *, runner=run_inproc, stdout_empty=True):
    """Run bnstat ARGS; pin the exit code and a message; check nothing changed on disk."""
    before = snapshot(folder)
    with leak_check() as leaked:
        rc, out, err = runner(*args)
    assert rc == code, f"exit {rc}, expected {code}\nstderr: {err}"
    assert re.search(pattern, err), f"stderr does not match {pattern!r}: {err!r}"
    assert "Traceback" not in err
    assert "internal error" not in err, err
    if stdout_empty:
        assert out == "", f"stdout should be empty on failure: {out[:300]!r}"
    assert snapshot(folder) == before, "files were written, removed or modified"
    assert not leaked, f"bnstat left files open: {leaked}"
    return err


def error_lines(err: str) -> list[str]:
    """The lines from 'bnstat: error:' on (a message is one or two lines, SPEC 4)."""
    lines = err.splitlines()
    starts = [i for i, ln in enumerate(lines) if ln.startswith("bnstat: error:")]
    assert starts, err
    return lines[starts[0]:]


@pytest.fixture
def good(tmp_path):
    a = np.random.default_rng(0).random((8, 3, 4)).astype(np.float32)
    path = tmp_path / "good.npy"
    np.save(path, a)
    return path


# ---- files that cannot be read ------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nosuch.npy"
    err = run_and_check(tmp_path, ["moments", path, "-o", tmp_path / "out.json"], 1,
                        r"nosuch\.npy: no such file")
    assert len(error_lines(err)) <= 2


def test_missing_file_real_process(tmp_path):
    """The console entry itself (not only cli.main) maps the error to exit 1."""
    run_and_check(tmp_path, ["moments", tmp_path / "nosuch.npy"], 1, r"nosuch\.npy: no such file",
                  runner=run_cli)


def test_directory(tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    run_and_check(tmp_path, ["moments", d, "-o", tmp_path / "out.json"], 1, r"adir: is a directory")


def _can_drop_dac() -> bool:
    if shutil.which("setpriv") is None:
        return False
    proc = subprocess.run(["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                           "--bounding-set=-dac_override,-dac_read_search", "true"],
                          capture_output=True)
    return proc.returncode == 0


def _runner_without_read_override():
    """A runner whose process cannot read a mode-000 file, even as root."""
    if os.geteuid() != 0:
        return run_cli
    import sys

    from conftest import _env

    def run(*args):
        proc = subprocess.run(["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                               "--bounding-set=-dac_override,-dac_read_search",
                               sys.executable, "-m", "bnstat", *map(str, args)],
                              capture_output=True, env=_env(), timeout=120)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()

    return run


@pytest.mark.skipif(os.geteuid() == 0 and not _can_drop_dac(),
                    reason="running as root, which reads mode-000 files, and setpriv cannot drop "
                    "CAP_DAC_OVERRIDE here")
def test_unreadable_file(tmp_path, good):
    locked = tmp_path / "locked.npy"
    shutil.copy(good, locked)
    os.chmod(locked, 0)
    try:
        run_and_check(tmp_path, ["moments", locked], 1, r"locked\.npy: permission denied",
                      runner=_runner_without_read_override())
    finally:
        os.chmod(locked, 0o644)


def test_empty_file(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    run_and_check(tmp_path, ["moments", tmp_path / "empty.npy", "-o", tmp_path / "out.json"], 1,
                  r"empty\.npy: empty file")


def test_empty_file_unknown_extension(tmp_path):
    (tmp_path / "empty.dat").write_bytes(b"")
    run_and_check(tmp_path, ["info", tmp_path / "empty.dat"], 1, r"empty\.dat: empty file")


def test_unknown_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    run_and_check(tmp_path, ["moments", tmp_path / "notes.txt"], 1,
                  r"notes\.txt: unknown file format")


# ---- broken .npy ------------------------------------------------------------------------


def test_truncated_npy(tmp_path, good):
    data = good.read_bytes()
    (tmp_path / "trunc.npy").write_bytes(data[:-50])
    run_and_check(tmp_path, ["moments", tmp_path / "trunc.npy", "-o", tmp_path / "out.json"], 1,
                  r"trunc\.npy: truncated")


def test_truncated_npy_normalize(tmp_path, good):
    data = good.read_bytes()
    (tmp_path / "trunc.npy").write_bytes(data[:-50])
    run_and_check(tmp_path, ["normalize", tmp_path / "trunc.npy", "-o", tmp_path / "out.npy",
                             "--layout", "NCL"], 1, r"trunc\.npy: truncated")


def test_truncated_inside_header(tmp_path, good):
    (tmp_path / "head.npy").write_bytes(good.read_bytes()[:40])
    run_and_check(tmp_path, ["moments", tmp_path / "head.npy"], 1,
                  r"head\.npy: (corrupt \.npy header|truncated)")


def test_corrupt_npy_header(tmp_path, good):
    data = bytearray(good.read_bytes())
    data[20:30] = b"@" * 10  # inside the header's dict literal
    (tmp_path / "hdr.npy").write_bytes(bytes(data))
    err = run_and_check(tmp_path, ["moments", tmp_path / "hdr.npy", "-o", tmp_path / "out.json"],
                        1, r"hdr\.npy: corrupt \.npy header")
    assert len(error_lines(err)) <= 2


def test_bad_magic_npy(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"definitely not numpy" * 10)
    run_and_check(tmp_path, ["moments", tmp_path / "junk.npy"], 1, r"junk\.npy: not a \.npy array")


# ---- dtypes and shapes ------------------------------------------------------------------

DTYPE_CASES = {
    "object": (lambda: np.array([[1, None], [2.0, "x"]], dtype=object), r"object"),
    "complex": (lambda: np.ones((4, 3), np.complex128), r"complex128 \(complex\) is not supported"),
    "structured": (lambda: np.zeros((4, 3), dtype=[("a", "f4"), ("b", "i4")]),
                   r"structured/void\) is not supported"),
    "bool": (lambda: np.ones((4, 3), bool), r"bool \(bool\) is not supported"),
    "string": (lambda: np.array([["a", "b"], ["c", "d"]]), r"\(string\) is not supported"),
    "bytes": (lambda: np.array([[b"a", b"b"], [b"c", b"d"]]), r"\(bytes\) is not supported"),
    "datetime": (lambda: np.zeros((4, 3), "datetime64[s]"), r"datetime\) is not supported"),
}


@pytest.mark.parametrize("kind", list(DTYPE_CASES))
def test_unsupported_dtype_npy(tmp_path, kind):
    make, pattern = DTYPE_CASES[kind]
    np.save(tmp_path / "x.npy", make(), allow_pickle=True)
    run_and_check(tmp_path, ["moments", tmp_path / "x.npy", "-o", tmp_path / "out.json"], 1,
                  r"x\.npy: dtype .*" + pattern)


def test_object_npy_is_never_unpickled(tmp_path):
    """A pickle that would write a file when loaded: bnstat refuses it unread."""
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    np.save(tmp_path / "evil.npy", np.array([[Boom(), 1]], dtype=object), allow_pickle=True)
    run_and_check(tmp_path, ["moments", tmp_path / "evil.npy"], 1, r"evil\.npy: dtype object")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("kind", ["complex", "bool", "structured"])
def test_unsupported_dtype_npz_member(tmp_path, kind):
    make, pattern = DTYPE_CASES[kind]
    # selected with -d it is an error; unselected, it is skipped with a warning
    # (tests/test_npz_members.py): issue 17
    np.savez(tmp_path / "x.npz", good=np.ones((4, 3), np.float32), bad=make())
    run_and_check(tmp_path, ["moments", tmp_path / "x.npz", "-d", "bad", "-o", tmp_path / "out.json"],
                  1, r"x\.npz:bad: dtype .*" + pattern)
    np.savez(tmp_path / "only.npz", bad=make())
    run_and_check(tmp_path, ["moments", tmp_path / "only.npz", "-o", tmp_path / "out.json"], 1,
                  r"only\.npz: no numeric array of 2 or more dimensions found; skipped bad \(")


@pytest.mark.parametrize("shape, what", [((0, 3), "N = 0"), ((4, 0), "C = 0"),
                                         ((2, 3, 0), "L = 0"), ((0, 3, 4, 4), "N = 0, 4-D")])
def test_zero_size(tmp_path, shape, what):
    np.save(tmp_path / "z.npy", np.zeros(shape, np.float32))
    shown = re.escape(str(shape))
    run_and_check(tmp_path, ["moments", tmp_path / "z.npy", "-o", tmp_path / "out.json"], 1,
                  rf"z\.npy: the array of shape {shown} is empty")


def test_zero_size_normalize(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((0, 3), np.float32))
    run_and_check(tmp_path, ["normalize", tmp_path / "z.npy", "-o", tmp_path / "out.npy"], 1,
                  r"z\.npy: the array of shape \(0, 3\) is empty")


@pytest.mark.parametrize("array, dims", [(np.float32(3.5), "0-D"), (np.arange(5.0), "1-D")])
def test_too_few_dimensions(tmp_path, array, dims):
    np.save(tmp_path / "low.npy", array)
    run_and_check(tmp_path, ["moments", tmp_path / "low.npy", "-o", tmp_path / "out.json"], 1,
                  rf"low\.npy: a {dims} array .*at least 2 dimensions")


# ---- broken .npz ------------------------------------------------------------------------


def test_npz_not_a_zip(tmp_path):
    (tmp_path / "notzip.npz").write_bytes(b"hello, this is not a zip file at all")
    run_and_check(tmp_path, ["moments", tmp_path / "notzip.npz", "-o", tmp_path / "out.json"], 1,
                  r"notzip\.npz: not a \.npz")


def test_npz_zip_magic_but_truncated(tmp_path):
    np.savez(tmp_path / "full.npz", a=np.ones((100, 4)))
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])  # the central directory is gone
    run_and_check(tmp_path, ["moments", tmp_path / "cut.npz"], 1, r"cut\.npz: not a valid \.npz")


def _flip_member_data(path, member: str) -> None:
    """Invert 64 bytes in the middle of a member's stored/deflated data."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    mid = start + info.compress_size // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


def test_npz_corrupt_deflated_member(tmp_path):
    rng = np.random.default_rng(1)
    np.savez_compressed(tmp_path / "c.npz", a=rng.random((2000, 8)))
    _flip_member_data(tmp_path / "c.npz", "a.npy")
    run_and_check(tmp_path, ["moments", tmp_path / "c.npz", "--layout", "NC",
                             "-o", tmp_path / "out.json"], 1, r"c\.npz:a: corrupt")


def test_npz_corrupt_deflated_member_normalize(tmp_path):
    rng = np.random.default_rng(1)
    np.savez_compressed(tmp_path / "c.npz", a=rng.random((2000, 8)))
    _flip_member_data(tmp_path / "c.npz", "a.npy")
    run_and_check(tmp_path, ["normalize", tmp_path / "c.npz", "--layout", "NC",
                             "-o", tmp_path / "out.npz"], 1, r"c\.npz:a: corrupt")


def test_npz_corrupt_stored_member(tmp_path):
    """A stored (uncompressed) member whose bytes were damaged: the zip's CRC-32 says so.

    numpy's own np.load refuses this file ("Bad CRC-32"); silently reporting
    statistics of damaged data would be worse than an error.
    """
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "s.npz", a=rng.random((2000, 8)))
    _flip_member_data(tmp_path / "s.npz", "a.npy")
    run_and_check(tmp_path, ["moments", tmp_path / "s.npz", "--layout", "NC",
                             "-o", tmp_path / "out.json"], 1, r"s\.npz:a: .*(corrupt|CRC)")


# ---- broken HDF5 ------------------------------------------------------------------------


def test_not_hdf5(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"junk" * 100)
    run_and_check(tmp_path, ["moments", tmp_path / "junk.h5", "-o", tmp_path / "out.json"], 1,
                  r"junk\.h5: not an HDF5 file")


def test_truncated_hdf5(tmp_path):
    with h5py.File(tmp_path / "full.h5", "w") as f:
        f["x"] = np.ones((200, 8), np.float32)
    data = (tmp_path / "full.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[:1200])
    run_and_check(tmp_path, ["moments", tmp_path / "cut.h5"], 1, r"cut\.h5: ")


@pytest.fixture
def odd_h5(tmp_path):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f["bytes"] = np.array([[b"a", b"b"], [b"c", b"d"]])
        f.create_dataset("text", data=[["x", "yy"], ["z", "w"]], dtype=h5py.string_dtype())
        f["scalar"] = 3.0
        f["vector"] = np.arange(5.0)
    return path


def test_hdf5_nothing_numeric(tmp_path, odd_h5):
    run_and_check(tmp_path, ["moments", odd_h5, "-o", tmp_path / "out.json"], 1,
                  r"odd\.h5: no numeric array of 2 or more dimensions")


@pytest.mark.parametrize("name, pattern", [
    ("bytes", r"odd\.h5:bytes: dtype \|S1 \(bytes\) is not supported"),
    ("text", r"odd\.h5:text: dtype object"),
    ("scalar", r"odd\.h5:scalar: a 0-D array"),
    ("vector", r"odd\.h5:vector: a 1-D array"),
])
def test_hdf5_selected_non_numeric(tmp_path, odd_h5, name, pattern):
    run_and_check(tmp_path, ["moments", odd_h5, "-d", name, "-o", tmp_path / "out.json"], 1,
                  pattern)


def test_hdf5_broken_external_link(tmp_path):
    path = tmp_path / "ext.h5"
    with h5py.File(path, "w") as f:
        f["ok"] = np.ones((4, 3), np.float32)
        f["acts"] = h5py.ExternalLink("missing.h5", "/data")
    run_and_check(tmp_path, ["moments", path, "-o", tmp_path / "out.json"], 1,
                  r"ext\.h5:acts: broken external link to missing\.h5:/data")


def test_hdf5_broken_soft_link(tmp_path):
    path = tmp_path / "soft.h5"
    with h5py.File(path, "w") as f:
        f["ok"] = np.ones((4, 3), np.float32)
        f["gone"] = h5py.SoftLink("/nowhere")
    run_and_check(tmp_path, ["moments", path, "-o", tmp_path / "out.json"], 1,
                  r"soft\.h5:gone: broken soft link to /nowhere")


def test_hdf5_broken_link_left_out_with_d(tmp_path):
    path = tmp_path / "ext.h5"
    with h5py.File(path, "w") as f:
        f["ok"] = np.ones((4, 3), np.float32)
        f["acts"] = h5py.ExternalLink("missing.h5", "/data")
    rc, out, err = run_inproc("moments", path, "-d", "ok", "--layout", "NC", "--format", "json")
    assert rc == 0, err
    assert json.loads(out)["arrays"][0]["name"] == "ok"
    assert "Traceback" not in err


# ---- usage errors found in the data (exit 2) ------------------------------------------


def test_layout_does_not_fit(tmp_path, good):
    err = run_and_check(tmp_path, ["moments", good, "--layout", "NCHW", "-o", tmp_path / "o.json"],
                        2, r"good\.npy: --layout NCHW has 4 letters but the array has 3 dimensions")
    assert "(8, 3, 4)" in err


def test_layout_does_not_fit_normalize(tmp_path, good):
    run_and_check(tmp_path, ["normalize", good, "--layout", "NC", "-o", tmp_path / "o.npy"], 2,
                  r"--layout NC has 2 letters but the array has 3 dimensions")


def test_bad_layout_letters(tmp_path, good):
    run_and_check(tmp_path, ["moments", good, "--layout", "NHW"], 2, r"exactly one C")


def test_unknown_norm(tmp_path, good):
    run_and_check(tmp_path, ["moments", good, "--norm", "bogus", "-o", tmp_path / "o.json"], 2,
                  r"--norm.*'bogus' is not one of")


def test_groups_do_not_divide_channels(tmp_path, good):
    run_and_check(tmp_path, ["moments", good, "--layout", "NCL", "--norm", "group", "--groups", "2",
                             "-o", tmp_path / "o.json"], 2, r"--groups 2 does not divide the 3 channels")


def test_groups_do_not_divide_channels_normalize(tmp_path, good):
    run_and_check(tmp_path, ["normalize", good, "--layout", "NCL", "--norm", "group", "--groups",
                             "2", "-o", tmp_path / "o.npy"], 2, r"--groups 2 does not divide")


def test_bad_chunk_size(tmp_path, good):
    run_and_check(tmp_path, ["moments", good, "--chunk-size", "12 parsecs"], 2,
                  r"--chunk-size.*is not a size")


# ---- odd data that works ------------------------------------------------------------------


def test_nan_omitted(tmp_path):
    a = np.arange(6 * 4 * 5, dtype=np.float32).reshape(6, 4, 5)
    a[0, 1, 2] = np.nan
    a[3, 1, 0] = np.nan
    np.save(tmp_path / "n.npy", a)
    before = snapshot(tmp_path)
    rc, out, err = run_inproc("moments", tmp_path / "n.npy", "--layout", "NCL", "--format", "json")
    assert rc == 0, err
    assert "Traceback" not in err
    assert re.search(r"warning: n: 2 NaN value\(s\) in 1 unit\(s\) counted and left out", err), err
    rec = json.loads(out)["arrays"][0]
    assert rec["nan_count"] == [0, 2, 0, 0]
    assert rec["count"] == [30, 28, 30, 30]
    ref = a.astype(np.float64)
    assert rec["mean"][1] == pytest.approx(np.nanmean(ref[:, 1, :]), rel=1e-12)
    assert rec["var"][1] == pytest.approx(np.nanvar(ref[:, 1, :]), rel=1e-12)
    assert rec["mean"][0] == pytest.approx(ref[:, 0, :].mean(), rel=1e-12)
    assert snapshot(tmp_path) == before


def test_inf_data(tmp_path):
    """+inf / -inf values: as numpy, the mean is +inf / -inf, the variance NaN."""
    a = np.arange(6 * 4 * 5, dtype=np.float32).reshape(6, 4, 5)
    a[1, 2, 3] = np.inf
    a[2, 3, 3] = -np.inf
    np.save(tmp_path / "i.npy", a)
    before = snapshot(tmp_path)
    rc, out, err = run_inproc("moments", tmp_path / "i.npy", "--layout", "NCL", "--format", "json")
    assert rc == 0, err
    assert "Traceback" not in err
    rec = json.loads(out)["arrays"][0]  # standard JSON: non-finite as null, inf_count says why
    assert rec["max"][2] is None and rec["min"][3] is None and rec["inf_count"] == [0, 0, 1, 1]
    assert rec["nan_count"] == [0, 0, 0, 0] and rec["count"] == [30] * 4
    assert rec["var"][2] is None and rec["var"][3] is None  # inf - inf: NaN, as numpy
    assert rec["mean"][:2] == pytest.approx(a.astype(np.float64).mean(axis=(0, 2))[:2], rel=1e-12)
    assert rec["mean"][2] is None and rec["mean"][3] is None
    rc, out, err = run_inproc("moments", tmp_path / "i.npy", "--layout", "NCL", "--format", "csv", "-q")
    rows = [r.split(",") for r in out.splitlines()[1:]]
    # the CSV keeps the signs, as numpy: the mean of a unit holding +inf is inf, -inf: -inf
    assert [r[3] for r in rows[2:]] == ["inf", "-inf"] and [r[4] for r in rows[2:]] == ["nan", "nan"]
    assert rows[2][7] == "inf" and rows[3][6] == "-inf"
    assert snapshot(tmp_path) == before


def test_nan_raise_names_array_and_unit(tmp_path):
    a = np.ones((6, 4, 5), np.float32)
    a[3, 2, 1] = np.nan
    np.save(tmp_path / "n.npy", a)
    run_and_check(tmp_path, ["moments", tmp_path / "n.npy", "--layout", "NCL", "--nan", "raise",
                             "-o", tmp_path / "o.json"], 1, r"n: 1 NaN value\(s\), the first in unit \(C=2\)")


def test_nan_propagate(tmp_path):
    a = np.ones((6, 4, 5), np.float32)
    a[3, 2, 1] = np.nan
    np.save(tmp_path / "n.npy", a)
    rc, out, err = run_inproc("moments", tmp_path / "n.npy", "--layout", "NCL", "--nan",
                              "propagate", "--format", "json")
    assert rc == 0 and "Traceback" not in err
    rec = json.loads(out)["arrays"][0]
    assert rec["mean"][2] is None and rec["mean"][:2] == [1.0, 1.0]  # NaN: null
    assert "NaN" in err


def test_ddof1_single_value(tmp_path):
    np.save(tmp_path / "one.npy", np.arange(4.0).reshape(1, 4))
    rc, out, err = run_inproc("moments", tmp_path / "one.npy", "--layout", "NC", "--ddof", "1",
                              "--format", "json")
    assert rc == 0, err
    assert "Traceback" not in err
    assert re.search(r"warning: one: 4 unit\(s\) have 1 value\(s\) or fewer; their variance with "
                     r"--ddof 1 is NaN", err), err
    assert '"var": [null, null, null, null]' in out  # NaN (never inf), written null
    rec = json.loads(out)["arrays"][0]
    assert all(v is None for v in rec["var"] + rec["std"])
    assert rec["mean"] == [0.0, 1.0, 2.0, 3.0]


def test_ddof1_single_value_csv(tmp_path):
    np.save(tmp_path / "one.npy", np.arange(4.0).reshape(1, 4))
    rc, out, err = run_inproc("moments", tmp_path / "one.npy", "--layout", "NC", "--ddof", "1",
                              "--format", "csv")
    assert rc == 0 and "Traceback" not in err and "--ddof 1 is NaN" in err
    rows = out.splitlines()
    assert rows[1] == "one,0,1,0.0,nan,nan,0.0,0.0,0,0,0"  # ..., nan_count, inf_count, c
    assert "inf" not in "\n".join(rows[1:])


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    a = np.random.default_rng(2).random((3, 100_000)).astype(np.float32)
    np.save(folder / "wide.npy", a)
    return folder / "wide.npy", a


def test_100k_channels_table_is_summarised(wide):
    path, a = wide
    rc, out, err = run_inproc("moments", path, "--layout", "NC")
    assert rc == 0, err
    assert "Traceback" not in err and err == ""
    assert "100,000 units of 3 values" in out
    assert "99,980 more units not shown" in out
    assert len(out.splitlines()) < 60


def test_100k_channels_json_is_complete(wide, tmp_path):
    path, a = wide
    rc, out, err = run_inproc("moments", path, "--layout", "NC", "-o", tmp_path / "w.json")
    assert rc == 0, err
    assert out == "" and "Traceback" not in err
    rec = json.loads((tmp_path / "w.json").read_text())["arrays"][0]
    assert rec["unit_shape"] == [100_000]
    assert len(rec["mean"]) == len(rec["var"]) == len(rec["count"]) == 100_000
    ref = a.astype(np.float64)
    np.testing.assert_allclose(rec["mean"], ref.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(rec["var"], ref.var(axis=0), rtol=1e-9, atol=1e-15)
    assert os.listdir(tmp_path) == ["w.json"]


def test_100k_channels_csv_is_complete(wide):
    path, _ = wide
    rc, out, err = run_inproc("moments", path, "--layout", "NC", "--format", "csv")
    assert rc == 0 and "Traceback" not in err
    lines = out.splitlines()
    assert len(lines) == 100_001
    assert lines[-1].startswith("wide,99999,3,")


# ---- stats and model files that do not fit --------------------------------------------


@pytest.fixture
def acts(tmp_path):
    a = np.random.default_rng(3).random((4, 6, 3, 3)).astype(np.float32)
    np.save(tmp_path / "x4.npy", a)
    return tmp_path / "x4.npy"


def _stats(tmp_path, src, name, *args):
    rc, _, err = run_inproc("moments", src, *args, "-o", tmp_path / name)
    assert rc == 0, err
    return tmp_path / name


def test_normalize_with_stats_of_another_layout(tmp_path, acts):
    nhwc = _stats(tmp_path, acts, "nhwc.npz", "--layout", "NHWC")
    err = run_and_check(tmp_path, ["normalize", acts, "--layout", "NCHW", "--stats", nhwc,
                                   "-o", tmp_path / "out.npy"], 1,
                        r"x4\.npy: the saved statistics \(layout NHWC.*do not fit this array \(layout NCHW")
    assert len(error_lines(err)) <= 2


def test_normalize_with_stats_of_another_norm(tmp_path, acts):
    inst = _stats(tmp_path, acts, "inst.npz", "--layout", "NCHW", "--norm", "instance")
    run_and_check(tmp_path, ["normalize", acts, "--layout", "NCHW", "--norm", "batch",
                             "--stats", inst, "-o", tmp_path / "out.npy"], 1,
                  r"the saved statistics \(layout NCHW, reduce HW.*do not fit")


def test_normalize_with_stats_of_another_rank(tmp_path, acts):
    """Stats saved for a 3-D NCL array, applied to a 4-D array with no --layout.

    A data error (exit 1) about the stats file: the user gave no --layout, so
    a message blaming "--layout NCL" (and exit 2) would send them looking for
    an option they never typed.
    """
    np.save(tmp_path / "three.npy", np.ones((4, 6, 9), np.float32))
    ncl = _stats(tmp_path, tmp_path / "three.npy", "ncl.npz", "--layout", "NCL")
    run_and_check(tmp_path, ["normalize", acts, "--stats", ncl, "-o", tmp_path / "out.npy"], 1,
                  r"x4\.npy: .*(stat|saved).*NCL")


def test_normalize_with_stats_of_another_channel_count(tmp_path, acts):
    np.save(tmp_path / "c5.npy", np.ones((4, 5, 3, 3), np.float32))
    c5 = _stats(tmp_path, tmp_path / "c5.npy", "c5.npz", "--layout", "NCHW")
    run_and_check(tmp_path, ["normalize", acts, "--stats", c5, "-o", tmp_path / "out.npy"], 1,
                  r"x4\.npy: the saved statistics .*unit shape \(5,\).*unit shape \(6,\)")


def test_normalize_with_a_file_that_is_no_stats_file(tmp_path, acts):
    np.savez(tmp_path / "plain.npz", a=np.ones(3))
    run_and_check(tmp_path, ["normalize", acts, "--stats", tmp_path / "plain.npz",
                             "-o", tmp_path / "out.npy"], 1, r"plain\.npz: not a bnstat stats file")


def test_merge_incompatible_layouts(tmp_path, acts):
    a = _stats(tmp_path, acts, "batch.npz", "--layout", "NCHW")
    b = _stats(tmp_path, acts, "inst.npz", "--layout", "NCHW", "--norm", "instance")
    run_and_check(tmp_path, ["merge", a, b, "-o", tmp_path / "m.npz"], 1,
                  r"cannot merge statistics of layout NCHW reducing NHW with statistics of layout "
                  r"NCHW reducing HW")


def test_merge_incompatible_channels(tmp_path, acts):
    a = _stats(tmp_path, acts, "a.npz", "--layout", "NCHW")
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "x4.npy", np.ones((4, 5, 3, 3), np.float32))
    b = _stats(tmp_path, other / "x4.npy", "b.npz", "--layout", "NCHW")
    run_and_check(tmp_path, ["merge", a, b, "-o", tmp_path / "m.npz"], 1,
                  r"x4: cannot (merge|join) statistics of unit shape")


def test_merge_different_arrays(tmp_path, acts):
    a = _stats(tmp_path, acts, "a.npz", "--layout", "NCHW")
    np.save(tmp_path / "y.npy", np.ones((4, 6), np.float32))
    b = _stats(tmp_path, tmp_path / "y.npy", "b.npz", "--layout", "NC")
    run_and_check(tmp_path, ["merge", a, b, "-o", tmp_path / "m.npz"], 1,
                  r"x4: in some stats files but not in .*b\.npz")


def test_merge_a_file_that_is_no_stats_file(tmp_path, acts):
    a = _stats(tmp_path, acts, "a.npz", "--layout", "NCHW")
    run_and_check(tmp_path, ["merge", a, acts, "-o", tmp_path / "m.npz"], 1,
                  r"x4\.npy: not a (readable )?bnstat stats file")


def test_fold_model_without_batchnorm(tmp_path):
    """SPEC 3 (fold): a model with nothing to fold is an error naming the file (exit 1)."""
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "model.npz", **{
        "conv.weight": rng.random((4, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.random(4).astype(np.float32),
        "fc.weight": rng.random((10, 4)).astype(np.float32),
        "fc.bias": rng.random(10).astype(np.float32)})
    err = run_and_check(tmp_path, ["fold", tmp_path / "model.npz", "-o", tmp_path / "folded.npz"],
                        1, r"model\.npz: .*no BatchNorm")
    assert len(error_lines(err)) <= 2


# ---- outputs refused before any work ------------------------------------------------------


def test_existing_output_without_force(tmp_path, good):
    (tmp_path / "out.json").write_text("precious\n")
    run_and_check(tmp_path, ["moments", good, "--layout", "NCL", "-o", tmp_path / "out.json"], 1,
                  r"out\.json: the output exists; nothing was written")
    assert (tmp_path / "out.json").read_text() == "precious\n"


def test_output_folder_missing(tmp_path, good):
    run_and_check(tmp_path, ["normalize", good, "--layout", "NCL", "-o", tmp_path / "no" / "o.npy"],
                  1, r"o\.npy: the folder .* does not exist")


def test_output_is_a_directory(tmp_path, good):
    (tmp_path / "d.json").mkdir()
    run_and_check(tmp_path, ["moments", good, "--layout", "NCL", "-o", tmp_path / "d.json"], 1,
                  r"d\.json: the output is a directory")


def test_good_deflated_npz_leaves_no_file_open(tmp_path):
    """Not a bad input, but the same check: reading a compressed .npz closes what it opens."""
    rng = np.random.default_rng(5)
    np.savez_compressed(tmp_path / "ok.npz", a=rng.random((500, 8)))
    with leak_check() as leaked:
        rc, out, err = run_inproc("moments", tmp_path / "ok.npz", "--layout", "NC", "--format", "csv")
    assert rc == 0 and "Traceback" not in err, err
    assert len(out.splitlines()) == 9
    assert not leaked, f"bnstat left files open: {leaked}"
