"""bnstat in shell pipelines (issue 6, SPEC 2-4, STYLE 4): '-' in and out, a
reader that stops early (`| head`), data only on stdout, warnings and progress
on stderr, no progress bar or colour unless a terminal asks for it, NO_COLOR.

The README's "Exit codes" and "Use in pipelines" examples (read from README.md)
are run here with the same command text,
through a real shell (bash) with the installed ``bnstat`` console script.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import _env, npy_bytes, run_cli
from test_faults import SLOW, big  # noqa: F401 - the 400 MB fixture, for the progress bar

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)

needs_bnstat_script = pytest.mark.skipif(
    shutil.which("bnstat", path=BIN) is None,
    reason=f"the bnstat console script is not installed beside {sys.executable}")


def sh(command: str, cwd, *, input: bytes | None = None, env_extra=None):
    """Run ``command`` in bash in ``cwd``, with this interpreter's bin folder first on PATH."""
    env = _env()
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.pop("NO_COLOR", None)
    env.update(env_extra or {})
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, input=input, capture_output=True,
                          env=env, timeout=120)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SGR = re.compile(rb"\x1b\[([0-9;]*)m")


def colour_codes(data: bytes) -> set[bytes]:
    """SGR sequences that set a colour (30-37, 38;..., 40-47, 48;..., 90-97, 100-107)."""
    found = set()
    for m in SGR.finditer(data):
        params = [int(p) for p in m.group(1).split(b";") if p]
        if any(30 <= p <= 49 or 90 <= p <= 107 for p in params):
            found.add(m.group(0))
    return found


@pytest.fixture
def acts(tmp_path):
    a = np.random.default_rng(10).random((16, 8, 4, 4)).astype(np.float32)
    np.save(tmp_path / "acts.npy", a)
    for i, part in enumerate((a[:6], a[6:]), 1):  # two shards of it, one array name
        (tmp_path / f"shard{i}").mkdir()
        np.save(tmp_path / f"shard{i}" / "acts.npy", part)
    return a


# ---- the README examples ------------------------------------------------------------------

# (command exactly as in README.md's "Use in pipelines", check(rc, stdout, stderr, folder, acts))
def _csv_head(rc, out, err, d, a):
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "name,unit,count,mean,var,std,min,max,nan_count,inf_count,c"
    assert len(lines) == 3 and lines[1].startswith("acts,0,256,")
    assert err == ""


def _json_file(rc, out, err, d, a):
    assert rc == 0 and out == "" and err == "", err
    rec = json.loads((d / "stats.json").read_text())["arrays"][0]
    np.testing.assert_allclose(rec["mean"], a.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)


def _json_python(rc, out, err, d, a):
    assert rc == 0, err
    assert float(out) == pytest.approx(float(a[:, 0].astype(np.float64).mean()), rel=1e-12)


def _stdin_csv(rc, out, err, d, a):
    assert rc == 0, err
    assert out.splitlines()[1:] == [f"stdin,{c},8,1.0,0.0,0.0,1.0,1.0,0,0,{c}" for c in range(3)]


def _normalize_stdout(rc, out, err, d, a):
    assert rc == 0, err
    assert out.strip() == "(16, 8, 4, 4) float32"


def _stats_then_normalize(rc, out, err, d, a):
    assert rc == 0 and out == "", err
    y = np.load(d / "normed.npy")
    assert y.shape == a.shape and y.dtype == a.dtype
    np.testing.assert_allclose(y.astype(np.float64).mean(axis=(0, 2, 3)), 0, atol=1e-5)


def _chain(rc, out, err, d, a):
    assert rc == 0, err
    assert out.strip() == "(5, 4)"


def _top_channel(rc, out, err, d, a):
    assert rc == 0, err
    means = a.astype(np.float64).mean(axis=(0, 2, 3))
    assert out.startswith(f"acts,{int(np.argmax(means))},")


def _exit_2(rc, out, err, d, a):
    assert rc == 0  # echo's status
    assert out.strip() == "exit status 2"
    assert "--layout NC has 2 letters but the array has 4 dimensions" in err
    assert "Traceback" not in err


def _exit_1(rc, out, err, d, a):
    assert rc == 0
    assert out == "" and "bnstat: error: missing.npy: no such file" in err
    assert err.rstrip().endswith("no statistics, skipping")


def _merge(rc, out, err, d, a):
    assert rc == 0 and err == "", err
    row = out.splitlines()[1].split(",")
    assert row[:3] == ["acts", "0", "256"]  # the shards' counts, once each
    assert float(row[3]) == pytest.approx(a[:, 0].astype(np.float64).mean(), rel=1e-12)


EXAMPLES = [
    ("bnstat moments acts.npy --layout NCHW --format csv | head -n 3", _csv_head),
    ("bnstat moments acts.npy --layout NCHW --format json > stats.json", _json_file),
    ("bnstat moments acts.npy --layout NCHW --format json | python -c 'import json, sys; "
     "print(json.load(sys.stdin)[\"arrays\"][0][\"mean\"][0])'", _json_python),
    ("python -c 'import numpy as np, sys; np.save(sys.stdout.buffer, np.ones((8, 3), np.float32))' "
     "| bnstat moments - --layout NC --format csv", _stdin_csv),
    ("bnstat normalize acts.npy --layout NCHW -o - | python -c 'import io, sys, numpy as np; "
     "a = np.load(io.BytesIO(sys.stdin.buffer.read())); print(a.shape, a.dtype)'", _normalize_stdout),
    ("bnstat moments acts.npy --layout NCHW -o stats.npz && "
     "bnstat normalize acts.npy --stats stats.npz -o - > normed.npy", _stats_then_normalize),
    ("python -c 'import numpy as np, sys; np.save(sys.stdout.buffer, np.random.rand(5, 4))' "
     "| bnstat normalize - --layout NC --norm layer -o - "
     "| python -c 'import io, sys, numpy as np; print(np.load(io.BytesIO(sys.stdin.buffer.read())).shape)'",
     _chain),
    ("bnstat moments acts.npy --layout NCHW --format csv --quiet | tail -n +2 | sort -t, -k4 -g "
     "| tail -n 1", _top_channel),
    ("bnstat moments acts.npy --layout NC; echo \"exit status $?\"", _exit_2),
    ("bnstat moments missing.npy --format json > /dev/null || echo 'no statistics, skipping' >&2",
     _exit_1),
    ("bnstat moments shard1/acts.npy --layout NCHW -o part1.npz && "
     "bnstat moments shard2/acts.npy --layout NCHW -o part2.npz && "
     "bnstat merge part1.npz part2.npz --format csv", _merge),
]


def _readme_text() -> str:
    """README.md's "Exit codes" and "Use in pipelines" sections, read from README.md itself."""
    with open(os.path.join(os.path.dirname(HERE), "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    start = text.index("\n## Exit codes\n")
    pipelines = text.index("\n## Use in pipelines\n", start)
    end = text.find("\n## ", pipelines + 1)
    return text[start:end if end >= 0 else len(text)]


def test_readme_shows_every_example():
    text = _readme_text()
    missing = [cmd for cmd, _ in EXAMPLES if cmd not in text]
    assert not missing, f"examples tested here but not in the README: {missing}"


def test_readme_exit_code_table():
    text = _readme_text()
    for code in ("0", "1", "2", "130", "141", "143"):
        assert re.search(rf"^\| *{code} *\|", text, re.M), f"exit status {code} not in the table"


@needs_bnstat_script
@pytest.mark.parametrize("command, check", EXAMPLES, ids=[f"ex{i}" for i in range(len(EXAMPLES))])
def test_readme_example(tmp_path, acts, command, check):
    rc, out, err = sh(command, tmp_path)
    assert "Traceback" not in err
    check(rc, out, err, tmp_path, acts)
    assert not list(tmp_path.glob(".*.bnstat-tmp"))


# ---- a reader that stops early --------------------------------------------------------------


@pytest.fixture(scope="module")
def long_csv(tmp_path_factory):
    """Enough units that the CSV (≈25 MB) cannot sit in a pipe's buffer."""
    d = tmp_path_factory.mktemp("longcsv")
    np.save(d / "big.npy", np.random.default_rng(11).random((2, 300_000)).astype(np.float32))
    return d


@needs_bnstat_script
def test_head_ends_quietly(long_csv):
    """The issue's command verbatim: only the layout warning on stderr, no error."""
    rc, out, err = sh("bnstat moments big.npy --format csv | head -n 2", long_csv)
    assert rc == 0
    assert out.splitlines()[0].startswith("name,unit,count,mean")
    assert len(out.splitlines()) == 2
    assert "Traceback" not in err and "error" not in err.lower() and "Broken pipe" not in err
    assert all(line.startswith("bnstat: warning: no --layout/layout= given") for line in err.splitlines())


@needs_bnstat_script
@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "PYTHONUNBUFFERED"])
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_head_exit_status(long_csv, fmt, unbuffered):
    """bnstat itself ends with 141 (as if killed by SIGPIPE) and prints nothing on stderr,
    also under PYTHONUNBUFFERED=1, where stdout's raw writes may be short."""
    rc, out, err = sh(f"bnstat moments big.npy --layout NC --format {fmt} | head -c 100 "
                      "> /dev/null; echo ${PIPESTATUS[0]}", long_csv,
                      env_extra={"PYTHONUNBUFFERED": unbuffered})
    assert out.strip() == "141", err
    assert err == ""


@needs_bnstat_script
def test_head_exit_status_of_a_table(tmp_path):
    """The rich table too: rich's own writes would exit 1 on a broken pipe."""
    np.save(tmp_path / "wide.npy", np.random.default_rng(5).random((16, 4096)).astype(np.float32))
    rc, out, err = sh("bnstat moments wide.npy --layout NC --all | head -n 3 > /dev/null; "
                      "echo ${PIPESTATUS[0]}", tmp_path)
    assert out.strip() == "141", err
    assert err == ""


@needs_bnstat_script
def test_normalize_to_a_closed_pipe(long_csv):
    rc, out, err = sh("bnstat normalize big.npy --layout NC -o - | head -c 10 > /dev/null; "
                      "echo ${PIPESTATUS[0]}", long_csv)
    assert out.strip() == "141", err
    assert err == ""
    assert sorted(os.listdir(long_csv)) == ["big.npy"]


# ---- '-' in and out -----------------------------------------------------------------------------


def test_stdin_moments_match_numpy():
    a = np.random.default_rng(12).random((20, 5, 6)).astype(np.float32)
    rc, out, err = run_cli("moments", "-", "--layout", "NCL", "--format", "json", input=npy_bytes(a))
    assert rc == 0 and err == "", err
    rec = json.loads(out)["arrays"][0]
    assert rec["name"] == "stdin" and rec["shape"] == [20, 5, 6]
    ref = a.astype(np.float64)
    np.testing.assert_allclose(rec["mean"], ref.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(rec["var"], ref.var(axis=(0, 2)), rtol=1e-9)


def test_stdin_to_stdout_normalize():
    a = np.random.default_rng(13).random((6, 4, 5)).astype(np.float64)
    rc, out, err = run_cli("normalize", "-", "--layout", "NCL", "--norm", "instance", "-o", "-",
                           input=npy_bytes(a), binary=True)
    assert rc == 0 and err == "", err
    y = np.load(io.BytesIO(out))
    assert y.shape == a.shape and y.dtype == a.dtype
    ref = (a - a.mean(axis=2, keepdims=True)) / np.sqrt(a.var(axis=2, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)


def test_stdin_batch_norm_needs_a_file():
    """Batch statistics of a stream need two passes: a usage error that says what to do."""
    a = np.ones((6, 4), np.float32)
    rc, out, err = run_cli("normalize", "-", "--layout", "NC", "-o", "-", input=npy_bytes(a),
                           binary=True)
    assert rc == 2, err
    assert "standard input need two passes" in err and "Traceback" not in err
    assert out == b""


@pytest.mark.parametrize("data, message", [
    (b"", r"-: standard input is empty"),
    (b"this is not numpy" * 10, r"not a \.npy array"),
    (npy_bytes(np.ones((50, 4), np.float32))[:300], r"truncated"),
])
def test_stdin_bad_stream(data, message):
    rc, out, err = run_cli("moments", "-", "--layout", "NC", input=data)
    assert rc == 1, err
    assert re.search(message, err) and "Traceback" not in err
    assert out == ""


def test_stats_file_to_stdout(tmp_path, acts):
    rc, out, err = run_cli("moments", tmp_path / "acts.npy", "--layout", "NCHW", "--format", "npz",
                           binary=True)
    assert rc == 0 and err == "", err
    with np.load(io.BytesIO(out)) as z:
        assert {"acts/mean", "acts/count", "__bnstat__"} <= set(z.files)
        np.testing.assert_allclose(z["acts/mean"], acts.astype(np.float64).mean(axis=(0, 2, 3)),
                                   rtol=1e-12)


# ---- stdout is data, stderr the rest ------------------------------------------------------------


def test_data_only_on_stdout(tmp_path):
    a = np.random.default_rng(14).random((6, 4)).astype(np.float32)
    a[2, 1] = np.nan
    np.save(tmp_path / "n.npy", a)
    rc, out, err = run_cli("moments", tmp_path / "n.npy", "--format", "json")
    assert rc == 0, err
    json.loads(out)  # all of stdout is the JSON document
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("bnstat: warning:") for line in lines), err
    assert "assuming the PyTorch layout NC" in err and "NaN value(s)" in err
    rc, out, err = run_cli("moments", tmp_path / "n.npy", "--format", "json", "--quiet")
    assert rc == 0 and err == "" and json.loads(out)


def test_normalize_stdout_is_exactly_one_npy(tmp_path):
    a = np.random.default_rng(15).random((6, 4)).astype(np.float32)
    a[1, 1] = np.nan
    np.save(tmp_path / "n.npy", a)
    rc, out, err = run_cli("normalize", tmp_path / "n.npy", "-o", "-", binary=True)
    assert rc == 0, err
    assert "bnstat: warning:" in err
    buf = io.BytesIO(out)
    y = np.load(buf)
    assert buf.tell() == len(out), "stdout holds the .npy and nothing else"
    assert y.shape == a.shape and y.dtype == a.dtype


@pytest.mark.slow
def test_no_progress_bar_or_ansi_when_stderr_is_a_pipe(big, tmp_path):  # noqa: F811
    rc, out, err = run_cli("moments", big, *SLOW, "-o", tmp_path / "s.json")
    assert rc == 0, err
    assert err == ""  # nothing at all: no bar, no escape sequence
    assert out == ""


def test_no_colour_when_stdout_is_a_pipe(tmp_path, acts):
    rc, out, err = run_cli("moments", tmp_path / "acts.npy", "--layout", "NCHW")
    assert rc == 0, err
    assert "acts" in out and "count" in out
    assert not ANSI.search(out) and not ANSI.search(err)


# ---- under a terminal ---------------------------------------------------------------------------


def run_on_pty(args, *, pty_for: str, env_extra=None, cwd=None, stdin=subprocess.DEVNULL):
    """Run bnstat with stdout or stderr on a pseudo-terminal; (rc, terminal bytes, other stream)."""
    master, slave = pty.openpty()
    env = _env()
    env.pop("NO_COLOR", None)
    env.update({"TERM": "xterm-256color", "COLUMNS": "120"})
    env.update(env_extra or {})
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    streams[pty_for] = slave
    proc = subprocess.Popen([sys.executable, "-m", "bnstat", *map(str, args)], cwd=cwd, env=env,
                            stdin=stdin, **streams)
    os.close(slave)
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, err = proc.communicate(timeout=120)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, b"".join(chunks), err if pty_for == "stdout" else out


def slow_pipe(path, seconds: float):
    """The read end of a pipe fed with ``path`` over about ``seconds`` (a slow producer)."""
    read_end, write_end = os.pipe()
    data = path.read_bytes()
    piece = 1 << 22
    pause = seconds / max(1, len(data) // piece)

    def feed():
        with os.fdopen(write_end, "wb") as pipe:
            for start in range(0, len(data), piece):
                pipe.write(data[start:start + piece])
                time.sleep(pause)

    threading.Thread(target=feed, daemon=True).start()
    return read_end


@pytest.mark.slow
@pytest.mark.parametrize("no_color", [False, True], ids=["colour", "NO_COLOR"])
def test_progress_bar_on_a_terminal(big, tmp_path, no_color):  # noqa: F811
    # The bar appears after half a second; the kernels read 400 MB faster than that, so the
    # data comes from a producer that takes 1.5 s, as a pipe from a model would.
    env = {"NO_COLOR": "1"} if no_color else {}
    source = slow_pipe(big, 1.5)
    try:
        rc, term, out = run_on_pty(["moments", "-", "--name", "big", *SLOW, "-o", tmp_path / "s.json"],
                                   pty_for="stderr", env_extra=env, stdin=source)
    finally:
        os.close(source)
    assert rc == 0, term.decode(errors="replace")
    assert out == b""
    assert b"moments" in term, term[:500]
    assert "━".encode() in term, "the bar itself"
    assert re.search(rb"\d+(\.\d+)?/\d+(\.\d+)? [kMG]B", term), "bytes done / total"
    assert b"Traceback" not in term
    if no_color:
        assert colour_codes(term) == set(), colour_codes(term)
    assert json.loads((tmp_path / "s.json").read_text())["arrays"][0]["shape"] == list(big_shape())


def big_shape():
    from test_faults import BIG_SHAPE

    return BIG_SHAPE


@pytest.mark.parametrize("no_color", [False, True], ids=["colour", "NO_COLOR"])
def test_table_colour_and_no_color(tmp_path, acts, no_color):
    env = {"NO_COLOR": "1"} if no_color else {}
    rc, term, err = run_on_pty(["moments", tmp_path / "acts.npy", "--layout", "NCHW"],
                               pty_for="stdout", env_extra=env)
    assert rc == 0, err
    assert b"count" in term and b"acts" in term
    if no_color:
        assert colour_codes(term) == set()
    else:
        assert colour_codes(term), "a table on a terminal is coloured (else NO_COLOR proves nothing)"
