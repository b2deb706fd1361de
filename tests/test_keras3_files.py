"""Keras 3 files (.keras, .weights.h5, .weights.json) folded by `bnstat fold` and reloaded in Keras.

The reference is Keras itself: the original model's predictions, compared
with those of the folded file loaded by keras.saving.load_model /
model.load_weights.
"""

import json
import os
import re
import zipfile

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="Keras 3 is needed to write and reload .keras files")
if int(keras.__version__.split(".")[0]) < 3:
    pytest.skip("these are Keras 3 files", allow_module_level=True)

from conftest import run_inproc  # noqa: E402

L = keras.layers
# Keras' torch backend converts tensors with np.array(x), which numpy 2 warns about
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _randomize_bn(model, rng):
    """Moving statistics and affine parameters far from their initial values."""
    for layer in _all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            for v in layer.weights:
                kind = v.path.rsplit("/", 1)[-1]
                low, high = (0.3, 3.0) if kind in ("moving_variance", "gamma") else (-1.0, 1.0)
                v.assign(rng.uniform(low, high, tuple(v.shape)).astype("float32"))


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _model(kind):
    bn = {"center_false": dict(center=False), "scale_false": dict(scale=False)}.get(kind, {})
    if kind == "dense":
        inp = keras.Input((6,))
        x = L.BatchNormalization()(L.Dense(5)(inp))
        return keras.Model(inp, L.Dense(3)(x)), (4, 6)
    if kind == "nested":
        sub = keras.Sequential([L.Dense(4, use_bias=False), L.BatchNormalization()], name="sub")
        inp = keras.Input((6,))
        return keras.Model(inp, sub(L.BatchNormalization()(L.Dense(6)(inp)))), (4, 6)
    layer = {
        "conv2d": lambda: L.Conv2D(4, 3, use_bias=False),
        "center_false": lambda: L.Conv2D(4, 3),
        "scale_false": lambda: L.Conv2D(4, 3),
        "depthwise1": lambda: L.DepthwiseConv2D(3, depth_multiplier=1),
        "depthwise2": lambda: L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False),
        "separable": lambda: L.SeparableConv2D(5, 3, depth_multiplier=2),
        "transpose": lambda: L.Conv2DTranspose(4, 3, strides=2, use_bias=False),
    }[kind]()
    inp = keras.Input((7, 7, 3))
    x = L.BatchNormalization(**bn)(layer(inp))
    # a second BN of the same class, after a ReLU: left unfolded, renumbered by --bn drop
    x = L.BatchNormalization()(L.ReLU()(x))
    return keras.Model(inp, L.Conv2D(2, 1)(x)), (3, 7, 7, 3)


def _saved(tmp_path, kind, seed=0):
    rng = np.random.default_rng(seed)
    model, shape = _model(kind)
    _randomize_bn(model, rng)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    x = rng.standard_normal(shape).astype("float32")
    return model, x, np.asarray(model.predict(x, verbose=0))


def _close(y, ref):
    assert y.shape == ref.shape
    assert np.max(np.abs(y - ref)) <= 2e-5 * max(1.0, np.max(np.abs(ref)))


def _fold(*args):
    code, out, err = run_inproc("fold", *map(str, args))
    assert "Traceback" not in err
    return code, out, err


KINDS = ["conv2d", "depthwise1", "depthwise2", "separable", "transpose", "dense", "center_false",
         "scale_false", "nested"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_keras_file_folds_and_reloads(tmp_path, kind):
    model, x, ref = _saved(tmp_path, kind)
    n_bn = sum(isinstance(ly, L.BatchNormalization) for ly in _all_layers(model))
    code, out, err = _fold(tmp_path / "m.keras", "-o", tmp_path / "drop.keras", "--check")
    assert code == 0, err
    folded = keras.saving.load_model(tmp_path / "drop.keras")
    _close(np.asarray(folded.predict(x, verbose=0)), ref)
    left = sum(isinstance(ly, L.BatchNormalization) for ly in _all_layers(folded))
    assert left == n_bn - (2 if kind == "nested" else 1)  # the BN after the ReLU stays
    # identity keeps the graph: the same model code loads the weights
    code, _, err = _fold(tmp_path / "m.keras", "-o", tmp_path / "id.keras", "--bn", "identity")
    assert code == 0, err
    _close(np.asarray(keras.saving.load_model(tmp_path / "id.keras").predict(x, verbose=0)), ref)
    code, _, err = _fold(tmp_path / "m.weights.h5", "-o", tmp_path / "id.weights.h5",
                         "--bn", "identity")
    assert code == 0, err
    model.load_weights(tmp_path / "id.weights.h5")
    _close(np.asarray(model.predict(x, verbose=0)), ref)
    # drop on weights: laid out for the BN-less model of drop.keras
    code, _, err = _fold(tmp_path / "m.weights.h5", "-o", tmp_path / "drop.weights.h5")
    assert code == 0, err
    assert "without the folded BatchNorm layers" in err
    fresh = keras.saving.load_model(tmp_path / "drop.keras")
    for v in fresh.weights:
        v.assign(np.zeros(tuple(v.shape), "float32"))
    fresh.load_weights(tmp_path / "drop.weights.h5")
    _close(np.asarray(fresh.predict(x, verbose=0)), ref)


@pytest.mark.slow
def test_drop_rewrites_config_only_where_folded(tmp_path):
    _saved(tmp_path, "conv2d")
    assert _fold(tmp_path / "m.keras", "-o", tmp_path / "f.keras")[0] == 0
    with zipfile.ZipFile(tmp_path / "m.keras") as a, zipfile.ZipFile(tmp_path / "f.keras") as b:
        assert a.namelist() == b.namelist()
        assert a.read("metadata.json") == b.read("metadata.json")
        old = json.loads(a.read("config.json"))["config"]["layers"]
        new = json.loads(b.read("config.json"))["config"]["layers"]
    names = [ly["name"] for ly in old]
    assert old[2]["class_name"] == "BatchNormalization"  # input, conv, BN, ReLU, BN, conv
    assert [ly["name"] for ly in new] == names[:2] + names[3:]
    conv = new[1]
    assert conv["config"]["use_bias"] is True
    relu = next(ly for ly in new if ly["class_name"] == "ReLU")
    hist = relu["inbound_nodes"][0]["args"][0]["config"]["keras_history"]
    assert hist[0] == conv["name"]
    same = [ly for ly in new if ly["class_name"] not in ("Conv2D", "ReLU")]
    assert same == [ly for ly in old if ly["name"] in {s["name"] for s in same}]


@pytest.mark.slow
def test_weights_with_config_option_and_sharded(tmp_path):
    model, x, ref = _saved(tmp_path, "separable")
    os.rename(tmp_path / "m.keras", tmp_path / "elsewhere.keras")
    code, _, err = _fold(tmp_path / "m.weights.h5", "-o", tmp_path / "f.weights.h5",
                         "--bn", "identity")
    assert code == 1
    assert "m.weights.h5" in err and "--config" in err
    with zipfile.ZipFile(tmp_path / "elsewhere.keras") as zf:
        (tmp_path / "config.json").write_bytes(zf.read("config.json"))
    code, _, err = _fold(tmp_path / "m.weights.h5", "--config", tmp_path / "config.json",
                         "-o", tmp_path / "f.keras")
    assert code == 0, err
    _close(np.asarray(keras.saving.load_model(tmp_path / "f.keras").predict(x, verbose=0)), ref)
    # sharded weights: a model big enough for several 5 kB shards
    inp = keras.Input((16,))
    x = L.BatchNormalization()(L.Dense(32)(inp))
    big = keras.Model(inp, L.Dense(16)(L.BatchNormalization()(L.Dense(32)(L.Dense(32)(x)))))
    _randomize_bn(big, np.random.default_rng(1))
    big.save(tmp_path / "big.keras")
    big.save_weights(tmp_path / "s.weights.json", max_shard_size=5e-6)
    assert len([p for p in os.listdir(tmp_path) if p.startswith("s_")]) > 1
    xb = np.random.default_rng(2).standard_normal((3, 16)).astype("float32")
    refb = np.asarray(big.predict(xb, verbose=0))
    code, _, err = _fold(tmp_path / "s.weights.json", "--config", tmp_path / "big.keras",
                         "-o", tmp_path / "s.weights.h5", "--bn", "identity")
    assert code == 0, err
    for v in big.weights:
        v.assign(np.zeros(tuple(v.shape), "float32"))
    big.load_weights(tmp_path / "s.weights.h5")
    _close(np.asarray(big.predict(xb, verbose=0)), refb)
    code, _, err = _fold(tmp_path / "s.weights.json", "--config", tmp_path / "big.keras",
                         "-o", tmp_path / "t.weights.json", "--bn", "identity")
    assert code == 1
    assert "t.weights.json: bnstat writes Keras 3 weights as one .weights.h5 file" in err


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("keras3")
    _saved(path, "dense")
    return path


def test_info_lists_keras3_pairs(small):
    code, out, err = run_inproc("info", small / "m.keras")
    assert code == 0, err
    assert re.search(r"dense(_\d+)? <- batch_normalization(_\d+)?: dense IO, 5 channels "
                     r"\(model graph\)", out), out


def test_keras_without_config(small, tmp_path):
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(small / "m.keras") as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            if name != "config.json":
                zout.writestr(name, zin.read(name))
    code, _, err = _fold(bad, "-o", tmp_path / "o.keras")
    assert code == 1
    assert f"{bad}: no config.json member" in err
    assert not (tmp_path / "o.keras").exists()


def test_truncated_keras_zip(small, tmp_path):
    bad = tmp_path / "cut.keras"
    raw = (small / "m.keras").read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    code, _, err = _fold(bad, "-o", tmp_path / "o.keras")
    assert code == 1
    assert f"{bad}: not a valid .keras (zip) file" in err


def test_weights_not_matching_config(small, tmp_path):
    # the config of a model whose BN has no beta, the weights of one that has it
    doc = json.loads(zipfile.ZipFile(small / "m.keras").read("config.json"))
    bn = next(ly for ly in doc["config"]["layers"] if ly["class_name"] == "BatchNormalization")
    bn["config"]["center"] = False
    (tmp_path / "config.json").write_text(json.dumps(doc))
    code, _, err = _fold(small / "m.weights.h5", "--config", tmp_path / "config.json",
                         "-o", tmp_path / "o.weights.h5")
    assert code == 1
    assert f"{small / 'm.weights.h5'}: layers/batch_normalization/vars holds 4 arrays" in err, err
    assert "center=False" in err and "do not match the config" in err


def test_keras_config_is_never_deserialized(tmp_path, monkeypatch):
    # a Lambda layer's code sits in config.json: bnstat reads it as JSON only
    marker = tmp_path / "ran"
    inp = keras.Input((4,))
    x = L.BatchNormalization()(L.Dense(4)(inp))
    monkeypatch.setenv("BNSTAT_TEST_MARKER", str(marker))
    out = L.Lambda(lambda t: (open(__import__("os").environ["BNSTAT_TEST_MARKER"], "w").close(),
                              t * 2.0)[1])(x)
    model = keras.Model(inp, out)
    model.save(tmp_path / "m.keras")
    assert marker.exists()  # the layer's code writes the marker whenever it runs
    marker.unlink()
    with zipfile.ZipFile(tmp_path / "m.keras") as zf:
        config = zf.read("config.json")
    assert b"Lambda" in config
    code, out_text, err = _fold(tmp_path / "m.keras", "--dry-run")
    assert code == 0, err
    assert re.search(r"dense(_\d+)? +│ batch_normalization(_\d+)? +│ dense", out_text), out_text
    assert "model graph" in out_text
    assert not marker.exists()


def test_info_config_option_and_output_over_config(small, tmp_path):
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes((small / "m.weights.h5").read_bytes())
    code, out, err = run_inproc("info", weights, "--config", small / "m.keras", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert "layers/dense/vars/0" in {a["name"] for a in doc["arrays"]}
    assert any(re.search(r"dense(_\d+)? <- batch_normalization(_\d+)?: dense IO", ln)
               for ln in doc["fold"]), doc["fold"]
    config = tmp_path / "c.keras"
    config.write_bytes((small / "m.keras").read_bytes())
    code, _, err = _fold(weights, "--config", config, "-o", config, "--force")
    assert code == 1
    assert f"{config}: the output is one of the inputs" in err
    assert config.read_bytes() == (small / "m.keras").read_bytes()


def test_keras_with_corrupt_weights_member(small, tmp_path):
    bad = tmp_path / "junk.keras"
    with zipfile.ZipFile(small / "m.keras") as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, b"not hdf5" if name == "model.weights.h5" else zin.read(name))
    code, _, err = _fold(bad, "-o", tmp_path / "o.keras")
    assert code == 1
    assert f"{bad}:model.weights.h5: not a readable HDF5 file" in err
