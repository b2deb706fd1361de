"""bnstat.render.tables: the table header, flags, summary line, sort / top / default view,
wide arrays, all-NaN arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import run_inproc
from helpers import table_blocks, table_rows


def test_table_header_says_layout_reduced_axes_and_element_count(tmp_path):
    x = np.random.default_rng(2).normal(size=(4, 3, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    rc, out, err = run_inproc("moments", tmp_path / "a.npy", "--layout", "NCL", "--norm", "instance")
    assert rc == 0, err
    assert out.splitlines()[0] == "a  (4, 3, 5) float32 · layout NCL · reduce L · 60 elements"
    # no layout given: assumed, said on stderr and in the title
    rc, out, err = run_inproc("moments", tmp_path / "a.npy")
    assert rc == 0
    assert out.splitlines()[0] == ("a  (4, 3, 5) float32 · layout NCL (assumed, PyTorch default) · "
                                   "reduce NL · 60 elements")
    assert "assuming the PyTorch layout NCL" in err and "Traceback" not in err


@pytest.fixture
def forty(tmp_path):
    """40 channels with distinct spreads, one constant, one with a NaN, one all NaN, one
    with a mean far from the others."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 40, 3)) * np.linspace(0.5, 3.0, 40)[None, :, None]
    x += np.linspace(-1, 1, 40)[None, :, None]
    rng.shuffle(x, axis=1)
    x[:, 5] = 0.25  # constant
    x[0, 7, 0] = np.nan  # one NaN
    x[:, 9] = np.nan  # empty
    x[:, 11] += 100.0  # extreme mean
    np.save(tmp_path / "w.npy", x)
    return tmp_path / "w.npy", x


def _expected_flags(x):
    """SPEC-free, README-documented flags, recomputed from numpy: const, nan, empty, mean."""
    units = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    flags = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.nanmean(units, axis=1)
    fin = np.isfinite(means)
    med = np.median(means[fin])
    mad = 1.4826 * np.median(np.abs(means[fin] - med))
    for c, row in enumerate(units):
        v = row[~np.isnan(row)]
        f = []
        if v.size == 0:
            f.append("empty")
        elif v.size > 1 and np.all(v == v[0]):
            f.append("const")
        if np.isnan(row).any():
            f.append("nan")
        if fin[c] and abs(means[c] - med) > 6 * mad:
            f.append("mean")
        flags.append(",".join(f))
    return flags


def test_table_flags_and_summary_line(forty):
    path, x = forty
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "--all", "--quiet")
    assert rc == 0, err
    (block,) = table_blocks(out)
    rows = table_rows(block)
    assert [int(r[0]) for r in rows] == list(range(40))
    got = [r[-1] for r in rows]
    want = _expected_flags(x)
    assert got == want
    assert want[5] == "const" and want[7] == "nan" and want[9] == "empty,nan" and "mean" in want[11]
    caption = " ".join(block[-3:])
    assert "40 units of 24 values" in caption
    n_mean = sum("mean" in f for f in want)
    assert f"flags: 1 zero variance, 2 with NaN, {n_mean} extreme mean, 1 empty" in caption


def test_table_sort_top_and_default_view(forty):
    """More than 32 units: the default shows 20 rows plus the flagged ones further down, and
    says how many are hidden; --sort/--top choose the rows; --all shows every unit."""
    path, x = forty
    units = np.moveaxis(x, 1, 0).reshape(40, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        var = np.nanvar(units, axis=1)
        mn = np.nanmin(units, axis=1)
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "--quiet", "--sort", "var",
                              "--top", "5")
    assert rc == 0, err
    (block,) = table_blocks(out)
    shown = [int(r[0]) for r in table_rows(block)]
    order = [int(c) for c in np.argsort(-np.where(np.isnan(var), -np.inf, var), kind="stable")]
    assert shown == order[:5]
    assert "35 more units not shown" in out
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "--quiet", "--sort", "min",
                              "--top", "3")
    shown = [int(r[0]) for r in table_rows(table_blocks(out)[0])]
    assert shown == [int(c) for c in np.argsort(np.where(np.isnan(mn), np.inf, mn), kind="stable")[:3]]
    rc, out, err = run_inproc("moments", path, "--layout", "NCL", "--quiet")
    shown = [int(r[0]) for r in table_rows(table_blocks(out)[0])]
    flagged = [c for c, f in enumerate(_expected_flags(x)) if f]
    assert shown[:20] == list(range(20))
    assert shown[20:] == [c for c in flagged if c >= 20]
    assert f"{40 - len(shown)} more units not shown" in out


def test_table_stays_readable_at_4096_channels(tmp_path):
    x = np.random.default_rng(4).normal(size=(3, 4096)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    rc, out, err = run_inproc("moments", tmp_path / "c.npy", "--layout", "NC")
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert len(lines) < 60 and max(map(len, lines)) <= 140
    assert "4,096 units of 3 values" in out and "4,076 more units not shown" in out


def test_table_of_an_all_nan_array_warns_only_about_the_nans(tmp_path):
    np.save(tmp_path / "allnan.npy", np.full((3, 4), np.nan))
    rc, out, err = run_inproc("moments", tmp_path / "allnan.npy", "--layout", "NC")
    assert rc == 0, err
    assert "Traceback" not in err and "internal error" not in err
    assert err.splitlines() == ["bnstat: warning: allnan: 12 NaN value(s) in 4 unit(s) counted "
                                "and left out"], err
    words = " ".join(out.split())  # the caption wraps at the table's width
    assert "4 units of 0 values · min NaN, max NaN · flags: 4 with NaN, 4 empty" in words
    rc, _, err = run_inproc("moments", tmp_path / "allnan.npy", "--layout", "NC", "-q",
                            "-o", tmp_path / "s.npz")
    assert rc == 0, err
    rc, out, err = run_inproc("show", tmp_path / "s.npz")
    assert rc == 0 and err == "", err
    assert "flags: 4 with NaN, 4 empty" in " ".join(out.split())
