"""Issue 17's "what a new user tripped over": the silent surprises of the CLI, each with
its warning, error or grammar (README.md "Output formats", "Exit codes")."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import run_inproc
from helpers import assert_fails


def _clean(err):
    assert "Traceback" not in err and "internal error" not in err, err


def test_fold_help_says_o_writes_a_model_file():
    rc, out, err = run_inproc("fold", "--help")
    assert rc == 0, err
    _clean(err)
    text = " ".join(out.split())
    assert "Write the folded model to PATH" in text
    assert "'-' is standard output" not in text
    # the other commands keep their standard output
    rc, out, _ = run_inproc("moments", "--help")
    assert "'-' is standard output" in " ".join(out.split())


def test_fold_o_dash_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "m.npz"
    np.savez(src, **{"c.weight": rng.normal(size=(4, 3, 1, 1)).astype(np.float32)})
    assert_fails(run_inproc("fold", src, "-o", "-"), 2, r"-o -: fold writes a model file")


@pytest.fixture
def acts(tmp_path):
    """a.npy (8, 4) and b.npy (8, 5): 4 and 5 channels, random normal."""
    rng = np.random.default_rng(3)
    np.save(tmp_path / "a.npy", rng.normal(size=(8, 4)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.normal(size=(8, 5)).astype(np.float32))
    return tmp_path


@pytest.mark.parametrize("command", ["moments", "hist"])
def test_one_more_unit_is_singular(acts, command):
    rc, out, err = run_inproc(command, acts / "a.npy", "--top", "3")
    assert rc == 0, err
    _clean(err)
    assert "1 more unit not shown" in out and "1 more units" not in out
    rc, out, err = run_inproc(command, acts / "b.npy", "--top", "3")
    assert rc == 0, err
    assert "2 more units not shown" in out


def test_diff_says_unit_in_the_singular(acts):
    rc, out, err = run_inproc("moments", acts / "a.npy", "-o", acts / "sa.npz")
    assert rc == 0, err
    (acts / "other").mkdir()
    np.save(acts / "other" / "a.npy", np.load(acts / "a.npy") + 1)
    rc, out, err = run_inproc("diff", acts / "sa.npz", acts / "other" / "a.npy", "--top", "3")
    assert rc == 0, err
    _clean(err)
    assert "1 more unit not shown" in out and "1 more units" not in out


@pytest.mark.parametrize("command", ["moments", "show"])
@pytest.mark.parametrize("name,fmt", [("st.json", "csv"), ("st.csv", "json"), ("st.npz", "table"),
                                      ("st.json", "npz")])
def test_format_contradicting_the_extension_is_a_usage_error(acts, command, name, fmt):
    src = acts / "a.npy"
    if command == "show":
        assert run_inproc("moments", src, "-o", acts / "in.npz")[0] == 0
        src = acts / "in.npz"
    assert_fails(run_inproc(command, src, "-o", acts / name, "--format", fmt), 2,
                 rf"-o \S*{name} --format {fmt}: the extension \.{name[3:]} says {name[3:]}")
    assert not (acts / name).exists()


def test_format_agreeing_with_the_extension_or_none(acts):
    rc, out, err = run_inproc("moments", acts / "a.npy", "-o", acts / "st.json", "--format", "json")
    assert rc == 0, err
    import json

    assert json.loads((acts / "st.json").read_text())["arrays"][0]["name"] == "a"
    rc, out, err = run_inproc("moments", acts / "a.npy", "-o", acts / "st.txt", "--format", "csv")
    assert rc == 0, err  # .txt names no machine format: --format decides
    assert (acts / "st.txt").read_text().startswith("name,unit,")


@pytest.fixture
def layers(tmp_path):
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "l.npz", conv1=rng.normal(size=(4, 3, 2, 2)), fc=rng.normal(size=(4, 6)))
    return tmp_path / "l.npz"


@pytest.mark.parametrize("command", ["moments", "hist", "info"])
def test_a_pattern_matching_nothing_warns_naming_it(layers, command):
    rc, out, err = run_inproc(command, layers, "-d", "conv*", "-d", "fcc")
    assert rc == 0, err
    _clean(err)
    assert "warning: -d/dataset= fcc: matches no array of" in err and str(layers) in err
    assert "conv*" not in err  # the pattern that matched is not named
    assert "conv1" in out


def test_patterns_that_all_match_do_not_warn_and_none_matching_fails(layers):
    rc, out, err = run_inproc("moments", layers, "-d", "conv*", "-d", "fc")
    assert rc == 0 and "matches no array" not in err, err
    assert_fails(run_inproc("moments", layers, "-d", "x", "-d", "y"), 1, r"no array matches -d/dataset= x -d y")


def test_the_api_warns_too(layers):
    import bnstat
    from bnstat.errors import BnstatWarning

    with pytest.warns(BnstatWarning, match=r"-d/dataset= nothing: matches no array"):
        result = bnstat.moments(str(layers), dataset=["fc", "nothing"], layout="NC")
    assert list(result) == ["fc"]


def test_moments_refuses_the_same_file_twice(acts):
    a = acts / "a.npy"
    assert_fails(run_inproc("moments", a, a), 1,
                 r"a\.npy and \S*a\.npy: the same file twice; its counts would double(.|\n)*--allow-duplicates")
    (acts / "link.npy").symlink_to(a)  # same device and inode under another name
    assert_fails(run_inproc("moments", a, acts / "link.npy", "--format", "json"), 1, r"link\.npy: the same file twice")
    import json

    rc, out, err = run_inproc("moments", a, a, "--allow-duplicates", "--format", "json")
    assert rc == 0, err
    rec = json.loads(out)["arrays"][0]
    x = np.load(a).astype(np.float64)
    assert rec["count"] == [16] * 4  # counted twice, as asked
    np.testing.assert_allclose(rec["mean"], x.mean(axis=0), rtol=1e-12)
    rc, out, err = run_inproc("moments", a, acts / "b.npy", "--per-file", "--format", "json")
    assert rc == 0, err  # two different files: no question asked


def test_merge_refuses_one_file_twice_and_files_of_the_same_sources(acts):
    a = acts / "a.npy"
    for out in ("s1.npz", "s2.npz"):
        assert run_inproc("moments", a, "-o", acts / out, "-q")[0] == 0
    s1, s2 = acts / "s1.npz", acts / "s2.npz"
    assert_fails(run_inproc("merge", s1, s1, "--format", "json"), 1, r"s1\.npz and \S*s1\.npz: the same file twice")
    assert_fails(run_inproc("merge", s1, s2, "-o", acts / "m.npz"), 1,
                 r"s1\.npz and \S*s2\.npz: a comes from the same sources \(\S*a\.npy\) in both; merged, "
                 r"its counts would double(.|\n)*--allow-duplicates")
    assert not (acts / "m.npz").exists()
    import json

    rc, out, err = run_inproc("merge", s1, s2, "--format", "json", "--allow-duplicates")
    assert rc == 0, err
    assert json.loads(out)["arrays"][0]["count"] == [16] * 4


def test_merge_of_higher_and_plain_warns_that_skew_and_kurtosis_are_dropped(acts):
    import json

    a = acts / "a.npy"
    (acts / "p2").mkdir()
    np.save(acts / "p2" / "a.npy", np.load(a) * 2 + 1)
    assert run_inproc("moments", a, "--higher", "-o", acts / "h.npz", "-q")[0] == 0
    assert run_inproc("moments", acts / "p2" / "a.npy", "-o", acts / "p.npz", "-q")[0] == 0
    rc, out, err = run_inproc("merge", acts / "h.npz", acts / "p.npz", "--format", "json")
    assert rc == 0, err
    _clean(err)
    assert re.search(r"warning: a: \S*p\.npz computed without --higher; the merged statistics drop "
                     r"skew and kurtosis", err), err
    rec = json.loads(out)["arrays"][0]
    assert "skew" not in rec and "kurtosis" not in rec
    both = np.concatenate([np.load(a), np.load(acts / "p2" / "a.npy")]).astype(np.float64)
    np.testing.assert_allclose(rec["var"], both.var(axis=0), rtol=1e-12)
    assert run_inproc("moments", acts / "p2" / "a.npy", "--higher", "-o", acts / "p.npz", "-q",
                      "--force")[0] == 0
    rc, out, err = run_inproc("merge", acts / "h.npz", acts / "p.npz", "--format", "json")
    assert rc == 0 and "without --higher" not in err, err
    assert "skew" in json.loads(out)["arrays"][0]


# ---- standard JSON: never NaN / Infinity (README "Output formats") ---------------------------

def _strict_json(text):
    import json

    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON token {c}"))


@pytest.fixture
def bad(tmp_path):
    """x.npy (8, 4) float64: channel 1 holds +inf and -inf, channel 2 one NaN, channel 3 only NaN;
    a model m.npz whose BN "norm" follows conv "conv"."""
    from helpers import torch_bn

    x = np.random.default_rng(8).normal(size=(8, 4))
    x[0, 1], x[3, 1], x[2, 2] = np.inf, -np.inf, np.nan
    x[:, 3] = np.nan
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.where(np.isnan(x), 0.0, x))  # inf only (running refuses NaN)
    rng = np.random.default_rng(9)
    np.savez(tmp_path / "m.npz", **{"conv.weight": rng.normal(size=(4, 3, 1, 1)).astype(np.float32),
                                    **torch_bn(rng, "norm", 4)})
    return tmp_path


def test_moments_json_writes_null_for_non_finite_values_with_the_counts(bad):
    rc, out, err = run_inproc("moments", bad / "x.npy", "--layout", "NC", "--format", "json", "-q",
                              "--higher")
    assert rc == 0, err
    rec = _strict_json(out)["arrays"][0]
    x = np.load(bad / "x.npy")
    assert rec["nan_count"] == [0, 0, 1, 8] and rec["inf_count"] == [0, 2, 0, 0]
    assert rec["mean"][0] == pytest.approx(x[:, 0].mean(), rel=1e-12)
    assert rec["mean"][1] is None and rec["var"][1] is None  # inf - inf: NaN, written null
    assert rec["mean"][2] == pytest.approx(np.nanmean(x[:, 2]), rel=1e-12)
    assert rec["mean"][3] is None and rec["min"][3] is None and rec["count"][3] == 0
    assert rec["max"][1] is None and rec["min"][1] is None  # +inf, -inf: null, inf_count says so


@pytest.mark.parametrize("which", ["show", "merge", "hist", "running", "diff", "info", "recalibrate",
                                   "fold"])
def test_every_json_writer_is_standard_json(bad, which):
    x = bad / "x.npy"
    assert run_inproc("moments", x, "--layout", "NC", "--higher", "-q", "-o", bad / "s.npz")[0] == 0
    (bad / "p2").mkdir()
    np.save(bad / "p2" / "x.npy", np.load(x)[::-1] * 2)
    assert run_inproc("moments", bad / "p2" / "x.npy", "--layout", "NC", "-q", "-o", bad / "s2.npz")[0] == 0
    args = {"show": ["show", bad / "s.npz"],
            "merge": ["merge", bad / "s.npz", bad / "s2.npz"],
            "hist": ["hist", x, "--layout", "NC"],
            "running": ["running", bad / "y.npy", "--layout", "NC", "-b", "4"],
            "diff": ["diff", bad / "s.npz", bad / "s2.npz"],
            "info": ["info", x],
            "recalibrate": ["recalibrate", bad / "m.npz", bad / "y.npy", "--layout", "NC", "--map", "y=norm",
                            "--dry-run"],
            "fold": ["fold", bad / "m.npz", "--dry-run"]}[which]
    rc, out, err = run_inproc(*args, "--format", "json", "-q")
    assert rc in (0, 1), err  # diff may report a change
    _clean(err)
    doc = _strict_json(out)
    assert doc
    if which in ("show", "merge"):
        assert None in doc["arrays"][0]["mean"]
