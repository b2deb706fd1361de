"""PyTorch .pt files read and written without torch (torch is the reference here only)."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch writes the reference .pt files")
nn = torch.nn

from bnstat.errors import InputError  # noqa: E402
from bnstat.io.models import index_model, read_model, write_model  # noqa: E402


def as_numpy(t):
    return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def small_net():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 1, groups=2), nn.BatchNorm2d(4)))


def folded_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.ReLU(),
                         nn.Conv2d(4, 4, 1, groups=2), nn.Identity()).eval()


def assert_same_as_torch(model, path, prefix=""):
    ref = torch.load(path, weights_only=False)
    if isinstance(ref, nn.Module):
        ref = ref.state_dict()
    ref = {k[len(prefix):]: v for k, v in ref.items() if isinstance(v, torch.Tensor)}
    assert list(model.entries) == list(ref)
    for name, t in ref.items():
        a = model.arrays[name]
        r = as_numpy(t)
        assert a.dtype == r.dtype and a.shape == r.shape, name
        np.testing.assert_array_equal(a, r, err_msg=name)


# ---- reading -----------------------------------------------------------------

def test_state_dict_read_exactly(tmp_path):
    net = small_net()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    model = read_model(str(tmp_path / "sd.pt"))
    assert model.format == "torch" and model.naming == "a state_dict" and model.prefix == ""
    assert_same_as_torch(model, tmp_path / "sd.pt")
    index = index_model(str(tmp_path / "sd.pt"))
    assert index.entries == model.entries and index.arrays == {}


@pytest.mark.parametrize("wrap,prefix,key", [
    (lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3}, "model.", "state_dict"),
    (lambda sd: {"module." + k: v for k, v in sd.items()}, "module.", None),
    (lambda sd: {"model": {"module." + k: v for k, v in sd.items()}, "step": 9}, "module.", "model"),
    (lambda sd: {"ema": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, "", "ema"),
])
def test_checkpoints_and_prefixes(tmp_path, wrap, prefix, key):
    sd = small_net().state_dict()
    torch.save(wrap(sd), tmp_path / "ck.pth")
    model = read_model(str(tmp_path / "ck.pth"))
    assert model.prefix == prefix
    assert list(model.entries) == list(sd)
    for name, t in sd.items():
        np.testing.assert_array_equal(model.arrays[name], as_numpy(t))
    if key:
        assert repr(key) in model.naming and repr(key) in model.order_source


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                   torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                   torch.bool, torch.uint16])
def test_every_dtype(tmp_path, dtype):
    base = (torch.arange(-12, 12, dtype=torch.float64) * 1.37).reshape(4, 6)
    t = (base > 0) if dtype is torch.bool else base.to(dtype) if dtype.is_floating_point else \
        base.to(torch.int64).abs().to(dtype) if dtype in (torch.uint8, torch.uint16) else base.to(dtype)
    torch.save({"w": t, "v": t[1:, ::2]}, tmp_path / "d.pt")
    model = read_model(str(tmp_path / "d.pt"))
    assert_same_as_torch(model, tmp_path / "d.pt")
    assert model.stored == ({"w": "BF16", "v": "BF16"} if dtype is torch.bfloat16 else {})
    out = tmp_path / "o.pt"
    write_model(str(out), model.arrays, template=model)
    back = torch.load(out, weights_only=True)
    assert back["w"].dtype == dtype and torch.equal(back["w"], t) and torch.equal(back["v"], t[1:, ::2])


def test_views_sharing_a_storage(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    doc = {"whole": base, "slice": base[2:5, 3:9], "t": base.t(), "step": base[::2, 1::3],
           "expanded": torch.arange(3.0).expand(4, 3), "empty": base[:0]}
    torch.save(doc, tmp_path / "v.pt")
    with zipfile.ZipFile(tmp_path / "v.pt") as zf:
        assert sum("/data/" in n for n in zf.namelist()) == 2  # base (the empty view too) and arange(3)
    model = read_model(str(tmp_path / "v.pt"))
    assert_same_as_torch(model, tmp_path / "v.pt")
    assert model.arrays["slice"].flags.writeable  # a copy, not the file's read-only map


def test_non_numeric_tensors_are_kept_not_read(tmp_path):
    torch.save({"w": torch.ones(2, 2), "z": torch.ones(3, dtype=torch.complex64)}, tmp_path / "c.pt")
    model = read_model(str(tmp_path / "c.pt"))
    assert list(model.entries) == ["w"]
    write_model(str(tmp_path / "o.pt"), {"w": model.arrays["w"] * 2}, template=model)
    back = torch.load(tmp_path / "o.pt", weights_only=True)
    assert torch.equal(back["z"], torch.ones(3, dtype=torch.complex64))
    assert torch.equal(back["w"], torch.full((2, 2), 2.0))


# ---- pickled whole modules ---------------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.01)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(6, eps=1e-3, momentum=0.01)
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x):
        return self.bn2(self.up(torch.relu(self.bn(self.conv(x)))))


def test_module_tree(tmp_path):
    net = randomize_bn(nn.Sequential(Block(), nn.Hardswish()))
    torch.save(net, tmp_path / "m.pt")
    model = read_model(str(tmp_path / "m.pt"))
    assert_same_as_torch(model, tmp_path / "m.pt")
    assert "0.scratch" not in model.entries  # non-persistent buffers are not in a state_dict
    mods = model.modules
    assert mods[""].cls == "torch.nn.modules.container.Sequential"
    assert mods["0"].cls.endswith(".Block") and mods["0"].attrs == {}  # outside torch.nn: name only
    assert mods["0.conv"].kind == "Conv2d" and mods["0.conv"].attrs["groups"] == 2
    assert mods["0.conv"].attrs["kernel_size"] == (3, 3) and mods["0.conv"].attrs["padding"] == (1, 1)
    assert mods["0.up"].kind == "ConvTranspose2d" and mods["0.up"].attrs["stride"] == (2, 2)
    assert mods["0.bn"].attrs["eps"] == 1e-3 and mods["0.bn"].attrs["momentum"] == 0.01
    assert mods["0.bn"].attrs["affine"] is True
    assert mods["1"].kind == "Hardswish"
    layers = model.metadata["layers"]
    assert layers["0.bn"] == {"module_type": "BatchNorm2d", "eps": 1e-3}
    assert layers["0.conv"] == {"module_type": "Conv2d", "groups": 2}


def test_mobilenet_like_module_folds_with_its_eps(tmp_path, cli):
    net = randomize_bn(nn.Sequential(Block()))
    torch.save(net, tmp_path / "m.pt")
    assert read_model(str(tmp_path / "m.pt")).modules["0.bn"].attrs["eps"] == 1e-3
    code, _, err = cli("fold", tmp_path / "m.pt", "-o", tmp_path / "f.pt")  # no --eps: the file's 1e-3
    assert code == 0, err
    folded = torch.load(tmp_path / "f.pt", weights_only=False).eval()
    assert isinstance(folded[0].bn, nn.Identity) and isinstance(folded[0].bn2, nn.Identity)
    assert folded[0].conv.bias is not None and folded[0].up.bias is not None
    assert set(folded.state_dict()) == {"0.conv.weight", "0.conv.bias", "0.up.weight", "0.up.bias"}
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


# ---- writing -----------------------------------------------------------------------

def test_fold_state_dict_loads_weights_only_and_matches(tmp_path, cli):
    net = small_net()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    code, _, err = cli("fold", tmp_path / "sd.pt", "-o", tmp_path / "f.pt")
    assert code == 0, err
    assert "Traceback" not in err
    sd = torch.load(tmp_path / "f.pt", weights_only=True)
    mapped = torch.load(tmp_path / "f.pt", weights_only=True, mmap=True)  # needs aligned storages
    assert all(torch.equal(mapped[k], v) for k, v in sd.items())
    target = folded_net()
    target.load_state_dict(sd)  # strict: exactly the keys of a model without the BNs
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(target(x), net(x), rtol=1e-5, atol=1e-5)


def test_fold_checkpoint_keeps_every_other_entry(tmp_path, cli):
    net = small_net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net.train()
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    randomize_bn(net)
    sd = net.state_dict()
    prefixed = OrderedDict(("model." + k, v) for k, v in sd.items())
    prefixed._metadata = sd._metadata
    ck = {"epoch": 7, "global_step": 1234, "state_dict": prefixed,
          "optimizer_states": [opt.state_dict()],
          "hyper_parameters": {"lr": 0.01, "name": "net", "betas": (0.9, 0.99), "tags": {"a", "b"},
                               "raw": b"\x00\xff", "big": 2 ** 70, "none": None}}
    torch.save(ck, tmp_path / "ck.ckpt")
    code, _, err = cli("fold", tmp_path / "ck.ckpt", "-o", tmp_path / "f.ckpt")
    assert code == 0, err
    back = torch.load(tmp_path / "f.ckpt", weights_only=True)
    assert list(back) == list(ck)
    assert back["epoch"] == 7 and back["global_step"] == 1234
    assert back["hyper_parameters"] == ck["hyper_parameters"]
    ref_opt, got_opt = ck["optimizer_states"][0], back["optimizer_states"][0]
    assert got_opt["param_groups"] == ref_opt["param_groups"]
    for i, state in ref_opt["state"].items():
        for k, v in state.items():
            assert torch.equal(got_opt["state"][i][k], v)
    assert list(back["state_dict"]) == ["model.0.weight", "model.0.bias", "model.3.weight", "model.3.bias"]
    target = folded_net()
    target.load_state_dict({k[len("model."):]: v for k, v in back["state_dict"].items()})
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(target(x), net(x), rtol=1e-5, atol=1e-5)
    assert back["state_dict"]._metadata == sd._metadata  # load_state_dict's module versions kept


def test_bfloat16_written_back_rounded(tmp_path, cli):
    net = small_net().to(torch.bfloat16)
    torch.save(net.state_dict(), tmp_path / "b.pt")
    code, _, err = cli("fold", tmp_path / "b.pt", "-o", tmp_path / "f.pt")
    assert code == 0, err
    sd = torch.load(tmp_path / "f.pt", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for k, t in sd.items())
    target = folded_net().to(torch.bfloat16)
    target.load_state_dict(sd)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(target(x.bfloat16()).float(), net.float()(x), rtol=0.1, atol=0.1)


def test_npz_to_pt(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_model(str(tmp_path / "o.pt"), {"fc.weight": w, "fc.bias": np.zeros(2, np.float64)})
    back = torch.load(tmp_path / "o.pt", weights_only=True)
    assert list(back) == ["fc.weight", "fc.bias"] and back["fc.bias"].dtype == torch.float64
    np.testing.assert_array_equal(back["fc.weight"].numpy(), w)


# ---- what is refused ---------------------------------------------------------------

class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_the_pickle_is_never_run(tmp_path, cli):
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2, 2), "x": Exploit(marker)}, tmp_path / "evil.pt")
    for args in (("fold", tmp_path / "evil.pt", "-o", tmp_path / "o.pt"), ("info", tmp_path / "evil.pt"),
                 ("moments", tmp_path / "evil.pt")):
        code, _, err = cli(*args)
        assert code == 1, err
        assert "evil.pt:evil/data.pkl" in err and ("posix.system" in err or "nt.system" in err)
        assert "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "o.pt").exists()


def rezip(src, dst, change):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def _bad_files(tmp_path):
    sd = {"a.weight": torch.ones(4, 3), "a.bias": torch.zeros(4)}
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    raw = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    rezip(good, tmp_path / "short.pt", lambda n, d: d[:-8] if n.endswith("data/0") else d)
    rezip(good, tmp_path / "missing.pt", lambda n, d: None if n.endswith("data/1") else d)
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():  # torch.jit is deprecated: the files people hold remain
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "script.pt")
    return {
        "cut.pt": "cut.pt: not a valid torch.save (zip) file",
        "short.pt": "short.pt:good/data/0: data.pkl says the storage holds 48 bytes, the member 40",
        "missing.pt": "missing.pt:good/data/1: the storage member is missing",
        "legacy.pt": "legacy.pt: a legacy torch.save file",
        "script.pt": "script.pt: a TorchScript archive (torch.jit.save); torch.jit is not supported",
    }


def test_bad_files(tmp_path, cli):
    for name, message in _bad_files(tmp_path).items():
        for args in (("fold", tmp_path / name, "-o", tmp_path / "o.pt"), ("moments", tmp_path / name)):
            code, _, err = cli(*args)
            assert code == 1, (name, err)
            assert message in err, (name, err)
            assert "Traceback" not in err
            assert not (tmp_path / "o.pt").exists()
        with pytest.raises(InputError, match="legacy|TorchScript|zip|storage"):
            read_model(str(tmp_path / name))


def test_pickle_lying_about_a_view(tmp_path):
    torch.save({"w": torch.ones(4)}, tmp_path / "g.pt")

    def bigger(name, data):  # size (4,) -> (9,): past the end of the 4-element storage
        return data.replace(b"K\x04\x85", b"K\x09\x85", 1) if name.endswith("data.pkl") else data

    rezip(tmp_path / "g.pt", tmp_path / "lie.pt", bigger)
    with pytest.raises(InputError, match=r"lie.pt:w: the tensor .* reaches past the end of its "
                                         r"storage g/data/0 \(16 bytes\)"):
        read_model(str(tmp_path / "lie.pt"))


def test_module_pickle_refuses_a_change_it_cannot_hold(tmp_path):
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m.pt")
    model = read_model(str(tmp_path / "m.pt"))
    arrays = dict(model.arrays, extra=np.zeros(2, np.float32))
    from bnstat.errors import OutputError

    with pytest.raises(OutputError, match="has no parameter or buffer extra"):
        write_model(str(tmp_path / "o.pt"), arrays, template=model)
    assert not (tmp_path / "o.pt").exists()


# ---- activations ---------------------------------------------------------------------

def moments_doc(cli, *args):
    code, out, err = cli("moments", *args, "--format", "json")
    assert code == 0, err
    return {r["name"]: r for r in json.loads(out)["arrays"]}


def strip_names(doc):
    return {k: {f: v for f, v in r.items() if f not in ("name", "path", "source", "sources")} for k, r in doc.items()}


def test_moments_of_pt_and_safetensors_equal_npy(tmp_path, cli):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors writes the reference file")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((5, 3, 4, 4)) * 3 + 1).astype(np.float32)
    np.save(tmp_path / "acts.npy", x)
    torch.save(torch.from_numpy(x), tmp_path / "acts.pt")
    st.save_file({"acts": x}, str(tmp_path / "acts.safetensors"))
    ref = strip_names(moments_doc(cli, tmp_path / "acts.npy", "--chunk-size", "200"))
    for f in ("acts.pt", "acts.safetensors"):
        got = moments_doc(cli, tmp_path / f, "--chunk-size", "200")
        assert list(got) == ["acts"]
        assert strip_names(got) == ref, f


def test_moments_of_a_dict_of_views(tmp_path, cli):
    rng = np.random.default_rng(2)
    base = torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32))
    torch.save({"t": base.t(), "s": base[1:, 2:], "b": base.bfloat16(), "n": 3}, tmp_path / "d.pt")
    np.savez(tmp_path / "d.npz", t=np.ascontiguousarray(base.t().numpy()), s=base[1:, 2:].numpy(), b=base.bfloat16().float().numpy())
    got = moments_doc(cli, tmp_path / "d.pt", "--chunk-size", "40")
    ref = moments_doc(cli, tmp_path / "d.npz", "--chunk-size", "40")
    assert list(got) == ["t", "s", "b"]
    assert strip_names(got) == strip_names(ref)
    code, out, err = cli("moments", tmp_path / "d.pt", "-d", "s", "--format", "json")
    assert code == 0 and [r["name"] for r in json.loads(out)["arrays"]] == ["s"]


def test_info_names_the_format(tmp_path, cli):
    torch.save({"model": OrderedDict((("module." + k, v) for k, v in small_net().state_dict().items()))},
               tmp_path / "m.pt")
    code, out, err = cli("info", tmp_path / "m.pt")
    assert code == 0, err
    assert "torch.save zip: a state_dict under 'model', prefix 'module.' stripped" in " ".join(out.split())


def test_normalize_with_a_pt_model(tmp_path, cli):
    net = small_net()
    torch.save({"state_dict": net.state_dict(), "epoch": 1}, tmp_path / "m.pt")
    x = torch.randn(2, 4, 5, 5)
    torch.save({"x": x}, tmp_path / "x.pt")
    code, _, err = cli("normalize", tmp_path / "x.pt", "--model", tmp_path / "m.pt", "--bn", "4",
                       "-o", tmp_path / "y.npy")
    assert code == 0, err
    with torch.no_grad():
        ref = net[4](x).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=1e-5, atol=1e-5)


def test_safetensors_activations_refuse_a_header_past_the_end(tmp_path, cli):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors writes the reference file")
    st.save_file({"a": np.ones((4, 4), np.float32)}, str(tmp_path / "a.safetensors"))
    raw = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
    code, _, err = cli("moments", tmp_path / "cut.safetensors")
    assert code == 1 and "cut.safetensors:a: corrupt .safetensors entry" in err, err
    assert "Traceback" not in err


def test_module_pickle_to_safetensors_and_npz(tmp_path, cli):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors reads the output")
    net = randomize_bn(nn.Sequential(Block()))
    torch.save(net, tmp_path / "m.pt")
    for out in ("f.safetensors", "f.npz"):
        code, _, err = cli("fold", tmp_path / "m.pt", "-o", tmp_path / out)
        assert code == 0, err
    back = st.load_file(str(tmp_path / "f.safetensors"))  # a valid header: no foreign __metadata__
    with np.load(tmp_path / "f.npz") as z:
        assert sorted(back) == sorted(z.files) == ["0.conv.bias", "0.conv.weight", "0.up.bias", "0.up.weight"]
        for k in z.files:
            np.testing.assert_array_equal(back[k], z[k])
    target = nn.Sequential(Block())
    target[0].conv.bias = nn.Parameter(torch.zeros(8))
    target[0].up.bias = nn.Parameter(torch.zeros(6))
    target[0].bn, target[0].bn2 = nn.Identity(), nn.Identity()
    target.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(target.eval()(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_pickled_module_folds_by_its_types_and_eps(tmp_path, cli, transposed):
    conv = nn.ConvTranspose2d(6, 6, 3, bias=False) if transposed else nn.Conv2d(6, 6, 3, groups=3)
    net = randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(6, eps=1e-3, momentum=0.01)))
    torch.save(net, tmp_path / "m.pt")
    code, _, err = cli("fold", tmp_path / "m.pt", "-o", tmp_path / "f.pt")  # no --eps, no plan
    assert code == 0, err
    folded = torch.load(tmp_path / "f.pt", weights_only=False).eval()
    x = torch.randn(2, 6, 7, 7)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    assert "assumption" not in err
    if transposed:  # the bare state_dict of the same model: a square weight, nothing says which
        torch.save(net.state_dict(), tmp_path / "sd.pt")
        code, out, err = cli("fold", tmp_path / "sd.pt", "--dry-run")
        assert code == 0 and "ASSUMED" in out and "folded on an assumption" in err, (out, err)


def test_big_endian_file(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    torch.save({"w": t, "i": torch.arange(5, dtype=torch.int64)}, tmp_path / "le.pt")

    def swap(name, data):  # the same file as a big-endian machine writes it
        if name.endswith("/byteorder"):
            return b"big"
        if "/data/" in name:
            itemsize = 4 if name.endswith("/0") else 8
            return np.frombuffer(data, f"<u{itemsize}").astype(f">u{itemsize}").tobytes()
        return data

    rezip(tmp_path / "le.pt", tmp_path / "be.pt", swap)
    model = read_model(str(tmp_path / "be.pt"))
    np.testing.assert_array_equal(model.arrays["w"], t.numpy())
    np.testing.assert_array_equal(model.arrays["i"], np.arange(5))
    assert model.arrays["w"].dtype.isnative
    write_model(str(tmp_path / "o.pt"), {"w": model.arrays["w"] * 2, "i": model.arrays["i"]}, template=model)
    back = read_model(str(tmp_path / "o.pt"))
    assert back.archive.byteorder == "big"
    np.testing.assert_array_equal(back.arrays["w"], t.numpy() * 2)
    np.testing.assert_array_equal(back.arrays["i"], np.arange(5))


def test_activation_listing_leaves_out_masks_unless_named(tmp_path, cli):
    torch.save({"x": torch.ones(3, 2), "mask": torch.ones(3, 2, dtype=torch.bool)}, tmp_path / "a.pt")
    assert list(moments_doc(cli, tmp_path / "a.pt")) == ["x"]
    code, _, err = cli("moments", tmp_path / "a.pt", "-d", "mask")
    assert code == 1 and "a.pt:mask: dtype bool (bool) is not supported" in err, err


@pytest.mark.slow
def test_torchvision_mobilenet_v3_pickled_whole(tmp_path, cli):
    from conftest import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    net = randomize_bn(tv.models.mobilenet_v3_small())
    torch.save(net, tmp_path / "mnv3.pt")
    model = read_model(str(tmp_path / "mnv3.pt"))
    assert_same_as_torch(model, tmp_path / "mnv3.pt")
    assert model.modules[""].cls == "torchvision.models.mobilenetv3.MobileNetV3"
    bn_eps = {i.attrs["eps"] for i in model.modules.values() if i.kind == "BatchNorm2d"}
    assert bn_eps == {1e-3}
    assert model.modules["features.1.block.0.0"].attrs["groups"] == 16  # the depthwise conv
    code, _, err = cli("fold", tmp_path / "mnv3.pt", "-o", tmp_path / "f.pt")  # its own eps 1e-3
    assert code == 0, err
    folded = torch.load(tmp_path / "f.pt", weights_only=False).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-4, atol=1e-4)
