"""The read-ahead thread of memory-mapped inputs (bnstat/io/readahead.py, issue 16).

A thread populates the map ahead of the window in use. The chunks must be the
bytes of the file, exactly, whatever the window, step and alignment; the
statistics must equal those of the reader without the thread (the consumer
populating each window itself) bit for bit, and a float64 numpy reference;
the thread must be gone when the read ends, early or on an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

import bnstat
from bnstat.io import open_path, readahead
from bnstat.io.npy import NpyStreamSource


def alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("bnstat-readahead")]


@pytest.fixture
def no_prefetch(monkeypatch):
    """The reader as it was before the thread: every window populated by the consumer."""

    class Failing(readahead.MapPrefetcher):
        def _run(self):
            with self.cond:
                self.failed = True
                self.cond.notify_all()

    monkeypatch.setattr("bnstat.io.npy.MapPrefetcher", Failing)


def chunks_of(path, rows):
    (src,) = open_path(str(path))
    return [(r0, c.copy()) for r0, c in src.iter_chunks(rows)]


# (shape, rows per chunk): row sizes that are not a page multiple, a ragged last chunk,
# one row per chunk, a file smaller than a page, chunks larger than the array
CASES = [((1000, 3, 7, 11), 37), ((97, 1025), 1), ((5, 3), 2), ((2, 2), 10), ((4096, 64), 513)]


@pytest.mark.parametrize("shape, rows", CASES)
@pytest.mark.parametrize("step", [4096, 3 * 4096, readahead.STEP])
def test_chunks_are_the_file_bytes(tmp_path, monkeypatch, shape, rows, step):
    monkeypatch.setattr(readahead, "STEP", step)
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    got = chunks_of(tmp_path / "a.npy", rows)
    assert [r0 for r0, _ in got] == list(range(0, shape[0], rows))
    assert np.array_equal(np.concatenate([c for _, c in got]), a)
    assert alive() == []


def test_stored_npz_member_at_odd_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(readahead, "STEP", 4096)
    a = np.random.default_rng(2).standard_normal((300, 1001)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=a)  # stored: the member is mapped, its data at an odd offset
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        assert zf.getinfo("x.npy").compress_type == zipfile.ZIP_STORED
    (src,) = open_path(str(tmp_path / "a.npz"))
    got = np.concatenate([c.copy() for _, c in src.iter_chunks(7)])
    assert np.array_equal(got, a)
    assert alive() == []


def moments_json(path, **kw):
    s = bnstat.moments(str(path), layout="NCHW", engine="numba", **kw)
    (stats,) = s.values() if isinstance(s, dict) else [s]
    return stats


@pytest.mark.parametrize("chunk_size", ["64KiB", 100_003, "1MiB"])
def test_moments_bit_identical_to_the_reader_without_thread(tmp_path, request, monkeypatch, chunk_size):
    a = np.random.default_rng(3).standard_normal((203, 5, 9, 13)).astype(np.float32) * 3 + 7
    np.save(tmp_path / "a.npy", a)
    monkeypatch.setattr(readahead, "STEP", 3 * 4096)
    with_thread = moments_json(tmp_path / "a.npy", chunk_size=chunk_size)
    request.getfixturevalue("no_prefetch")
    without = moments_json(tmp_path / "a.npy", chunk_size=chunk_size)
    for key in ("mean", "var", "min", "max", "count"):
        assert np.array_equal(getattr(with_thread, key), getattr(without, key)), key
    ref = a.astype(np.float64)
    np.testing.assert_allclose(with_thread.mean, ref.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(with_thread.var, ref.var(axis=(0, 2, 3)), rtol=1e-10)
    assert np.array_equal(with_thread.min, a.min(axis=(0, 2, 3)))


def test_stdin_same_as_file(tmp_path):
    """A pipe is read with readinto (no map, no thread): the same statistics as the mapped file."""
    a = np.random.default_rng(4).standard_normal((64, 3, 17)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    args = [sys.executable, "-m", "bnstat", "moments", "--layout", "NCH", "--format", "json", "-q",
            "--chunk-size", "4KiB"]
    env = dict(os.environ, BNSTAT_ENGINE="numpy")
    from_file = subprocess.run(args + [str(tmp_path / "a.npy")], capture_output=True, env=env, check=True)
    with open(tmp_path / "a.npy", "rb") as fh:
        from_pipe = subprocess.run(args + ["-"], stdin=fh, capture_output=True, env=env, check=True)
    f, p = json.loads(from_file.stdout)["arrays"][0], json.loads(from_pipe.stdout)["arrays"][0]
    for key in ("mean", "var", "min", "max", "count"):
        assert f[key] == p[key], key
    np.testing.assert_allclose(f["mean"], a.astype(np.float64).mean(axis=(0, 2)), rtol=1e-12)


def test_thread_gone_when_the_consumer_stops_early(tmp_path, monkeypatch):
    started = []

    class Recorded(readahead.MapPrefetcher):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            started.append(self.thread)

    monkeypatch.setattr("bnstat.io.npy.MapPrefetcher", Recorded)
    np.save(tmp_path / "a.npy", np.ones((500, 1024), np.float32))
    (src,) = open_path(str(tmp_path / "a.npy"))
    it = src.iter_chunks(10)
    next(it)
    assert len(started) == 1  # a thread populates ahead (it waits: 20 rows ahead at most)
    it.close()
    assert not started[0].is_alive() and alive() == []


def test_thread_gone_on_an_error_mid_read(tmp_path, monkeypatch):
    """The input changed while it was read: InputError at the next window, the thread joined."""
    from bnstat.errors import InputError
    from bnstat.io import guard

    np.save(tmp_path / "a.npy", np.ones((500, 1024), np.float32))
    (src,) = open_path(str(tmp_path / "a.npy"))
    assert isinstance(src, NpyStreamSource)
    it = src.iter_chunks(10)
    next(it)
    guard._broken[0] += 1  # what the SIGIO handler records when a writer breaks the lease
    with pytest.raises(InputError, match="the input changed while it was read"):
        next(it)
    assert alive() == []


def test_populate_failing_falls_back(tmp_path, monkeypatch):
    """An old kernel (no MADV_POPULATE_READ): the thread stops, the consumer reads on."""
    monkeypatch.setattr(readahead, "MADV_POPULATE_READ", -1)  # EINVAL
    a = np.random.default_rng(5).standard_normal((300, 777)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    got = chunks_of(tmp_path / "a.npy", 11)
    assert np.array_equal(np.concatenate([c for _, c in got]), a)
    assert alive() == []


def test_cli_truncated_input_exit_1_no_thread_no_temp(tmp_path):
    """A file shorter than its header says: exit 1, named, no output, no temporary file."""
    a = np.ones((400, 1024), np.float32)
    np.save(tmp_path / "a.npy", a)
    size = (tmp_path / "a.npy").stat().st_size
    with open(tmp_path / "a.npy", "r+b") as fh:
        fh.truncate(size - 5000)
    out = tmp_path / "s.json"
    proc = subprocess.run([sys.executable, "-m", "bnstat", "moments", str(tmp_path / "a.npy"),
                           "--layout", "NC", "-o", str(out), "-q"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert f"{tmp_path / 'a.npy'}: truncated" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
