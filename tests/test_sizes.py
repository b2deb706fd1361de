"""bnstat.sizes: the byte sizes of --chunk-size and chunk_size=."""

from __future__ import annotations

import pytest

from bnstat.errors import UsageProblem
from bnstat.sizes import parse_size, size_bytes


@pytest.mark.parametrize(("text", "n"), [
    ("65536", 65536), ("512KiB", 512 * 1024), ("512k", 512 * 1024), ("64MiB", 64 * 1024**2),
    ("64 M", 64 * 1024**2), ("1GiB", 1024**3), ("1GB", 10**9), ("100MB", 10**8), ("2kb", 2000),
    ("1.5KiB", 1536), ("1TiB", 1024**4), ("7b", 7), (" 3 ", 3),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize(("text", "message"), [
    ("lots", "is not a size"), ("12 parsecs", "is not a size"), ("-5", "is not a size"),
    ("", "is not a size"), ("0", "smaller than one byte"), ("0.5", "smaller than one byte"),
])
def test_parse_size_refusals(text, message):
    with pytest.raises(ValueError, match=message):
        parse_size(text)


def test_size_bytes_takes_none_ints_and_strings():
    assert size_bytes(None, 123) == 123
    assert size_bytes(4096, 1) == 4096
    assert size_bytes("4KiB", 1) == 4096
    with pytest.raises(UsageProblem, match=r"--chunk-size/chunk_size= 0: must be at least one byte"):
        size_bytes(0, 1)
    with pytest.raises(UsageProblem, match=r"^--chunk-size/chunk_size= 'x' is not a size"):
        size_bytes("x", 1)
    with pytest.raises(UsageProblem, match=r"--threads/threads="):
        size_bytes(True, 1, "--threads/threads=")
