"""Issue 11: a fold you can trust. Every case of the issue (each failed before), the evidence
of each pair, --strict, and the pairing passes one by one.

References: torch (where installed) for the transposed conv; otherwise the expected pairing is
written by hand from the architecture each case imitates.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from bnstat.errors import BnstatWarning


def conv_w(rng, cout, cin, k=3):
    return rng.normal(size=(cout, cin, k, k)).astype(np.float32)


def bn(rng, name, c):
    return {f"{name}.weight": rng.uniform(0.5, 1.5, c).astype(np.float32),
            f"{name}.bias": rng.normal(size=c).astype(np.float32),
            f"{name}.running_mean": rng.normal(size=c).astype(np.float32),
            f"{name}.running_var": rng.uniform(0.3, 2, c).astype(np.float32),
            f"{name}.num_batches_tracked": np.array(7, np.int64)}


def quiet_fold(*args, **kwargs):
    from bnstat.folding import fold

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        return fold(*args, **kwargs)


def pairs_of(res):
    return [(p.conv.display, p.bn.display) for p in res.pairs]


# ---- pre-activation ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["drop", "identity"])
def test_minimal_pre_activation_bn_is_never_folded_from_safetensors(tmp_path, rng, cli, mode):
    """norm1 = BatchNorm2d(8), conv1 = Conv2d(8, 16, 1) as safetensors (no file order): the
    old code read conv1 as a conv-transpose (IOHW) and wrote a bias of 8 values for 16 outputs."""
    from bnstat.io.models import read_model, write_model

    d = {**bn(rng, "norm1", 8), "conv1.weight": conv_w(rng, 16, 8, 1)}
    src, out = tmp_path / "m.safetensors", tmp_path / "o.safetensors"
    write_model(str(src), d, fmt="safetensors")
    code, text, err = cli("fold", src, "-o", out, "--bn", mode)
    assert code == 0 and "Traceback" not in err
    assert "1 BatchNorm layer(s) left unfolded (norm1)" in err
    assert "8 is its input channel count" in text and "pre-activation" in text
    back = read_model(str(out)).arrays
    assert sorted(back) == sorted(d)  # nothing folded, no bias added
    for k, v in d.items():
        np.testing.assert_array_equal(back[k], v)


def test_densenet_transition_and_pre_activation(tmp_path, rng):
    """DenseNet from .npz: transition (norm -> relu -> conv -> avgpool), then a dense layer
    (norm1 -> relu -> conv1 -> norm2 -> relu -> conv2). norm1 must not go into
    transition.conv (a pool and a concatenation sit between); norm2 is conv1's."""
    t, p = "features.transition1.", "features.denseblock2.denselayer1."
    d = {**bn(rng, t + "norm", 16), t + "conv.weight": conv_w(rng, 8, 16, 1),
         **bn(rng, p + "norm1", 8), p + "conv1.weight": conv_w(rng, 16, 8, 1),
         **bn(rng, p + "norm2", 16), p + "conv2.weight": conv_w(rng, 4, 16)}
    np.savez(tmp_path / "m.npz", **d)
    res = quiet_fold(str(tmp_path / "m.npz"), check=True)
    assert pairs_of(res) == [(p + "conv1", p + "norm2")]
    why = {u.bn.display: u.reason for u in res.unpaired}
    assert "in another module" in why[p + "norm1"] and "pre-activation" in why[p + "norm1"]
    assert "pre-activation" in why[t + "norm"]


def test_square_pre_activation_pattern_is_not_folded_without_order(tmp_path, rng):
    """A square conv1 (8 -> 8) after norm1 in a safetensors file: elsewhere the same names are
    provably BN -> conv (norm1 of 4 channels into conv1 4 -> 8), so this one is too."""
    from bnstat.io.models import write_model

    d = {}
    for i, cin in enumerate((4, 8)):
        q = f"block.layer{i}."
        d.update({**bn(rng, q + "norm1", cin), q + "conv1.weight": conv_w(rng, 8, cin, 1)})
    write_model(str(tmp_path / "m.safetensors"), d, fmt="safetensors")
    res = quiet_fold(str(tmp_path / "m.safetensors"))
    assert res.pairs == []
    why = {u.bn.display: u.reason for u in res.unpaired}
    assert "the same names elsewhere in the model are BN -> conv" in why["block.layer1.norm1"]


# ---- the shape rule ----------------------------------------------------------------------

def _mbconv(rng, q, cin, mid, cout):
    """timm's InvertedResidual: conv_pw/bn1, conv_dw/bn2, se (conv_reduce, conv_expand), conv_pwl/bn3."""
    return {q + "conv_pw.weight": conv_w(rng, mid, cin, 1), **bn(rng, q + "bn1", mid),
            q + "conv_dw.weight": conv_w(rng, mid, 1), **bn(rng, q + "bn2", mid),
            q + "se.conv_reduce.weight": conv_w(rng, 4, mid, 1),
            q + "se.conv_reduce.bias": np.zeros(4, np.float32),
            q + "se.conv_expand.weight": conv_w(rng, mid, 4, 1),
            q + "se.conv_expand.bias": np.zeros(mid, np.float32),
            q + "conv_pwl.weight": conv_w(rng, cout, mid, 1), **bn(rng, q + "bn3", cout)}


def test_squeeze_excitation_no_longer_blocks_later_bns(tmp_path, rng):
    """The old shape rule left blocks.1.bn1/bn2 "ambiguous" because blocks.0.se.conv_expand
    (48 outputs, fed to a sigmoid, never a BN) stayed unclaimed before them."""
    d = {**_mbconv(rng, "blocks.0.", 16, 48, 16), **_mbconv(rng, "blocks.1.", 16, 48, 16)}
    np.savez(tmp_path / "m.npz", **d)
    res = quiet_fold(str(tmp_path / "m.npz"), check=True)
    want = [(f"blocks.{i}.{c}", f"blocks.{i}.{b}") for i in (0, 1)
            for c, b in (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))]
    assert pairs_of(res) == want and not res.unpaired
    assert all(p.evidence[:2] == ("shapes", "file order") for p in res.pairs)


def test_shape_rule_needs_a_known_order(tmp_path, rng):
    from bnstat.io.models import write_model

    d = {"z.weight": conv_w(rng, 8, 3), **bn(rng, "a", 8)}
    write_model(str(tmp_path / "m.safetensors"), d, fmt="safetensors")
    res = quiet_fold(str(tmp_path / "m.safetensors"))
    assert res.pairs == [] and res.unpaired[0].candidates == ["z"]
    assert "no layer order" in res.unpaired[0].reason


@pytest.mark.parametrize("tracked", [False, True])
def test_hdf5_creation_order_is_seen(tmp_path, rng, tracked):
    """h5py.File(..., track_order=True): creation order (the old reader never saw it)."""
    import h5py

    from bnstat.io.models import read_model

    d = {"z.weight": conv_w(rng, 8, 3), **bn(rng, "a", 8)}
    with h5py.File(tmp_path / "m.h5", "w", track_order=tracked) as f:
        for k, v in d.items():
            f.create_dataset(k, data=v)
    m = read_model(str(tmp_path / "m.h5"))
    assert (m.ordered, m.order_source) == ((True, "creation order") if tracked
                                           else (False, "alphabetical (HDF5)"))
    res = quiet_fold(str(tmp_path / "m.h5"), check=True)
    assert pairs_of(res) == ([("z", "a")] if tracked else [])


# ---- readings ----------------------------------------------------------------------------

def test_square_grouped_deconv_named_as_such_folds_as_transposed(rng):
    torch = pytest.importorskip("torch", reason="torch is the reference for ConvTranspose2d")
    torch.manual_seed(0)
    deconv = torch.nn.ConvTranspose2d(32, 32, 3, groups=4)
    norm = torch.nn.BatchNorm2d(32)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    d = {"deconv2." + k: v.numpy() for k, v in deconv.state_dict().items()}
    d.update({"deconv2_bn." + k: v.numpy() for k, v in norm.eval().state_dict().items()})
    res = quiet_fold(d, check=True)
    p = res.pairs[0]
    assert (p.reading.kind, p.reading.groups, p.certain, p.evidence[0]) == (
        "conv_transpose", 4, True, "names")
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        want = norm(deconv(x))
        deconv.weight.copy_(torch.from_numpy(res.arrays["deconv2.weight"]))
        deconv.bias.copy_(torch.from_numpy(res.arrays["deconv2.bias"]))
        got = deconv(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m", [1, 2])
def test_keras3_depthwise_kernel_folds_as_depthwise(rng, m):
    """Keras 3 names a DepthwiseConv2D's weight `kernel` (k, k, C, M): channel c*M+m. The old
    code labelled M=1 a conv-transpose and left M=2 unfolded."""
    k = rng.normal(size=(3, 3, 4, m)).astype(np.float32)
    c = 4 * m
    d = {"depthwise_conv2d/kernel:0": k,
         "batch_normalization/gamma:0": rng.uniform(0.5, 1.5, c).astype(np.float32),
         "batch_normalization/beta:0": rng.normal(size=c).astype(np.float32),
         "batch_normalization/moving_mean:0": rng.normal(size=c).astype(np.float32),
         "batch_normalization/moving_variance:0": rng.uniform(0.5, 2, c).astype(np.float32)}
    res = quiet_fold(d, check=True)
    p = res.pairs[0]
    assert (p.reading.kind, p.reading.layout, p.reading.channels) == ("depthwise", "HWCM", c)
    s = d["batch_normalization/gamma:0"] / np.sqrt(d["batch_normalization/moving_variance:0"] + 1e-3)
    np.testing.assert_allclose(res.arrays["depthwise_conv2d/kernel:0"],
                               k * s.reshape(4, m), rtol=1e-6)


def test_no_transposed_reading_merely_because_the_conv_reading_does_not_fit(rng):
    d = {"block.0.weight": conv_w(rng, 4, 6), **bn(rng, "block.1", 6)}  # (4, 6): 6 only as IOHW
    res = quiet_fold(d)
    assert res.pairs == [] and "not 6" in res.unpaired[0].reason
    plan = {"pairs": [{"conv": "block.0", "bn": "block.1", "kind": "conv_transpose"}]}
    res = quiet_fold(d, plan=plan, check=True)
    assert (res.pairs[0].reading.kind, res.pairs[0].evidence[0]) == ("conv_transpose", "plan")


# ---- evidence, warnings, --strict --------------------------------------------------------

def square_model(rng):
    return {"features.0.weight": conv_w(rng, 8, 8), **bn(rng, "features.1", 8)}


def test_assumed_pair_is_folded_marked_and_warned(rng):
    from bnstat.folding import fold

    with pytest.warns(BnstatWarning, match=r"features.0 <- features.1: folded on an assumption: "
                      r"features.0.weight \(8, 8, 3, 3\) reads both as a conv and as a "
                      r"conv-transpose.*plan entry"):
        res = fold(square_model(rng))
    rec = res.plan_dict()["pairs"][0]
    assert rec["certain"] is False and "reads both" in rec["assumption"]
    assert rec["evidence"] == ["sequential neighbours", "shapes"]
    # a plan entry settles it: the kind, and "certain" left true
    rec["certain"] = True
    settled = fold(square_model(rng), plan={"pairs": [rec]})
    assert settled.pairs[0].certain and settled.pairs[0].evidence[0] == "plan"


def test_strict_refuses_assumed_pairs_and_writes_nothing(tmp_path, rng, cli):
    np.savez(tmp_path / "m.npz", **square_model(rng))
    out = tmp_path / "o.npz"
    code, text, err = cli("fold", tmp_path / "m.npz", "-o", out, "--strict")
    assert code == 1 and "Traceback" not in err
    assert "--strict/strict=: 1 pair(s) rest on an assumption, nothing written: " \
           "features.0+features.1: features.0.weight (8, 8, 3, 3) reads both" in err
    assert not out.exists()
    assert "ASSUMED" in text  # the plan is printed with the assumption
    code, _, err = cli("fold", tmp_path / "m.npz", "-o", out, "--strict",
                       "--pair", "features.0=features.1")
    assert code == 0 and out.exists() and "assumption" not in err


def test_dry_run_json_shows_each_pairs_evidence(tmp_path, rng, cli):
    d = {"conv1.weight": conv_w(rng, 8, 3), **bn(rng, "bn1", 8), **square_model(rng)}
    np.savez(tmp_path / "m.npz", **d)
    code, text, err = cli("fold", tmp_path / "m.npz", "--dry-run", "--format", "json", "--check")
    assert code == 0, err
    doc = json.loads(text)
    ev = {p["bn"]: (p["evidence"], p["certain"]) for p in doc["pairs"]}
    assert ev == {"bn1": (["names", "file order", "shapes"], True),
                  "features.1": (["sequential neighbours", "shapes"], False)}
    assert doc["assumed"] == ["features.0=features.1"] and doc["dry_run"] is True
    assert "arithmetic of each planned pair" in doc["check_scope"]
    code, _, err = cli("fold", tmp_path / "m.npz", "--dry-run", "--format", "csv")
    assert code == 2 and "fold prints its plan as a table or json" in err


def test_check_header_says_what_it_verifies(tmp_path, rng, cli):
    np.savez(tmp_path / "m.npz", **{"conv1.weight": conv_w(rng, 8, 3), **bn(rng, "bn1", 8)})
    code, text, _ = cli("fold", tmp_path / "m.npz", "--dry-run", "--check")
    assert code == 0 and text.startswith("--check verifies the arithmetic of each planned pair")
    assert "cannot" in text and "tell a wrong pairing" in text.replace("\n", " ")


# ---- the passes, one by one ---------------------------------------------------------------

def _state(d, ordered=True):
    from bnstat.folding.layers import parse_layers
    from bnstat.folding.pairing import PlanState

    return PlanState(parse_layers({k: (v.shape, v.dtype) for k, v in d.items()}), ordered=ordered)


def _outcomes(state):
    from bnstat.folding.plans import Pair

    return {b: (o.conv.display if isinstance(o, Pair) else None) for b, o in state.decided.items()}


def test_sequence_pass_alone(rng):
    from bnstat.folding.pairing import sequence_pass

    d = {"f.0.weight": conv_w(rng, 8, 3), **bn(rng, "f.1", 8), **bn(rng, "f.3", 8),  # ReLU at 2
         "g.0.a.weight": conv_w(rng, 8, 8), **bn(rng, "g.1", 8),  # g.0 is a block
         **bn(rng, "bn1", 8)}
    st = _state(d)
    sequence_pass(st)
    assert _outcomes(st) == {"f.1": "f.0", "f.3": None, "g.1": None}
    assert "no weights" in st.decided["f.3"].reason and "block of 1 layers" in st.decided["g.1"].reason


def test_name_pass_alone(rng):
    from bnstat.folding.pairing import name_pass

    d = {"conv1.weight": conv_w(rng, 8, 3), **bn(rng, "bn1", 8),
         **bn(rng, "norm2", 8), "conv2.weight": conv_w(rng, 4, 8, 1),  # pre-activation
         "stem_conv.weight": conv_w(rng, 8, 3), **bn(rng, "stem_conv_bn", 8)}
    st = _state(d)
    name_pass(st)
    assert _outcomes(st) == {"bn1": "conv1", "stem_conv_bn": "stem_conv"}
    assert "pre-activation" in st.notes["norm2"]  # left to the shape pass, with the note


def test_shape_pass_alone(rng):
    from bnstat.folding.pairing import shape_pass

    d = {"a.x.weight": conv_w(rng, 8, 3), **bn(rng, "a.y", 8),
         "b.p.weight": conv_w(rng, 8, 8, 1), "b.q.weight": conv_w(rng, 5, 8, 1),  # q: no BN of 5
         **bn(rng, "b.r", 8),
         "c.x.weight": conv_w(rng, 8, 3), **bn(rng, "d.y", 8)}  # another module
    st = _state(d)
    shape_pass(st)
    assert _outcomes(st) == {"a.y": "a.x", "b.r": "b.p", "d.y": None}
    assert "took b.q (between them in the file) for a side branch" in st.decided["b.r"].assumption
    assert "in another module" in st.decided["d.y"].reason
    st = _state(d, ordered=False)
    shape_pass(st)
    assert set(_outcomes(st).values()) == {None}
