"""bnstat.io.open_any: paths, path-likes, lists, arrays, dicts, anything with __array__,
and bnstat.moments / bnstat.normalize on each (against numpy float64)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

import bnstat
from bnstat.errors import InputError, UsageProblem
from bnstat.io import open_any


class ArrayLike:
    """A plain object exposing ``__array__`` (as a dask block or an xarray DataArray does)."""

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


def ref_bn(x, eps=1e-5):
    """BatchNorm over N, H, W of an NCHW array, in float64."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


@pytest.fixture
def x():
    return np.random.default_rng(5).normal(2.0, 3.0, (6, 3, 4, 5))


def test_a_pathlib_path_to_normalize(tmp_path, x):
    """Issue 10, bug 1: normalize(pathlib.Path) raised "'PosixPath' object is not iterable"."""
    np.save(tmp_path / "acts.npy", x)
    out = tmp_path / "out.npy"
    applied = bnstat.normalize(pathlib.Path(tmp_path / "acts.npy"), out, layout="NCHW")
    assert list(applied) == ["acts"]
    np.testing.assert_allclose(np.load(out), ref_bn(x), rtol=1e-10, atol=1e-12)


def test_every_kind_of_path(tmp_path, x):
    np.save(tmp_path / "a.npy", x)
    name = str(tmp_path / "a.npy")
    for given in (name, pathlib.Path(name), name.encode(), [pathlib.Path(name)], (name,)):
        (src,) = open_any(given)
        assert src.path == name and src.shape == x.shape


def test_a_list_of_paths_is_one_data_set_split_along_N(tmp_path, x):
    np.savez(tmp_path / "a.npz", acts=x[:2])
    np.savez(tmp_path / "b.npz", acts=x[2:])
    (s,) = bnstat.moments([tmp_path / "a.npz", tmp_path / "b.npz"], layout="NCHW").values()
    np.testing.assert_allclose(s.mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(s.var, x.var(axis=(0, 2, 3)), rtol=1e-12)


def test_an_object_with___array___to_moments_and_normalize(x):
    (s,) = bnstat.moments(ArrayLike(x), layout="NCHW").values()
    np.testing.assert_allclose(s.mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(s.var, x.var(axis=(0, 2, 3)), rtol=1e-12)
    y = bnstat.normalize(ArrayLike(x), layout="NCHW")
    assert isinstance(y, np.ndarray) and y.dtype == np.float64
    np.testing.assert_allclose(y, ref_bn(x), rtol=1e-10, atol=1e-12)


def test_a_torch_tensor_to_moments_and_normalize(x):
    torch = pytest.importorskip("torch", reason="torch tensors as inputs")
    t = torch.from_numpy(x.astype(np.float32))
    (s,) = bnstat.moments(t, layout="NCHW").values()
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(s.mean, x32.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(s.var, x32.var(axis=(0, 2, 3)), rtol=1e-6)
    y = bnstat.normalize(t, layout="NCHW")
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref_bn(x32), rtol=1e-5, atol=1e-5)
    # and what torch's own BatchNorm computes (training mode: batch statistics)
    bn = torch.nn.BatchNorm2d(3, affine=False).train()
    np.testing.assert_allclose(y, bn(t).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_tensor_that_requires_grad_is_an_input_error_naming_what_to_do(x):
    torch = pytest.importorskip("torch", reason="torch tensors as inputs")
    t = torch.ones(4, 3, requires_grad=True)
    with pytest.raises(InputError, match=r"array: cannot be read as a numpy array") as info:
        bnstat.moments(t)
    assert "detach()" in str(info.value)


def test_a_dict_of_arrays_keeps_its_names_and_normalizes_to_a_dict(x):
    d = {"a": x, "b": ArrayLike(x[:, :2] * 2)}
    assert [s.name for s in open_any(d)] == ["a", "b"]
    out = bnstat.normalize(d, layout="NCHW")
    assert list(out) == ["a", "b"]
    np.testing.assert_allclose(out["a"], ref_bn(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out["b"], ref_bn(x[:, :2] * 2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [42, None, [1, 2], [], {}, object()])
def test_anything_else_is_a_usage_problem_naming_the_parameter(bad):
    with pytest.raises(UsageProblem, match=r"source="):
        open_any(bad)


def test_dataset_patterns_select_file_members(tmp_path, x):
    np.savez(tmp_path / "a.npz", first=x, second=x[:, :1])
    assert [s.name for s in open_any(tmp_path / "a.npz", "sec*")] == ["second"]
    assert [s.name for s in open_any(tmp_path / "a.npz", ["first", "second"])] == ["first", "second"]


def test_a_one_dimensional_array_is_refused():
    with pytest.raises(InputError, match=r"1-D array"):
        open_any(np.zeros(5))
