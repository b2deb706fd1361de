"""`bnstat --help` (and every command's) imports none of numba, h5py, rich; the root help lists
every command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import _env

from bnstat.cli import COMMANDS

HEAVY = ("numba", "h5py", "rich")

PROBE = """
import json, sys
from bnstat.cli import main
sys.argv = ["bnstat", *{args!r}]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = None
sys.stderr.write("\\nPROBE " + json.dumps({{"code": code,
    "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}) + "\\n")
"""


def probe(*args):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args), heavy=HEAVY)],
                          capture_output=True, text=True, env=_env(), timeout=120)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("PROBE ")]
    assert line, proc.stderr
    return json.loads(line[-1][6:]), proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"]] + [[name, "--help"] for name in COMMANDS])
def test_help_imports_no_heavy_module(args):
    result, out = probe(*args)
    assert result["code"] == 0
    assert result["heavy"] == []
    assert out  # the help text (or version) was printed


def test_probe_can_see_heavy_modules(tmp_path):
    """The probe itself works: a command that computes does import numba."""
    import numpy as np

    np.save(tmp_path / "a.npy", np.ones((2, 3)))
    result, _ = probe("moments", str(tmp_path / "a.npy"), "--layout", "NC", "--format", "json")
    assert result["code"] == 0
    assert "numba" in result["heavy"]


def test_root_help_lists_every_command():
    result, out = probe("--help")
    for name in COMMANDS:
        assert name in out
