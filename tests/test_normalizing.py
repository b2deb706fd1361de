"""bnstat.normalizing: the statistics strategies, model files through bnstat.io.models,
chunk sizes as strings, and messages that name the parameters."""

from __future__ import annotations

import os

import numpy as np
import pytest

import bnstat
from bnstat.errors import UsageProblem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_MODEL = os.path.join(REPO, "sample_data", "model.npz")


def sample_arrays():
    with np.load(SAMPLE_MODEL) as z:
        return {k: z[k] for k in z.files}


def write_safetensors(path, arrays, writer):
    if writer == "safetensors":
        st = pytest.importorskip("safetensors.numpy", reason="the reference safetensors writer")
        st.save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    else:
        from bnstat.io.models import write_model

        write_model(str(path), arrays)


def ref_model_bn(x, arrays, layer, eps=1e-5):
    """Inference BatchNorm of an NCHW array with a PyTorch layer's arrays, in float64."""
    get = lambda k: np.asarray(arrays[f"{layer}.{k}"], np.float64).reshape(1, -1, 1, 1)  # noqa: E731
    return (x - get("running_mean")) / np.sqrt(get("running_var") + eps) * get("weight") + get("bias")


@pytest.mark.parametrize("writer", ["bnstat", "safetensors"])
def test_cli_normalize_with_a_safetensors_model(tmp_path, cli, writer):
    """Issue 10, bug 2: --model model.safetensors said "unknown file format"."""
    arrays = sample_arrays()
    write_safetensors(tmp_path / "model.safetensors", arrays, writer)
    x = np.random.default_rng(3).normal(1.0, 2.0, (4, 16, 3, 5))
    np.save(tmp_path / "acts.npy", x)
    code, out, err = cli("normalize", tmp_path / "acts.npy", "-o", tmp_path / "out.npy",
                         "--model", tmp_path / "model.safetensors", "--bn", "features.1",
                         "--layout", "NCHW", "--quiet")
    assert code == 0, err
    assert "Traceback" not in err
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), ref_model_bn(x, arrays, "features.1"),
                               rtol=1e-10, atol=1e-12)


def test_api_model_file_of_every_format_gives_the_same_result(tmp_path):
    arrays = sample_arrays()
    x = np.random.default_rng(4).normal(0.0, 1.0, (2, 32, 4, 4))
    np.savez(tmp_path / "m.npz", **arrays)
    write_safetensors(tmp_path / "m.safetensors", arrays, "bnstat")
    ref = ref_model_bn(x, arrays, "features.4")
    for name in ("m.npz", "m.safetensors"):
        y = bnstat.normalize(x, model=tmp_path / name, bn="features.4", layout="NCHW")
        np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-12)


def test_a_model_that_is_not_a_model_file_names_the_file(tmp_path, cli):
    (tmp_path / "notes.txt").write_text("not a model at all, just some text here")
    np.save(tmp_path / "acts.npy", np.ones((2, 3)))
    code, _out, err = cli("normalize", tmp_path / "acts.npy", "-o", tmp_path / "o.npy",
                          "--model", tmp_path / "notes.txt", "--bn", "x")
    assert code == 1
    assert "notes.txt: unknown model file format" in err and "Traceback" not in err
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("size", ["512KiB", "64MiB", "1GB", 4096, "100"])
def test_chunk_size_accepts_the_cli_size_strings(size):
    x = np.random.default_rng(6).normal(size=(40, 3, 8))
    ref = (x - x.mean(axis=(0, 2), keepdims=True)) / np.sqrt(x.var(axis=(0, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(bnstat.normalize(x, layout="NCL", chunk_size=size), ref,
                               rtol=1e-10, atol=1e-12)
    (s,) = bnstat.moments(x, layout="NCL", chunk_size=size).values()
    np.testing.assert_allclose(s.mean, x.mean(axis=(0, 2)), rtol=1e-12)


@pytest.mark.parametrize("size", ["lots", "0.1", 0, -5, True])
def test_a_bad_chunk_size_names_the_option_and_the_parameter(size):
    with pytest.raises(UsageProblem, match=r"--chunk-size/chunk_size="):
        bnstat.moments(np.ones((2, 3)), chunk_size=size)
    with pytest.raises(UsageProblem, match=r"--chunk-size/chunk_size="):
        bnstat.normalize(np.ones((2, 3)), chunk_size=size)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    (dict(stats={}, model="m.npz", bn="x"), r"--stats/stats= or --model/model="),
    (dict(model="m.npz"), r"--model/model= needs --bn/bn="),
    (dict(per_batch=2, stats={}), r"--per-batch/per_batch="),
    (dict(eps=-1.0), r"--eps/eps= -1.0"),
    (dict(output="out.h5"), r"-o/output= .*out\.h5"),
])
def test_usage_messages_name_the_parameters(tmp_path, kwargs, pattern):
    kwargs = {k: (str(tmp_path / v) if k == "output" else v) for k, v in kwargs.items()}
    with pytest.raises(UsageProblem, match=pattern):
        bnstat.normalize(np.ones((4, 3)), **kwargs)


def test_a_path_without_output_names_the_parameter(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3)))
    with pytest.raises(UsageProblem, match=r"-o OUTPUT \(output=\)"):
        bnstat.normalize(tmp_path / "a.npy")


def test_the_module_keeps_no_state_between_calls():
    """No module globals: what one call sets up (threads) another does not inherit."""
    import bnstat.normalizing as nz

    assert not hasattr(nz, "_THREADS")
    x = np.random.default_rng(8).normal(size=(6, 4))
    ref = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-5)
    for threads in (1, 2, 1):
        y = bnstat.normalize(x, layout="NC", threads=threads, engine="numba")
        np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_the_api_has_real_signatures():
    import inspect

    from bnstat.folding import fold as impl

    for fn in (bnstat.moments, bnstat.normalize, bnstat.fold, bnstat.load_stats, bnstat.save_stats):
        params = inspect.signature(fn).parameters.values()
        assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params), fn.__name__
        assert "Raises" in fn.__doc__, fn.__name__
    assert list(inspect.signature(bnstat.fold).parameters) == list(inspect.signature(impl).parameters)


def test_load_and_save_stats_take_path_likes(tmp_path):
    x = np.random.default_rng(9).normal(size=(5, 3))
    stats = bnstat.moments(x, layout="NC")
    bnstat.save_stats(stats, tmp_path / "s.npz")
    back = bnstat.load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(back["array"].mean, stats["array"].mean)
    np.testing.assert_allclose(back["array"].var, x.var(axis=0), rtol=1e-12)
