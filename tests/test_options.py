"""bnstat.options and the command table of bnstat.cli: every flag declared once, the compute
options only on the commands that compute, the run's state in click's ctx.obj."""

from __future__ import annotations

import importlib
import warnings

import click
import numpy as np
import pytest
from conftest import run_inproc

from bnstat import options
from bnstat.cli import COMMANDS

COMPUTE = {"--threads", "--chunk-size"}
# commands that read no data to compute on: a compute option there would be a no-op
NOT_COMPUTING = {"show", "merge", "info", "fold"}
COMPUTING = {"moments", "normalize"}


def command_of(name: str) -> click.Command:
    return importlib.import_module(COMMANDS[name].module).command


def _flags(command: click.Command) -> list[str]:
    ctx = click.Context(command, info_name=command.name)
    flags = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            flags += list(param.opts) + list(param.secondary_opts)
    return flags


@pytest.mark.parametrize("name", list(COMMANDS))
def test_no_command_declares_a_flag_twice(name):
    command = command_of(name)
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


@pytest.mark.parametrize("name", list(COMMANDS))
def test_compute_options_only_on_commands_that_compute(name):
    flags = set(_flags(command_of(name)))
    if name in NOT_COMPUTING:
        assert not COMPUTE & flags, f"bnstat {name} offers {sorted(COMPUTE & flags)}"
    elif name in COMPUTING:
        assert COMPUTE <= flags, f"bnstat {name} lacks {sorted(COMPUTE - flags)}"
    else:  # a command this test does not know yet: both compute options or neither
        assert len(COMPUTE & flags) in (0, 2), (name, sorted(COMPUTE & flags))
    if name in NOT_COMPUTING | COMPUTING:
        assert {"-o", "--force", "-q", "--debug"} <= flags, name


def test_the_known_commands_are_in_the_table():
    assert NOT_COMPUTING | COMPUTING <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(NOT_COMPUTING))
def test_non_computing_command_refuses_threads(name):
    rc, out, err = run_inproc(name, "x", "--threads", "2")
    assert rc == 2
    assert "Error: No such option '--threads'." in err and "Traceback" not in err


def test_detector_sees_a_compute_option():
    """The walk above can fail: a command declaring --threads is seen."""
    @click.command()
    @options.compute_options
    def cmd(threads, chunk_size):
        pass

    assert COMPUTE <= set(_flags(cmd))


# ---- the run's state (ctx.obj), --quiet and --debug ---------------------------------------


def test_quiet_and_debug_set_the_state_of_the_context_only():
    seen = {}

    @click.command()
    @options.common_options
    def cmd(output, force, quiet):
        seen["state"] = click.get_current_context().obj

    ctx = cmd.make_context("cmd", ["-q", "--debug"], obj=options.RunState())
    cmd.invoke(ctx)
    assert seen["state"] == options.RunState(quiet=True, debug=True)
    ctx = cmd.make_context("cmd", [], obj=options.RunState())
    cmd.invoke(ctx)
    assert seen["state"] == options.RunState()
    assert not hasattr(options, "state")  # no module-level switch left


def test_quiet_silences_warnings_of_its_run_only(tmp_path):
    x = np.ones((4, 3))
    x[0, 0] = np.nan
    np.save(tmp_path / "n.npy", x)
    rc, out, err = run_inproc("moments", tmp_path / "n.npy", "--layout", "NC", "--format", "json", "-q")
    assert rc == 0 and err == ""
    rc, out, err = run_inproc("moments", tmp_path / "n.npy", "--layout", "NC", "--format", "json")
    assert rc == 0
    assert err == "bnstat: warning: n: 1 NaN value(s) in 1 unit(s) counted and left out\n"


@pytest.mark.parametrize("where", ["root", "command"])
def test_debug_shows_the_traceback(where, tmp_path):
    missing = str(tmp_path / "missing.npy")
    args = ["--debug", "show", missing] if where == "root" else ["show", missing, "--debug"]
    rc, out, err = run_inproc(*args)
    assert rc == 1
    assert "Traceback" in err and f"bnstat: error: {missing}: no such file" in err
    rc, out, err = run_inproc("show", missing)
    assert rc == 1 and err == f"bnstat: error: {missing}: no such file\n"


def test_debug_as_an_option_value_is_not_the_flag(tmp_path):
    """`-d --debug` selects arrays named "--debug"; it does not switch tracebacks on."""
    np.save(tmp_path / "a.npy", np.ones((2, 2)))
    rc, out, err = run_inproc("info", tmp_path / "a.npy", tmp_path / "nothere.npy", "-d", "--debug")
    assert rc == 1 and "Traceback" not in err, err
