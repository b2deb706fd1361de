"""Pairing every BatchNorm with the layer feeding it: the rules as a list of passes.

:func:`make_plan` runs :func:`explicit_pass` and then every function of
:data:`PASSES` in turn on one :class:`PlanState`; each pass decides some
BNs (a :class:`Pair` with its evidence, or an :class:`Unpaired` with the
reason and candidates) and leaves the others to the next. The rules, as
the user reads them, are :data:`PAIRING_RULES` (README "fold").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from bnstat.errors import DataError, UsageProblem
from bnstat.folding.layers import (_BN_TOKEN, _CONV_TOKEN, _KERAS_AUTO, CONVENTION_LABEL,
                                   DEFAULT_EPS, KERAS, PYTORCH, Layer)
from bnstat.folding.plans import Explicit, Pair, Unpaired, resolve
from bnstat.folding.readings import Read, _outs_text, _readings, read
from bnstat.folding.readings import read as _read

PAIRING_RULES = """\
1. Explicit pairs first: --pair CONV=BN, then the pairs of a --plan file (which may also fix the
   kind, e.g. conv_transpose, the groups and the eps); a plan's "unfolded" BNs are left alone.
2. Model graph: a Keras model_config names the layer feeding each BN, the layer classes
   (Conv2DTranspose, DepthwiseConv2D...), groups, activations and each BN's epsilon. A BN fed by
   a non-conv layer, by a conv with a fused activation, or by a conv that also feeds other layers
   is not folded.
3. Sequential neighbours (PyTorch): BN `P.k` is fed by `P.(k-1)` (features.0/features.1). If
   `P.(k-1)` has no weights (ReLU, pooling), is a block of several layers, or is not a conv or
   linear layer, the BN is not folded: folding through another module is wrong.
4. Names differing in one segment by a BN word vs a conv word: conv1/bn1, conv0/norm0,
   stem_conv/stem_bn, or by a BN suffix or prefix: conv1/conv1_bn, Conv1/bn_Conv1. Keras'
   automatic names (conv2d_3, batch_normalization_3) are not used. A layer named for two BNs
   pairs with neither. A name partner that does not give the BN's channel count is not replaced
   by another layer.
5. Pre-activation (BN -> activation -> conv) is never folded: a BN whose channel count is its
   name partner's input and not its output count, or whose name partner comes after it in the
   file order; without a file order, a square partner (input = output = C) is pre-activation
   when the same pair of names is provably so elsewhere in the model, an assumption otherwise.
6. Keras layer order (layer_names of an HDF5 file, weightless layers included): the layer
   directly before the BN, when it is a conv or dense layer that fits.
7. Shapes, in a known file order only: the nearest weighted layer before the BN that fits it,
   in the same module, with nothing in between but layers already paired or whose output
   channels fit no unpaired BN (skipping those is an assumption). Otherwise the BN is reported
   with its candidates. BNs are taken in model order; a layer feeds at most one BN.
8. Readings: PyTorch (out, in/groups, k...) is a conv; (in, out/groups, k...) a conv-transpose
   only on evidence: its name (deconv, convT, conv_transpose, upconv...), its module type, a
   Keras config or a plan, never because the ordinary reading does not fit. A square weight
   (in = out) with nothing to tell is read as a conv: an assumption. Keras (k..., in, out) is a
   conv, (k..., out, in) a Conv2DTranspose on evidence; a depthwise kernel (k..., C, M), also
   Keras 3's `kernel` of a DepthwiseConv2D, gives output channel c*M+m; a separable conv folds
   into its pointwise kernel.
"""


@dataclass
class PlanState:
    """What the passes share: the layers, the file's order, the decisions so far."""

    layers: list[Layer]
    ordered: bool = True
    keras_order: bool = False
    graph: dict | None = None
    eps: float | None = None  # --eps
    plan_eps: float | None = None
    decided: dict[str, Pair | Unpaired] = field(default_factory=dict)  # bn name -> outcome
    claimed: dict[str, Layer] = field(default_factory=dict)  # conv name -> bn
    notes: dict[str, str] = field(default_factory=dict)  # bn name -> why its name partner is not it

    @property
    def bns(self) -> list[Layer]:
        return [ly for ly in self.layers if ly.role == "bn"]

    def open_bns(self) -> list[Layer]:
        return [bn for bn in self.bns if bn.name not in self.decided]

    def eps_for(self, bn: Layer, own: float | None = None) -> tuple[float, str]:
        if self.eps is not None:
            return self.eps, "--eps"
        if own is not None:
            return own, "plan"
        if self.plan_eps is not None:
            return self.plan_eps, "plan"
        if bn.eps is not None:
            return bn.eps, "model config"
        return DEFAULT_EPS[bn.convention], f"{CONVENTION_LABEL[bn.convention]} default"

    def pair(self, conv: Layer, bn: Layer, rd: Read, by: str, evidence: tuple[str, ...],
             assumption: str = "", own_eps: float | None = None) -> None:
        e, src = self.eps_for(bn, own_eps)
        ev = tuple(dict.fromkeys(evidence + rd.evidence))
        why = "; ".join(a for a in (assumption, rd.assumption) if a)
        self.decided[bn.name] = Pair(conv, bn, rd.reading, e, by, eps_source=src, evidence=ev,
                                     assumption=why)
        self.claimed[conv.name] = bn

    def leave(self, bn: Layer, reason: str, candidates: Iterable[Layer] = ()) -> None:
        if bn.name in self.notes:
            reason = f"{self.notes[bn.name]}; {reason}"
        self.decided[bn.name] = Unpaired(bn, reason, [ly.display for ly in candidates][:8])


def explicit_pass(state: PlanState, explicit: Iterable[Explicit]) -> None:
    """--pair and plan entries. Raises UsageProblem, DataError (channel mismatch)."""
    layers = state.layers
    for ex in explicit:
        bn = resolve(ex.bn, layers, "BN", ex.source)
        if bn.role != "bn":
            raise UsageProblem(f"{ex.source}: {bn.display} is not a BatchNorm layer (it has "
                               f"{', '.join(bn.params)}; a BN has running statistics)")
        if bn.name in state.decided:
            raise UsageProblem(f"{ex.source}: the BN {bn.display} is named twice")
        if ex.conv is None:
            state.leave(bn, f"left unfolded by {ex.source}")
            continue
        conv = resolve(ex.conv, layers, "layer", ex.source)
        if conv.role != "weighted":
            raise UsageProblem(f"{ex.source}: {conv.display} is not a conv, conv-transpose or linear "
                               f"layer (it has {', '.join(conv.params)})")
        if conv.name in state.claimed:
            raise UsageProblem(f"{ex.source}: {conv.display} is paired with two BNs ("
                               f"{state.claimed[conv.name].display} and {bn.display}); a layer "
                               "feeds one BN")
        C = bn.channels
        by = "--pair" if ex.source == "--pair" else "plan"
        rd = read(conv, C, ex.kind, ex.groups, by)
        if rd is None and ex.kind is None:  # the user says they pair: any reading that fits
            found = _readings(conv, C, None, ex.groups)
            rd = Read(found[0], ("shapes",), f"{conv.display} read as a {found[0].label} only "
                      "because that reading gives the BN's channel count") if found else None
        if rd is None:
            want = f" as {ex.kind.replace('_', '-')}" if ex.kind else ""
            raise DataError(f"{bn.display}: channel-count mismatch: the BN has {C} channels but "
                            f"{_outs_text(conv)}; refusing to fold it into {conv.display}{want} "
                            "(nothing written)",
                            "Check the pair, or the kind and groups in the plan.")
        if ex.certain:  # the user settled it: the pair, and the reading (the ordinary one by default)
            rd = Read(rd.reading, rd.evidence)
        doubt = "" if ex.certain else f"the {ex.source} entry says \"certain\": false"
        state.pair(conv, bn, rd, by, (by,), doubt, own_eps=ex.eps)


def graph_pass(state: PlanState) -> None:
    """Keras BNs whose model_config names the layer feeding them: settled by the graph."""
    graph = state.graph
    if not graph:
        return
    by_keras = {ly.keras_name: ly for ly in state.layers if ly.convention == KERAS}
    for bn in state.open_bns():
        if bn.convention != KERAS or bn.keras_name not in graph:
            continue
        ins = graph[bn.keras_name]["inputs"]
        if len(ins) != 1:
            state.leave(bn, f"the model graph feeds it from {len(ins)} layers")
            continue
        src = graph.get(ins[0], {})
        conv = by_keras.get(ins[0])
        if conv is None or conv.role != "weighted":
            what = src.get("class") or "a layer"
            state.leave(bn, f"the model graph feeds it from {ins[0]} ({what}), not from a conv or "
                        "dense layer; folding through it would be wrong")
            continue
        consumers = src.get("consumers", [])
        if len(consumers) > 1:
            others = ", ".join(c for c in consumers if c != bn.keras_name)
            state.leave(bn, f"{conv.display} also feeds {others}: folding would change their "
                        "input", [conv])
            continue
        if conv.block:
            state.leave(bn, conv.block, [conv])
            continue
        if conv.name in state.claimed:
            continue
        rd = read(conv, bn.channels)
        if rd is None:
            state.leave(bn, f"the model graph feeds it from {conv.display}, but {_outs_text(conv)}, "
                        f"not {bn.channels}", [conv])
            continue
        state.pair(conv, bn, rd, "model graph", ("graph",))


def _sequence_prev(bn: Layer, by_display: dict[str, Layer]) -> tuple[str, Layer | None] | None:
    """(name, layer) of the module before a PyTorch BN ``P.k`` in its Sequential, or None when
    the BN is not in a Sequential of weighted layers."""
    last = bn.segments[-1] if bn.segments else ""
    if bn.convention != PYTORCH or not last.isdigit() or int(last) < 1:
        return None
    parent = bn.display[:len(bn.display) - len(last) - 1]
    if not parent:
        return None
    sep = bn.display[len(parent)]
    if not any(ly.role == "weighted" and ly.display.startswith(parent + sep)
               and ly.display[len(parent) + 1:].split(".")[0].split("/")[0].isdigit()
               for ly in by_display.values()):
        return None
    prev = f"{parent}{sep}{int(last) - 1}"
    return prev, by_display.get(prev)


def sequence_pass(state: PlanState) -> None:
    """PyTorch Sequential neighbours: BN ``P.k`` is fed by ``P.(k-1)`` or by nothing foldable."""
    by_display = {ly.display: ly for ly in state.layers}
    for bn in state.open_bns():
        found = _sequence_prev(bn, by_display)
        if found is None:
            continue
        prev, layer = found
        if layer is None:
            inside = [ly for ly in state.layers if ly.display.startswith(prev + ".")]
            if inside:
                state.leave(bn, f"the module before it in its Sequential, {prev}, is a block of "
                            f"{len(inside)} layers: folding into its last layer would skip what "
                            "the block computes", [ly for ly in inside if ly.role == "weighted"])
            else:
                state.leave(bn, f"the module before it in its Sequential, {prev}, has no weights "
                            "(an activation, pooling or dropout?); folding through it would be "
                            "wrong")
            continue
        if layer.role != "weighted":
            what = "another BatchNorm" if layer.role == "bn" else "not a conv or linear layer"
            state.leave(bn, f"the module before it in its Sequential, {prev}, is {what}; a BN is "
                        "folded only into the layer directly before it")
            continue
        if layer.name in state.claimed:
            state.leave(bn, f"{layer.display}, before it in its Sequential, is already paired "
                        f"with {state.claimed[layer.name].display}", [layer])
            continue
        rd = read(layer, bn.channels)
        if rd is None:
            state.leave(bn, f"{layer.display} is before it in its Sequential, but "
                        f"{_outs_text(layer)}, not {bn.channels}", [layer])
            continue
        state.pair(layer, bn, rd, "sequence", ("sequential neighbours",))


def name_partner(bn: Layer, weighted: list[Layer], C: int | None = None) -> Layer | None:
    """The weighted layer a BN's name points at (conv1 for bn1, conv1 for conv1_bn), or None."""
    segs = bn.segments
    if not segs or (bn.convention == KERAS and _KERAS_AUTO.match(segs[-1])):
        return None
    stripped = _strip_bn(segs[-1])
    found = []
    for ly in weighted:
        other = ly.segments
        if len(other) != len(segs):
            continue
        diff = [i for i, (a, b) in enumerate(zip(segs, other, strict=True)) if a != b]
        if len(diff) != 1:
            continue
        i = diff[0]
        a, b = segs[i], other[i]
        if (i == len(segs) - 1 and stripped is not None and b == stripped) \
                or _segment_keys(a, _BN_TOKEN) & _segment_keys(b, _CONV_TOKEN):
            found.append(ly)
    if len(found) > 1 and C is not None:  # conv1 and fc1 beside bn1: the one that fits
        fitting = [f for f in found if read(f, C) is not None]
        found = fitting if len(fitting) == 1 else found
    return found[0] if len(found) == 1 else None


def channels_in(layer: Layer) -> int | None:
    """A weighted layer's input channel count (groups as known, else 1)."""
    shape = layer.shapes[layer.weight_param]
    g = layer.groups or 1
    if layer.convention == PYTORCH:
        return shape[1] * g if len(shape) >= 2 else None
    if layer.weight_param == "pointwise_kernel":
        return layer.shapes.get("depthwise_kernel", shape)[-2]
    if len(shape) == 2:
        return shape[0]
    return shape[-2] * (1 if layer.weight_param == "depthwise_kernel" else g)


_PRE = ("a pre-activation BN (BN -> activation -> conv) is not folded into the layer after it; "
        "if {conv} does feed it, say --pair {conv}={bn}")


def name_pass(state: PlanState) -> None:
    """Names (conv1/bn1, conv1/conv1_bn), with the pre-activation guard."""
    weighted = [ly for ly in state.layers if ly.role == "weighted"]
    props = []  # (bn, partner, fits, cin)
    family: dict[tuple[str, str], set[str]] = {}  # (bn word, conv word) -> {"pre", "post"}
    for bn in state.open_bns():
        partner = name_partner(bn, weighted, bn.channels)
        if partner is None:
            continue
        C, cin = bn.channels, channels_in(partner)
        fits = read(partner, C) is not None
        props.append((bn, partner, fits, cin))
        key = (bn.segments[-1], partner.segments[-1])
        if fits != (cin == C):
            family.setdefault(key, set()).add("post" if fits else "pre")
    by_partner: dict[str, list[Layer]] = {}
    for bn, partner, fits, cin in props:
        C, pre = bn.channels, _PRE.format(conv=partner.display, bn=bn.display)
        if partner.block:
            state.leave(bn, partner.block, [partner])
        elif not fits and cin == C:  # the layers before it may still feed it (shape pass)
            state.notes[bn.name] = (f"{partner.display} matches it by name but {C} is its input "
                                    f"channel count, not its output ({_outs_text(partner)}): {pre}")
        elif not fits:
            state.notes[bn.name] = (f"{partner.display} matches it by name but "
                                    f"{_outs_text(partner)}, not {C}")
        elif state.ordered and partner.order > bn.order:
            state.notes[bn.name] = (f"{partner.display} matches it by name but comes after it in "
                                    "the file: " + pre)
        elif partner.name in state.claimed:
            state.leave(bn, f"{partner.display} matches it by name but is paired with "
                        f"{state.claimed[partner.name].display}", [partner])
        elif not state.ordered and cin == C \
                and "pre" in family.get((bn.segments[-1], partner.segments[-1]), ()):
            state.notes[bn.name] = (f"{partner.display} matches it by name, with {C} input and "
                                    "output channels, and the same names elsewhere in the model "
                                    f"are BN -> conv: {pre}")
        else:
            by_partner.setdefault(partner.name, []).append(bn)
    for bn, partner, fits, cin in props:
        group = by_partner.get(partner.name, [])
        if bn not in group:
            continue
        if len(group) > 1:
            names = ", ".join(b.display for b in group)
            state.leave(bn, f"ambiguous: {partner.display} matches the names of several BNs "
                        f"({names})", [partner])
            continue
        doubt = ""
        if not state.ordered and cin == bn.channels \
                and "post" not in family.get((bn.segments[-1], partner.segments[-1]), ()):
            doubt = (f"the file has no order and {partner.display} has {cin} input and output "
                     f"channels: {bn.display} could come before it (BN -> activation -> conv)")
        evidence = ("names", "file order") if state.ordered else ("names",)
        state.pair(partner, bn, read(partner, bn.channels), "name", evidence, doubt)
def _segment_keys(seg: str, token: re.Pattern) -> set:
    """Keys of a name segment with its BN (or conv) word replaced by '#': bn1 -> {'#1'}."""
    toks = seg.split("_")
    keys = set()
    for i, t in enumerate(toks):
        m = token.match(t)
        if m:
            keys.add("_".join(toks[:i] + ["#" + m.group(1)] + toks[i + 1:]).lower())
    m = token.match(seg)
    if m:
        keys.add("#" + m.group(1))
    return keys


def _strip_bn(seg: str) -> str | None:
    """conv1_bn -> conv1, bn_Conv1 -> Conv1, expanded_conv_depthwise_BN -> ...; else None."""
    toks = seg.split("_")
    if len(toks) < 2:
        return None
    if re.fullmatch(r"(?i)bn|batchnorm|batch_norm|norm", toks[-1]):
        return "_".join(toks[:-1])
    if re.fullmatch(r"(?i)bn|batchnorm|norm", toks[0]):
        return "_".join(toks[1:])
    return None




def _previous(bn: Layer, layers: list[Layer]) -> Layer | None:
    """The layer directly before a BN in the model: from a Keras file's layer_names when known
    (where a weightless Dropout or pooling layer in between leaves None), else file order."""
    if bn.seq is not None:
        before = [ly for ly in layers if ly.seq == bn.seq - 1]
        return before[0] if len(before) == 1 else None
    before = [ly for ly in layers if ly.order < bn.order]
    return max(before, key=lambda ly: ly.order) if before else None


def keras_order_pass(state: PlanState) -> None:
    """Keras layer order: the layer directly before the BN (weightless layers count)."""
    if not (state.keras_order and state.ordered):
        return
    for bn in state.open_bns():
        if bn.convention != KERAS:
            continue
        prev = _previous(bn, state.layers)
        rd = read(prev, bn.channels) if prev is not None and prev.role == "weighted" else None
        if rd is not None and prev.name not in state.claimed and not prev.block:
            state.pair(prev, bn, rd, "layer order", ("file order",))
        elif bn.seq is not None:  # the file lists every layer: nothing else can feed it
            what = (f"the layer before it, {prev.display}, " if prev is not None else
                    "the layer before it in the file's layer list ")
            if prev is not None and prev.block:
                why = prev.block
            elif prev is not None and prev.role == "weighted" and prev.name in state.claimed:
                why = what + f"is paired with {state.claimed[prev.name].display}"
            elif prev is not None and prev.role == "weighted":
                why = what + f"does not fit: {_outs_text(prev)}, not {bn.channels}"
            else:
                why = what + "has no conv or dense weights (an activation, pooling, dropout?)"
            state.leave(bn, why, [prev] if prev is not None and prev.role == "weighted" else [])


def _parent(layer: Layer) -> str:
    return layer.display[:-len(layer.segments[-1])] if layer.segments else ""


def shape_pass(state: PlanState) -> None:
    """Shapes in a known order: the nearest fitting layer before the BN, in the same module,
    with only paired layers or layers that fit no unpaired BN in between; else reported."""
    weighted = [ly for ly in state.layers if ly.role == "weighted"]
    memo: dict[tuple[str, int], Read | None] = {}

    def read(ly: Layer, c: int) -> Read | None:  # DenseNet: ~100 BNs x ~100 layers x channels
        if (ly.name, c) not in memo:
            memo[ly.name, c] = _read(ly, c)
        return memo[ly.name, c]

    for bn in state.open_bns():
        C = bn.channels
        fits = [ly for ly in weighted if ly.name not in state.claimed and not ly.block
                and read(ly, C) is not None and (not state.ordered or ly.order < bn.order)]
        if not state.ordered:
            state.leave(bn, "the file has no layer order, and no name, Sequential or graph ties it "
                        f"to a layer ({len(fits)} unpaired layer(s) with {C} output channels); "
                        "settle it with --pair CONV=BN", fits)
            continue
        others = {b.channels for b in state.open_bns() if b is not bn}
        skipped, stop = [], None
        for ly in sorted((ly for ly in state.layers if ly.order < bn.order),
                         key=lambda ly: ly.order, reverse=True):
            if ly.role == "weighted" and read(ly, C) is None and (
                    ly.name in state.claimed or not any(read(ly, c) for c in others)):
                skipped.append(ly)
                continue
            stop = ly
            break
        if stop is None or stop.role != "weighted" or stop.name in state.claimed or stop.block:
            what = ("nothing" if stop is None else f"{stop.display} ("
                    + {"bn": "a BatchNorm", "other": "not a conv or linear layer"}.get(
                        stop.role, "already paired" if stop.name in state.claimed else
                        "an activation is fused into it") + ")")
            lead = "ambiguous: " if len(fits) > 1 else ""
            state.leave(bn, f"{lead}the layer before it in the file is {what}; {len(fits)} "
                        f"unpaired layer(s) with {C} output channels come earlier"
                        + ("; settle it with --pair CONV=BN" if fits else ""), fits)
            continue
        rd = read(stop, C)
        if rd is None:
            state.leave(bn, f"the layer before it in the file, {stop.display}, could feed another "
                        f"BN but not this one ({_outs_text(stop)}, not {C})", fits)
            continue
        if stop.convention == PYTORCH and _parent(stop) != _parent(bn):
            state.leave(bn, f"the layer before it in the file, {stop.display}, is in another module: "
                        "the file cannot show what sits between them (pooling, a concatenation?); "
                        f"if it does feed it, say --pair {stop.display}={bn.display}", fits)
            continue
        doubt = ("took " + ", ".join(ly.display for ly in skipped[:4])
                 + " (between them in the file) for a side branch") if skipped else ""
        state.pair(stop, bn, rd, "shape", ("shapes", "file order"), doubt)


PASSES = (graph_pass, sequence_pass, name_pass, keras_order_pass, shape_pass)


def make_plan(layers: list[Layer], *, explicit: Iterable[Explicit] = (), eps: float | None = None,
              ordered: bool = True, keras_order: bool = False, plan_eps: float | None = None,
              graph: dict | None = None) -> tuple[list[Pair], list[Unpaired]]:
    """Pair every BN with the layer feeding it (see PAIRING_RULES): the explicit pairs, then
    :data:`PASSES` in order; a BN whose running mean is not 1-D is left alone.

    Raises UsageProblem for explicit pairs that name no layer, or the wrong
    kind of layer, or one layer twice; DataError for an explicit pair whose
    channel counts differ.
    """
    state = PlanState(list(layers), ordered=ordered, keras_order=keras_order, graph=graph,
                      eps=eps, plan_eps=plan_eps)
    explicit_pass(state, explicit)
    for bn in state.open_bns():
        key = "running_mean" if bn.convention == PYTORCH else "moving_mean"
        if bn.channels is None or len(bn.shapes.get(key, ())) != 1:
            state.leave(bn, "its running mean is not a 1-D array")
    for run in PASSES:
        run(state)
    outcomes = [state.decided[bn.name] for bn in state.bns]
    return ([o for o in outcomes if isinstance(o, Pair)],
            [o for o in outcomes if isinstance(o, Unpaired)])
