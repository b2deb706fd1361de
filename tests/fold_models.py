"""Real architectures folded end to end (issue 11): the harness of tests/test_fold_models.py,
and, run as a script, the table of README "fold" (model x format -> BNs folded / foldable,
wrong pairs, max relative output error):

    python tests/fold_models.py [MODEL...]

Each model is built with random weights, its BN statistics warmed by a few training-mode
passes, its state_dict saved as .npz, .safetensors and HDF5 (without and with track_order),
folded with --bn drop and --bn identity, loaded back strictly (drop: into a copy whose folded
BNs are nn.Identity; identity: into the model itself) and run in eval mode against the
original. The truth (which BN is fed straight by which conv / linear) comes from torch.fx,
independent of bnstat.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import warnings

import numpy as np

FORMATS = ("npz", "safetensors", "hdf5", "hdf5-tracked")
MODELS = ("resnet18", "densenet", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
          "unet")


def _torchvision():
    import types

    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import torchvision

    return torchvision


def unet():
    """A small UNet: a square grouped ConvTranspose2d named deconv2 with deconv2_bn (issue 11),
    and an unnamed ConvTranspose2d in a Sequential (no evidence: listed, not folded)."""
    from torch import nn

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                      nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.enc2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.deconv2 = nn.ConvTranspose2d(32, 32, 3, padding=1, groups=4, bias=False)
            self.deconv2_bn = nn.BatchNorm2d(32)
            self.up1 = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, stride=2), nn.BatchNorm2d(16))
            self.dec1 = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(16), nn.ReLU())
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            import torch

            e1 = self.enc1(x)
            e2 = self.enc2(self.pool(e1))
            d = torch.relu(self.deconv2_bn(self.deconv2(e2)))
            d = self.up1(d)
            return self.head(self.dec1(torch.cat([d, e1], 1)))

    return UNet()


def build(name: str):
    """The model (random weights, BN statistics warmed in training mode), in eval mode."""
    import torch

    torch.manual_seed(0)
    if name == "unet":
        model = unet()
    else:
        tv = _torchvision().models
        if name == "densenet":  # a small DenseNet config: same blocks as densenet121, narrower
            model = tv.DenseNet(growth_rate=8, block_config=(2, 3, 2), num_init_features=16,
                                bn_size=2, num_classes=10)
        else:
            model = getattr(tv, name)(weights=None, num_classes=10)
    with torch.no_grad():
        for m in model.modules():  # non-trivial BN parameters, as after training
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    return model.eval()


def truth(model) -> set[tuple[str, str]]:
    """(layer, bn) pairs where the BN is fed straight by a conv / conv-transpose / linear whose
    output goes nowhere else (torch.fx)."""
    import torch
    from torch import fx, nn

    gm = fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    out = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target),
                                                      nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1 \
                and isinstance(mods.get(src.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                                      nn.ConvTranspose1d, nn.ConvTranspose2d,
                                                      nn.ConvTranspose3d)):
            out.add((src.target, node.target))
    del torch
    return out


def save(model, path: str, fmt: str) -> None:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if fmt == "npz":
        np.savez(path, **sd)
    elif fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, path)
    else:
        import h5py

        with h5py.File(path, "w", track_order=fmt == "hdf5-tracked") as f:
            for k, v in sd.items():
                f.create_dataset(k, data=v)


def load_back(model, arrays: dict, pairs, mode: str):
    """The folded model: a copy loaded strictly from ``arrays``."""
    import torch
    from torch import nn

    folded = copy.deepcopy(model)
    if mode == "drop":
        mods = dict(folded.named_modules())
        for p in pairs:
            conv = mods[p.conv.name]
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(p.reading.channels))
            parent, _, leaf = p.bn.name.rpartition(".")
            setattr(mods[parent] if parent else folded, leaf, nn.Identity())
    state = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    folded.load_state_dict(state, strict=True)
    return folded.eval()


def fused_error(model, folded, pairs, mode: str) -> float:
    """Max relative difference of the folded weights from torch.nn.utils.fusion's."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    mods, fmods = dict(model.named_modules()), dict(folded.named_modules())
    worst = 0.0
    for p in pairs:
        conv, bn = mods[p.conv.name], mods[p.bn.name]
        transpose = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        if transpose and conv.groups > 1:
            continue  # torch's fusion is wrong there (pytorch#180995): the outputs tell
        if isinstance(conv, nn.Linear):
            ref = fuse_linear_bn_eval(conv, bn)
        else:
            ref = fuse_conv_bn_eval(conv, bn, transpose=transpose)
        got = fmods[p.conv.name]
        w, rw = got.weight.detach().double(), ref.weight.detach().double()
        err = float((w - rw).abs().max() / rw.abs().max())
        if mode == "drop":
            err = max(err, float((got.bias.detach().double() - ref.bias.detach().double()).abs().max()
                                 / ref.bias.detach().double().abs().max()))
        worst = max(worst, err)
    return worst


def run_case(name: str, fmt: str, mode: str, model=None, workdir: str | None = None) -> dict:
    """Fold one model saved in one format; the row of the table (and what the test asserts)."""
    import torch

    from bnstat.folding import fold

    model = model if model is not None else build(name)
    ext = {"hdf5": "h5", "hdf5-tracked": "h5"}.get(fmt, fmt)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, dst = os.path.join(tmp, f"m.{ext}"), os.path.join(tmp, f"f.{ext}")
        save(model, src, fmt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = fold(src, output=dst, bn=mode, check=True, eps=model_eps(model))
        from bnstat.io.models import read_model

        arrays = read_model(dst).arrays
    want = truth(model)
    got = {(p.conv.name, p.bn.name) for p in res.pairs}
    folded = load_back(model, arrays, res.pairs, mode)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y0, y1 = model(x).double(), folded(x).double()
    return {"model": name, "format": fmt, "bn": mode, "bns": sum(1 for _ in _bns(model)),
            "foldable": len(want), "folded": len(got & want), "wrong": sorted(got - want),
            "assumed": len(res.assumed), "unpaired": len(res.unpaired),
            "rel_err": float((y1 - y0).abs().max() / y0.abs().max()),
            "fused_err": fused_error(model, folded, [p for p in res.pairs
                                                     if (p.conv.name, p.bn.name) in want], mode),
            "warnings": [str(w.message) for w in caught], "result": res}


def model_eps(model) -> float | None:
    """The --eps a user gives for a state_dict (which does not store it): the model's BN eps
    when it is not PyTorch's default (MobileNetV3, EfficientNet: 1e-3)."""
    eps = {m.eps for m in _bns(model)}
    if len(eps) != 1:
        raise AssertionError(f"BNs with several eps: {eps}")
    return None if eps == {1e-5} else eps.pop()


def _bns(model):
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def main(names) -> None:
    print(f"{'model':20} {'format':13} {'bn':9} {'BNs':>4} {'folded/foldable':>16} {'wrong':>6} "
          f"{'assumed':>8} {'max rel out err':>16} {'vs torch fusion':>16}  --eps")
    for name in names:
        model = build(name)
        for fmt in FORMATS:
            for mode in ("drop", "identity"):
                r = run_case(name, fmt, mode, model)
                print(f"{name:20} {fmt:13} {mode:9} {r['bns']:>4} "
                      f"{r['folded']:>7}/{r['foldable']:<8} {len(r['wrong']):>6} {r['assumed']:>8} "
                      f"{r['rel_err']:>16.2e} {r['fused_err']:>16.2e}  {model_eps(model) or '-'}",
                      flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:] or MODELS)
