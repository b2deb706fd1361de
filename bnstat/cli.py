"""The ``bnstat`` command: root group, lazy command table, exit codes.

This is the only module that turns library errors into messages and exit
statuses (README "Exit codes"): 0 success, 1 data/runtime error, 2 usage error, 130 after
SIGINT, 143 after SIGTERM; a broken pipe ends quietly (exit 141, as a Unix
tool killed by SIGPIPE). Commands are imported only when run, so that
``bnstat --help`` never imports numba, h5py or rich.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import warnings
from typing import NamedTuple


def _early_exit(signum, frame):
    os._exit(130 if signum == signal.SIGINT else 143)


# A signal before main() installs its handlers (while click and the package are
# imported) exits at once: nothing is written yet, and Python's default would
# print a KeyboardInterrupt traceback. Only in the console script (python -m
# bnstat does the same in __main__); a program importing bnstat keeps its own.
CONSOLE = os.path.basename(sys.argv[0] if sys.argv else "") == "bnstat"  # __main__ sets it too
if CONSOLE and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _early_exit)
    signal.signal(signal.SIGTERM, _early_exit)

import click  # noqa: E402

from bnstat import options  # noqa: E402
from bnstat._version import __version__  # noqa: E402



class Entry(NamedTuple):
    """A command of the lazy table: its module (defining ``command``) and its one-line
    summary for the root help, so that listing the commands imports none of them."""

    module: str
    summary: str


# one line per command
COMMANDS = {
    "info": Entry("bnstat.commands.info", "List the arrays of files: shape, dtype, chunks, compression, size."),
    "moments": Entry("bnstat.commands.moments", "Exact per-unit count, mean, var, std, min, max, NaN count."),
    "show": Entry("bnstat.commands.show", "Render a saved stats file as a table, JSON or CSV."),
    "merge": Entry("bnstat.commands.merge", "Merge saved stats files exactly into one."),
    "normalize": Entry("bnstat.commands.normalize", "Normalize arrays as BN / LayerNorm / InstanceNorm / GroupNorm would."),
    "fold": Entry("bnstat.commands.fold", "Fold BatchNorm layers into the conv / linear layers that feed them."),
    "hist": Entry("bnstat.commands.hist", "Exact per-unit histograms, quantiles and calibration ranges (amax)."),
    "plot": Entry("bnstat.commands.plot", "Plot a stats or histogram file (PNG, SVG, PDF; the plot extra)."),
    "running": Entry("bnstat.commands.running", "The running mean/var a framework's BN would hold after training on the data."),
    "recalibrate": Entry("bnstat.commands.recalibrate", "Precise BN: a model's BN running statistics set from activations."),
    "diff": Entry("bnstat.commands.diff", "Per-unit drift between two stats, activation or model files."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        return importlib.import_module(entry.module).command

    def format_commands(self, ctx, formatter):
        rows = [(name, entry.summary) for name, entry in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnstat")
@options.debug_option
def cli():
    """Exact statistics for normalization layers, out of core.

    \b
    Examples:
      bnstat info acts.h5
      bnstat moments acts.h5 --layout NCHW
      bnstat moments acts.h5 --layout NHWC --norm group --groups 8 -o stats.npz
      bnstat show stats.npz --format csv
      bnstat normalize acts.npy -o normed.npy --stats stats.npz
      bnstat fold model.npz -o folded.npz --check
    """


def _on_signal(signum, frame):
    from bnstat import errors

    if errors.pending_signal is not None:
        return  # cleanup of the first signal is running: a second Ctrl-C must not break it
    errors.pending_signal = signum  # kept in case the exception below is swallowed
    raise KeyboardInterrupt() if signum == signal.SIGINT else errors.Terminated()


class _ClosedStream:
    """sys.stdout when bnstat was started with it closed (`>&-`): every write fails."""

    def write(self, data):
        import errno

        raise OSError(errno.EBADF, "standard output is closed")

    def flush(self):
        pass

    def isatty(self):
        return False

    def fileno(self):
        return 1

    @property
    def buffer(self):
        return self


def _closed_stdio() -> None:
    """Occupy a closed fd 0/1/2 with /dev/null, so that no file bnstat opens gets it.

    A closed stdout becomes a stream whose writes fail ("standard output is
    closed", exit 1); a closed stderr swallows the messages; a closed stdin reads empty.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                os.dup2(os.open(os.devnull, os.O_RDWR), fd)
            except OSError:
                pass
            if fd == 1:
                sys.stdout = _ClosedStream()
            elif fd == 2 and sys.stderr is None:
                sys.stderr = open(fd, "w", closefd=False)  # noqa: SIM115 - the process's stderr


def _unraisable(hook):
    """sys.unraisablehook that is quiet about a signal landing in a finalizer.

    The signal is recorded by _on_signal and raised again by
    errors.check_interrupt(); Python's "Exception ignored in ... Traceback"
    would only break the README's promise of no traceback.
    """
    from bnstat.errors import Terminated

    def quiet(unraisable):
        if not isinstance(unraisable.exc_value, (KeyboardInterrupt, Terminated)):
            hook(unraisable)

    return quiet


def _print_error(message: str) -> None:
    try:
        click.echo(f"bnstat: error: {message}", err=True)
    except (BrokenPipeError, OSError):
        pass


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _warning_printer(state: options.RunState):
    """warnings.showwarning for one run: one line on stderr, nothing under --quiet.

    Bound to the run's state (``ctx.obj``) rather than read from the current
    click context: warnings also come from reader and writer threads.
    """
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if state.quiet:
            return
        _say(f"bnstat: warning: {message}")

    return showwarning


def _note_printer(state: options.RunState):
    """errors.note for one run: stderr when it is a terminal or with -v, nothing under --quiet."""
    def note(message):
        if not state.quiet and (state.verbose or _stderr_is_terminal()):
            _say(f"bnstat: note: {message}")

    return note


def _say(line: str) -> None:
    try:
        click.echo(line, err=True)
    except (BrokenPipeError, OSError):
        pass


def _silence_stdout() -> None:
    # After a broken pipe, make the interpreter's final flush of stdout quiet.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _buffer_stdout() -> None:
    """Put a buffered writer back under stdout when Python runs unbuffered.

    Under ``python -u`` / PYTHONUNBUFFERED=1 (common in containers)
    ``sys.stdout.buffer`` is the raw FileIO, whose ``write`` may write only
    part of the bytes and return the count; TextIOWrapper and our .npy writers
    ignore that count, so a short write (a reader gone, `| head`) would drop
    data silently and exit 0 instead of ending as a broken pipe. A
    BufferedWriter retries short writes and raises BrokenPipeError.
    """
    import io

    raw = getattr(sys.stdout, "buffer", None)
    if isinstance(raw, io.RawIOBase):
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=sys.stdout.encoding,
                                      errors=sys.stdout.errors, write_through=True)


def _run(args: list[str], state: options.RunState) -> int:
    """Parse and run one command line; the exit status the README gives (no exception escapes but
    an internal error or OSError under --debug)."""
    from bnstat import errors
    from bnstat.errors import BnstatError, Terminated

    try:
        # make_context/invoke rather than cli.main: click's main turns a
        # broken pipe into exit 1 and KeyboardInterrupt into Abort itself
        with cli.make_context("bnstat", args, obj=state) as ctx:
            cli.invoke(ctx)
        errors.check_interrupt()
        sys.stdout.flush()
        return 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        return 130
    except Terminated:
        return 143
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except BnstatError as exc:
        if state.debug:
            import traceback

            traceback.print_exc()
        _print_error(str(exc))
        return exc.exit_code
    except OSError as exc:  # an I/O failure no layer below named (e.g. stdout on a full disk)
        if state.debug:
            raise
        import errno

        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            where += "cannot write: "  # files are named by the layers below; this is stdout
        _print_error(f"{where}{exc.strerror or exc}")
        _silence_stdout()  # the interpreter's final flush would fail again
        return 1
    except MemoryError:
        _print_error("out of memory; try a smaller --chunk-size")
        return 1
    except Exception as exc:  # an unexpected failure: still no traceback by default
        if errors.pending_signal is not None:  # a signal, wrapped by a library (numba's compiler)
            return 130 if errors.pending_signal == signal.SIGINT else 143
        if state.debug:
            raise
        # the first line only: errors are one or two lines (README "Exit codes"); numba's are dozens
        first = (str(exc).strip().splitlines() or [""])[0]
        _print_error(f"internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)")
        return 1


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script; exits with the README's exit statuses."""
    from bnstat import errors
    from bnstat.errors import BnstatWarning
    from bnstat.kernels import _jit

    _closed_stdio()
    _jit.setup(cli=True)  # the command line tool: numba's start-up shortcut (imports nothing)
    _buffer_stdout()
    args = list(sys.argv[1:] if argv is None else argv)
    state = options.RunState()  # ctx.obj of every command of this run
    errors.pending_signal = None
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _unraisable(previous_hook)
    with warnings.catch_warnings():
        warnings.simplefilter("always", BnstatWarning)
        warnings.showwarning = _warning_printer(state)
        errors.note_printer = _note_printer(state)
        try:
            code = _run(args, state)
        finally:
            errors.note_printer = None
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sys.unraisablehook = previous_hook
            errors.pending_signal = None  # handled: library calls after this one start clean
    try:
        sys.stdout.flush()
    except (OSError, ValueError):  # bytes that cannot be delivered (full disk, closed pipe):
        _silence_stdout()          # leave without the interpreter's "Exception ignored"
    if CONSOLE:  # the process ends: a late Ctrl-C must not kill the interpreter's finalization
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
