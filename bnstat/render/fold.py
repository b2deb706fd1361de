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


def plan_table(result: FoldResult):
    from rich.table import Table
    from rich.text import Text

    checked = result.checked or any(p.check_rel is not None for p in result.pairs)
    title = (f"{result.source}: {CONVENTION_LABEL[result.convention]} naming, "
             f"{len(result.pairs)} BatchNorm layer(s) to fold, --bn {result.bn_mode}")
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False,
                  caption=f"{_eps_line(result)}; pairing order: {result.order_source}",
                  caption_justify="left")
    grouped = any(p.reading.groups != 1 for p in result.pairs)
    heads = ("conv", "bn", "kind", "layout", "channels") + (("groups",) if grouped else ()) + (
        "eps", "by", "evidence")
    for head in heads:
        # fold, never no_wrap: rich crops a no_wrap cell too wide for the console (digits lost)
        table.add_column(head, justify="right" if head in ("channels", "groups", "eps") else "left",
                         overflow="fold")
    if checked:
        table.add_column("max abs err", justify="right", overflow="fold")
        table.add_column("max rel err", justify="right", overflow="fold")
        table.add_column("check", justify="left", overflow="fold")
    table.add_column("note", overflow="fold")
    for p in result.pairs:
        row = [p.conv.display, p.bn.display, p.reading.label, p.reading.layout,
               str(p.reading.channels)] + ([str(p.reading.groups)] if grouped else []) + [
               f"{p.eps:g}", p.by, _evidence(p)]
        if checked:
            status = Text("ok", style="green") if p.ok else Text(
                f"FAIL > {p.tolerance:.1e}", style="bold red")
            if p.check_rel is None:
                status = Text("-")
            row += [_err(p.check_abs), _err(p.check_rel), status]
        row.append(p.note)
        table.add_row(*row)
    return table


def unpaired_table(result: FoldResult):
    from rich.table import Table

    table = Table(title=f"{len(result.unpaired)} BatchNorm layer(s) left unfolded",
                  title_justify="left", show_edge=False, pad_edge=False)
    for head in ("bn", "channels", "why", "candidates"):
        table.add_column(head, justify="right" if head == "channels" else "left", overflow="fold")
    for u in result.unpaired:
        table.add_row(u.bn.display, str(u.bn.channels), u.reason, ", ".join(u.candidates) or "-")
    return table


def print_plan(result: FoldResult, *, file=None) -> None:
    """The plan table, then the unfolded BNs and what was written (render.emit_rich)."""
    emit_rich(lambda console: _print_plan(result, console), file=file, width=160)


def _print_plan(result: FoldResult, console) -> None:
    if result.checked:
        console.print(f"--check verifies {CHECK_SCOPE}")
    if result.pairs:
        console.print(plan_table(result))
    else:
        what = "could be paired" if result.unpaired else "found"
        console.print(f"{result.source}: {CONVENTION_LABEL[result.convention]} naming; no BatchNorm "
                      f"layer to fold {what}")
    if result.unpaired:
        console.print()
        console.print(unpaired_table(result))
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
