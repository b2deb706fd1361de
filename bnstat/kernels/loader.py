"""The kernels loaded in a thread of their own, and compiled apart the first time.

Loading a cached kernel costs numba's import and its target (about 0.4 s);
compiling one costs several seconds (bench/README.md, "The first run"). A
run that finds its kernel in numba's cache waits for the load, so that every
run of a cached install computes every chunk with the same kernel and its
results are the same from run to run. A run that does not find it never waits
for the compiler: the kernel is compiled by a detached ``python -m
bnstat.kernels.loader`` process, which fills numba's cache even when this run
ends first; meanwhile the chunks are computed by the numpy engine, and the
run switches to the kernel as soon as the compiler is done and the kernel is
loaded. The merges are exact, so the result is that of either engine up to
float64 rounding (README, "The first run").

``Spec`` names one compiled variant: the kernel and the dtype and
writability of its input (the two things numba's signature of these kernels
depends on). Nothing here imports numba at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

# kernel name -> (module, attribute) of its entry point
KERNELS = {
    "moments4_rows": ("bnstat.kernels.moments", "moments4_rows"),
    "moments4_units": ("bnstat.kernels.moments", "moments4_units"),
    "moments4_higher": ("bnstat.kernels.moments", "moments4_higher"),
    "normalize4": ("bnstat.kernels.normalize", "normalize4"),
    "hist4_rows": ("bnstat.kernels.hist", "hist4_rows"),
    "hist4_units": ("bnstat.kernels.hist", "hist4_units"),
    "moments_select4": ("bnstat.kernels.fused", "moments_select4"),
}


# what computes while a kernel compiles, where that is not numpy
FALLBACK = {"moments_select4": "the moments and the selection kernels compute apart"}


def moments_kernel(x: np.ndarray, higher: bool = False) -> str:
    """The name of the moments kernel that takes the (P, A, U, B) view ``x``."""
    if higher:
        return "moments4_higher"
    return "moments4_rows" if x.shape[3] == 1 else "moments4_units"


def hist_kernel(x: np.ndarray) -> str:
    """The name of the counting kernel of ``bnstat hist`` that takes the (P, A, U, B) view ``x``."""
    return "hist4_rows" if x.shape[3] == 1 else "hist4_units"


@dataclass(frozen=True)
class Spec:
    """One compiled variant of a kernel: its name, input dtype and writability, output dtype."""

    kernel: str
    dtype: str
    readonly: bool = False
    out: str = ""  # normalize4's output dtype

    @classmethod
    def of(cls, kernel: str, x: np.ndarray, out: np.ndarray | None = None) -> Spec:
        return cls(kernel, x.dtype.name, not x.flags.writeable, "" if out is None else out.dtype.name)

    def text(self) -> str:
        return ":".join((self.kernel, self.dtype, "ro" if self.readonly else "rw", self.out))

    @classmethod
    def parse(cls, text: str) -> Spec:
        kernel, dtype, mode, out = text.split(":")
        if kernel not in KERNELS:
            raise ValueError(f"{kernel}: no such kernel")
        return cls(kernel, np.dtype(dtype).name, mode == "ro", out and np.dtype(out).name)

    def entry(self):
        """The kernel's entry point (imports numba and the kernel's module)."""
        import importlib

        module, name = KERNELS[self.kernel]
        return getattr(importlib.import_module(module), name)

    def args(self) -> tuple:
        """Arguments of one-element arrays with this variant's types (numba's signature)."""
        x = np.zeros((1, 1, 1, 1), self.dtype)
        x.setflags(write=not self.readonly)
        if self.kernel == "normalize4":
            params = [np.zeros((1, 1)) for _ in range(3)]
            return (x, *params, np.zeros((1, 1, 1, 1), self.out or "float64"))
        if self.kernel.startswith("hist4"):  # x, sa, su, absval, lo, hi, inv, margin, edges, counts, 5 more
            if self.kernel == "hist4_units":  # B > 1
                x = np.zeros((1, 1, 1, 2), self.dtype)
                x.setflags(write=not self.readonly)
            lo, hi, inv, margin = np.zeros((1, 1)), np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1))
            small = [np.zeros((1, 1, 1), np.int64) for _ in range(5)]
            return (x, 1, 1, False, lo, hi, inv, margin, np.array([[[0.0, 1.0]]]),
                    np.zeros((1, 1, 1, 1), np.int64), *small)
        n = 2 if self.kernel == "moments4_higher" else 0
        if self.kernel in ("moments4_units", "moments_select4"):  # B > 1 (the type is what counts)
            x = np.zeros((1, 1, 1, 2), self.dtype)
            x.setflags(write=not self.readonly)
        acc = [np.zeros((1, 1, 1)) for _ in range(2 + n)]
        mn, mx = np.zeros((1, 1, 1)), np.zeros((1, 1, 1))
        moments = (x, 1, 1, np.zeros((1, 1, 1), np.int64), *acc, mn, mx, np.zeros((1, 1, 1), np.int64))
        if self.kernel != "moments_select4":
            return moments
        # then select4's arguments after su (histrun._select_args): no slot, so nothing is read
        i2, i3, u3 = np.zeros((1, 1), np.int64), np.zeros((1, 1, 1), np.int64), np.zeros((1, 1, 1), np.uint64)
        return (*moments, i2, u3, u3, u3, i3, np.zeros((1, 1, 1), np.bool_), i3, i3, i2,
                np.zeros((1, 1, 1)), np.zeros((1, 1, 1)), i3, False, np.zeros(2, np.int64),
                np.zeros(1, np.uint64))


def in_cache(call, args: tuple) -> bool:
    """Whether numba's cache holds ``call``'s kernel for ``args`` (False when it cannot tell)."""
    try:
        from numba.core.registry import cpu_target

        dispatcher = call.kernel
        sig = tuple(dispatcher.typeof_pyval(a) for a in args)
        cache = dispatcher._cache
        key = cache._index_key(sig, cpu_target.target_context.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # numba's cache internals moved, or caching is off: compile
        return False


def index_may_exist(spec: Spec) -> bool:
    """False when no index of numba's cache for ``spec``'s kernel exists where numba looks:
    NUMBA_CACHE_DIR, the package's __pycache__, the user-wide cache (numba's locators for a
    file; a test checks them against numba's own path). Needs no numba: a run whose kernel
    was never compiled starts computing at once. True when it cannot tell."""
    import glob
    import hashlib

    if os.environ.get("NUMBA_CACHE_LOCATOR_CLASSES"):
        return True
    module, attr = KERNELS[spec.kernel]
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          module.rsplit(".", 1)[-1] + ".py")
    here = os.path.dirname(source)
    sub = f"{os.path.basename(here)}_{hashlib.sha1(here.encode()).hexdigest()}"
    dirs = [os.path.join(here, "__pycache__")]
    if os.environ.get("NUMBA_CACHE_DIR"):
        dirs = [os.path.join(os.environ["NUMBA_CACHE_DIR"], sub)]
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        dirs.append(os.path.join(base, "numba", sub))
    name = f"{os.path.splitext(os.path.basename(source))[0]}._{attr}-*.py{sys.version_info[0]}" \
           f"{sys.version_info[1]}.nbi"
    return any(glob.glob(os.path.join(glob.escape(d), name)) for d in dirs)


def compile_apart(spec: Spec) -> subprocess.Popen:
    """Start the detached process that compiles ``spec`` into numba's cache."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    return subprocess.Popen([sys.executable, "-m", "bnstat.kernels.loader", spec.text()],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True,
                            close_fds=True)


class Job:
    """The load of one ``Spec`` in a daemon thread: ``known`` once it is known whether the
    kernel is cached, ``done`` once it is loaded (or failed: ``error``).

    ``apart``: the kernel is known not to be cached (``index_may_exist``): the detached
    compiler is started at once, by the caller, so that it runs even if this process ends
    before its thread has imported numba. Otherwise the thread starts it, before ``known``
    is set, when numba's cache has no such kernel.
    """

    def __init__(self, spec: Spec, apart: bool = False, detach: bool = True):
        self.spec = spec
        self.detach = detach
        self.known = threading.Event()
        self.done = threading.Event()
        self.cached: bool | None = False if apart else None
        self.error: BaseException | None = None
        self.noted = False  # the first-compile note was given
        self.proc = compile_apart(spec) if apart and detach else None
        if apart:
            self.known.set()
        threading.Thread(target=self._run, name=f"bnstat-load-{spec.kernel}", daemon=True).start()

    def _run(self) -> None:
        try:
            call = self.spec.entry()
            args = self.spec.args()
            if not self.known.is_set():
                self.cached = in_cache(call, args)
                if not self.cached and self.detach:
                    self.proc = compile_apart(self.spec)
                self.known.set()
            if self.proc is not None:
                self.proc.wait()
            call(*args)  # numba's target, then the kernel from the cache (or compiled here)
        except BaseException as exc:  # re-raised by the thread that asks for the kernel
            self.error = exc
        finally:
            self.known.set()
            self.done.set()


_jobs: dict[Spec, Job] = {}
_lock = threading.Lock()


def job(spec: Spec) -> Job:
    """The (started) load of ``spec``, one per process."""
    with _lock:
        if spec not in _jobs:
            _jobs[spec] = Job(spec, apart=not index_may_exist(spec))
        return _jobs[spec]


def _wait(event: threading.Event) -> None:
    from bnstat.errors import check_interrupt

    while not event.wait(0.05):
        check_interrupt()


def loaded(spec: Spec) -> bool:
    """Whether the kernel of ``spec`` can run now: waits while it is loaded from numba's cache,
    returns False while it is being compiled (the first time, with a note). Raises what the load
    raised."""
    j = job(spec)
    _wait(j.known)
    if j.cached:
        _wait(j.done)
    elif not j.noted:
        from bnstat.errors import note

        j.noted = True
        meanwhile = FALLBACK.get(spec.kernel, "numpy computes")
        note(f"compiling the {spec.kernel} kernel for {spec.dtype} for the first time (a few "
             f"seconds, in the background; {meanwhile} meanwhile)")
    if not j.done.is_set():
        return False
    if j.error is not None:
        raise j.error
    return True


# warm_up's names for the kernels (bnstat.warm_up)
GROUPS = {"moments": ("moments4_rows", "moments4_units"), "higher": ("moments4_higher",),
          "normalize": ("normalize4",), "hist": ("hist4_rows", "hist4_units", "moments_select4")}


def warm_up(kernels=("moments", "normalize"), dtypes=("float32", "float64")) -> dict[str, float]:
    """Load (compiling the first time) ``kernels`` for inputs of ``dtypes``, in this process
    (inputs reach the kernels read-only: ``stream.read_only``). Returns the seconds per variant."""
    names = [name for k in kernels for name in GROUPS.get(k, (k,))]
    for name in names:
        if name not in KERNELS:
            raise ValueError(f"{name}: no such kernel (choose from {', '.join(GROUPS)})")
    took = {}
    for name in names:
        for dtype in dtypes:
            out = np.dtype(dtype).name if name == "normalize4" else ""
            spec = Spec(name, np.dtype(dtype).name, True, out)
            t0 = time.perf_counter()
            spec.entry()(*spec.args())
            took[spec.text()] = time.perf_counter() - t0
    return took


def main(argv: list[str]) -> int:
    """``python -m bnstat.kernels.loader SPEC...``: compile each SPEC into numba's cache."""
    from bnstat.kernels._jit import setup

    setup(cli=True)
    for text in argv:
        spec = Spec.parse(text)
        spec.entry()(*spec.args())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
