"""Every shared click option of bnstat, defined once, with its validation.

Commands stack these decorators; a test walks all commands and fails on a
flag declared twice. Validation of a single value raises
``click.BadParameter``; options that conflict raise ``click.UsageError``
(both exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from bnstat.sizes import parse_size


@dataclass
class RunState:
    """The switches of one run, set by option callbacks: ``ctx.obj`` (``cli.main`` creates it)."""

    quiet: bool = False
    debug: bool = False
    verbose: bool = False

NORMS = ("batch", "layer", "instance", "group")
FORMATS = ("table", "json", "csv", "npz")
NAN_POLICIES = ("omit", "propagate", "raise")

def _threads_callback(ctx, param, value):
    """--threads above the cores this process may use: capped there, with a warning."""
    if value is None:
        return None
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if value > cores:
        from bnstat.errors import warn

        warn(f"--threads {value}: this machine gives bnstat {cores} cores; using {cores}")
        return cores
    return value


def _checked(check):
    """A click callback applying ``check`` (which raises ValueError) to a given value."""
    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return check(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def check_layout_letters(text: str) -> str:
    """Validate a layout string (``NCHW``...). Raises ValueError."""
    letters = text.strip()
    if not letters or not letters.isalpha():
        raise ValueError(f"{text!r}: a layout is a string of axis letters, such as NCHW or NHWC")
    letters = letters.upper()
    if letters.count("C") != 1:
        raise ValueError(f"{text!r}: a layout needs exactly one C (the channel axis)")
    if len(set(letters)) != len(letters):
        raise ValueError(f"{text!r}: each axis letter may appear once")
    return letters


def check_layout_entry(text: str) -> str:
    """Validate one --layout: LETTERS or PATTERN=LETTERS (README, "Layouts per array").
    Raises ValueError."""
    pattern, sep, letters = text.rpartition("=")
    if sep and not pattern.strip():
        raise ValueError(f"{text!r}: PATTERN=LAYOUT needs a pattern before '=', e.g. 'fc*=NC'")
    if not sep:
        return check_layout_letters(letters)
    try:
        return f"{pattern}={check_layout_letters(letters)}"
    except ValueError as exc:
        raise ValueError(f"{text!r}: {str(exc).split(': ', 1)[1]}") from None


def _layouts_callback(ctx, param, value):
    """Every --layout checked; () when none is given."""
    check = _checked(check_layout_entry)
    return tuple(check(ctx, param, v) for v in value or ())


def _reduce_callback(ctx, param, value):
    if value is None:
        return None
    letters = value.strip().upper()
    if not letters.isalpha() or len(set(letters)) != len(letters):
        raise click.BadParameter(
            f"{value!r}: name the reduced axes by their layout letters, each once (e.g. C, HW, NHW)",
            ctx=ctx, param=param)
    return letters


def _quiet_callback(ctx, param, value):
    if value:
        ctx.ensure_object(RunState).quiet = True
    return value


def _verbose_callback(ctx, param, value):
    if value:
        ctx.ensure_object(RunState).verbose = True
    return value


def _debug_callback(ctx, param, value):
    if value:
        ctx.ensure_object(RunState).debug = True
    return value


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False, is_eager=True, callback=_debug_callback,
    help="Show the Python traceback of an error.")

def _output_option(help_text: str):
    return click.option("-o", "--output", type=str, default=None, metavar="PATH", help=help_text)


output_option = _output_option("Write the result to PATH ('-' is standard output).")
force_option = click.option("--force", is_flag=True, help="Replace an existing output file.")
quiet_option = click.option(
    "-q", "--quiet", is_flag=True, callback=_quiet_callback,
    help="No warnings and no progress bar.")
verbose_option = click.option(
    "-v", "--verbose", is_flag=True, expose_value=False, callback=_verbose_callback,
    help="Notes on stderr (a first compile of the kernels) even when it is not a terminal.")
threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None, metavar="N", callback=_threads_callback,
    help="Number of compute threads (default: all cores).")
chunk_size_option = click.option(
    "--chunk-size", type=str, default=None, callback=_checked(parse_size), metavar="SIZE",
    help="Bytes read at a time: 65536, 512KiB, 64MiB, 1GiB; KB/MB/GB are powers of 1000. "
    "Memory stays bounded by it. [default: 64MiB]")


scheduler_option = click.option(
    "--scheduler", metavar="ADDRESS", default=None,
    help="Run on a Dask cluster: tcp://HOST:PORT of a running scheduler, or local[:N] "
         "(a local cluster of N worker processes). Needs the dask extra.")


def common_options(func, output=None):
    """-o, --force, --quiet, --verbose, --debug (every command); ``output``: another -o option."""
    for deco in reversed((output or output_option, force_option, quiet_option, verbose_option,
                          debug_option)):
        func = deco(func)
    return func


def model_output_options(func):
    """common_options for a command whose -o is a model file (fold): no standard output."""
    return common_options(func, output=_output_option(
        "Write the folded model to PATH (a file: standard output carries the plan)."))


def compute_options(func):
    """--threads, --chunk-size: only on the commands that compute over data."""
    for deco in reversed((threads_option, chunk_size_option)):
        func = deco(func)
    return func


inputs_argument = click.argument("inputs", nargs=-1, required=True, metavar="PATH...")
dataset_option = click.option(
    "-d", "--dataset", "datasets", multiple=True, metavar="PATTERN",
    help="Select arrays by name (fnmatch; '*' also matches '/'). Repeatable.")
per_file_option = click.option(
    "--per-file", is_flag=True,
    help="Keep arrays of the same name in different files apart (default: merged along N).")


def check_array_name(text: str) -> str:
    """Validate an array name for --name (what -d patterns and stats files see). Raises ValueError."""
    name = text.strip()
    if not name or name != text or any(ch in name for ch in "*?[]") or name.startswith("__"):
        raise ValueError(f"{text!r}: an array name is a non-empty string without spaces around it, "
                         "wildcards (*?[]) or a leading __")
    return name


name_option = click.option(
    "--name", type=str, default=None, metavar="NAME", callback=_checked(check_array_name),
    help="Call the array of each input NAME (a .npy file, standard input, or one array "
         "selected with -d): shards given the same NAME are one array, merged along N.")


skip_crc_option = click.option(
    "--skip-crc", is_flag=True,
    help="Do not check the CRC-32 of .npz members: a stored member then reads as fast as a "
         ".npy (the check costs about half of it), and a damaged member goes unnoticed.")


def selection_options(func):
    for deco in reversed((dataset_option, per_file_option)):
        func = deco(func)
    return func


def layout_options(func):
    """--layout, --channel-axis, --norm, --groups, --reduce."""
    decos = (
        click.option("--layout", type=str, multiple=True, callback=_layouts_callback,
                     metavar="[PATTERN=]LETTERS",
                     help="Axis letters, one per dimension, one C: NC, NCL, NLC, NCHW, NHWC, NCDHW... "
                     "Repeatable: PATTERN=LETTERS for the arrays whose name matches (fnmatch, the "
                     "first match wins), bare LETTERS for the other arrays of their rank. "
                     "Default: an HDF5 dataset's layout attribute, else the PyTorch layout."),
        click.option("--channel-axis", type=int, default=None, metavar="K",
                     help="The channel axis, instead of --layout (negative counts from the end)."),
        click.option("--norm", type=click.Choice(NORMS), default=None,
                     help="Which statistics: per channel (batch, the default), per sample (layer), "
                     "per sample and channel (instance), per sample and group (group)."),
        click.option("--groups", type=click.IntRange(min=1), default=None, metavar="G",
                     help="Number of channel groups, with --norm group."),
        click.option("--reduce", type=str, default=None, callback=_reduce_callback, metavar="LETTERS",
                     help="Name the reduced axes directly, e.g. --reduce C with --layout NLC."),
    )
    for deco in reversed(decos):
        func = deco(func)
    return func


def layout_spec(layout, channel_axis, norm, groups, reduce) -> dict:
    """Check the layout options against each other; keyword arguments for the library.

    ``layout``: the --layout values (a tuple; one bare layout is passed on as a string).
    Raises click.UsageError on a conflict.
    """
    layout = _layout_value(layout)
    if layout is not None and channel_axis is not None:
        raise click.UsageError("give --layout or --channel-axis, not both")
    if reduce is not None and norm is not None:
        raise click.UsageError("--reduce names the reduced axes itself; drop --norm")
    if reduce is not None and layout is None:
        raise click.UsageError("--reduce needs --layout, to know which letter is which axis")
    for letters in ([layout] if isinstance(layout, str) else [e.rpartition("=")[2] for e in layout or ()]):
        unknown = sorted(set(reduce or "") - set(letters))
        if unknown:
            raise click.UsageError(
                f"--reduce {reduce}: {''.join(unknown)} is not an axis of --layout {letters}")
    norm = norm or "batch"
    if norm == "group" and groups is None:
        raise click.UsageError("--norm group needs --groups G")
    if groups is not None and norm != "group":
        raise click.UsageError("--groups goes with --norm group")
    return dict(layout=layout, channel_axis=channel_axis, norm=norm, groups=groups, reduce=reduce)


def _layout_value(layout):
    """The --layout tuple for the library: None, one LETTERS string, or the entries (their
    conflicts checked: click.UsageError)."""
    if isinstance(layout, str) or layout is None:
        return layout
    if not layout:
        return None
    if len(layout) == 1 and "=" not in layout[0]:
        return layout[0]
    from bnstat.errors import UsageProblem
    from bnstat.layout import layout_rules

    try:
        layout_rules(layout)
    except UsageProblem as exc:
        raise click.UsageError(exc.message) from None
    return tuple(layout)


ddof_option = click.option(
    "--ddof", type=click.IntRange(min=0), default=0, show_default=True,
    help="Delta degrees of freedom of the reported variance (0: biased, as BN normalizes; 1: unbiased).")
nan_option = click.option(
    "--nan", "nan_policy", type=click.Choice(NAN_POLICIES), default="omit", show_default=True,
    help="NaN values: omit (counted and left out, with a warning), propagate (numpy), raise (exit 1).")
higher_option = click.option(
    "--higher", is_flag=True, help="Add skewness and excess kurtosis.")
format_option = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=None,
    help="Output format (default: table; with -o FILE, from its extension).")


allow_duplicates_option = click.option(
    "--allow-duplicates", is_flag=True,
    help="Accept the same input twice (its counts then double); refused by default.")


def table_options(func):
    decos = (
        click.option("--sort", type=click.Choice(["unit", "mean", "var", "std", "min", "max",
                                                  "nan", "absmean"]),
                     default="unit", show_default=True, help="Order of the table rows."),
        click.option("--top", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Show N rows per array (default: all up to 32, else 20 and the flagged units)."),
        click.option("--all", "show_all", is_flag=True, help="Show every unit of every array."),
        click.option("--summary", is_flag=True,
                     help="One line per array (shape, layout, units, mean and std ranges, flags) "
                          "instead of its table."),
    )
    for deco in reversed(decos):
        func = deco(func)
    return func


def check_summary(summary: bool, fmt: str, sort: str, top, show_all: bool) -> None:
    """--summary is a text view: refused with --format json|csv|npz, --sort, --top and --all
    (README, `bnstat moments`). Raises click.UsageError."""
    if not summary:
        return
    if fmt != "table":
        raise click.UsageError(f"--summary is a text view and --format is {fmt}: drop --summary "
                               f"(the {fmt} output has every unit), or drop --format")
    given = [flag for flag, on in (("--sort", sort != "unit"), ("--top", top is not None),
                                   ("--all", show_all)) if on]
    if given:
        raise click.UsageError(f"--summary shows no unit rows: drop {' and '.join(given)}, or --summary")


def format_for(fmt: str | None, output: str | None) -> str:
    """The output format: --format, else the extension of -o, else table.

    A --format that contradicts the extension (``-o st.json --format csv``) is a usage error.
    """
    ext = output.rsplit(".", 1)[-1].lower() if output and "." in output else ""
    if fmt:
        if ext in ("json", "csv", "npz") and ext != fmt:
            raise click.UsageError(f"-o {output} --format {fmt}: the extension .{ext} says {ext}; "
                                   f"drop --format, or name the file .{'txt' if fmt == 'table' else fmt}")
        return fmt
    if output and output != "-":
        from bnstat.io.atomic import is_special

        if not ext and is_special(output):  # -o /dev/null, a FIFO: as standard output
            return "table"
        if ext in ("json", "csv", "npz"):
            return ext
        if ext in ("txt", "text"):
            return "table"
        raise click.UsageError(
            f"-o {output}: cannot tell the format from the extension; use .json, .csv, .npz or --format")
    return "table"
