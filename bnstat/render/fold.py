"""Rich rendering of a fold plan: the pairs (with the check's errors) and the BNs left unfolded.

The plan is the output `bnstat fold` is asked for, so it goes to standard
output; warnings stay on standard error (bnstat.cli prints them).
"""

from __future__ import annotations

import json
import math

from bnstat.folding import CHECK_SCOPE, CONVENTION_LABEL, FoldResult
from bnstat.render.console import emit_rich


def _err(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf"
    return f"{v:.2e}"


def _eps_line(result: FoldResult) -> str:
    if result.eps is not None:
        return f"eps {result.eps:g} (--eps)"
    counts: dict[str, int] = {}
    for p in result.pairs:
        counts[p.eps_source] = counts.get(p.eps_source, 0) + 1
    parts = [f"{CONVENTION_LABEL[c]} default {e:g}" for c, e in result.default_eps.items()]
    for source in ("model config", "plan"):
        if counts.get(source):
            parts.append(f"from the {source} for {counts[source]} pair(s)")
    return "eps: " + ("; ".join(parts) if parts else "-") + " (change with --eps)"


def _evidence(p):
    from rich.text import Text

    text = Text(", ".join(p.evidence))
    if not p.certain:
        text.append(" ASSUMED: " + p.assumption, style="bold yellow")
    return text


def print_json(result: FoldResult, *, file=None) -> None:
    """The plan and what was done as JSON on standard output (fold --format json)."""
    import sys

    (file or sys.stdout).write(json.dumps(result.report_dict(), indent=1, allow_nan=False) + "\n")


def plan_columns(result: FoldResult) -> list:
    """The columns of the plan: one row per pair, conv and bn leading every piece."""
    from rich.text import Text

    from bnstat.render.fit import Column

    pairs = result.pairs
    checked = result.checked or any(p.check_rel is not None for p in pairs)
    grouped = any(p.reading.groups != 1 for p in pairs)
    columns = [Column("conv", [p.conv.display for p in pairs], kind="text", key=True, justify="left"),
               Column("bn", [p.bn.display for p in pairs], kind="text", key=True, justify="left"),
               Column("kind", [p.reading.label for p in pairs], kind="text", justify="left"),
               Column("layout", [p.reading.layout for p in pairs], kind="text", justify="left"),
               Column("channels", [p.reading.channels for p in pairs], kind="int")]
    if grouped:
        columns.append(Column("groups", [p.reading.groups for p in pairs], kind="int"))
    columns += [Column("eps", [f"{p.eps:g}" for p in pairs], kind="text"),
                Column("by", [p.by for p in pairs], kind="text", justify="left"),
                Column("evidence", [_evidence(p) for p in pairs], kind="text", wrap=True,
                       justify="left")]
    if checked:
        def status(p):
            if p.check_rel is None:
                return Text("-")
            return Text("ok", style="green") if p.ok else Text(f"FAIL > {p.tolerance:.1e}", style="bold red")

        columns += [Column("max abs err", [_err(p.check_abs) for p in pairs], kind="text"),
                    Column("max rel err", [_err(p.check_rel) for p in pairs], kind="text"),
                    Column("check", [status(p) for p in pairs], kind="text", justify="left")]
    columns.append(Column("note", [p.note for p in pairs], kind="text", wrap=True, justify="left"))
    return columns


def unpaired_columns(result: FoldResult) -> list:
    from bnstat.render.fit import Column

    un = result.unpaired
    return [Column("bn", [u.bn.display for u in un], kind="text", key=True, justify="left"),
            Column("channels", [u.bn.channels for u in un], kind="int"),
            Column("why", [u.reason for u in un], kind="text", wrap=True, justify="left"),
            Column("candidates", [", ".join(u.candidates) or "-" for u in un], kind="text",
                   wrap=True, justify="left")]


def print_plan(result: FoldResult, *, file=None) -> None:
    """The plan table, then the unfolded BNs and what was written (render.emit_rich)."""
    emit_rich(lambda console: _print_plan(result, console), file=file, width=160)


def _print_plan(result: FoldResult, console) -> None:
    from rich.markup import escape

    from bnstat.render.fit import draw_table

    if result.checked:
        console.print(f"--check verifies {CHECK_SCOPE}")
    if result.pairs:
        console.print(f"{result.source}: {CONVENTION_LABEL[result.convention]} naming, "
                      f"{len(result.pairs)} BatchNorm layer(s) to fold, --bn {result.bn_mode}")
        draw_table(console, plan_columns(result),
                   escape(f"{_eps_line(result)}; pairing order: {result.order_source}"))
    else:
        what = "could be paired" if result.unpaired else "found"
        console.print(f"{result.source}: {CONVENTION_LABEL[result.convention]} naming; no BatchNorm "
                      f"layer to fold {what}")
    if result.unpaired:
        console.print()
        console.print(f"{len(result.unpaired)} BatchNorm layer(s) left unfolded")
        draw_table(console, unpaired_columns(result))
    lines = []
    if result.output:
        what = f"{len(result.pairs)} BN folded"
        if result.bn_mode == "drop":
            what += f", {len(result.removed)} arrays removed, {len(result.added)} biases added"
        lines.append(f"wrote {result.output} ({result.output_format}; {what})")
    if result.plan_output:
        lines.append(f"wrote the plan to {result.plan_output}")
    mc = result.model_check
    if mc is not None and "refused" in mc:
        lines.append(f"whole-model check (the file's graph) not run: {mc['refused']}")
    elif mc is not None:
        lines.append(f"whole-model check (the file's graph, random inputs {tuple(mc['input_shape'])}): "
                     f"max rel output error {_err(mc['max_rel_error'])} "
                     f"({'ok' if mc['ok'] else 'FAIL'}, tolerance {mc['tolerance']:.0e})")
    if result.failed:
        lines.append(f"check failed for {len(result.failed)} pair(s): nothing written")
    elif mc is not None and not mc.get("ok", True):
        lines.append("whole-model check failed: nothing written")
    elif result.dry_run:
        lines.append("dry run: no model written" + (f" (-o {result.requested_output} ignored)"
                                                    if result.requested_output else ""))
    for line in lines:
        console.print(line)
