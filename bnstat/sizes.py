"""Byte sizes as people write them: ``65536``, ``512KiB``, ``64MiB``, ``1GB``.

Shared by the command line (``--chunk-size``) and the Python API
(``chunk_size=``); nothing here imports click.
"""

from __future__ import annotations

import re

from bnstat.errors import UsageProblem

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3,
    "t": 1024**4, "tib": 1024**4,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
}


def parse_size(text: str) -> int:
    """``'64MiB'`` -> 67108864. KiB/MiB/GiB (and K/M/G) are powers of 1024,
    KB/MB/GB powers of 1000. Raises ValueError."""
    match = _SIZE_RE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 65536, 512KiB, 64MiB, 1GiB, 100MB)")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 1:
        raise ValueError(f"{text!r} is smaller than one byte")
    if not value < MAX_SIZE:  # 200 digits (or inf): no machine has that much memory
        raise ValueError(f"{text!r} is larger than any memory (at most 1 PiB)")
    return int(value)


MAX_SIZE = float(1 << 50)


def size_bytes(value, default: int, name: str = "--chunk-size/chunk_size=") -> int:
    """``value`` (None, a positive int, or a size string) in bytes; None is ``default``.

    Raises UsageProblem naming the option and parameter ``name``."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise UsageProblem(f"{name} {value!r}: not a size (examples: 65536, 512KiB, 64MiB, 1GB)")
    if isinstance(value, int):
        if value < 1:
            raise UsageProblem(f"{name} {value}: must be at least one byte")
        return value
    try:
        return parse_size(value)
    except ValueError as exc:
        raise UsageProblem(f"{name} {exc}") from None
