"""Folding BatchNorm into the conv / conv-transpose / linear layer that feeds it (README "bnstat fold").

With s = gamma / sqrt(var + eps), computed in float64::

    W' = W * s   along W's output channels
    b' = (b - mean) * s + beta      (b = 0 where the layer had no bias)

and the results cast back to the weight's dtype.

The pieces, in the order :func:`fold` runs them:

1. :func:`parse_layers`: array names -> layers. PyTorch state_dict naming
   (``x.weight``, ``y.running_mean``...) and Keras naming (``kernel``,
   ``gamma``, ``moving_mean``..., with ``:0`` suffixes and the nesting of
   Keras HDF5 files) are both recognised, layer by layer.
2. :func:`make_plan`: every BatchNorm paired with the layer that feeds it,
   from explicit pairs (``--pair``, a plan file), then names, then shapes
   and file order. A BN that cannot be paired unambiguously is reported
   with the reason and left alone: never guessed (the heuristics are listed
   in :data:`PAIRING_RULES`).
3. :func:`bnstat.folding.apply.apply_plan` with :func:`bnstat.folding.math.fold_weights`:
   the folding math for every weight layout (README "bnstat fold"), with ``--bn drop``
   or ``--bn identity``; refusals (negative or NaN
   variance, NaN parameters, channel mismatches) are DataErrors naming the
   layer, raised before anything is written.
4. :func:`bnstat.folding.check.check_plan`: each folded layer against the original layer then
   BN (inference mode), on random inputs, through the pure-numpy reference
   convolution / transposed convolution / matmul of this module.

No click and no rich here; :mod:`bnstat.render.fold` draws the plan.
"""


from __future__ import annotations

import json
from math import isfinite  # not `import math`: bnstat.folding.math is this package's submodule
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from bnstat.errors import DataError, InputError, OutputError, UsageProblem, warn
from bnstat.folding.apply import apply_plan
from bnstat.folding.check import CHECK_SCOPE, check_plan
from bnstat.folding.keras import apply_keras_config, keras_graph
from bnstat.folding.layers import (CONVENTION_LABEL, DEFAULT_EPS, KERAS, PYTORCH, Layer,
                                   apply_layer_metadata, convention_of, parse_layers)
from bnstat.folding.pairing import PAIRING_RULES, make_plan
from bnstat.folding.plans import Pair, Unpaired, load_plan, parse_pair
from bnstat.folding.readings import Reading

__all__ = ["fold", "describe_model", "FoldResult", "Pair", "Unpaired", "Layer", "Reading",
           "parse_layers", "make_plan", "DEFAULT_EPS", "PAIRING_RULES", "FoldCheckError",
           "FoldAssumptionError", "CHECK_SCOPE"]

# ---- the API -------------------------------------------------------------------

@dataclass
class FoldResult:
    """What :func:`fold` did: the plan, the checks, the folded arrays."""

    source: str
    convention: str | None
    order_source: str
    bn_mode: str
    eps: float | None  # --eps, or None for the conventions' defaults
    pairs: list[Pair]
    unpaired: list[Unpaired]
    arrays: dict[str, np.ndarray]  # the folded model, in order
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    checked: bool = False
    output: str | None = None
    output_format: str | None = None
    plan_output: str | None = None
    layer_count: int = 0
    dry_run: bool = False
    requested_output: str | None = None  # -o given with a dry run
    # --check on the whole model (a file with a graph): max_rel_error, tolerance, ok; or refused
    model_check: dict | None = None

    @property
    def failed(self) -> list[Pair]:
        """Pairs whose check exceeded the tolerance."""
        return [p for p in self.pairs if not p.ok]

    @property
    def assumed(self) -> list[Pair]:
        """Pairs that rest on an assumption (warned about; refused with strict=)."""
        return [p for p in self.pairs if not p.certain]

    @property
    def default_eps(self) -> dict[str, float]:
        convs = {p.bn.convention for p in self.pairs} | {u.bn.convention for u in self.unpaired}
        return {c: DEFAULT_EPS[c] for c in sorted(convs)}

    def plan_dict(self) -> dict:
        """The plan as JSON-ready data (what --dry-run --plan FILE writes)."""
        from bnstat._version import __version__

        doc = {"bnstat": __version__, "model": self.source,
               "convention": self.convention, "order": self.order_source,
               "bn": self.bn_mode, "pairs": [p.record() for p in self.pairs],
               "unfolded": [u.record() for u in self.unpaired]}
        if self.eps is not None:
            doc["eps"] = self.eps
        return doc

    def report_dict(self) -> dict:
        """The plan plus what was done (what fold --format json prints)."""
        doc = self.plan_dict()
        doc.update({"assumed": [f"{p.conv.display}={p.bn.display}" for p in self.assumed],
                    "dry_run": self.dry_run, "output": self.output,
                    "output_format": self.output_format, "plan_output": self.plan_output,
                    "added": self.added, "removed": self.removed})
        if self.checked:
            doc["check_scope"] = CHECK_SCOPE
            doc["model_check"] = self.model_check
            doc["check_failed"] = [f"{p.conv.display}={p.bn.display}" for p in self.failed]
        return doc

    def plan_json(self) -> str:
        return json.dumps(self.plan_dict(), indent=1, allow_nan=False) + "\n"


class FoldCheckError(DataError):
    """--check found a pair over tolerance; ``result`` holds the plan with the errors."""

    def __init__(self, result: FoldResult):
        bad = result.failed
        names = ", ".join(f"{p.conv.display}+{p.bn.display}" for p in bad[:4])
        what = (f"the check failed for {len(bad)} pair(s) ({names}): the folded layer differs "
                "from layer then BN" if bad else "the whole folded model differs from the "
                f"original (max relative error {result.model_check['max_rel_error']:.2e})")
        super().__init__(f"{result.source}: {what}; nothing written",
                         "Check the pairing and kinds in the plan (bnstat fold --dry-run --plan FILE).")
        self.result = result


class FoldAssumptionError(DataError):
    """strict= and a pair rests on an assumption; ``result`` holds the plan."""

    def __init__(self, result: FoldResult):
        bad = result.assumed
        names = "; ".join(f"{p.conv.display}+{p.bn.display}: {p.assumption}" for p in bad)
        super().__init__(f"{result.source}: --strict/strict=: {len(bad)} pair(s) rest on an "
                         f"assumption, nothing written: {names}",
                         "Settle each with a plan entry (bnstat fold MODEL --dry-run --plan FILE, "
                         "set its \"kind\" and \"certain\": true) or --pair CONV=BN.")
        self.result = result


def _warn_assumed(result: FoldResult) -> None:
    for p in result.assumed:
        warn(f"{p.conv.display} <- {p.bn.display}: folded on an assumption: {p.assumption}. "
             "Settle it with a plan entry (bnstat fold MODEL --dry-run --plan FILE; set \"kind\" "
             "and \"certain\": true) or --pair; --strict refuses such pairs")


def _check_outputs(output, plan_output, force: bool, inputs: list) -> None:
    """Refuse outputs that would overwrite something, before any work. Raises OutputError."""
    from bnstat.io.atomic import check_output

    if output is not None:
        check_output(output, force=force, inputs=inputs)
    if plan_output is not None:
        if os.path.exists(plan_output) and not force and not os.path.isdir(plan_output):
            raise OutputError(f"{plan_output}: the plan file exists; with --dry-run, --plan FILE is "
                              "where the plan is written; nothing was written",
                              "Use --force to replace it, or drop --dry-run to fold with it.")
        check_output(plan_output, force=force, inputs=inputs)


def _explicit(pairs, plan) -> tuple[list, float | None]:
    """The explicit pairs (--pair first: it wins over the plan) and the plan's eps."""
    explicit = [parse_pair(p) for p in pairs]
    plan_eps = None
    if plan is not None:
        from_plan, plan_eps = load_plan(plan)
        listed = {e.bn for e in explicit}
        explicit += [e for e in from_plan if e.bn not in listed]
    return explicit, plan_eps


def _check(result: FoldResult, model, layers, graph, seed: int) -> None:
    """--check: every pair, and the whole model where the file has a graph. Raises
    FoldCheckError."""
    check_plan(result, model, seed)
    if graph and getattr(model, "config", None):
        from bnstat.folding.graphcheck import check_model

        result.model_check = check_model(graph, model.config, layers, model.arrays,
                                         result.arrays, np.random.default_rng(seed))
    if result.failed or not (result.model_check or {}).get("ok", True):
        raise FoldCheckError(result)


def _layers_of(model) -> tuple[list[Layer], dict | None]:
    layers = parse_layers(model.entries)
    sequence = getattr(model, "layer_sequence", None)
    if sequence:
        for ly in layers:
            tops = [i for i, g in enumerate(sequence) if ly.name == g or ly.name.startswith(g + "/")]
            ly.seq = tops[-1] if tops else None
    graph = keras_graph(model.config) if getattr(model, "config", None) else None
    if graph:
        apply_keras_config(layers, graph)
    apply_layer_metadata(layers, (getattr(model, "metadata", None) or {}).get("layers")
                         if isinstance(getattr(model, "metadata", None), dict) else None)
    return layers, graph


def _load(source):
    from bnstat.io.models import ModelFile, read_model

    if isinstance(source, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
        entries = {k: (a.shape, a.dtype) for k, a in arrays.items()}
        return ModelFile(None, "memory", entries, arrays=arrays)
    return read_model(os.fspath(source))


def fold(source, *, output: str | None = None, pairs: Iterable = (), plan=None,
         eps: float | None = None, bn: str = "drop", check: bool = False, dry_run: bool = False,
         plan_output: str | None = None, force: bool = False, seed: int = 0,
         strict: bool = False) -> FoldResult:
    """Fold every BatchNorm of a model into the layer that feeds it.

    ``source``: a model file (.npz, HDF5, .safetensors) or a mapping of named
    arrays. ``pairs``: ``"CONV=BN"`` strings or ``(conv, bn)`` tuples;
    ``plan``: a plan file or dict (its pairs and unfolded BNs are explicit);
    ``eps``: overrides every default. ``bn``: ``"drop"`` removes the folded
    BNs' arrays and gives every folded layer a bias; ``"identity"`` keeps the
    keys, the BN computing x + shift. ``check``: run every pair against the
    original on random inputs (and, where the file carries a graph, the
    whole model). ``strict``: refuse to fold when a pair rests on an
    assumption (FoldAssumptionError, nothing written). With ``output`` (and not ``dry_run``) the
    folded model is written there atomically, in the format its extension
    names (else the input's); ``plan_output`` receives the plan as JSON.

    Returns a :class:`FoldResult`. Raises InputError (unreadable model or
    plan), DataError (refusals: negative/NaN variance, NaN parameters,
    channel mismatch; FoldCheckError when a check fails; FoldAssumptionError
    with ``strict``), UsageProblem (bad
    pairs), OutputError. Nothing is written when it raises.
    """
    from bnstat.io.atomic import atomic_open
    from bnstat.io.models import write_model

    if bn not in ("drop", "identity"):
        raise UsageProblem(f"bn={bn!r}: use 'drop' or 'identity'")
    if eps is not None and not (isfinite(eps) and eps >= 0):
        raise UsageProblem(f"eps={eps!r}: eps must be a number >= 0")
    path = None if isinstance(source, Mapping) else os.fspath(source)
    inputs = [path] if path else []
    if isinstance(plan, str | os.PathLike):
        inputs.append(os.fspath(plan))
    _check_outputs(None if dry_run else output, plan_output, force, inputs)

    model = _load(source)
    layers, graph = _layers_of(model)
    convention = convention_of(layers)
    if not any(ly.role in ("bn", "weighted") for ly in layers):
        raise InputError(f"{model.label}: no layer weights found: not a model in PyTorch or Keras "
                         "naming (x.weight, y.running_mean / kernel, moving_mean)",
                         "List its arrays with: bnstat info " + (path or "FILE"))
    explicit, plan_eps = _explicit(pairs, plan)
    keras_order = model.ordered and (model.order_source == "Keras layer order" or model.format != "hdf5")
    found, unpaired = make_plan(layers, explicit=explicit, eps=eps, ordered=model.ordered,
                                keras_order=keras_order, plan_eps=plan_eps, graph=graph)
    if not any(ly.role == "bn" for ly in layers):
        raise DataError(f"{model.label}: no BatchNorm layers (running_mean/running_var or "
                        "moving_mean/moving_variance); nothing to fold",
                        "Give the model file whose BatchNorm layers should be folded.")

    out, added, removed = apply_plan(found, model, bn)
    result = FoldResult(model.label, convention, model.order_source if model.format != "memory"
                        else "mapping order", bn, eps, found, unpaired, out, added, removed,
                        layer_count=len(layers), dry_run=dry_run,
                        requested_output=output if dry_run else None)
    if check:
        _check(result, model, layers, graph, seed)
    if strict and result.assumed:
        raise FoldAssumptionError(result)
    _warn_assumed(result)
    if unpaired:
        names = ", ".join(u.bn.display for u in unpaired[:5]) + (" ..." if len(unpaired) > 5 else "")
        warn(f"{len(unpaired)} BatchNorm layer(s) left unfolded ({names}); the plan says why. "
             "Settle them with --pair CONV=BN or --plan FILE")
    if bn == "drop" and found and getattr(model, "config", None) and output and not dry_run \
            and model.format == "hdf5":  # a Keras 3 file's config is rewritten (io/models/keras3)
        warn(f"{model.label}: its model_config still describes the dropped BatchNorm layers: load "
             "the folded weights into a model without them (load_weights), or use --bn identity "
             "to keep the file loadable as it is")
    if plan_output is not None:
        with atomic_open(plan_output, "w", force=force, inputs=inputs) as fh:
            fh.write(result.plan_json())
        result.plan_output = plan_output
    if output is not None and not dry_run:
        result.output_format = write_model(output, out, template=model, force=force, inputs=inputs)
        result.output = output
    return result


def describe_model(source) -> list[str]:
    """The layers fold would see in a model file, as text lines (for ``bnstat info``).

    Reads names and shapes only. Returns [] for a file without layer weights
    (an activation file). Raises InputError for an unreadable file.
    """
    from bnstat.io.models import index_model

    if isinstance(source, Mapping):
        model = _load(source)
    else:
        model = index_model(os.fspath(source))
    layers, graph = _layers_of(model)
    if not any(ly.role == "bn" for ly in layers):
        return []
    keras_order = model.ordered and (model.order_source == "Keras layer order" or model.format != "hdf5")
    try:
        found, unpaired = make_plan(layers, ordered=model.ordered, keras_order=keras_order,
                                    graph=graph)
    except Exception:  # a malformed model: list nothing rather than fail `info`
        return []
    convention = convention_of(layers)
    eps = ", ".join(f"{CONVENTION_LABEL[c]} {DEFAULT_EPS[c]:g}" for c in (PYTORCH, KERAS)
                    if any(ly.convention == c and ly.role == "bn" for ly in layers))
    n_bn = sum(ly.role == "bn" for ly in layers)
    n_w = sum(ly.role == "weighted" for ly in layers)
    lines = [f"{model.label}: {CONVENTION_LABEL[convention]} naming, {n_w} conv/linear layers, "
             f"{n_bn} BatchNorm layers ({len(found)} pairable), default eps {eps}; "
             f"order: {model.order_source}"]
    for p in found:
        lines.append(f"  {p.conv.display} <- {p.bn.display}: {p.reading.label} {p.reading.layout}, "
                     f"{p.reading.channels} channels ({p.by})")
    for u in unpaired:
        lines.append(f"  {u.bn.display}: not folded: {u.reason}")
    return lines
