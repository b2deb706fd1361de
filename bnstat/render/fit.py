"""Tables that fit the console's width without cutting a number (README, `bnstat moments`).

rich shrinks a table wider than the console by cutting cells with "…"
(``1,048,5…``). Here a table is built from columns of values, measured, and
fitted before rich sees it: when it is too wide, the columns that say the
same thing in every row are left out (a note gives their value), then the
numbers get fewer significant digits (down to ``FLOOR_DIGITS``), and last
the columns are wrapped into tables stacked one under the other, each with
the unit column. Cells fold rather than cut if even one column is wider than
the console, so every digit is printed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DIGITS = 6  # significant digits of a number when the table fits
FLOOR_DIGITS = 4  # fewer digits than this, and the table wraps instead
SEPARATOR = 3  # " │ " between two columns (show_edge=False, pad_edge=False)


def fmt_num(v: float, digits: int = DIGITS) -> str:
    """A float to ``digits`` significant digits (NaN, inf, -inf spelled out); an int with
    thousands separators."""
    if isinstance(v, float | np.floating):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}"
    return f"{v:,}"


@dataclass
class Column:
    """One column of a table: its head and the values of the rows shown.

    ``kind`` is float (to the table's digits), int or text (a str or a rich Text);
    ``fmt(value, digits)`` formats a float column otherwise. The ``key`` column (the unit) is never left
    out and heads every piece of a wrapped table.
    """

    head: str
    values: Sequence
    kind: str = "float"
    key: bool = False
    wrap: bool = False  # prose: may wrap at its spaces within a cell
    style: str | None = None
    justify: str = "right"
    fmt: Callable[[object, int], str] | None = None

    def cells(self, digits: int) -> list[str]:
        if self.fmt is not None:
            return [self.fmt(v, digits) for v in self.values]
        if self.kind == "float":
            return [fmt_num(float(v), digits) for v in self.values]
        if self.kind == "int":
            return [fmt_num(int(v)) for v in self.values]
        return [getattr(v, "plain", None) or str(v) for v in self.values]  # str, or rich Text

    def text(self, row: int, cell: str):
        """The rich Text of a cell: a text column's own Text (its styles kept), else ``cell``."""
        from rich.text import Text

        value = self.values[row]
        return value.copy() if self.kind == "text" and isinstance(value, Text) else Text(cell)


Cells = list[tuple[Column, list[str]]]


@dataclass
class Fitted:
    pieces: list[Cells]  # one table, or the stacked tables of a wrapped one
    notes: list[str]  # what was left out or shortened, for the caption


def _measure(table: Cells) -> dict[int, tuple[int, int, bool]]:
    """Per column (by the id of its cells): its natural width, its longest word, and whether
    it is prose. Measured once per fitting (a table of --all rows has many cells)."""
    from rich.cells import cell_len

    sizes = {}
    for c, cells in table:
        texts = [c.head, *cells]
        word = max([cell_len(w) for x in texts for w in x.split()] or [1]) if c.wrap else 0
        sizes[id(cells)] = (max(cell_len(x) for x in texts), word, c.wrap)
    return sizes


def width_of(table: Cells, sizes: dict | None = None) -> int:
    """The width ``table`` needs: every column whole, except that prose (``wrap`` columns)
    may wrap in its cells down to its longest word, but not below the widest other column
    (rich narrows the widest wrappable columns first, so the numbers keep their width)."""
    sizes = sizes or _measure(table)
    need = [sizes[id(cells)] for _, cells in table]
    fixed = [natural for natural, _, wrap in need if not wrap]
    prose = [min(natural, max([word, *fixed])) for natural, word, wrap in need if wrap]
    return sum(fixed) + sum(prose) + SEPARATOR * (len(table) - 1)


def _uninformative(cells: list[str]) -> bool:
    """Empty in every row, or the same in every one of two or more rows."""
    return all(x == "" for x in cells) or (len(cells) > 1 and len(set(cells)) == 1)


def _at(columns: list[Column], digits: int) -> Cells:
    return [(c, c.cells(digits)) for c in columns]


def _split(table: Cells, width: int, sizes: dict) -> list[Cells]:
    """The non-key columns in order, cut into pieces that each fit beside the key columns:
    as few pieces as filling each in turn gives, with as even a number of columns as fits
    (not five and one)."""
    keys = [t for t in table if t[0].key]
    rest = [t for t in table if not t[0].key]
    groups, cur = [], []
    for t in rest:
        if cur and width_of(keys + cur + [t], sizes) > width:
            groups.append(cur)
            cur = []
        cur.append(t)
    groups += [cur] if cur or not groups else []
    size = -(-len(rest) // len(groups))
    even = [rest[k:k + size] for k in range(0, len(rest), size)] if rest else [[]]
    if len(even) == len(groups) and all(width_of(keys + g, sizes) <= width for g in even):
        groups = even
    return [keys + g for g in groups]


def fit(columns: list[Column], width: int, digits: int = DIGITS) -> Fitted:
    """The columns fitted to ``width``: whole, without uninformative columns, with fewer
    digits, or wrapped, in that order of preference."""
    table = _at(columns, digits)
    if width_of(table) <= width:
        return Fitted([table], [])
    notes = []
    dropped = [(c, cells) for c, cells in table if not c.key and _uninformative(cells)]
    if dropped:
        said = ", ".join(f"{c.head} {cells[0] or 'none'}" if cells else c.head for c, cells in dropped)
        notes.append(f"the same in every row, so not shown: {said}")
    whole = [t for t in table if all(t[0] is not c for c, _ in dropped)]
    shorter, sizes, used = whole, _measure(whole), digits
    while used > FLOOR_DIGITS and width_of(shorter, sizes) > width:
        used -= 1
        shorter = [(c, cells) if c.kind == "text" else (c, c.cells(used)) for c, cells in whole]
        sizes = _measure(shorter)
    if any(a != b for (_, a), (_, b) in zip(whole, shorter)):
        notes.append(f"numbers to {used} significant digits to fit {width} columns "
                     "(--format csv or json: every digit)")
    if width_of(shorter, sizes) <= width:
        return Fitted([shorter], notes)
    pieces = _split(shorter, width, sizes)
    if len(pieces) > 1:
        notes.append(f"wrapped into {len(pieces)} tables to fit {width} columns")
    return Fitted(pieces, notes)


def draw_table(console, columns: list[Column], caption: str = "", digits: int = DIGITS) -> None:
    """Print ``columns`` as a table fitted to the console's width, then ``caption`` (rich
    markup) and the notes of the fitting, wrapped at the console's width."""
    from rich.markup import escape
    from rich.table import Table

    fitted = fit(columns, console.width, digits)
    for piece in fitted.pieces:
        table = Table(show_edge=False, pad_edge=False)
        for c, _ in piece:
            # fold, never no_wrap: rich crops a no_wrap cell that is too wide (the digits lost)
            table.add_column(c.head, justify=c.justify, style=c.style, overflow="fold")
        for row in range(len(piece[0][1])):
            table.add_row(*(c.text(row, cells[row]) for c, cells in piece))
        console.print(table)
    for line in [caption, *map(escape, fitted.notes)]:
        if line:
            console.print(line, style="table.caption")
