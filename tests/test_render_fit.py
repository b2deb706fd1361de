"""Tables fitted to the terminal: no number cut with "…" at 80, 60 or 40 columns (with and
without --higher, batch and instance norm, hist, diff, running); every printed number is
the float64 reference rounded at its last printed digit; columns left out are named with
their value. Also --summary (one line per array) and the CSV's unit coordinates."""

from __future__ import annotations

import csv
import io
import math
import re
from decimal import Decimal

import numpy as np
import pytest
from conftest import run_inproc
from helpers import assert_fails, table_blocks
from reference import ref_moments

from bnstat.render.fit import FLOOR_DIGITS, Column, fit, width_of

ELLIPSIS = "…"


# ---- parsing a printed table back ------------------------------------------------------------


def parse_block(block: list[str]) -> dict[str, dict[str, str]]:
    """{unit label: {head: cell}} over every piece of a (possibly wrapped) table."""
    units: dict[str, dict[str, str]] = {}
    heads: list[str] = []
    last, in_head = None, False
    for line in block:
        if "┃" in line:  # a head wrapped over lines is joined column by column
            parts = [h.strip() for h in line.split("┃")]
            heads = [" ".join(x for x in hs if x) for hs in zip(heads, parts)] if in_head else parts
            in_head = True
        elif "│" in line:
            in_head = False
            cells = [c.strip() for c in line.split("│")]
            if cells[0] == "" and last is not None:  # a cell wrapped onto the next line
                for h, c in zip(heads[1:], cells[1:], strict=True):
                    if c:
                        last[h] = f"{last[h]} {c}".strip()
                continue
            last = units.setdefault(cells[0], {})
            last.update(zip(heads[1:], cells[1:], strict=True))
        else:
            in_head = False
    return units


def split_title(block: list[str]) -> tuple[list[str], list[str]]:
    """The title's lines (wrapped at a narrow width) and the table's."""
    k = next(i for i, line in enumerate(block) if "┃" in line)
    return block[:k], block[k:]


def assert_printed(cell: str, want: float, digits: int = FLOOR_DIGITS) -> None:
    """``cell`` is ``want`` rounded at the cell's last digit (NaN and +-inf spelled out), and
    that digit is at most the ``digits``-th significant one (an integer: exact)."""
    if np.isnan(want):
        assert cell == "NaN", (cell, want)
        return
    if np.isinf(want):
        assert cell == ("inf" if want > 0 else "-inf"), (cell, want)
        return
    d = Decimal(cell.replace(",", ""))
    if "," in cell:  # an integer with thousands separators (counts): exact
        assert float(d) == want, (cell, want)
        return
    half = 0.5 * 10.0 ** d.as_tuple().exponent
    assert abs(float(d) - want) <= half * (1 + 1e-9) + 1e-12 * abs(want), (cell, want)
    if want:
        coarsest = 0.5 * 10.0 ** (math.floor(math.log10(abs(want))) - digits + 1)
        assert abs(float(d) - want) <= coarsest * (1 + 1e-6), (cell, want, digits)


def notes_of(text: str) -> str:
    return " ".join(text.split())


def check_table(block, ref, labels, *, width, higher, dropped_ok=True):
    """Every cell of every unit matches the reference; a missing column is in the note."""
    assert all(len(line) <= width for line in block), max(map(len, block))
    units = parse_block(block)
    assert list(units) == labels
    note = notes_of("\n".join(block))
    names = {"count": ref.count, "mean": ref.mean, "std": ref.std, "var": ref.var, "min": ref.min,
             "max": ref.max, "NaN": ref.nan_count}
    if higher:
        names.update(skew=ref.skew, kurtosis=ref.kurtosis)
    seen = set().union(*(u.keys() for u in units.values()))
    for head, want in names.items():
        flat = np.asarray(want).ravel()
        if head not in seen:  # left out: the same in every row, and the note says its value
            assert dropped_ok, head
            cells = {str(int(v)) if head in ("count", "NaN") else f"{v:.6g}" for v in flat}
            assert len(cells) == 1, (head, cells)
            value = f"{int(flat[0]):,}" if head in ("count", "NaN") else cells.pop()
            assert f"{head} {value}" in note, (head, note)
            continue
        for k, label in enumerate(labels):
            assert_printed(units[label][head], float(flat[k]))
    return units, note


# ---- data with numbers that used to be cut ---------------------------------------------------


@pytest.fixture(scope="module")
def wide_numbers(tmp_path_factory):
    """Four channels of 2**20 values each (counts 1,048,5xx), small means, big offsets, tiny
    scales, NaNs in one channel (so count and NaN differ between rows)."""
    d = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(17)
    x = rng.normal(size=(1024, 4, 1024)).astype(np.float32)
    x[:, 0] = x[:, 0] * 1e-3 - 0.00089
    x[:, 1] = x[:, 1] * 1234.5 + 98765.4321
    x[:, 2] *= 1e-30
    x[:, 3] = x[:, 3] * 0.1 + 1e7
    x[:5, 0, 0] = np.nan
    np.save(d / "wide.npy", x)
    return d / "wide.npy", {False: ref_moments(x, "NCL")}


@pytest.fixture(scope="module")
def instance_numbers(tmp_path_factory):
    d = tmp_path_factory.mktemp("inst")
    rng = np.random.default_rng(18)
    x = (rng.normal(size=(6, 3, 50)) * np.array([1e-5, 3e4, 1.0])[None, :, None]).astype(np.float64)
    x[2, 1, :] = 7.25  # a constant unit: flags "const"
    np.save(d / "inst.npy", x)
    return d / "inst.npy", ref_moments(x, "NCL", "instance")


@pytest.mark.parametrize("width", [80, 60, 40])
@pytest.mark.parametrize("higher", [False, True], ids=["plain", "higher"])
def test_batch_norm_table_never_cuts_a_number(wide_numbers, monkeypatch, width, higher):
    path, refs = wide_numbers
    ref = refs[False]
    monkeypatch.setenv("COLUMNS", str(width))
    args = ["moments", path, "--layout", "NCL", "-q"] + (["--higher"] if higher else [])
    rc, out, err = run_inproc(*args)
    assert rc == 0 and err == "", err
    assert ELLIPSIS not in out
    (block,) = table_blocks(out)
    title, body = split_title(block)
    assert " ".join(" ".join(title).split()).endswith("· 4,194,304 elements")  # wrapped, not cut
    units, note = check_table(body, ref, ["0", "1", "2", "3"], width=width, higher=higher)
    assert units["0"]["count"] == "1,048,571" or "count" not in units["0"]
    assert "flags none" in note or "flags" in units["0"]


@pytest.mark.parametrize("width", [80, 60, 40])
@pytest.mark.parametrize("higher", [False, True], ids=["plain", "higher"])
def test_instance_norm_table_never_cuts_a_number(instance_numbers, monkeypatch, width, higher):
    path, ref = instance_numbers
    monkeypatch.setenv("COLUMNS", str(width))
    args = ["moments", path, "--layout", "NCL", "--norm", "instance", "-q"] + (["--higher"] if higher else [])
    rc, out, err = run_inproc(*args)
    assert rc == 0 and err == "", err
    assert ELLIPSIS not in out
    (block,) = table_blocks(out)
    labels = [f"n{n} c{c}" for n in range(6) for c in range(3)]
    units, _ = check_table(split_title(block)[1], ref, labels, width=width, higher=higher)
    assert "const" in units["n2 c1"]["flags"].split(",")


def test_a_table_that_fits_is_left_whole(instance_numbers, monkeypatch):
    """At 140 columns nothing is left out, numbers have 6 digits, no note."""
    path, ref = instance_numbers
    monkeypatch.setenv("COLUMNS", "140")
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "--norm", "instance", "-q")
    assert rc == 0, err
    (block,) = table_blocks(out)
    heads = [h.strip() for h in next(line for line in block if "┃" in line).split("┃")]
    assert heads == ["n/c", "count", "mean", "std", "var", "min", "max", "NaN", "flags"]
    units = parse_block(block)
    assert units["n0 c1"]["mean"] == f"{ref.mean[0, 1]:.6g}"
    assert "not shown" not in out and "significant digits" not in out and "wrapped" not in out


def test_notes_say_what_was_left_out_and_shortened(wide_numbers, monkeypatch):
    path, refs = wide_numbers
    monkeypatch.setenv("COLUMNS", "60")
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "-q", "--higher")
    assert rc == 0, err
    note = notes_of(out)
    assert "not shown" not in note  # count, NaN and flags differ between the rows
    assert f"numbers to {FLOOR_DIGITS} significant digits to fit 60 columns" in note
    assert re.search(r"wrapped into \d tables to fit 60 columns", note)
    # every piece of the wrapped table leads with the unit column
    heads = [line.split("┃")[0].strip() for line in out.splitlines() if "┃" in line]
    assert len(heads) >= 2 and set(heads) == {"c"}


def test_on_a_terminal_of_80_columns(wide_numbers):
    """The real terminal path (a pseudo-terminal, COLUMNS=80), colours and all."""
    from test_pipelines import ANSI, run_on_pty

    path, refs = wide_numbers
    rc, term, err = run_on_pty(["moments", path, "--layout", "NCL", "--higher", "-q"],
                               pty_for="stdout", env_extra={"COLUMNS": "80"})
    assert rc == 0, err
    text = ANSI.sub("", term.decode()).replace("\r", "")
    assert ELLIPSIS not in text and "Traceback" not in text
    (block,) = table_blocks(text)
    check_table(split_title(block)[1], refs[False], ["0", "1", "2", "3"], width=80, higher=True)


# ---- other tables ------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 60, 40])
def test_hist_diff_running_tables_never_cut(tmp_path, monkeypatch, width):
    rng = np.random.default_rng(19)
    a = (rng.normal(size=(64, 5)) * 1e-4 - 0.000891).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", a * 1.5 + 0.001)
    monkeypatch.setenv("COLUMNS", str(width))
    ref = ref_moments(a, "NC")
    rc, out, err = run_inproc("hist", tmp_path / "a.npy", "--layout", "NC", "-q", "--quantiles",
                              "0.001,0.5,0.999", "--amax", "max", "--amax", "percentile:99.9")
    assert rc == 0, err
    assert ELLIPSIS not in out and max(map(len, out.splitlines())) <= width
    units = parse_block(table_blocks(out)[0])
    assert list(units) == [str(c) for c in range(5)]
    for c in range(5):
        col = a[:, c].astype(np.float64)
        assert_printed(units[str(c)]["min"], ref.min[c])
        assert_printed(units[str(c)]["max"], ref.max[c])
        assert_printed(units[str(c)]["q0.5"], float(np.quantile(col, 0.5)))
        assert_printed(units[str(c)]["amax max"], float(np.abs(col).max()))
    rc, out, err = run_inproc("diff", tmp_path / "a.npy", tmp_path / "b.npy", "--layout", "NC", "-q",
                              "--map", "a=b")
    assert rc == 0, err
    assert ELLIPSIS not in out and max(map(len, out.splitlines())) <= width
    units = parse_block(table_blocks(out)[-1])
    ref_b = ref_moments(a * np.float32(1.5) + np.float32(0.001), "NC")
    for c in range(5):
        assert_printed(units[str(c)]["mean A"], ref.mean[c])
        assert_printed(units[str(c)]["std B"], ref_b.std[c])
        shift = (ref_b.mean[c] - ref.mean[c]) / ref.std[c]
        assert_printed(units[str(c)]["shift"], shift)


# ---- the fitting itself ------------------------------------------------------------------------


def _render(columns, width):
    from rich.console import Console

    from bnstat.render.fit import draw_table

    console = Console(width=width, record=True, file=io.StringIO(), highlight=False)
    draw_table(console, columns, "caption")
    return console.export_text()


def test_fit_order_drop_then_digits_then_wrap():
    vals = [-0.000891234567, 12345.6789012, 1.5e-30]
    cols = [Column("u", ["0", "1", "2"], kind="text", key=True),
            Column("count", [1048576] * 3, kind="int"), Column("a", vals), Column("b", vals),
            Column("flags", ["", "", ""], kind="text")]
    whole = fit(cols, 200)
    assert len(whole.pieces) == 1 and not whole.notes and len(whole.pieces[0]) == 5
    # the same table minus count and flags fits: nothing else changes
    need = width_of([(c, c.cells(6)) for c in (cols[0], cols[2], cols[3])])
    f = fit(cols, need)
    assert [c.head for c, _ in f.pieces[0]] == ["u", "a", "b"]
    assert f.notes == ["the same in every row, so not shown: count 1,048,576, flags none"]
    assert f.pieces[0][1][1] == ["-0.000891235", "12345.7", "1.5e-30"]
    f = fit(cols, need - 2)  # two characters short: one digit fewer is enough
    assert len(f.pieces) == 1 and f.pieces[0][1][1] == ["-0.00089123", "12346", "1.5e-30"]
    assert f.notes[1] == f"numbers to 5 significant digits to fit {need - 2} columns (--format csv or json: every digit)"
    f = fit(cols, 20)  # too narrow for two number columns: wrapped, the key column in each
    assert [[c.head for c, _ in p] for p in f.pieces] == [["u", "a"], ["u", "b"]]
    for width in (20, 30, 40):
        text = _render(cols, width)
        assert ELLIPSIS not in text
        assert all(len(line) <= width for line in text.splitlines())
        units = parse_block(text.splitlines())
        for k, v in enumerate(vals):
            for head in ("a", "b"):
                cell = units[str(k)][head]
                assert_printed(cell, v)
                digits = len(Decimal(cell).normalize().as_tuple().digits)
                assert digits >= FLOOR_DIGITS or f"{v:.{FLOOR_DIGITS}g}" == cell, cell


def test_fit_never_drops_a_column_of_one_row_or_the_key():
    cols = [Column("u", ["0"], kind="text", key=True), Column("a", [1.25]), Column("b", [2.5])]
    f = fit(cols, 6)
    assert not any("not shown" in n for n in f.notes)
    assert [[c.head for c, _ in p] for p in f.pieces] == [["u", "a"], ["u", "b"]]


def test_a_column_wider_than_the_console_folds_never_cuts():
    cols = [Column("u", ["0"], kind="text", key=True), Column("a", [-1.23456789e-300])]
    text = _render(cols, 8)
    assert ELLIPSIS not in text
    folded = "".join(line.split("│")[1].strip() for line in text.splitlines() if "│" in line)
    assert folded == "-1.235e-300"  # over three lines, every character kept


# ---- --summary ---------------------------------------------------------------------------------


@pytest.fixture
def forty_arrays(tmp_path):
    """40 arrays of differing shapes; array 3 has a NaN, array 7 a constant channel, array 9
    an all-zero channel."""
    rng = np.random.default_rng(20)
    arrays = {}
    for k in range(40):
        x = rng.normal(size=(4, 2 + k % 5, 6)) * (k + 1) + k
        arrays[f"layer{k:02d}.out"] = x
    arrays["layer03.out"][0, 0, 0] = np.nan
    arrays["layer07.out"][:, 1] = 3.0
    arrays["layer09.out"][:, 0] = 0.0
    np.savez(tmp_path / "many.npz", **arrays)
    return tmp_path / "many.npz", arrays


def _summary_rows(out: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]


def _range_cells(cell: str) -> tuple[str, str]:
    lo, hi = cell.split(" .. ")
    return lo, hi


@pytest.mark.parametrize("width", ["140", "40"])
def test_summary_is_one_line_per_array(forty_arrays, monkeypatch, width):
    path, arrays = forty_arrays
    monkeypatch.setenv("COLUMNS", width)  # never wrapped, whatever the width
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "--summary", "-q")
    assert rc == 0, err
    rows = _summary_rows(out)
    assert len(out.splitlines()) == 41
    assert rows[0] == ["array", "shape", "layout", "reduce", "units", "mean", "std", "flags"]
    for row, (name, x) in zip(rows[1:], sorted(arrays.items()), strict=True):
        ref = ref_moments(x, "NCL")
        assert row[:5] == [name, "x".join(map(str, x.shape)), "NCL", "NL", str(x.shape[1])]
        lo, hi = _range_cells(row[5])
        assert_printed(lo, float(np.nanmin(ref.mean)), 6)
        assert_printed(hi, float(np.nanmax(ref.mean)), 6)
        lo, hi = _range_cells(row[6])
        assert_printed(lo, float(np.nanmin(ref.std)), 6)
        assert_printed(hi, float(np.nanmax(ref.std)), 6)
        want = {"layer03.out": "1 with NaN", "layer07.out": "1 zero variance",
                "layer09.out": "1 zero variance"}.get(name, "none")
        assert row[7] == want, (name, row)


def test_summary_of_hist_and_show(forty_arrays, tmp_path):
    path, arrays = forty_arrays
    rc, out, err = run_inproc("hist", path, "--layout", "NCL", "--summary", "-q", "--bins", "8")
    assert rc == 0, err
    rows = {r[0]: r for r in _summary_rows(out)[1:]}
    assert len(rows) == 40
    assert rows["layer09.out"][7] == "1 zero variance, 1 dead (all zero)"
    assert rows["layer03.out"][7] == "1 with NaN"
    rc, _, err = run_inproc("moments", path, "--layout", "NCL", "-q", "-o", tmp_path / "s.npz")
    assert rc == 0, err
    rc, shown, err = run_inproc("show", tmp_path / "s.npz", "--summary")
    assert rc == 0 and err == "", err
    rc, direct, err = run_inproc("moments", path, "--layout", "NCL", "--summary", "-q")
    assert shown == direct


@pytest.mark.parametrize("extra, message", [
    (["--format", "json"], r"--summary is a text view and --format is json"),
    (["--format", "csv"], r"--summary is a text view and --format is csv"),
    (["-o", "{tmp}/s.csv"], r"--summary is a text view and --format is csv"),
    (["-o", "{tmp}/s.npz"], r"--summary is a text view and --format is npz"),
    (["--top", "3"], r"--summary shows no unit rows: drop --top"),
    (["--all", "--sort", "var"], r"--summary shows no unit rows: drop --sort and --all"),
])
def test_summary_with_other_outputs_is_a_usage_error(forty_arrays, tmp_path, extra, message):
    path, _ = forty_arrays
    extra = [e.format(tmp=tmp_path) for e in extra]
    for cmd in ("moments", "hist"):
        assert_fails(run_inproc(cmd, path, "--layout", "NCL", "--summary", *extra), 2, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.npz"]


# ---- CSV unit coordinates ----------------------------------------------------------------------


@pytest.mark.parametrize("norm, extra, heads, unit_head", [
    ("batch", [], ["c"], "c"),
    ("instance", [], ["n", "c"], "n/c"),
    ("group", ["--groups", "2"], ["n", "g"], "n/g"),
    ("layer", [], ["n"], "n"),
])
def test_csv_unit_coordinates(tmp_path, norm, extra, heads, unit_head):
    rng = np.random.default_rng(21)
    x = rng.normal(size=(3, 4, 5))
    np.save(tmp_path / "x.npy", x)
    args = ["moments", tmp_path / "x.npy", "--layout", "NCL", "--norm", norm, *extra, "-q"]
    rc, out, err = run_inproc(*args, "--format", "csv")
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0])[-len(heads):] == heads
    ref = ref_moments(x, "NCL", norm, 2 if norm == "group" else None)
    assert len(rows) == int(np.prod(ref.unit_shape))
    rc, table, err = run_inproc(*args, "--all")
    assert rc == 0, err
    (block,) = table_blocks(table)
    assert next(line for line in block if "┃" in line).split("┃")[0].strip() == unit_head
    labels = list(parse_block(block))
    for row, label in zip(rows, labels, strict=True):
        flat = int(row["unit"])
        at = np.unravel_index(flat, ref.unit_shape)
        assert [int(row[h]) for h in heads] == [int(i) for i in at]
        assert label == (str(int(at[0])) if len(heads) == 1 else
                         " ".join(f"{h}{int(i)}" for h, i in zip(heads, at)))
        assert float(row["mean"]) == pytest.approx(ref.mean.ravel()[flat], rel=1e-12)


def test_csv_coordinates_of_arrays_with_different_unit_axes(tmp_path):
    """Statistics of an instance-norm array (n, c) and a batch-norm one (c): the CSV
    has both columns, n empty for the batch-norm rows; hist's CSV has them too."""
    import bnstat
    from bnstat.render import write_csv

    rng = np.random.default_rng(22)
    np.save(tmp_path / "inst.npy", rng.normal(size=(2, 3, 4)))
    stats = bnstat.moments(rng.normal(size=(2, 3, 4)), layout="NCL", norm="instance")
    stats = {"inst": stats.popitem()[1]}
    stats["bn"] = bnstat.moments(rng.normal(size=(5, 2)), layout="NC").popitem()[1]
    buf = io.StringIO()
    write_csv(stats, buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert list(rows[0])[-2:] == ["n", "c"]
    inst = rows[:6]
    bn = rows[6:]
    assert [(r["n"], r["c"]) for r in inst] == [(str(n), str(c)) for n in range(2) for c in range(3)]
    assert [(r["n"], r["c"]) for r in bn] == [("", "0"), ("", "1")]
    rc, out, err = run_inproc("hist", tmp_path / "inst.npy", "--layout", "NCL", "--norm", "instance",
                              "--bins", "4", "--format", "csv", "-q")
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(int(r["unit"]), int(r["n"]), int(r["c"])) for r in rows] == [
        (k, *np.unravel_index(k, (2, 3))) for k in range(6)]


# ---- info and fold ------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [80, 60, 40])
def test_info_never_cuts_a_shape_or_size(monkeypatch, width):
    """`info` on the sample files: every shape, chunk shape and size whole, whatever the width
    (the file and array columns lead every piece)."""
    import json
    import os

    from helpers import SAMPLE

    paths = [os.path.join(SAMPLE, n) for n in ("acts.h5", "acts.npz")]
    rc, out, err = run_inproc("info", *paths, "--format", "json")
    assert rc == 0, err
    records = json.loads(out)["arrays"]
    monkeypatch.setenv("COLUMNS", str(width))
    rc, out, err = run_inproc("info", *paths)
    assert rc == 0, err
    assert ELLIPSIS not in out and max(map(len, out.splitlines())) <= width
    text = "".join(out.split())
    for r in records:
        assert "x".join(map(str, r["shape"])) in text
        if r.get("chunks"):
            assert "x".join(map(str, r["chunks"])) in text


@pytest.mark.parametrize("width", [80, 60])
def test_fold_plan_never_cuts_a_number(tmp_path, monkeypatch, width):
    """The plan of the sample model at 80 and 60 columns: channels and errors whole, the
    columns that are the same for every pair named in the note."""
    import os

    from helpers import SAMPLE

    monkeypatch.setenv("COLUMNS", str(width))
    rc, out, err = run_inproc("fold", os.path.join(SAMPLE, "model.npz"), "-o", tmp_path / "f.npz",
                              "--check")
    assert rc == 0, err
    assert ELLIPSIS not in out and max(map(len, out.splitlines())) <= width
    pairs = parse_block([line for line in out.splitlines() if "┃" in line or "│" in line])
    with np.load(os.path.join(SAMPLE, "model.npz")) as z:
        channels = {k[:-len(".running_mean")]: z[k].size for k in z.files if k.endswith(".running_mean")}
    # parse_block keys rows by the first cell (conv); the bn is the second
    assert sorted(u["bn"] for u in pairs.values()) == sorted(channels)
    for u in pairs.values():
        assert int(u["channels"]) == channels[u["bn"]]
        assert float(u["max rel err"]) <= 1e-5
    assert "the same in every row, so not shown: eps 1e-05" in notes_of(out)


def test_array_names_that_look_like_markup_are_printed_as_they_are(tmp_path):
    """A name such as ``blk[/b]`` was read as rich markup: an internal error (MarkupError)."""
    np.savez(tmp_path / "m.npz", **{"blk[/b]": np.arange(12.0).reshape(3, 4),
                                    "x[bold]": np.ones((3, 4))})
    for cmd in (["moments"], ["hist", "--bins", "3"], ["moments", "--summary"]):
        rc, out, err = run_inproc(cmd[0], tmp_path / "m.npz", "--layout", "NC", "-q", *cmd[1:])
        assert rc == 0 and "internal error" not in err, err
        assert "blk[/b]" in out and "x[bold]" in out


@pytest.mark.parametrize("width", [80, 60])
def test_recalibrate_table_never_cuts_a_number(tmp_path, monkeypatch, width):
    from test_recalibrate import acts, pytorch_model, two_pass

    x = acts()
    np.save(tmp_path / "bn1.npy", x)
    pytorch_model(tmp_path / "m.npz")
    monkeypatch.setenv("COLUMNS", str(width))
    rc, out, err = run_inproc("recalibrate", tmp_path / "m.npz", tmp_path / "bn1.npy", "--layout",
                              "NCHW", "-o", tmp_path / "o.npz")
    assert rc == 0, err
    assert ELLIPSIS not in out
    table = [line for line in out.splitlines() if "┃" in line or "│" in line or "━" in line]
    assert max(map(len, table)) <= width  # (the title and note are single lines, never cut)
    rows = parse_block(table)
    assert set(rows) == {"bn1", "head.bn"}
    mean, m2, n = two_pass(x)
    assert rows["bn1"]["channels"] == str(mean.size)
    assert rows["bn1"]["values/channel"] == f"{n:,}"
    # the new mean of the channel named, whole, in its (wrapped) cell
    cell = rows["bn1"]["largest mean change: old -> new"]
    i = int(re.match(r"c (\d+):", cell).group(1))
    assert f"-> {mean[i]:.6g}" in cell
