"""bnstat.io.zlibx: CRC-32 (combined from pieces, libdeflate or zlib) and zlib
inflation, against Python's zlib module; the deflated .npz member stream."""

from __future__ import annotations

import zipfile
import zlib

import numpy as np
import pytest

from bnstat.io import npy, zlibx


@pytest.mark.parametrize("len1, len2", [(0, 0), (0, 5), (5, 0), (1, 1), (3, 1000), (4096, 7),
                                        (1 << 20, 12345)])
def test_crc32_combine_equals_crc_of_concatenation(len1, len2):
    rng = np.random.default_rng(len1 * 7 + len2)
    a = rng.integers(0, 256, len1, dtype=np.uint8).tobytes()
    b = rng.integers(0, 256, len2, dtype=np.uint8).tobytes()
    assert zlibx.crc32_combine(zlib.crc32(a), zlib.crc32(b), len2) == zlib.crc32(a + b)


@pytest.mark.parametrize("n", [0, 1, 1000, zlibx.PARALLEL_CRC_BYTES * 2 + 3,
                               zlibx.PARALLEL_CRC_BYTES * 5 + 11])
@pytest.mark.parametrize("start", [0, 0xDEADBEEF])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_crc32_matches_zlib(zlib_backend, monkeypatch, n, start, workers):
    monkeypatch.setattr(zlibx, "threads", workers)
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert zlibx.crc32(data, start) == zlib.crc32(data.tobytes(), start)
    # a strided-free view of a float array, as the readers pass them
    f = data[: n - n % 4].view(np.float32)
    assert zlibx.crc32(f, start) == zlib.crc32(f.tobytes(), start)


@pytest.mark.parametrize("level", [1, 6, 9])
def test_inflate_into(zlib_backend, level):
    raw = np.random.default_rng(level).standard_normal(100_000).astype(np.float32).tobytes()
    out = np.empty(len(raw), np.uint8)
    zlibx.inflate_into(zlib.compress(raw, level), out)
    assert out.tobytes() == raw


def test_inflate_into_wrong_size_or_corrupt(zlib_backend):
    raw = bytes(range(256)) * 100
    comp = zlib.compress(raw)
    with pytest.raises((zlibx.InflateError, zlib.error)):
        zlibx.inflate_into(comp, np.empty(len(raw) + 1, np.uint8))
    bad = bytearray(comp)
    bad[len(bad) // 2: len(bad) // 2 + 8] = b"\xff" * 8
    with pytest.raises((zlibx.InflateError, zlib.error)):
        zlibx.inflate_into(bytes(bad), np.empty(len(raw), np.uint8))


def test_inflated_member_stream_reads_in_bounded_pieces(tmp_path):
    """The deflated member stream gives zipfile's bytes, at most OUT bytes per readinto."""
    a = np.random.default_rng(0).standard_normal((300, 7, 50)).astype(np.float32)
    path = tmp_path / "z.npz"
    np.savez_compressed(path, a=a)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("a.npy")
        expected = zf.read(info)
    stream = npy._Inflated(str(path), npy._stored_offset(str(path), info), info.compress_size)
    with stream:
        got = bytearray()
        buf = bytearray(npy._Inflated.OUT * 3)
        while True:
            n = stream.readinto(buf)
            assert n <= npy._Inflated.OUT
            if not n:
                break
            got += buf[:n]
    assert bytes(got) == expected
    with npy._Inflated(str(path), npy._stored_offset(str(path), info), info.compress_size) as s2:
        s2.seek(1000)
        assert s2.tell() == 1000
        assert s2.read(64) == expected[1000:1064]


@pytest.mark.parametrize("saver", ["savez", "savez_compressed"])
def test_skip_crc(tmp_path, saver):
    """A member whose CRC-32 in the zip is wrong: refused by default, read with --skip-crc
    (its statistics are those of the bytes as they are) by moments and normalize."""
    from conftest import run_inproc
    from reference import ref_moments

    a = np.random.default_rng(5).standard_normal((400, 3, 7)).astype(np.float32)
    good = tmp_path / "good.npz"
    getattr(np, saver)(good, a=a)
    raw = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("a.npy")
    # the CRC-32 field of the central directory entry, which readers take the CRC from
    cd = raw.rindex(b"PK\x01\x02")  # the one member's entry
    raw[cd + 16:cd + 20] = (info.CRC ^ 1).to_bytes(4, "little")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))

    rc, out, err = run_inproc("moments", bad, "--layout", "NCL", "--format", "json")
    assert rc == 1 and "bad.npz:a: corrupt zip member (bad CRC-32" in err and "Traceback" not in err
    rc, out, err = run_inproc("moments", bad, "--layout", "NCL", "--format", "json", "--skip-crc")
    assert rc == 0, err
    import json

    got = json.loads(out)["arrays"][0]
    np.testing.assert_allclose(got["mean"], ref_moments(a, "NCL").mean.ravel(), rtol=1e-9)
    rc, out, err = run_inproc("normalize", bad, "--layout", "NCL", "-o", tmp_path / "n.npz")
    assert rc == 1 and "CRC-32" in err and not (tmp_path / "n.npz").exists()
    rc, out, err = run_inproc("normalize", bad, "--layout", "NCL", "-o", tmp_path / "n.npz",
                              "--skip-crc")
    assert rc == 0, err
    with np.load(tmp_path / "n.npz") as z:
        y = z["a"]
    x = a.astype(np.float64)
    m = x.mean(axis=(0, 2), keepdims=True)
    ref = (x - m) / np.sqrt(((x - m) ** 2).mean(axis=(0, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6)
