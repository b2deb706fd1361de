"""Acceptance 8: help imports none of numba, h5py, rich; STYLE rule 1: no command
declares a flag twice."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import click
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


@pytest.mark.parametrize("args", [["--help"], ["moments", "--help"], ["--version"], ["show", "--help"],
                                  ["merge", "--help"], ["info", "--help"]])
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


def _flags(command: click.Command) -> list[str]:
    ctx = click.Context(command, info_name=command.name)
    flags = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            flags += list(param.opts) + list(param.secondary_opts)
    return flags


@pytest.mark.parametrize("name", list(COMMANDS))
def test_no_command_declares_a_flag_twice(name):
    command = importlib.import_module(COMMANDS[name]).command
    assert isinstance(command, click.Command)
    flags = _flags(command)
    dupes = sorted({f for f in flags if flags.count(f) > 1})
    assert dupes == [], f"bnstat {name}: flags declared more than once: {dupes}"


def test_duplicate_flag_detector_detects():
    """The walk above would see a duplicate (the check can fail)."""
    @click.command()
    @click.option("-o", "--output")
    @click.option("--out", "-o", "other")
    def cmd(output, other):
        pass

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # newer click also warns about it
        flags = _flags(cmd)
    assert flags.count("-o") == 2
