"""The plan's records (Pair, Unpaired) and what the user says: --pair and plan files."""

from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass, field

from bnstat.errors import InputError, UsageProblem
from bnstat.folding.layers import _KERAS_SUFFIX, KINDS, _KIND_ALIASES, Layer
from bnstat.folding.readings import Reading

# ---- the plan ----------------------------------------------------------------

# What a pair can rest on, strongest first (the plan's "evidence" lists them).
EVIDENCE = ("--pair", "plan", "graph", "module type", "sequential neighbours", "names", "shapes",
            "file order")

@dataclass
class Pair:
    """One BN folded into one layer."""

    conv: Layer
    bn: Layer
    reading: Reading
    eps: float
    by: str  # the rule that paired them: --pair, plan, model graph, sequence, name, layer order, shape
    eps_source: str = "default"
    note: str = ""
    # what the pair rests on, among EVIDENCE; an assumption is what the file could not settle
    evidence: tuple[str, ...] = ()
    assumption: str = ""
    check_abs: float | None = None
    check_rel: float | None = None
    tolerance: float | None = None

    @property
    def certain(self) -> bool:
        return not self.assumption

    @property
    def ok(self) -> bool:
        return self.check_rel is None or (not math.isnan(self.check_rel)
                                          and self.check_rel <= self.tolerance)

    def record(self) -> dict:
        rec = {"conv": self.conv.display, "bn": self.bn.display, "kind": self.reading.kind,
               "layout": self.reading.layout, "groups": self.reading.groups,
               "channels": self.reading.channels, "eps": self.eps, "by": self.by,
               "evidence": list(self.evidence), "certain": self.certain}
        if self.assumption:
            rec["assumption"] = self.assumption
        if self.note:
            rec["note"] = self.note
        if self.check_rel is not None:
            rec["check"] = {"max_abs_error": _json_float(self.check_abs),
                            "max_rel_error": _json_float(self.check_rel),
                            "tolerance": self.tolerance, "ok": self.ok}
        return rec


@dataclass
class Unpaired:
    """A BN left unfolded, and why."""

    bn: Layer
    reason: str
    candidates: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return {"bn": self.bn.display, "channels": self.bn.channels, "conv": None,
                "reason": self.reason, "candidates": self.candidates}


def _json_float(v):
    return None if v is None or not math.isfinite(v) else v


@dataclass
class Explicit:
    conv: str | None  # None: leave the BN unfolded
    bn: str
    kind: str | None = None
    groups: int | None = None
    eps: float | None = None
    source: str = "--pair"
    certain: bool = True  # a plan entry with "certain": false stays an assumption


def resolve(name: str, layers: list[Layer], what: str, source: str) -> Layer:
    """The layer a user means by ``name``: a layer name, an array key or a unique suffix.

    Raises UsageProblem when nothing or several layers match.
    """
    for ly in layers:
        if name in (ly.name, ly.display):
            return ly
    for ly in layers:
        if name in ly.params.values() or name in {_KERAS_SUFFIX.sub("", k) for k in ly.params.values()}:
            return ly
    hits = [ly for ly in layers
            if any(full.endswith(sep + name) for full in (ly.name, ly.display) for sep in "./")]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise UsageProblem(f"{source}: {what} {name!r} matches several layers: "
                           + ", ".join(ly.display for ly in hits[:6]),
                           "Give the full layer name.")
    close = difflib.get_close_matches(name, [ly.display for ly in layers], n=3)
    raise UsageProblem(f"{source}: no layer {name!r} in the model",
                       f"Did you mean {' or '.join(close)}?" if close else
                       "List the layers with: bnstat fold MODEL --dry-run")


# ---- plans and pairs from the user ---------------------------------------------

def parse_pair(text) -> Explicit:
    """'CONV=BN' (or a (conv, bn) tuple) -> Explicit. Raises UsageProblem."""
    if isinstance(text, tuple | list):
        if len(text) != 2:
            raise UsageProblem(f"--pair {text!r}: give (CONV, BN)")
        return Explicit(str(text[0]), str(text[1]))
    conv, sep, bn = str(text).partition("=")
    if not sep or not conv.strip() or not bn.strip():
        raise UsageProblem(f"--pair {text}: write CONV=BN, e.g. --pair features.0=features.1")
    return Explicit(conv.strip(), bn.strip())


def _kind(value, where: str) -> str | None:
    if value is None:
        return None
    kind = _KIND_ALIASES.get(str(value).lower().replace(" ", ""))
    if kind is None:
        raise InputError(f"{where}: unknown kind {value!r}", f"Use one of: {', '.join(KINDS)}.")
    return kind


_LAYOUT_KINDS = {"OI": "linear", "IO": "dense"}


def _kind_from_layout(layout, where: str) -> str | None:
    if layout is None:
        return None
    text = str(layout).upper()
    if text in _LAYOUT_KINDS:
        return _LAYOUT_KINDS[text]
    if text.startswith("OI"):
        return "conv"
    if text.startswith("IO"):
        return "conv_transpose"
    if text.endswith("IO"):
        return "conv"
    if text.endswith("OI"):
        return "conv_transpose"
    if text.endswith("CM"):
        return "depthwise"
    raise InputError(f"{where}: unknown layout {layout!r}", "Examples: OIHW, IOHW, OI, HWIO, HWOI, IO, HWCM.")


def load_plan(plan, label: str | None = None) -> tuple[list[Explicit], float | None]:
    """The explicit pairs of a plan (a path or a parsed dict) and its default eps.

    Raises InputError for an unreadable or malformed plan.
    """
    if isinstance(plan, str | os.PathLike):
        label = os.fspath(plan)
        try:
            with open(plan, encoding="utf-8") as fh:
                doc = json.load(fh)
        except FileNotFoundError as exc:
            raise InputError(f"{label}: no such plan file") from exc
        except OSError as exc:
            raise InputError(f"{label}: cannot read the plan: {exc.strerror}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InputError(f"{label}: not a JSON plan ({str(exc)[:200]})",
                             "Write one with: bnstat fold MODEL --dry-run --plan FILE") from exc
    else:
        doc = plan
        label = label or "plan"
    if not isinstance(doc, dict):
        raise InputError(f"{label}: a plan is a JSON object with \"pairs\"")
    out: list[Explicit] = []
    plan_eps = _eps_value(doc.get("eps"), f"{label}: eps")
    for i, rec in enumerate(doc.get("pairs") or []):
        where = f"{label}: pairs[{i}]"
        if not isinstance(rec, dict) or not isinstance(rec.get("bn"), str):
            raise InputError(f"{where}: each pair needs \"bn\" (and \"conv\")")
        conv = rec.get("conv")
        if conv is not None and not isinstance(conv, str):
            raise InputError(f"{where}: \"conv\" must be a layer name or null")
        kind = _kind(rec.get("kind"), where)
        from_layout = _kind_from_layout(rec.get("layout"), where)
        if kind and from_layout and {kind, from_layout} not in ({"linear", "dense"},) \
                and kind != from_layout and rec.get("kind") is not None:
            if not (kind == "separable" and from_layout == "conv"):
                raise InputError(f"{where}: kind {rec.get('kind')} and layout {rec.get('layout')} "
                                 "disagree")
        kind = kind or from_layout
        groups = rec.get("groups")
        if groups is not None and (not isinstance(groups, int) or groups < 1):
            raise InputError(f"{where}: groups must be a positive integer")
        certain = rec.get("certain", True)
        if not isinstance(certain, bool):
            raise InputError(f"{where}: \"certain\" must be true or false")
        out.append(Explicit(conv, rec["bn"], kind, groups, _eps_value(rec.get("eps"), where + ": eps"),
                            source=f"plan {label}", certain=certain))
    for i, rec in enumerate(doc.get("unfolded") or []):
        if not isinstance(rec, dict) or not isinstance(rec.get("bn"), str):
            raise InputError(f"{label}: unfolded[{i}] needs \"bn\"")
        out.append(Explicit(None, rec["bn"], source=f"plan {label}"))
    return out, plan_eps


def _eps_value(v, where: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise InputError(f"{where}: eps must be a number >= 0")
    return float(v)


