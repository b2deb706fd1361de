"""bnstat plot: valid PNG/SVG/PDF read back, a 4096-unit stats file, errors."""

from __future__ import annotations

import builtins
import xml.etree.ElementTree as ET

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="bnstat plot needs the plot extra (matplotlib)")


@pytest.fixture
def files(cli, tmp_path):
    r = np.random.default_rng(3)
    x = (r.standard_normal((8, 4096, 3)) * np.linspace(0.5, 2, 4096)[None, :, None]).astype(np.float32)
    np.save(tmp_path / "wide.npy", x)
    np.save(tmp_path / "small.npy", r.standard_normal((20, 3, 5)).astype(np.float32))
    assert cli("moments", tmp_path / "wide.npy", "--layout", "NCL", "-o", tmp_path / "wide.npz")[0] == 0
    assert cli("moments", tmp_path / "small.npy", "--layout", "NCL", "-o", tmp_path / "small.npz")[0] == 0
    assert cli("hist", tmp_path / "small.npy", "--layout", "NCL", "--bins", "32", "-o", tmp_path / "h.npz")[0] == 0
    return tmp_path


def plot_area_pixels(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    h, w = img.shape[:2]
    inner = img[h // 5: 4 * h // 5, w // 10: 9 * w // 10, :3]
    return img.shape, np.count_nonzero(np.abs(inner - 1.0).sum(axis=2) > 0.05) / inner[..., 0].size


@pytest.mark.parametrize("name", ["wide", "small", "h"])
def test_png(cli, files, name):
    code, out, err = cli("plot", files / f"{name}.npz", "-o", files / f"{name}.png")
    assert code == 0, err
    assert (files / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shape, inked = plot_area_pixels(files / f"{name}.png")
    assert shape[0] >= 300 and shape[1] >= 1000
    assert inked > 0.05, f"plot area almost blank ({inked:.3f})"


def test_svg_and_pdf(cli, files):
    assert cli("plot", files / "h.npz", "-o", files / "h.svg", "--units", "0,2")[0] == 0
    root = ET.parse(files / "h.svg").getroot()
    assert root.tag.endswith("svg") and "units 0, 2" in (files / "h.svg").read_text()
    assert cli("plot", files / "wide.npz", "-o", files / "w.pdf")[0] == 0
    data = (files / "w.pdf").read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert cli("plot", files / "small.npz", "-o", files / "s.img", "--format", "svg")[0] == 0
    ET.parse(files / "s.img")


def test_errors(cli, files):
    code, _, err = cli("plot", files / "small.npy", "-o", files / "x.png")
    assert code == 1 and "not a bnstat stats file" in err and "Traceback" not in err
    code, _, err = cli("plot", files / "small.npz", "-o", files / "x.gif")
    assert code == 2 and "cannot tell the picture format" in err
    code, _, err = cli("plot", files / "h.npz", "-o", files / "x.png", "--units", "9")
    assert code == 2 and "--units 9: small has units 0..2" in err
    assert not (files / "x.png").exists()
    assert cli("plot", files / "small.npz", "-o", files / "y.png")[0] == 0
    code, _, err = cli("plot", files / "small.npz", "-o", files / "y.png")
    assert code == 1 and "exists" in err


def test_missing_matplotlib(cli, files, monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = cli("plot", files / "small.npz", "-o", files / "z.png")
    assert code == 1 and "pip install 'bnstat[plot]'" in err and "Traceback" not in err


@pytest.fixture
def report(cli, files):
    """A diff report of two 600-unit stats files (envelopes) and one of 3 units (bars)."""
    r = np.random.default_rng(11)
    a = r.standard_normal((50, 600, 4)).astype(np.float32)
    shift = np.where(np.arange(600) % 7 == 0, 1.5, 0.0)  # every 7th unit moved by 1.5 of its std
    b = (a * 1.0 + shift[None, :, None]).astype(np.float32)
    for name, x in (("a", a), ("b", b)):
        np.save(files / f"{name}.npy", x)
        assert cli("moments", files / f"{name}.npy", "--layout", "NCL", "-o", files / f"{name}.npz")[0] == 0
    code, _, err = cli("diff", files / "a.npz", files / "b.npz", "--map", "a=b", "--format", "json",
                       "--fail-over", "shift=0.5", "-o", files / "d.json")
    assert code == 3, err  # over the threshold: the report is written all the same
    xa = a.astype(np.float64)
    xb = b.astype(np.float64)
    want = (xb.mean(axis=(0, 2)) - xa.mean(axis=(0, 2))) / xa.std(axis=(0, 2))
    return files / "d.json", int(np.count_nonzero(np.abs(want) > 0.5))


def test_diff_report_png_and_svg(cli, files, report):
    path, over = report
    assert over == len(range(0, 600, 7))
    code, _, err = cli("plot", path, "-o", files / "d.png")
    assert code == 0, err
    shape, inked = plot_area_pixels(files / "d.png")
    assert shape[1] >= 1000 and inked > 0.02
    assert cli("plot", path, "-o", files / "d.svg")[0] == 0
    text = (files / "d.svg").read_text()
    ET.parse(files / "d.svg")
    assert f"{over} unit(s) over 0.5" in text and "fail-over shift=0.5" in text
    assert "log var ratio" in text


def test_diff_report_errors_and_inputs_kept(cli, files, report):
    path, _ = report
    before = path.read_bytes()
    code, _, err = cli("plot", path, "-o", path, "--format", "png", "--force")
    assert code == 1 and "Traceback" not in err and path.read_bytes() == before
    (files / "other.json").write_text('{"some": "json"}')
    code, _, err = cli("plot", files / "other.json", "-o", files / "o.png")
    assert code == 1 and "not a bnstat diff report" in err and not (files / "o.png").exists()
    (files / "cut.json").write_bytes(before[: len(before) // 2])
    code, _, err = cli("plot", files / "cut.json", "-o", files / "c.png")
    assert code == 1 and "not a bnstat diff report" in err and "Traceback" not in err
    (files / "deep.json").write_text("{" + '"a":[' * 100000 + "]" * 100000 + "}")
    code, _, err = cli("plot", files / "deep.json", "-o", files / "e.png")
    assert code == 1 and "not a bnstat diff report" in err and "Traceback" not in err
    code, _, err = cli("plot", path, "-o", files / "n.png", "-d", "nothing*")
    assert code == 2 and "no array matches" in err
