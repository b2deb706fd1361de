"""Pairing every BatchNorm with the layer feeding it: the rules as a list of passes."""

from __future__ import annotations

import re
from collections.abc import Iterable

from bnstat.errors import DataError, UsageProblem
from bnstat.folding.layers import (_BN_TOKEN, _CONV_TOKEN, _KERAS_AUTO, CONVENTION_LABEL,
                                   DEFAULT_EPS, KERAS, PYTORCH, Layer)
from bnstat.folding.plans import Explicit, Pair, Unpaired, resolve
from bnstat.folding.readings import _TRANSPOSE_NAME, _outs_text, fit

PAIRING_RULES = """\
1. Explicit pairs first: --pair CONV=BN, then the pairs of a --plan file (which may also fix the
   kind, e.g. conv_transpose, the groups and the eps); a plan's "unfolded" BNs are left alone.
2. Keras model graph: a Keras HDF5 model's model_config names the layer feeding each BN, the
   layer classes (Conv2DTranspose...), groups, activations and each BN's epsilon. A BN fed by a
   non-conv layer, by a conv with a fused activation, or by a conv that also feeds other layers
   is not folded.
3. Sequential neighbours (PyTorch): BN `P.k` is fed by `P.(k-1)` (features.0/features.1,
   downsample.0/downsample.1). If `P.(k-1)` has no weights (ReLU, pooling, dropout) or is not a
   conv/linear, the BN is not folded: folding through another module is wrong.
4. Names differing in one segment by a BN word vs a conv word: conv1/bn1, conv/bn, conv0/norm0,
   stem_conv/stem_bn, convs.1/bns.1, or by a BN suffix or prefix: conv1/conv1_bn, Conv1/bn_Conv1.
   Keras' automatic names (conv2d_3, batch_normalization_3) are numbered apart and not used.
   A layer named for two BNs pairs with neither.
5. Pre-activation guard: when the file order is the model's and the layer a BN's name points at
   comes after the BN and has the BN's channel count, the block is BN -> ReLU -> conv: not folded.
6. Keras layer order (layer_names of an HDF5 file, or model.weights order in .npz): the weighted
   layer directly before the BN, if it fits.
7. Shapes: among the layers not yet paired whose output channels equal the BN's (and that come
   before it, when the file order is the model's): exactly one, directly before the BN, is paired;
   none, or several, or one further away: reported with the candidates, not folded. BNs are taken
   in model order, so earlier BNs claim their layers first. A layer feeds at most one BN.
8. Readings: PyTorch (out, in/groups, k...) is a conv when shape[0] fits; (in, out/groups, k...)
   a conv-transpose with groups = C / shape[1] only when the conv reading does not fit, and, when
   pairing by shapes alone, only for layers named or configured as transposed (a conv whose input
   channels equal the BN's would read as one: a pre-activation BN). Keras (k..., in, out) likewise
   before (k..., out, in); depthwise_kernel (k..., C, M) gives output channel c*M+m; a separable
   conv folds into its pointwise kernel.
"""

def _name_partner(bn: Layer, by_display: dict[str, Layer],
                  C: int | None = None) -> tuple[Layer | None, str, bool]:
    """The layer a BN's name points at: (layer, rule, blocks) where blocks means stop here.

    Returns (None, reason, True) when the name says the BN cannot be folded
    (a parameter-free module before it in its Sequential).
    """
    segs = bn.segments
    if not segs:
        return None, "", False
    last = segs[-1]
    if bn.convention == PYTORCH and last.isdigit():
        k = int(last)
        parent = bn.display[:len(bn.display) - len(last) - 1]
        sep = bn.display[len(parent)] if parent else "."
        siblings = [ly for ly in by_display.values()
                    if parent and ly.display.startswith(parent + sep)
                    and ly.display[len(parent) + 1:].split(".")[0].split("/")[0].isdigit()]
        mixed = any(ly.role == "weighted" for ly in siblings)
        prev = f"{parent}{sep}{k - 1}" if parent else str(k - 1)
        if k >= 1 and mixed:
            layer = by_display.get(prev)
            if layer is not None and layer.role == "weighted":
                return layer, "sequence", False
            if layer is not None:
                what = "another BatchNorm" if layer.role == "bn" else "not a conv or linear layer"
                return None, (f"the module before it in its Sequential, {prev}, is {what}; "
                              "a BN is folded only into the layer directly before it"), True
            if not any(ly.display.startswith(prev + sep) for ly in by_display.values()):
                return None, (f"the module before it in its Sequential, {prev}, has no weights "
                              "(an activation, pooling or dropout?); folding through it would be "
                              "wrong"), True
    if bn.convention == KERAS and _KERAS_AUTO.match(last):
        return None, "", False
    stripped = _strip_bn(last)
    found = []
    for ly in by_display.values():
        if ly.role != "weighted":
            continue
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
            found.append((ly, "name"))
    if len(found) > 1 and C is not None:  # conv1 and fc1 beside bn1: the one that fits
        fitting = [f for f in found if fit(f[0], C) is not None]
        found = fitting if len(fitting) == 1 else found
    if len(found) == 1:
        return found[0][0], found[0][1], False
    return None, "", False


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


def _graph_pass(bns: list[Layer], by_keras: dict[str, Layer], graph: dict[str, dict],
                decided: dict, claimed: dict, eps_for) -> None:
    """Pair Keras BNs from the model graph: definitive where the config knows the layer."""
    for bn in bns:
        if bn.name in decided or bn.convention != KERAS or bn.keras_name not in graph:
            continue
        ins = graph[bn.keras_name]["inputs"]
        if len(ins) != 1:
            decided[bn.name] = Unpaired(bn, f"the model graph feeds it from {len(ins)} layers")
            continue
        src = graph.get(ins[0], {})
        conv = by_keras.get(ins[0])
        if conv is None or conv.role != "weighted":
            what = src.get("class") or "a layer"
            decided[bn.name] = Unpaired(bn, f"the model graph feeds it from {ins[0]} ({what}), not "
                                        "from a conv or dense layer; folding through it would be wrong")
            continue
        consumers = src.get("consumers", [])
        if len(consumers) > 1:
            others = ", ".join(c for c in consumers if c != bn.keras_name)
            decided[bn.name] = Unpaired(bn, f"{conv.display} also feeds {others}: folding would "
                                        "change their input", [conv.display])
            continue
        if conv.block:
            decided[bn.name] = Unpaired(bn, conv.block, [conv.display])
            continue
        if conv.name in claimed:
            continue
        reading = fit(conv, bn.channels)
        if reading is None:
            decided[bn.name] = Unpaired(bn, f"the model graph feeds it from {conv.display}, but "
                                        f"{_outs_text(conv)}, not {bn.channels}", [conv.display])
            continue
        e, src_label = eps_for(bn, None)
        decided[bn.name] = Pair(conv, bn, reading, e, "model graph", eps_source=src_label)
        claimed[conv.name] = bn


def _previous(bn: Layer, layers: list[Layer]) -> Layer | None:
    """The layer directly before a BN in the model: from a Keras file's layer_names when known
    (where a weightless Dropout or pooling layer in between leaves None), else file order."""
    if bn.seq is not None:
        before = [ly for ly in layers if ly.seq == bn.seq - 1]
        return before[0] if len(before) == 1 else None
    before = [ly for ly in layers if ly.order < bn.order]
    return max(before, key=lambda ly: ly.order) if before else None


def make_plan(layers: list[Layer], *, explicit: Iterable[Explicit] = (), eps: float | None = None,
              ordered: bool = True, keras_order: bool = False, plan_eps: float | None = None,
              graph: dict | None = None) -> tuple[list[Pair], list[Unpaired]]:
    """Pair every BN with the layer feeding it (see PAIRING_RULES).

    Raises UsageProblem for explicit pairs that name no layer, or the wrong
    kind of layer, or one layer twice; DataError for an explicit pair whose
    channel counts differ.
    """
    bns = [ly for ly in layers if ly.role == "bn"]
    weighted = [ly for ly in layers if ly.role == "weighted"]
    by_display = {ly.display: ly for ly in layers}
    claimed: dict[str, Layer] = {}  # conv name -> bn
    decided: dict[str, Pair | Unpaired] = {}  # bn name -> outcome

    def eps_for(bn: Layer, own: float | None) -> tuple[float, str]:
        if eps is not None:
            return eps, "--eps"
        if own is not None:
            return own, "plan"
        if plan_eps is not None:
            return plan_eps, "plan"
        if bn.eps_hint is not None:
            return bn.eps_hint, "model config"
        return DEFAULT_EPS[bn.convention], f"{CONVENTION_LABEL[bn.convention]} default"

    for ex in explicit:
        bn = resolve(ex.bn, layers, "BN", ex.source)
        if bn.role != "bn":
            raise UsageProblem(f"{ex.source}: {bn.display} is not a BatchNorm layer (it has "
                               f"{', '.join(bn.params)}; a BN has running statistics)")
        if bn.name in decided:
            raise UsageProblem(f"{ex.source}: the BN {bn.display} is named twice")
        if ex.conv is None:
            decided[bn.name] = Unpaired(bn, f"left unfolded by {ex.source}")
            continue
        conv = resolve(ex.conv, layers, "layer", ex.source)
        if conv.role != "weighted":
            raise UsageProblem(f"{ex.source}: {conv.display} is not a conv, conv-transpose or linear "
                               f"layer (it has {', '.join(conv.params)})")
        if conv.name in claimed:
            raise UsageProblem(f"{ex.source}: {conv.display} is paired with two BNs "
                               f"({claimed[conv.name].display} and {bn.display}); a layer feeds one BN")
        C = bn.channels
        reading = fit(conv, C, ex.kind, ex.groups)
        if reading is None:
            want = f" as {ex.kind.replace('_', '-')}" if ex.kind else ""
            raise DataError(f"{bn.display}: channel-count mismatch: the BN has {C} channels but "
                            f"{_outs_text(conv)}; refusing to fold it into {conv.display}{want} "
                            "(nothing written)",
                            "Check the pair, or the kind and groups in the plan.")
        e, src = eps_for(bn, ex.eps)
        decided[bn.name] = Pair(conv, bn, reading, e, "--pair" if ex.source == "--pair" else "plan",
                                eps_source=src)
        claimed[conv.name] = bn

    if graph:
        by_keras = {ly.keras_name: ly for ly in layers if ly.convention == KERAS}
        _graph_pass(bns, by_keras, graph, decided, claimed, eps_for)

    # names: a layer named for two BNs pairs with neither
    proposals: dict[str, list[tuple[Layer, Layer, str]]] = {}  # conv name -> [(conv, bn, rule)]
    notes: dict[str, str] = {}  # bn name -> why its name partner did not fit
    for bn in bns:
        if bn.name in decided:
            continue
        if bn.channels is None or len(bn.shapes.get("running_mean" if bn.convention == PYTORCH
                                                    else "moving_mean", ())) != 1:
            decided[bn.name] = Unpaired(bn, "its running mean is not a 1-D array")
            continue
        partner, rule, blocks = _name_partner(bn, by_display, bn.channels)
        if blocks:
            decided[bn.name] = Unpaired(bn, rule)
            continue
        if partner is None or partner.name in claimed:
            continue
        if partner.block:
            decided[bn.name] = Unpaired(bn, partner.block, [partner.display])
            continue
        after = ordered and partner.order > bn.order
        if fit(partner, bn.channels, transpose=not after) is None:
            notes[bn.name] = (f"{partner.display} matches it by name but {_outs_text(partner)}, "
                              f"not {bn.channels}")
            continue
        if after:
            decided[bn.name] = Unpaired(
                bn, f"{partner.display} matches it by name but comes after it in the file: a "
                "pre-activation block (BN -> ReLU -> conv) cannot be folded; if "
                f"{partner.display} does feed it, say --pair {partner.display}={bn.display}",
                [partner.display])
            continue
        proposals.setdefault(partner.name, []).append((partner, bn, rule))
    for props in proposals.values():
        if len(props) > 1:
            names = ", ".join(p[1].display for p in props)
            for partner, bn, _ in props:
                decided[bn.name] = Unpaired(
                    bn, f"ambiguous: {partner.display} matches the names of several BNs ({names})",
                    [partner.display])
            continue
        partner, bn, rule = props[0]
        e, src = eps_for(bn, None)
        decided[bn.name] = Pair(partner, bn, fit(partner, bn.channels), e, rule, eps_source=src)
        claimed[partner.name] = bn

    # order and shapes, in model order so that earlier BNs claim their layers first
    for bn in bns:
        if bn.name in decided:
            continue
        C = bn.channels
        prev = _previous(bn, layers) if ordered else None
        fits = [ly for ly in weighted if ly.name not in claimed and not ly.block
                and fit(ly, C, transpose=False) is not None
                and (not ordered or ly.order < bn.order)]
        note = notes.get(bn.name, "")
        e, src = eps_for(bn, None)
        pair = None
        if keras_order and bn.convention == KERAS and any(f is prev for f in fits):
            pair = Pair(prev, bn, fit(prev, C, transpose=False), e, "layer order", eps_source=src)
        elif len(fits) == 1 and (not ordered or fits[0] is prev):
            how = "shape" if ordered else "shape (order unknown)"
            pair = Pair(fits[0], bn, fit(fits[0], C, transpose=False), e, how, eps_source=src)
        if pair is not None:
            decided[bn.name] = pair
            claimed[pair.conv.name] = bn
            continue
        lead = (note + "; ") if note else ""
        if not fits:
            reason = f"{lead}no unpaired conv/linear layer with {C} output channels" + (
                " before it" if ordered else "")
        elif len(fits) == 1:
            reason = (f"{lead}the only unpaired layer with {C} output channels, {fits[0].display}, "
                      "is not directly before it in the file")
        else:
            reason = (f"{lead}ambiguous: {len(fits)} layers with {C} output channels and no name "
                      "or order to choose; settle it with --pair CONV=BN")
        decided[bn.name] = Unpaired(bn, reason, [ly.display for ly in fits[:8]])

    pairs = [decided[bn.name] for bn in bns if isinstance(decided[bn.name], Pair)]
    for p in pairs:
        if p.by in ("--pair", "plan") or p.reading.kind != "conv" or p.reading.framework != PYTORCH:
            continue
        if _TRANSPOSE_NAME.search(p.conv.segments[-1] if p.conv.segments else "") \
                and fit(p.conv, p.reading.channels, "conv_transpose") is not None:
            p.caution = (f"{p.conv.display} is named like a transposed conv and its weight also "
                         "reads as one (in, out/groups, k...); it was read as an ordinary conv. If it "
                         "is a ConvTranspose, say \"kind\": \"conv_transpose\" in a plan")
    unpaired = [decided[bn.name] for bn in bns if isinstance(decided[bn.name], Unpaired)]
    return pairs, unpaired


