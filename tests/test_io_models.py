"""bnstat.io.models: the format registry, detection by magic bytes, and each format's
reader and writer against the format's own library (numpy, h5py, safetensors)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bnstat.errors import InputError, OutputError
from bnstat.io import models
from bnstat.io.models import (
    FORMATS,
    ModelFile,
    ModelIndex,
    index_model,
    model_format,
    output_format,
    read_model,
    write_model,
)


def state(rng):
    return {"features.0.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "features.1.running_mean": rng.normal(size=4),
            "features.1.num_batches_tracked": np.array(7, np.int64)}


def test_the_registry_names_every_format_once():
    names = [f.name for f in FORMATS]
    # sniffed in this order: the torch and Keras 3 zips before the .npz zip, a Keras 3
    # .weights.h5 before plain HDF5
    assert names == ["torch", "keras-weights", "keras", "npz", "hdf5", "safetensors"]
    exts = [e for f in FORMATS for e in f.extensions]
    assert len(exts) == len(set(exts))
    assert all(isinstance(f, models.ModelFormat) for f in FORMATS)


@pytest.mark.parametrize("name", ["m.npz", "m.h5", "m.safetensors"])
def test_round_trip_in_order_and_detection_by_content(tmp_path, rng, name):
    arrays = state(rng)
    fmt = write_model(str(tmp_path / name), arrays)
    assert fmt == output_format(name, None)
    # the format comes from the bytes, not the name
    renamed = tmp_path / "model.bin"
    (tmp_path / name).rename(renamed)
    assert model_format(str(renamed)) == fmt
    m = read_model(str(renamed))
    assert isinstance(m, ModelFile) and m.format == fmt
    if fmt == "npz":
        assert m.ordered and list(m.arrays) == list(arrays)
    else:  # a new HDF5 file's groups do not track creation order; safetensors' header is
        # sorted by the reference writer, so its order is never taken for the model's
        assert not m.ordered and set(m.arrays) == set(arrays)
        if fmt == "hdf5":
            assert list(m.arrays) == sorted(arrays)
        assert m.order_source == {"hdf5": "alphabetical (HDF5)",
                                  "safetensors": "safetensors order (sorted)"}[fmt]
    for k, v in arrays.items():
        assert m.arrays[k].dtype == v.dtype
        np.testing.assert_array_equal(m.arrays[k], v)
    idx = index_model(str(renamed))
    assert isinstance(idx, ModelIndex)
    assert idx.entries == {k: (m.arrays[k].shape, m.arrays[k].dtype) for k in m.arrays}


def test_each_format_reads_what_its_own_library_wrote(tmp_path, rng):
    h5py = pytest.importorskip("h5py", reason="HDF5 model files")
    arrays = state(rng)
    np.savez(tmp_path / "a.npz", **arrays)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
    paths = [tmp_path / "a.npz", tmp_path / "a.h5"]
    try:
        from safetensors.numpy import save_file
    except ImportError:
        pass
    else:
        save_file(arrays, str(tmp_path / "a.safetensors"))
        paths.append(tmp_path / "a.safetensors")
    for p in paths:
        m = read_model(str(p))
        assert set(m.arrays) == set(arrays)
        for k, v in arrays.items():
            np.testing.assert_array_equal(m.arrays[k], v)


def test_what_the_writers_write_reads_back_in_the_format_libraries(tmp_path, rng):
    arrays = state(rng)
    write_model(str(tmp_path / "w.npz"), arrays)
    with np.load(tmp_path / "w.npz") as z:
        assert list(z.files) == list(arrays)
        np.testing.assert_array_equal(z["features.0.weight"], arrays["features.0.weight"])
    try:
        from safetensors.numpy import load_file
    except ImportError:
        return
    write_model(str(tmp_path / "w.safetensors"), arrays)
    back = load_file(str(tmp_path / "w.safetensors"))
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("x.npz", b"not a zip file at all", r"x\.npz: not a \.npz \(zip\) file \(bad magic bytes b'not '\)"),
    ("x.h5", b"not an hdf5 file at all", r"x\.h5: not an HDF5 file \(no HDF5 signature\)"),
    ("x.safetensors", b"short", r"not a \.safetensors file \(no JSON header after 8 bytes\)"),
    ("x.txt", b"some text that is no model", r"x\.txt: unknown model file format"),
    ("x.npy", None, r"a single \.npy array, not a model file"),
    ("empty.npz", b"", r"empty\.npz: empty file"),
])
def test_refusals_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        np.save(path, np.ones(3))
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        read_model(str(path))
    if "unknown" in message:
        assert all(f in str(info.value) for f in ("bnstat reads models as", "PyTorch .pt", "(.keras)", ".npz", "HDF5 (.h5)", ".safetensors"))


def test_a_missing_model_file_and_a_directory(tmp_path):
    with pytest.raises(InputError, match=r"nope\.npz: no such file"):
        read_model(str(tmp_path / "nope.npz"))
    with pytest.raises(InputError, match=r"is a directory"):
        index_model(str(tmp_path))


def test_an_unknown_output_extension(tmp_path, rng):
    with pytest.raises(OutputError, match=r"cannot tell the model format") as info:
        write_model(str(tmp_path / "out.xyz"), state(rng))
    assert "Use .pt, .weights.h5, .keras, .npz, .h5 or .safetensors." in str(info.value)
    assert not (tmp_path / "out.xyz").exists()


def test_a_new_format_is_one_registry_entry(tmp_path, monkeypatch, rng):
    """The protocol of the package docstring: a format module's FORMAT, tried in order."""
    magic = b"TOYMODEL"

    def read(path):
        idx = index(path)
        return ModelFile(**vars(idx), arrays={"w": np.arange(3.0)})

    def index(path):
        return ModelIndex(path, "toy", {"w": ((3,), np.dtype(np.float64))})

    written = {}

    def write(tmp, arrays, template):
        with open(tmp, "wb") as fh:
            fh.write(magic)
        written.update(arrays)

    toy = models.ModelFormat(name="toy", label="Toy (.toy)", extensions=(".toy",),
                             sniff=lambda path, head: head.startswith(magic), index=index,
                             read=read, write=write, mismatch="not a toy file")
    monkeypatch.setattr(models, "FORMATS", (toy, *FORMATS))
    (tmp_path / "a.toy").write_bytes(magic + b"rest")
    assert model_format(str(tmp_path / "a.toy")) == "toy"
    np.testing.assert_array_equal(read_model(str(tmp_path / "a.toy")).arrays["w"], np.arange(3.0))
    assert write_model(str(tmp_path / "b.toy"), {"w": np.ones(2)}) == "toy"
    assert (tmp_path / "b.toy").read_bytes() == magic and list(written) == ["w"]
    (tmp_path / "c.toy").write_bytes(b"something else entirely")
    with pytest.raises(InputError, match=r"c\.toy: not a toy file"):
        read_model(str(tmp_path / "c.toy"))
    (tmp_path / "d.txt").write_bytes(b"something else entirely")
    with pytest.raises(InputError, match=r"reads models as Toy \(\.toy\), PyTorch \.pt, "):
        read_model(str(tmp_path / "d.txt"))
    # a read-only format is never chosen for an output
    monkeypatch.setattr(models, "FORMATS", (dataclasses.replace(toy, write=None), *FORMATS))
    assert output_format("x.toy", None) is None


def test_a_broken_link_in_an_hdf5_model_names_the_dataset(tmp_path, rng):
    h5py = pytest.importorskip("h5py", reason="HDF5 model files")
    with h5py.File(tmp_path / "m.h5", "w") as f:
        f.create_dataset("bn/moving_mean", data=np.zeros(3))
        f["bn/gone"] = h5py.SoftLink("/nowhere")
    with pytest.raises(InputError, match=r"m\.h5:bn/gone: broken soft link to /nowhere"):
        read_model(str(tmp_path / "m.h5"))


def test_hdf5_groups_that_track_creation_order_give_the_model_order(tmp_path):
    h5py = pytest.importorskip("h5py", reason="HDF5 model files")
    with h5py.File(tmp_path / "m.h5", "w", track_order=True) as f:
        g = f.create_group("net", track_order=True)
        for name in ("z.weight", "a.weight", "m.bias"):
            g.create_dataset(name, data=np.ones(2))
    idx = index_model(str(tmp_path / "m.h5"))
    assert list(idx.entries) == ["net/z.weight", "net/a.weight", "net/m.bias"]
    # (idx.ordered is still False here: the root's creation-order flag is read from the file's
    # plist; the HDF5 order logic belongs to the folding work)


def test_an_npz_member_of_python_objects_is_refused(tmp_path):
    np.savez(tmp_path / "m.npz", w=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match=r"m\.npz:w: dtype object holds Python objects"):
        read_model(str(tmp_path / "m.npz"))
