"""`bnstat fold model.onnx`: models exported from torch, checked by onnx.checker and onnxruntime.

The reference is the exported model itself run by onnxruntime (and the torch
module in eval mode): the folded model must give the same outputs.
"""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the onnx extra is needed for ONNX models")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the models compared")
torch = pytest.importorskip("torch", reason="torch exports the test models")

from conftest import run_inproc  # noqa: E402

nn = torch.nn
# the TorchScript exporter warns about its own deprecation and about constant folding
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")


def _stats(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.3)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) * 2 + 0.3)
                m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)
    return model.eval()


def _export(model, x, path):
    # PRESERVE keeps the BN nodes (EVAL lets the exporter fuse Conv+BN itself)
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], training=torch.onnx.TrainingMode.PRESERVE,
                      do_constant_folding=False, dynamic_axes={"x": {0: "n"}})
    return path


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


class ConvBN(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, eps=1e-3), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4))


class GroupedTransposeBN(nn.Sequential):
    def __init__(self):
        super().__init__(nn.ConvTranspose2d(6, 9, 3, stride=2, groups=3), nn.BatchNorm2d(9),
                         nn.ConvTranspose2d(9, 9, 2, groups=9, bias=False), nn.BatchNorm2d(9))


class LinearBN(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(12, 7), nn.BatchNorm1d(7),
                         nn.Linear(7, 5), nn.BatchNorm1d(5, affine=False))


CASES = {"conv": (ConvBN, (2, 3, 9, 9), 2), "convtranspose": (GroupedTransposeBN, (2, 6, 5, 5), 2),
         "linear": (LinearBN, (4, 3, 4), 2)}  # affine=False: its scale and bias are Constant nodes


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_model_folds(tmp_path, case):
    cls, shape, n_bn = CASES[case]
    model = _stats(cls())
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    src = _export(model, torch.from_numpy(x), tmp_path / "m.onnx")
    assert _ops(src).count("BatchNormalization") == n_bn
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    before = _run(src, x)
    np.testing.assert_allclose(before, ref, rtol=1e-4, atol=1e-5)
    code, out, err = run_inproc("fold", src, "-o", tmp_path / "f.onnx", "--check")
    assert code == 0, err
    assert "Traceback" not in err
    assert f"{n_bn} foldable" in out and "check: onnxruntime outputs" in out
    folded = tmp_path / "f.onnx"
    onnx.checker.check_model(onnx.load(str(folded)), full_check=True)
    assert "BatchNormalization" not in _ops(folded)
    after = _run(folded, x)
    scale = np.max(np.abs(before))
    assert np.max(np.abs(after - before)) <= 1e-5 * scale
    # a batch size the export never saw: the graph stays dynamic
    x3 = np.random.default_rng(2).standard_normal((3,) + shape[1:]).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x3), _run(src, x3), rtol=1e-4, atol=1e-5 * scale)
    # everything but the folded nodes and their initializers is kept
    a, b = onnx.load(str(src)), onnx.load(str(folded))
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input]
    assert [o.name for o in b.graph.output] == ["y"]
    assert a.opset_import == b.opset_import


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Conv+BN, then ReLU+BN (not foldable), exported once."""
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    model = _stats(nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(),
                                 nn.BatchNorm2d(4)))
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)
    return _export(model, torch.from_numpy(x), path), x


def test_bn_fed_by_other_node_is_left_and_listed(mixed, tmp_path):
    src, x = mixed
    code, out, err = run_inproc("info", src)
    assert code == 0, err
    assert "/0/Conv <- /1/BatchNormalization: Conv, 4 channels, eps 0.001" in out
    assert "/3/BatchNormalization: not folded: fed by Relu (/2/Relu), not a Conv, " \
           "ConvTranspose or Gemm" in out
    code, out, err = run_inproc("fold", src, "-o", tmp_path / "f.onnx")
    assert code == 0, err
    assert "1 BatchNormalization node(s) left unfolded (/3/BatchNormalization)" in err
    assert _ops(tmp_path / "f.onnx") == ["Conv", "Relu", "BatchNormalization"]
    np.testing.assert_allclose(_run(tmp_path / "f.onnx", x), _run(src, x), rtol=1e-5, atol=1e-6)


def test_dry_run_writes_nothing(mixed, tmp_path):
    src, _ = mixed
    code, out, err = run_inproc("fold", src, "--dry-run")
    assert code == 0, err
    assert "2 BatchNormalization node(s), 1 foldable" in out
    assert "written" not in out


def test_json_report_and_strict(mixed, tmp_path):
    import json

    src, _ = mixed
    code, out, err = run_inproc("fold", src, "-o", tmp_path / "f.onnx", "--strict",
                                "--format", "json")
    assert code == 0, err  # graph pairs are certain: --strict refuses none
    doc = json.loads(out)
    assert doc["format"] == "onnx" and doc["output"] == str(tmp_path / "f.onnx")
    assert [(p["conv"], p["bn"], p["kind"], p["eps"], p["certain"]) for p in doc["pairs"]] == \
        [("/0/Conv", "/1/BatchNormalization", "Conv", float(np.float32(1e-3)), True)]  # a float attr
    assert [u["bn"] for u in doc["unfolded"]] == ["/3/BatchNormalization"]
    assert (tmp_path / "f.onnx").exists()


def test_weight_shared_by_two_nodes_is_not_folded(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 3)).astype(np.float32), "w")
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("s", rng.uniform(0.5, 2, 3)), ("b", rng.normal(size=3)), ("m", rng.normal(size=3)),
           ("v", rng.uniform(0.5, 2, 3)))]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="g1"),
             helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn"),
             helper.make_node("Gemm", ["x", "w"], ["z"], name="g2", transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 3])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3])
                               for n in ("y", "z")], [w, *bn])
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    code, out, err = run_inproc("info", path)
    assert code == 0, err
    assert "bn: not folded: the weights of g1 (w) are used by other nodes too" in out


def test_gemm_alpha_beta_and_trans_b(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((1, 5)).astype(np.float32), "c")]
    inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
              (("s", rng.uniform(0.5, 2, 5)), ("b", rng.normal(size=5)), ("m", rng.normal(size=5)),
               ("v", rng.uniform(0.5, 2, 5)))]
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="g", alpha=0.5, beta=2.0,
                              transB=1),
             helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["y"], name="bn",
                              epsilon=0.25)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
                              inits)
    path = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    code, out, err = run_inproc("fold", path, "-o", tmp_path / "f.onnx", "--check")
    assert code == 0, err
    assert "eps 0.25" in out
    x = rng.standard_normal((3, 4)).astype(np.float32)
    # the reference in float64 from the ONNX operator definitions
    w, c, s, b, m, v = (numpy_helper.to_array(t).astype(np.float64) for t in inits)
    ref = ((0.5 * x @ w.T + 2.0 * c) - m) / np.sqrt(v + 0.25) * s + b
    sess = ort.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-5)
    assert _ops(tmp_path / "f.onnx") == ["Gemm"]


@pytest.mark.parametrize("content", [b"", b"not a protobuf \xff\xfe", b"\x08\x07"])
def test_bad_onnx_file(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    code, _, err = run_inproc("fold", bad, "-o", tmp_path / "f.onnx")
    assert code == 1
    assert f"{bad}: not" in err
    assert "Traceback" not in err
    assert not (tmp_path / "f.onnx").exists()


def test_options_that_do_not_apply_to_onnx(mixed, tmp_path):
    src, _ = mixed
    for extra in (["--eps", "1e-3"], ["--pair", "a=b"], ["--bn", "identity"]):
        code, _, err = run_inproc("fold", src, "-o", tmp_path / "f.onnx", *extra)
        assert code == 2, err
        assert "an ONNX model is folded along its graph" in err


def test_without_the_onnx_package(mixed, tmp_path, monkeypatch):
    import sys

    src, _ = mixed
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    code, _, err = run_inproc("fold", src, "-o", tmp_path / "f.onnx")
    assert code == 1
    assert f"{src}: reading ONNX models needs the onnx package" in err
    assert "pip install 'bnstat[onnx]'" in err
