"""bnstat.kernels._jit: the numba flags and the process set-up, done by explicit calls only.

Each probe runs in a fresh interpreter: numba's target and the OpenMP layer are per process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import _env

SNAPSHOT = """
import json, os, sys
env0 = dict(os.environ)
mods0 = dict(sys.modules)
{code}
env1 = dict(os.environ)
changed_env = sorted(k for k in set(env0) | set(env1) if env0.get(k) != env1.get(k))
replaced = sorted(k for k, m in mods0.items() if sys.modules.get(k) is not m)
print(json.dumps({{"env": changed_env, "replaced": replaced,
    "scipy_linalg": repr(sys.modules.get("scipy.linalg", "absent"))[:20],
    "omp": os.environ.get("OMP_WAIT_POLICY"), "numba": "numba" in sys.modules}}))
"""


def probe(code: str, **env) -> dict:
    environ = _env()
    environ.pop("OMP_WAIT_POLICY", None)
    environ.update(env)
    proc = subprocess.run([sys.executable, "-c", SNAPSHOT.format(code=code)], capture_output=True,
                          text=True, env=environ, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_importing_the_kernels_changes_no_environment_and_no_other_module():
    got = probe("import importlib, pkgutil, bnstat.kernels\n"
                "names = [m.name for m in pkgutil.iter_modules(bnstat.kernels.__path__)]\n"
                "assert {'_jit', '_keys', 'moments', 'normalize', 'numpy_engine'} <= set(names)\n"
                "for name in names:\n"
                "    importlib.import_module('bnstat.kernels.' + name)\n")
    assert got["env"] == [] and got["omp"] is None
    assert got["replaced"] == []
    assert got["scipy_linalg"] == "'absent'"  # neither imported nor blocked (None)
    assert got["numba"]  # the kernels were really compiled-or-declared: numba is imported


def test_importing_the_package_alone_imports_no_numba():
    got = probe("import bnstat.kernels")
    assert got["numba"] is False and got["env"] == []


def test_setup_sets_passive_wait_policy_and_keeps_the_users():
    assert probe("from bnstat.kernels import _jit; _jit.setup()")["omp"] == "passive"
    got = probe("from bnstat.kernels import _jit; _jit.setup(cli=True)", OMP_WAIT_POLICY="active")
    assert got["omp"] == "active" and got["env"] == []
    # setup itself imports nothing (the CLI calls it before parsing: `bnstat --help` stays fast)
    assert probe("from bnstat.kernels import _jit; _jit.setup(cli=True)")["numba"] is False


def test_cli_ready_loads_the_target_without_scipy_and_lifts_the_block():
    """After setup(cli=True) the target load sees no scipy.linalg and leaves no None entry behind;
    a later import of scipy.linalg (a user's np.dot) still works."""
    got = probe("from bnstat.kernels import _jit; _jit.setup(cli=True); _jit.ready()\n"
                "import numpy as np; from bnstat.kernels import moments as k\n"
                "x = np.ones((1, 3, 2, 1)); z = [np.zeros((1, 1, 2), t) for t in "
                "('i8', 'f8', 'f8', 'f8', 'f8', 'i8')]\n"
                "k.moments4(x, 1, 1, *z); assert z[1].tolist() == [[[1.0, 1.0]]]\n"
                "assert 'scipy.linalg' not in sys.modules\n"
                "try:\n    import scipy.linalg\nexcept ModuleNotFoundError:\n    pass\n")
    assert got["scipy_linalg"] != "None"
    assert got["replaced"] == []


def test_api_ready_does_not_block_scipy():
    """A library user's process (no setup(cli=True)): numba's BLAS probe runs as usual when
    numba loads its whole target (here for the user's own np.dot)."""
    code = ("from bnstat.kernels import _jit; _jit.ready()\n"
            "import numpy as np, numba\n"
            "assert numba.njit(lambda a: np.sum(a * a))(np.ones(3)) == 3.0\n"
            "import importlib.util\n"
            "has_scipy = importlib.util.find_spec('scipy') is not None\n"
            "assert ('scipy.linalg' in sys.modules) == has_scipy, has_scipy\n")
    got = probe(code)
    assert got["scipy_linalg"] != "None"
    assert got["omp"] == "passive"


def test_every_kernel_is_cached_and_keeps_the_nan_tests():
    from bnstat.kernels import _jit

    for flags in (_jit.JIT, _jit.SUMS_JIT, _jit.PARALLEL_JIT):
        assert flags["cache"] is True
        assert not {"nnan", "ninf", "fast"} & set(flags.get("fastmath") or ())


# ---- moved from the acceptance audit --------------------------------------------------


def test_kernels_compile_nothing_at_import_and_are_cached():
    """Nothing compiled at import, cache=True on every kernel, no fastmath flag that deletes
    the NaN tests (STYLE 8)."""
    code = (
        "import json, bnstat, sys\n"
        "heavy = [m for m in ('numba', 'h5py', 'rich', 'click') if m in sys.modules]\n"
        "import bnstat.kernels._keys, bnstat.kernels.moments, bnstat.kernels.normalize\n"
        "from numba.core.registry import CPUDispatcher\n"
        "from numba.core.caching import NullCache\n"
        "ds = {m + '.' + n: v for m in ('moments', 'normalize')\n"
        "      for n, v in vars(getattr(bnstat.kernels, m)).items() if isinstance(v, CPUDispatcher)}\n"
        "print(json.dumps({'heavy': heavy, 'kernels': {n: [len(d.signatures),\n"
        "    not isinstance(d._cache, NullCache), sorted(d.targetoptions.get('fastmath') or [])]\n"
        "    for n, d in ds.items()}}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["heavy"] == []  # `import bnstat` imports none of them
    assert len(doc["kernels"]) >= 3
    for name, (compiled, cached, fastmath) in doc["kernels"].items():
        assert compiled == 0, f"{name} compiled at import"
        assert cached, f"{name} has no cache"
        assert not {"nnan", "ninf", "fast"} & set(fastmath), (name, fastmath)


def test_kernels_type_plain_arrays_as_numba_does():
    """The kernels' dispatchers type an argument of type np.ndarray as numba's typeof does
    (dtype, ndim, layout, writability), without numpy.ma; anything else is numba's answer."""
    import numba
    import numpy as np

    from bnstat.kernels import moments

    dispatcher = moments.moments4_units.kernel
    assert "typeof_pyval" in vars(dispatcher)  # the plain-array rule is installed
    base = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    ro = base.view()
    ro.flags.writeable = False
    values = [base, ro, base.astype(np.float32), base.astype(np.int16), base.astype(np.uint8),
              np.asfortranarray(base), base[:, ::2], base[0, 0, 0], np.zeros(0), np.array(3.0),
              base.astype(np.complex128), np.ma.masked_array(base), np.array(["a"]), 3, 2.5,
              np.zeros(3, dtype=[("a", "f4"), ("b", "i2")])]
    for v in values:
        try:
            want = type(dispatcher).typeof_pyval(dispatcher, v)
        except Exception as exc:  # numba refuses it (a MaskedArray): so does the kernel
            with pytest.raises(type(exc)):
                dispatcher.typeof_pyval(v)
            continue
        assert dispatcher.typeof_pyval(v) == want, v
    assert dispatcher.typeof_pyval(ro) == numba.typeof(ro)
