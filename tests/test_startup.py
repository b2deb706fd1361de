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


UNUSED = ("h5py", "rich", "bnstat.kernels.normalize", "bnstat.kernels.hist", "bnstat.io.models",
          "bnstat.io.hdf5", "scipy.linalg", "numba.np.arraymath")


def probe_modules(args, names, **env):
    code = PROBE.format(args=list(args), heavy=names)
    environ = _env()
    environ.update(env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, timeout=300)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("PROBE ")]
    assert line, proc.stderr
    return json.loads(line[-1][6:]), proc.stdout


# numpy.ma (arrays typed without it) and, for the kernel of B > 1 (NCHW), which allocates nothing
# and reads bits with a bitcast, numba's array module and the string modules it imports
NUMBA_UNUSED = {"NCHW": ("numba.np.arrayobj", "numba.cpython.unicode", "numba.cpython.charseq",
                         "numpy.ma"), "NC": ("numpy.ma",)}


@pytest.mark.parametrize("layout", ["NCHW", "NC"])  # the two moments kernels: B > 1, B == 1
@pytest.mark.parametrize("engine", ["numba", "numpy"])
def test_moments_of_a_npy_to_a_pipe_imports_only_what_it_uses(tmp_path, engine, layout):
    """JSON to a pipe from a .npy: no h5py, no rich, no normalize/hist kernels, no model
    readers, no scipy.linalg; with the Numba engine a cached kernel loads without numba's numpy
    implementations (numba.np.arraymath), numpy.ma (and, NCHW, numba's array module)."""
    import numpy as np

    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    np.save(tmp_path / "a.npy", x if layout == "NCHW" else x.reshape(8, 12))
    args = ["moments", str(tmp_path / "a.npy"), "--layout", layout, "--format", "json", "-q"]
    probe_modules(args, UNUSED, BNSTAT_ENGINE=engine)  # fills numba's cache if it must
    result, out = probe_modules(args, UNUSED + NUMBA_UNUSED[layout] + ("numba",), BNSTAT_ENGINE=engine)
    assert result["code"] == 0
    (stats,) = json.loads(out)["arrays"]  # the statistics were printed, and are numpy's
    if layout == "NCHW":
        np.testing.assert_allclose(stats["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-12)
    else:
        np.testing.assert_allclose(stats["mean"], x.reshape(8, 12).mean(axis=0), rtol=1e-12)
    want = ["numba"] if engine == "numba" else []
    assert result["heavy"] == want


def test_moments_table_to_a_terminal_imports_rich_and_hdf5_imports_h5py(tmp_path):
    """The probe sees the modules a command does use: h5py for an HDF5 input, rich for a table."""
    import h5py
    import numpy as np

    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["x"] = np.ones((2, 3), np.float32)
    result, _ = probe_modules(["moments", str(tmp_path / "a.h5"), "--layout", "NC"],
                              ("h5py", "rich"), BNSTAT_ENGINE="numpy")
    assert result["code"] == 0 and result["heavy"] == ["h5py", "rich"]


STATE = """
import gc, json, sys
from numba.core import entrypoints
sys.stderr.write("\\nSTATE " + json.dumps({"gc": gc.isenabled(), "frozen": gc.get_freeze_count(),
    "extensions_scanned": entrypoints._already_initialized}) + "\\n")
"""


def state_after(code):
    proc = subprocess.run([sys.executable, "-c", code + STATE], capture_output=True, text=True,
                          env=_env(), timeout=300)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("STATE ")]
    assert line, proc.stderr
    return json.loads(line[-1][6:])


def test_cli_ready_pauses_the_collector_and_skips_the_extension_scan_api_keeps_both():
    """The command line (setup(cli=True)): numba imported with the collector paused, its
    objects frozen, the collector on again after; numba's extension scan marked done. A library
    user's process: collector untouched, numba scans its extensions at the first kernel call."""
    call = ("import numpy as np\nfrom bnstat.kernels import moments as k\n"
            "x = np.ones((1, 3, 2, 1)); z = [np.zeros((1, 1, 2), t) for t in "
            "('i8', 'f8', 'f8', 'f8', 'f8', 'i8')]\n"
            "k.moments4(x, 1, 1, *z); assert z[1].tolist() == [[[1.0, 1.0]]]\n")
    cli = state_after("from bnstat.kernels import _jit; _jit.setup(cli=True); _jit.ready()\n" + call)
    assert cli["gc"] is True and cli["frozen"] > 10_000
    api = state_after("from bnstat.kernels import _jit; _jit.ready()\n" + call)
    assert api["gc"] is True and api["frozen"] == 0
    assert api["extensions_scanned"] is True  # by numba, at the first call
    # before any kernel runs: the command line has the scan marked done, a library user not
    assert state_after("from bnstat.kernels import _jit; _jit.setup(cli=True); _jit.ready()\n")[
        "extensions_scanned"] is True
    assert state_after("from bnstat.kernels import _jit; _jit.ready()\n")[
        "extensions_scanned"] is False
