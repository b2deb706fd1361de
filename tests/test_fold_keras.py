"""Keras 3 legacy HDF5 files folded and loaded back (issue 11): Conv2D, DepthwiseConv2D
(multipliers 1 and 2, whose weight Keras 3 names `kernel`), SeparableConv2D, Conv2DTranspose
and Dense, each followed by a BatchNormalization; model.save('m.h5') (with the model_config
graph) and the legacy weight file (layer_names, no graph). The reference is Keras itself:
the predictions of the original model against those of the folded file."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras", reason="keras 3 is the reference (the test-frameworks extra)")
pytestmark = [pytest.mark.slow,  # keras' torch backend hands numpy a tensor without copy=
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy "
                                         "keyword:DeprecationWarning")]

from bnstat.errors import BnstatWarning  # noqa: E402


def _model(with_bn: bool, seed: int = 0):
    from keras import layers

    keras.utils.set_random_seed(seed)
    bn = (lambda name: [layers.BatchNormalization(epsilon=1e-2, name=name)]) if with_bn else (
        lambda name: [])
    stack = [keras.Input((8, 8, 3)),
             layers.Conv2D(8, 3, padding="same", use_bias=not with_bn, name="conv"), *bn("conv_bn"),
             layers.Activation("relu", name="relu"),
             layers.DepthwiseConv2D(3, padding="same", name="depthwise1"), *bn("depthwise1_bn"),
             layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise2"),
             *bn("depthwise2_bn"),
             layers.SeparableConv2D(6, 3, padding="same", name="sep"), *bn("sep_bn"),
             layers.Conv2DTranspose(6, 3, strides=2, name="up"), *bn("up_bn"),
             layers.Flatten(name="flat"), layers.Dense(5, name="fc"), *bn("fc_bn")]
    model = keras.Sequential(stack, name="net")
    if with_bn:
        rng = np.random.default_rng(seed)
        for layer in model.layers:
            if isinstance(layer, layers.BatchNormalization):
                c = layer.gamma.shape[0]
                layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c),
                                   rng.normal(0, 0.3, c), rng.uniform(0.5, 2.0, c)])
    return model


BNS = ["conv_bn", "depthwise1_bn", "depthwise2_bn", "sep_bn", "up_bn", "fc_bn"]
KINDS = {"conv_bn": "conv", "depthwise1_bn": "depthwise", "depthwise2_bn": "depthwise",
         "sep_bn": "separable",
         "up_bn": "conv_transpose", "fc_bn": "dense"}


def _fold(src, out, mode, eps=None):
    from bnstat.folding import fold

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BnstatWarning)
        return fold(str(src), output=str(out), bn=mode, check=True, eps=eps)


def _legacy_weights(model, path):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def _load_legacy(model, path):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f
        legacy_h5_format.load_weights_from_hdf5_group(root, model)
    return model


@pytest.mark.parametrize("mode", ["drop", "identity"])
@pytest.mark.parametrize("saved", ["model.save", "legacy weights"])
def test_keras_legacy_h5_folds_and_loads_back(tmp_path, mode, saved):
    model = _model(True)
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
    want = np.asarray(model.predict(x, verbose=0), np.float64)
    src, out = tmp_path / "m.h5", tmp_path / "f.h5"
    if saved == "model.save":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save(str(src))
    else:
        _legacy_weights(model, src)
    # a weight file has no config: its BNs' epsilon (1e-2, not Keras' 1e-3) is the user's to give
    res = _fold(src, out, mode, eps=None if saved == "model.save" else 1e-2)
    assert {p.eps for p in res.pairs} == {1e-2}
    got_pairs = {p.bn.keras_name: (p.conv.keras_name, p.reading.kind) for p in res.pairs}
    assert got_pairs == {b: (b[:-3], KINDS[b]) for b in BNS}, [u.reason for u in res.unpaired]
    assert all(p.certain for p in res.pairs)
    if saved == "model.save":
        assert all(p.evidence[0] == "graph" for p in res.pairs)
        mc = res.model_check  # --check ran the whole model from the file's graph
        assert mc["ok"] and mc["max_rel_error"] < 1e-5 and mc["input_shape"] == [2, 8, 8, 3]
    else:
        assert res.model_check is None
    if mode == "identity" and saved == "model.save":
        folded = keras.saving.load_model(str(out), compile=False)
    elif mode == "identity":
        folded = _load_legacy(_model(True, seed=5), out)
    else:
        folded = _load_legacy(_model(False, seed=5), out)
    got = np.asarray(folded.predict(x, verbose=0), np.float64)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-5


def test_whole_model_check_runner_matches_keras(tmp_path):
    """The numpy runner of --check's whole-model check against Keras' own predictions; a layer
    it does not run is named in the result, never skipped."""
    from bnstat.folding.graphcheck import _run
    from bnstat.folding.keras import keras_graph
    from bnstat.io.models import read_model

    model = _model(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(str(tmp_path / "m.h5"))
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 3))
    want = np.asarray(model.predict(x.astype(np.float32), verbose=0), np.float64)
    m = read_model(str(tmp_path / "m.h5"))

    def get(name, param):
        hits = [k for k in m.arrays if k.split("/")[-2] == name and k.split("/")[-1].split(":")[0]
                == param]
        return np.asarray(m.arrays[hits[0]], np.float64) if hits else None

    got = _run(keras_graph(m.config), m.config, get, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # a refused layer is said, not silently skipped
    from keras import layers

    odd = keras.Sequential([keras.Input((4, 4, 2)), layers.Conv2D(3, 1, name="c"),
                            layers.BatchNormalization(name="c_bn"), layers.LayerNormalization()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        odd.save(str(tmp_path / "odd.h5"))
    res = _fold(tmp_path / "odd.h5", tmp_path / "odd_f.h5", "identity")
    assert "layer class LayerNormalization" in res.model_check["refused"]
