#!/usr/bin/env python
"""Regenerate the bnstat sample data files (numpy + h5py only, deterministic).

Run from anywhere (e.g. ``python sample_data/make_samples.py`` from the repo
root); the files are written next to this script:

    acts.h5         HDF5 activation dump (NCHW, nested groups, chunked, two gzip datasets)
    acts_nhwc.npy   NHWC float32 activations (block2 conv output, transposed)
    acts.npz        compressed .npz with conv1, conv2 (NCHW) and fc (N, C) members
    model.npz       small conv net in PyTorch state_dict naming, with BatchNorm layers
"""
import os

import h5py
import numpy as np

SEED = 20240601
OUT = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------
# numpy building blocks

def smooth_images(rng, n, c=3, size=32):
    """Images made of a few random low-frequency sinusoids plus blurred noise."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    imgs = np.zeros((n, c, size, size), np.float64)
    for i in range(n):
        for ch in range(c):
            for _ in range(4):
                fy, fx = rng.uniform(0.5, 4.0, 2)
                ph = rng.uniform(0, 2 * np.pi)
                imgs[i, ch] += rng.normal(0, 0.5) * np.sin(2 * np.pi * (fy * yy + fx * xx) + ph)
    noise = rng.normal(0, 1, imgs.shape)
    k = np.array([1, 4, 6, 4, 1], np.float64) / 16.0      # separable binomial blur
    for _ in range(2):
        noise = sum(k[j] * np.roll(noise, j - 2, axis=2) for j in range(5))
        noise = sum(k[j] * np.roll(noise, j - 2, axis=3) for j in range(5))
    imgs += 0.5 * noise
    imgs += rng.normal(0, 0.2, (1, c, 1, 1))                # per-channel colour offset
    return imgs.astype(np.float32)


def conv2d(x, w, bias=None, stride=1, groups=1):
    """3x3 (or kxk) conv, padding k//2, NCHW input, OIHW weight, via shifted views."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    assert c == cg * groups and o % groups == 0
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho, wo = (h + 2 * ph - kh) // stride + 1, (wd + 2 * pw - kw) // stride + 1
    og = o // groups
    out = np.zeros((n, o, ho, wo), np.float32)
    for g in range(groups):
        xs = xp[:, g * cg:(g + 1) * cg]
        wg = w[g * og:(g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                view = xs[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", view, wg[:, :, i, j])
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return out


def relu(x):
    return np.maximum(x, 0, dtype=x.dtype)


def maxpool2(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def he(rng, shape, fan_in):
    return (rng.normal(0, np.sqrt(2.0 / fan_in), shape)).astype(np.float32)


# ----------------------------------------------------------------------------
# 1-3: activation dumps of a small conv net

def activation_net(rng):
    return {
        "w1": he(rng, (16, 3, 3, 3), 3 * 9), "b1": rng.normal(0, 0.1, 16).astype(np.float32),
        "w2": he(rng, (32, 16, 3, 3), 16 * 9), "b2": rng.normal(0, 0.1, 32).astype(np.float32),
        "wfc": he(rng, (10, 32), 32), "bfc": rng.normal(0, 0.1, 10).astype(np.float32),
    }


def forward_acts(p, x):
    a = {}
    a["block1_conv"] = conv2d(x, p["w1"], p["b1"])                      # (N,16,32,32)
    a["block1_relu"] = relu(a["block1_conv"])
    a["block2_conv"] = conv2d(maxpool2(a["block1_relu"]), p["w2"], p["b2"])  # (N,32,16,16)
    a["block2_relu"] = relu(a["block2_conv"])
    pooled = a["block2_relu"].mean(axis=(2, 3))                           # (N,32)
    a["fc"] = (pooled @ p["wfc"].T + p["bfc"]).astype(np.float32)         # (N,10)
    return a


def write_h5(path, acts):
    desc = ("bnstat sample activations: conv3x3(3->16,pad1)+bias -> ReLU -> maxpool2 -> "
            "conv3x3(16->32,pad1)+bias -> ReLU -> global avgpool -> fc(32->10); "
            "He-normal random weights, N=16 smooth random 3x32x32 images; layout NCHW, float32")
    with h5py.File(path, "w") as f:
        f.attrs["description"] = desc
        f.attrs["layout"] = "NCHW"
        f.attrs["seed"] = SEED
        f.attrs["generator"] = "sample_data/make_samples.py"
        spec = [
            ("features/block1/conv", "block1_conv", {}),
            ("features/block1/relu", "block1_relu", {"compression": "gzip", "compression_opts": 4,
                                                     "shuffle": True}),
            ("features/block2/conv", "block2_conv", {}),
            ("features/block2/relu", "block2_relu", {"compression": "gzip", "compression_opts": 4}),
        ]
        # every dataset is NCHW, so that `bnstat moments acts.h5 --layout NCHW` fits them all;
        # the 2-D fc output is in acts.npz
        for name, key, kw in spec:
            arr = acts[key]
            chunks = (5,) + arr.shape[1:]          # 16 = 5 + 5 + 5 + 1
            ds = f.create_dataset(name, data=arr, chunks=chunks, **kw)
            ds.attrs["layout"] = "NCHW" if arr.ndim == 4 else "NC"


# ----------------------------------------------------------------------------
# 4: model in PyTorch state_dict naming, running stats from real batches

def bn_update(sd, name, y, axes, momentum=0.1):
    """One PyTorch training-mode BN step: update running stats, return normalized output."""
    n = int(np.prod([y.shape[a] for a in axes]))
    mean = y.mean(axis=axes, dtype=np.float64)
    var = y.var(axis=axes, dtype=np.float64)
    sd[name + ".running_mean"] = ((1 - momentum) * sd[name + ".running_mean"] + momentum * mean).astype(np.float32)
    sd[name + ".running_var"] = ((1 - momentum) * sd[name + ".running_var"]
                                 + momentum * var * n / (n - 1)).astype(np.float32)
    sd[name + ".num_batches_tracked"] = np.array(sd[name + ".num_batches_tracked"] + 1, np.int64)
    shape = [1] * y.ndim
    shape[1] = -1
    g, b = sd[name + ".weight"].reshape(shape), sd[name + ".bias"].reshape(shape)
    return ((y - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5) * g + b).astype(np.float32)


def make_model(rng):
    sd = {}

    def bn(name, c):
        sd[name + ".weight"] = rng.normal(1.0, 0.1, c).astype(np.float32)   # gamma ~ 1
        sd[name + ".bias"] = rng.normal(0.0, 0.05, c).astype(np.float32)    # beta ~ 0
        sd[name + ".running_mean"] = np.zeros(c, np.float32)
        sd[name + ".running_var"] = np.ones(c, np.float32)
        sd[name + ".num_batches_tracked"] = np.array(0, np.int64)

    sd["features.0.weight"] = he(rng, (16, 3, 3, 3), 27)           # conv 3->16, no bias
    bn("features.1", 16)                                            # features.2 = ReLU
    sd["features.3.weight"] = he(rng, (32, 16, 3, 3), 144)         # conv 16->32 stride 2, no bias
    bn("features.4", 32)                                            # features.5 = ReLU
    sd["features.6.weight"] = he(rng, (32, 1, 3, 3), 9)            # depthwise conv, groups=32
    bn("features.7", 32)                                            # features.8 = ReLU
    sd["classifier.0.weight"] = he(rng, (64, 32), 32)              # linear 32->64
    sd["classifier.0.bias"] = rng.normal(0, 0.1, 64).astype(np.float32)
    bn("classifier.1", 64)                                          # BatchNorm1d; classifier.2 = ReLU
    sd["classifier.3.weight"] = he(rng, (10, 64), 64)              # linear 64->10
    sd["classifier.3.bias"] = rng.normal(0, 0.1, 10).astype(np.float32)

    # train for a few batches (BN statistics only, momentum 0.1) so running stats are realistic
    for _ in range(30):
        x = smooth_images(rng, 16)
        y = relu(bn_update(sd, "features.1", conv2d(x, sd["features.0.weight"]), (0, 2, 3)))
        y = relu(bn_update(sd, "features.4", conv2d(y, sd["features.3.weight"], stride=2), (0, 2, 3)))
        y = relu(bn_update(sd, "features.7", conv2d(y, sd["features.6.weight"], groups=32), (0, 2, 3)))
        y = y.mean(axis=(2, 3))
        y = y @ sd["classifier.0.weight"].T + sd["classifier.0.bias"]
        bn_update(sd, "classifier.1", y.astype(np.float32), (0,))

    order = ["features.0.weight"] + [f"features.1.{k}" for k in
             ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    order += ["features.3.weight"] + [f"features.4.{k}" for k in
              ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    order += ["features.6.weight"] + [f"features.7.{k}" for k in
              ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    order += ["classifier.0.weight", "classifier.0.bias"] + [f"classifier.1.{k}" for k in
              ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    order += ["classifier.3.weight", "classifier.3.bias"]
    assert sorted(order) == sorted(sd)
    return {k: sd[k] for k in order}


# ----------------------------------------------------------------------------

def main():
    rng = np.random.default_rng(SEED)
    net = activation_net(rng)

    acts = forward_acts(net, smooth_images(rng, 16))
    write_h5(os.path.join(OUT, "acts.h5"), acts)

    # NHWC: block2 conv output (N,32,16,16) -> (N,16,16,32)
    np.save(os.path.join(OUT, "acts_nhwc.npy"),
            np.ascontiguousarray(acts["block2_conv"].transpose(0, 2, 3, 1)))

    # .npz: the same net on a second batch of 6 images
    acts2 = forward_acts(net, smooth_images(rng, 6))
    np.savez_compressed(os.path.join(OUT, "acts.npz"), conv1=acts2["block1_conv"],
                        conv2=acts2["block2_conv"], fc=acts2["fc"])

    np.savez(os.path.join(OUT, "model.npz"), **make_model(rng))

    for name in ("acts.h5", "acts_nhwc.npy", "acts.npz", "model.npz"):
        print(f"{name}: {os.path.getsize(os.path.join(OUT, name))} bytes")


if __name__ == "__main__":
    main()
