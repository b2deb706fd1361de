"""`bnstat moments`, `show`, `merge` from the command line: JSON/CSV/npz output
contracts (SPEC 4), each input kind, and the error paths of acceptance 6."""

from __future__ import annotations

import csv
import io
import json
import math

import h5py
import numpy as np
import pytest
from conftest import by_name, npy_bytes, run_cli, run_inproc
from reference import ref_moments

JSON_KEYS = {"name", "sources", "shape", "dtype", "layout", "reduce", "unit_shape", "ddof", "count",
             "mean", "var", "std", "min", "max", "nan_count"}
UNIT_FIELDS = ("count", "mean", "var", "std", "min", "max", "nan_count")


def data(shape, rng, dtype=np.float64):
    return rng.normal(0.7, 2.0, size=shape).astype(dtype)


def check_record(rec, x, layout, norm="batch", groups=None, reduce=None, ddof=0, rtol=1e-9):
    """A JSON array record against the reference: flat C-order lists of unit_shape."""
    ref = ref_moments(x, layout, norm, groups, reduce, ddof)
    assert JSON_KEYS <= set(rec)
    assert rec["unit_shape"] == list(ref.unit_shape)
    assert rec["shape"] == list(x.shape)
    assert rec["ddof"] == ddof
    n = math.prod(ref.unit_shape)
    for key in UNIT_FIELDS:
        assert isinstance(rec[key], list) and len(rec[key]) == n, key
    assert rec["count"] == ref.count.ravel().tolist()
    assert rec["nan_count"] == ref.nan_count.ravel().tolist()
    np.testing.assert_array_equal(rec["min"], ref.min.ravel())
    np.testing.assert_array_equal(rec["max"], ref.max.ravel())
    scale = float(np.nanmax(np.abs(np.asarray(x, dtype=np.float64))))
    np.testing.assert_allclose(rec["mean"], ref.mean.ravel(), rtol=rtol, atol=rtol * scale * 1e-3)
    np.testing.assert_allclose(rec["var"], ref.var.ravel(), rtol=rtol, atol=rtol * scale**2 * 1e-6)
    np.testing.assert_allclose(rec["std"], ref.std.ravel(), rtol=rtol, atol=rtol * scale * 1e-3)


def moments_json(*args, runner=run_inproc, input=None):
    code, out, err = runner("moments", *args, "--format", "json", input=input)
    assert code == 0, err
    assert "Traceback" not in err
    return json.loads(out), err


# ---- each input kind through the CLI -----------------------------------------------

@pytest.mark.parametrize("chunk", ["1", "200", "64MiB"])
@pytest.mark.parametrize("layout,norm,groups", [("NCHW", "batch", None), ("NHWC", "group", 2),
                                                ("NCHW", "instance", None), ("NHWC", "layer", None)])
def test_npy_json(tmp_path, rng, layout, norm, groups, chunk):
    x = data((5, 4, 3, 4), rng, np.float32)
    np.save(tmp_path / "acts.npy", x)
    args = [tmp_path / "acts.npy", "--layout", layout, "--norm", norm, "--chunk-size", chunk]
    if groups:
        args += ["--groups", groups]
    doc, _ = moments_json(*args)
    assert set(doc) >= {"bnstat", "arrays"}
    (rec,) = doc["arrays"]
    assert rec["name"] == "acts"
    assert rec["layout"] == layout
    assert rec["dtype"] == "float32"
    check_record(rec, x, layout, norm, groups)


def test_npy_fortran_and_byteswapped_json(tmp_path, rng):
    x = data((6, 3, 5), rng)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    np.save(tmp_path / "s.npy", x.astype(">f4"))
    doc, _ = moments_json(tmp_path / "f.npy", tmp_path / "s.npy", "--layout", "NCL",
                          "--chunk-size", "1")
    recs = by_name(doc)
    check_record(recs["f"], x, "NCL")
    check_record(recs["s"], x.astype(">f4"), "NCL")


@pytest.mark.parametrize("saver", ["savez", "savez_compressed"])
def test_npz_json(tmp_path, rng, saver):
    a, b = data((6, 3, 4), rng), data((6, 4, 3), rng, np.float16)
    getattr(np, saver)(tmp_path / "z.npz", a=a, b=b)
    doc, _ = moments_json(tmp_path / "z.npz", "--layout", "NCL", "--chunk-size", "100")
    recs = by_name(doc)
    check_record(recs["a"], a, "NCL")
    check_record(recs["b"], b, "NCL")


def test_hdf5_json_nested_gzip_ragged(tmp_path, rng):
    a = data((10, 4, 6), rng, np.float32)
    b = rng.integers(0, 60000, size=(10, 2, 3)).astype(np.uint16)
    with h5py.File(tmp_path / "acts.h5", "w") as f:
        f.create_dataset("net/block1/conv", data=a, chunks=(3, 4, 6), compression="gzip")
        f.create_dataset("net/block2/deeper/relu", data=b, chunks=(4, 2, 3))
    doc, _ = moments_json(tmp_path / "acts.h5", "--layout", "NCL", "--chunk-size", "1",
                          "--ddof", "1")
    recs = by_name(doc)
    check_record(recs["net/block1/conv"], a, "NCL", ddof=1)
    check_record(recs["net/block2/deeper/relu"], b, "NCL", ddof=1)


def test_hdf5_dataset_pattern_star_matches_slash(tmp_path, rng):
    arrays = {"net/block1/conv": data((4, 3, 2), rng), "net/block2/deep/conv": data((4, 3, 2), rng),
              "net/block2/bn": data((4, 3, 2), rng)}
    with h5py.File(tmp_path / "n.h5", "w") as f:
        for k, v in arrays.items():
            f[k] = v
    doc, _ = moments_json(tmp_path / "n.h5", "--layout", "NCL", "-d", "net/*conv")
    recs = by_name(doc)
    assert sorted(recs) == ["net/block1/conv", "net/block2/deep/conv"]
    for k in recs:
        check_record(recs[k], arrays[k], "NCL")


@pytest.mark.parametrize("runner", [run_cli, run_inproc], ids=["subprocess", "inproc"])
def test_stdin_npy_stream(rng, runner):
    x = data((7, 3, 4, 5), rng, np.float32)
    doc, _ = moments_json("-", "--layout", "NCHW", "--chunk-size", "240", runner=runner,
                          input=npy_bytes(x))
    (rec,) = doc["arrays"]
    assert rec["name"] == "stdin"
    check_record(rec, x, "NCHW")


def test_stdin_fortran_stream(rng):
    x = data((5, 4, 6), rng)
    doc, _ = moments_json("-", "--layout", "NCL", "--norm", "instance", "--chunk-size", "1",
                          input=npy_bytes(np.asfortranarray(x)))
    check_record(doc["arrays"][0], x, "NCL", "instance")


def test_several_files_and_per_file(tmp_path, rng):
    x = data((9, 3, 4), rng)
    for i, sl in enumerate((slice(0, 2), slice(2, 9))):
        with h5py.File(tmp_path / f"p{i}.h5", "w") as f:
            f["acts"] = x[sl]
    paths = [tmp_path / "p0.h5", tmp_path / "p1.h5"]
    doc, _ = moments_json(*paths, "--layout", "NCL", "--norm", "instance")
    (rec,) = doc["arrays"]
    assert rec["sources"] == [str(p) for p in paths]
    check_record(rec, x, "NCL", "instance")
    doc, _ = moments_json(*paths, "--layout", "NCL", "--per-file")
    assert len(doc["arrays"]) == 2
    check_record(doc["arrays"][0], x[:2], "NCL")
    check_record(doc["arrays"][1], x[2:], "NCL")


def test_reduce_c_with_nlc(tmp_path, rng):
    x = data((3, 5, 8), rng)
    np.save(tmp_path / "tok.npy", x)
    doc, _ = moments_json(tmp_path / "tok.npy", "--layout", "NLC", "--reduce", "C")
    rec = doc["arrays"][0]
    assert rec["unit_shape"] == [3, 5]
    check_record(rec, x, "NLC", reduce="C")


def test_seed_example_cli(tmp_path):
    x = np.repeat(np.arange(1, 25), 5).reshape(2, 3, 4, 5).astype(np.float32)
    np.save(tmp_path / "seed.npy", x)
    doc, _ = moments_json(tmp_path / "seed.npy", "--layout", "NCHW")
    assert doc["arrays"][0]["mean"] == [8.5, 12.5, 16.5]
    doc, _ = moments_json(tmp_path / "seed.npy", "--layout", "NHWC")
    assert doc["arrays"][0]["mean"] == [12.5] * 5


def test_default_layout_assumed_is_said_on_stderr(tmp_path, rng):
    np.save(tmp_path / "a.npy", data((2, 3, 4, 5), rng))
    doc, err = moments_json(tmp_path / "a.npy")
    assert "NCHW" in err and "assum" in err
    assert doc["arrays"][0]["layout"] == "NCHW"
    code, out, err = run_inproc("moments", tmp_path / "a.npy", "--quiet", "--format", "json")
    assert code == 0 and err == ""


def test_table_is_the_default_and_names_layout(tmp_path, rng):
    np.save(tmp_path / "a.npy", data((2, 3, 4, 5), rng))
    code, out, err = run_inproc("moments", tmp_path / "a.npy", "--layout", "NHWC")
    assert code == 0, err
    assert "NHWC" in out and "a" in out
    assert "Traceback" not in err


# ---- output contracts ---------------------------------------------------------------------

def test_json_floats_round_trip(tmp_path, rng):
    x = data((50, 6), rng) * 1e-3 + 1 / 3
    np.save(tmp_path / "x.npy", x)
    import bnstat

    want = bnstat.moments(str(tmp_path / "x.npy"), layout="NC")["x"]
    doc, _ = moments_json(tmp_path / "x.npy", "--layout", "NC")
    rec = doc["arrays"][0]
    assert rec["mean"] == want.mean.tolist()  # exact: full round-trip precision
    assert rec["var"] == want.var.tolist()
    assert rec["std"] == want.std.tolist()


def test_json_nan_is_written_as_null(tmp_path, rng):
    """README "Output formats": standard JSON, an empty unit's NaN mean as null."""
    x = data((4, 3), rng)
    x[:, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_inproc("moments", tmp_path / "x.npy", "--layout", "NC", "--format", "json")
    assert code == 0, err
    assert "NaN" not in out
    rec = json.loads(out, parse_constant=lambda c: pytest.fail(c))["arrays"][0]
    assert rec["mean"][1] is None and rec["count"][1] == 0 and rec["nan_count"][1] == 4


def test_csv_header_and_rows(tmp_path, rng):
    x = data((4, 6, 3), rng)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_inproc("moments", tmp_path / "x.npy", "--layout", "NCL", "--norm",
                                "instance", "--format", "csv")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["name", "unit", "count", "mean", "var", "std", "min", "max", "nan_count", "inf_count",
                       "n", "c"]
    ref = ref_moments(x, "NCL", "instance")
    assert len(rows) == 1 + 24
    for i, row in enumerate(rows[1:]):
        assert row[0] == "x" and int(row[1]) == i
        assert (int(row[-2]), int(row[-1])) == np.unravel_index(i, (4, 6))
        assert int(row[2]) == ref.count.ravel()[i]
        assert float(row[3]) == pytest.approx(ref.mean.ravel()[i], rel=1e-12, abs=1e-14)
        assert float(row[4]) == pytest.approx(ref.var.ravel()[i], rel=1e-12)
        assert float(row[6]) == ref.min.ravel()[i]
        assert float(row[7]) == ref.max.ravel()[i]
        assert int(row[8]) == 0


def test_csv_with_higher_adds_columns(tmp_path, rng):
    x = data((20, 3), rng)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_inproc("moments", tmp_path / "x.npy", "--layout", "NC", "--higher",
                                "--format", "csv")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][-3:] == ["skew", "kurtosis", "c"]  # the unit's coordinates come last
    ref = ref_moments(x, "NC")
    np.testing.assert_allclose([float(r[-3]) for r in rows[1:]], ref.skew, rtol=1e-9)
    np.testing.assert_allclose([float(r[-2]) for r in rows[1:]], ref.kurtosis, rtol=1e-9)


def test_json_output_file_follows_extension(tmp_path, rng):
    x = data((5, 3), rng)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_inproc("moments", tmp_path / "x.npy", "--layout", "NC", "-o",
                                tmp_path / "out.json")
    assert code == 0, err
    assert out == ""
    check_record(json.loads((tmp_path / "out.json").read_text())["arrays"][0], x, "NC")
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


@pytest.mark.parametrize("higher", [False, True])
def test_stats_npz_with_plain_numpy(tmp_path, rng, higher):
    x = data((8, 3, 5), rng)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["g/acts"] = x
    args = ["moments", tmp_path / "a.h5", "--layout", "NCL", "--ddof", "1", "-o", tmp_path / "s.npz"]
    code, _, err = run_inproc(*args, *(["--higher"] if higher else []))
    assert code == 0, err
    ref = ref_moments(x, "NCL", ddof=1)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        keys = set(z.files)
        base = {f"g/acts/{k}" for k in ("count", "mean", "m2", "var", "min", "max", "nan_count", "inf_count")}
        extra = {f"g/acts/{k}" for k in ("m3", "m4", "skew", "kurtosis")}
        assert keys == base | {"__bnstat__"} | (extra if higher else set())
        np.testing.assert_array_equal(z["g/acts/count"], ref.count)
        np.testing.assert_allclose(z["g/acts/mean"], ref.mean, rtol=1e-12)
        np.testing.assert_allclose(z["g/acts/m2"], ref.m2, rtol=1e-12)
        np.testing.assert_allclose(z["g/acts/var"], ref.var, rtol=1e-12)
        np.testing.assert_array_equal(z["g/acts/min"], ref.min)
        np.testing.assert_array_equal(z["g/acts/max"], ref.max)
        np.testing.assert_array_equal(z["g/acts/nan_count"], 0)
        for k in base:
            assert z[k].shape == (3,)
        meta = json.loads(str(z["__bnstat__"][()]))
        assert "bnstat" in meta or "version" in meta
        text = json.dumps(meta)
        assert "NCL" in text and str(tmp_path / "a.h5") in text
        if higher:
            d = x.transpose(1, 0, 2).reshape(3, -1)
            d = d - d.mean(axis=1, keepdims=True)
            np.testing.assert_allclose(z["g/acts/m3"], (d**3).sum(1), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(z["g/acts/m4"], (d**4).sum(1), rtol=1e-9)
            np.testing.assert_allclose(z["g/acts/skew"], ref.skew, rtol=1e-9)
            np.testing.assert_allclose(z["g/acts/kurtosis"], ref.kurtosis, rtol=1e-9)


def test_npz_to_stdout_is_a_stats_file(tmp_path, rng):
    x = data((5, 3), rng)
    np.save(tmp_path / "x.npy", x)
    code, out, err = run_cli("moments", tmp_path / "x.npy", "--layout", "NC", "--format", "npz",
                             binary=True)
    assert code == 0, err
    with np.load(io.BytesIO(out), allow_pickle=False) as z:
        np.testing.assert_allclose(z["x/mean"], x.mean(0), rtol=1e-12)


# ---- show and merge ---------------------------------------------------------------------

@pytest.mark.parametrize("higher", [False, True])
@pytest.mark.parametrize("layout,norm", [("NCL", "batch"), ("NCL", "instance")])
def test_show_reproduces_json(tmp_path, rng, higher, layout, norm):
    x = data((6, 3, 4), rng)
    x[1, 2, 3] = np.nan
    np.save(tmp_path / "x.npy", x)
    flags = ["--higher"] if higher else []
    base = ["moments", tmp_path / "x.npy", "--layout", layout, "--norm", norm, "--ddof", "1", *flags]
    code, direct, err = run_inproc(*base, "--format", "json")
    assert code == 0, err
    code, _, err = run_inproc(*base, "-o", tmp_path / "s.npz")
    assert code == 0, err
    code, shown, err = run_inproc("show", tmp_path / "s.npz", "--format", "json")
    assert code == 0, err
    assert json.loads(shown) == json.loads(direct) or _nan_equal(json.loads(shown), json.loads(direct))


def _nan_equal(a, b):
    """JSON documents equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_nan_equal(u, v) for u, v in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
    return a == b


def test_show_csv_and_table(tmp_path, rng):
    x = data((6, 3), rng)
    np.save(tmp_path / "x.npy", x)
    assert run_inproc("moments", tmp_path / "x.npy", "--layout", "NC", "-o", tmp_path / "s.npz")[0] == 0
    code, out, err = run_inproc("show", tmp_path / "s.npz", "--format", "csv")
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert len(rows) == 4
    np.testing.assert_allclose([float(r[3]) for r in rows[1:]], x.mean(0), rtol=1e-12)
    code, out, err = run_inproc("show", tmp_path / "s.npz")
    assert code == 0, err
    assert "NC" in out


def test_merge_equals_one_run(tmp_path, rng):
    x = data((11, 3, 4), rng)
    parts = [x[:3], x[3:4], x[4:]]
    paths = []
    for i, p in enumerate(parts):
        d = tmp_path / f"s{i}"
        d.mkdir()
        np.save(d / "acts.npy", p)
        paths.append(d / "acts.npy")
        code, _, err = run_inproc("moments", d / "acts.npy", "--layout", "NCL", "--higher",
                                  "-o", tmp_path / f"part{i}.npz")
        assert code == 0, err
    code, merged, err = run_inproc("merge", *[tmp_path / f"part{i}.npz" for i in (2, 0, 1)],
                                   "--format", "json")
    assert code == 0, err
    code, whole, err = run_inproc("moments", *paths, "--layout", "NCL", "--higher", "--format", "json")
    assert code == 0, err
    m, w = json.loads(merged)["arrays"][0], json.loads(whole)["arrays"][0]
    for key in ("count", "nan_count", "min", "max", "unit_shape", "shape", "layout", "reduce"):
        assert m[key] == w[key], key
    assert sorted(m["sources"]) == sorted(w["sources"])
    for key in ("mean", "var", "std", "skew", "kurtosis"):
        np.testing.assert_allclose(m[key], w[key], rtol=1e-12, err_msg=key)
    check_record(w, x, "NCL")


def test_merge_refuses_files_with_different_arrays(tmp_path, rng):
    x = data((8, 2), rng)
    for i, sl in enumerate((slice(0, 5), slice(5, 8))):
        np.save(tmp_path / f"x{i}.npy", x[sl])  # arrays named x0 and x1
        code, _, err = run_inproc("moments", tmp_path / f"x{i}.npy", "--layout", "NC",
                                  "-o", tmp_path / f"p{i}.npz")
        assert code == 0, err
    code, _, err = run_inproc("merge", tmp_path / "p0.npz", tmp_path / "p1.npz", "-o", tmp_path / "m.npz")
    assert code == 1
    assert "x0" in err or "x1" in err
    assert not (tmp_path / "m.npz").exists()


def test_merge_refuses_incompatible_layouts(tmp_path, rng):
    x = data((6, 3, 4), rng)
    np.save(tmp_path / "acts.npy", x)
    assert run_inproc("moments", tmp_path / "acts.npy", "--layout", "NCL", "-o", tmp_path / "a.npz")[0] == 0
    assert run_inproc("moments", tmp_path / "acts.npy", "--layout", "NLC", "-o", tmp_path / "b.npz")[0] == 0
    code, out, err = run_inproc("merge", tmp_path / "a.npz", tmp_path / "b.npz", "-o", tmp_path / "m.npz")
    assert code == 1
    assert "cannot merge" in err and "NCL" in err and "NLC" in err
    assert "Traceback" not in err
    assert not (tmp_path / "m.npz").exists()


# ---- NaN policies through the CLI ------------------------------------------------------------

def nan_file(tmp_path, rng):
    x = data((5, 3, 4), rng)
    x[2, 1, 3] = np.nan
    x[4, 2, 0] = np.nan
    np.save(tmp_path / "n.npy", x)
    return x


def test_nan_omit_warns_on_stderr(tmp_path, rng):
    x = nan_file(tmp_path, rng)
    doc, err = moments_json(tmp_path / "n.npy", "--layout", "NCL")
    assert "NaN" in err and "warning" in err
    rec = doc["arrays"][0]
    assert rec["nan_count"] == [0, 1, 1]
    assert rec["count"] == [20, 19, 19]
    check_record(rec, x, "NCL")


def test_nan_propagate(tmp_path, rng):
    nan_file(tmp_path, rng)
    doc, _ = moments_json(tmp_path / "n.npy", "--layout", "NCL", "--nan", "propagate")
    rec = doc["arrays"][0]
    assert [v is None for v in rec["mean"]] == [False, True, True]  # NaN: null
    assert [v is None for v in rec["var"]] == [False, True, True]


def test_nan_raise(tmp_path, rng):
    nan_file(tmp_path, rng)
    code, out, err = run_inproc("moments", tmp_path / "n.npy", "--layout", "NCL", "--nan", "raise",
                             "--format", "json")
    assert code == 1
    assert "n" in err and "C=1" in err and "NaN" in err
    assert "Traceback" not in err
    assert out == ""


# ---- error paths (acceptance 6) -----------------------------------------------------------------

def assert_error(result, code, *needles):
    rc, out, err = result
    assert rc == code, (rc, err)
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err


def test_layout_that_does_not_fit(tmp_path, rng):
    np.save(tmp_path / "a.npy", data((2, 3, 4), rng))
    assert_error(run_cli("moments", tmp_path / "a.npy", "--layout", "NCHW"), 2, "NCHW", "3", "a.npy")


def test_layout_that_does_not_fit_inproc(tmp_path, rng):
    np.save(tmp_path / "a.npy", data((2, 3, 4), rng))
    assert_error(run_inproc("moments", tmp_path / "a.npy", "--layout", "NC"), 2, "NC", "3 dimensions")
    assert_error(run_inproc("moments", tmp_path / "a.npy", "--layout", "NCC"), 2, "NCC")
    assert_error(run_inproc("moments", tmp_path / "a.npy", "--layout", "NCL", "--norm", "group",
                            "--groups", "2"), 2, "--groups 2")


def test_missing_file(tmp_path):
    assert_error(run_cli("moments", tmp_path / "missing.npy", "--layout", "NC"), 1,
                 "missing.npy", "no such file")


def test_truncated_npy(tmp_path, rng):
    np.save(tmp_path / "t.npy", data((10, 3, 4), rng))
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[:-100])
    assert_error(run_cli("moments", tmp_path / "t.npy", "--layout", "NCL"), 1, "t.npy", "truncated")


def test_truncated_npy_on_stdin(rng):
    raw = npy_bytes(data((10, 3, 4), rng))
    assert_error(run_inproc("moments", "-", "--layout", "NCL", input=raw[:-100]), 1, "truncated")


def test_truncated_npy_header(tmp_path, rng):
    raw = npy_bytes(data((10, 3, 4), rng))
    (tmp_path / "h.npy").write_bytes(raw[:30])
    assert_error(run_inproc("moments", tmp_path / "h.npy", "--layout", "NCL"), 1, "h.npy")


def test_hdf5_holding_only_strings(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["names"] = np.array([[b"a", b"b"], [b"c", b"d"]])
    assert_error(run_cli("moments", tmp_path / "s.h5", "--layout", "NC"), 1, "s.h5")


def test_hdf5_non_numeric_selected_with_d(tmp_path, rng):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["acts"] = data((4, 3), rng)
        f["names"] = np.array([[b"a", b"b"], [b"c", b"d"]])
    assert_error(run_inproc("moments", tmp_path / "s.h5", "--layout", "NC", "-d", "names"), 1,
                 "s.h5", "names", "not supported")


def test_existing_output_without_force(tmp_path, rng):
    np.save(tmp_path / "a.npy", data((4, 3), rng))
    out = tmp_path / "out.json"
    out.write_bytes(b"precious\x00bytes")
    assert_error(run_cli("moments", tmp_path / "a.npy", "--layout", "NC", "-o", out), 1,
                 "out.json", "exists", "--force")
    assert out.read_bytes() == b"precious\x00bytes"
    code, _, err = run_inproc("moments", tmp_path / "a.npy", "--layout", "NC", "-o", out, "--force")
    assert code == 0, err
    assert json.loads(out.read_text())["arrays"][0]["name"] == "a"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_output_that_is_an_input(tmp_path, rng, force):
    np.savez(tmp_path / "a.npz", acts=data((4, 3), rng))
    before = (tmp_path / "a.npz").read_bytes()
    assert_error(run_inproc("moments", tmp_path / "a.npz", "--layout", "NC", "-o", tmp_path / "a.npz",
                            *force), 1, "a.npz", "input")
    assert (tmp_path / "a.npz").read_bytes() == before


def test_output_that_is_an_input_through_another_path(tmp_path, rng):
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "a.npz", acts=data((4, 3), rng))
    before = (tmp_path / "d" / "a.npz").read_bytes()
    alias = tmp_path / "d" / ".." / "d" / "a.npz"
    assert_error(run_inproc("moments", tmp_path / "d" / "a.npz", "--layout", "NC", "-o", alias, "--force"),
                 1, "input")
    assert (tmp_path / "d" / "a.npz").read_bytes() == before


def test_show_output_is_its_input(tmp_path, rng):
    np.save(tmp_path / "a.npy", data((4, 3), rng))
    assert run_inproc("moments", tmp_path / "a.npy", "--layout", "NC", "-o", tmp_path / "s.npz")[0] == 0
    before = (tmp_path / "s.npz").read_bytes()
    assert_error(run_inproc("show", tmp_path / "s.npz", "-o", tmp_path / "s.npz", "--force"), 1, "input")
    assert (tmp_path / "s.npz").read_bytes() == before


def test_failed_run_leaves_no_output(tmp_path, rng):
    x = data((4, 3), rng)
    x[0, 0] = np.nan
    np.save(tmp_path / "a.npy", x)
    assert_error(run_inproc("moments", tmp_path / "a.npy", "--layout", "NC", "--nan", "raise", "-o",
                            tmp_path / "o.npz"), 1, "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]


@pytest.mark.parametrize("args,needle", [
    (["--norm", "bogus"], "bogus"),
    (["--chunk-size", "12XB"], "12XB"),
    (["--layout", "NCHW", "--channel-axis", "1"], "--channel-axis"),
    (["--norm", "group"], "--groups"),
    (["--reduce", "C"], "--layout"),
    (["--ddof", "-1"], "-1"),
])
def test_usage_errors_exit_2(tmp_path, rng, args, needle):
    np.save(tmp_path / "a.npy", data((2, 3, 4, 5), rng))
    assert_error(run_inproc("moments", tmp_path / "a.npy", *args), 2, needle)


def test_show_of_a_file_that_is_not_a_stats_file(tmp_path, rng):
    np.savez(tmp_path / "plain.npz", a=data((3, 2), rng))
    assert_error(run_inproc("show", tmp_path / "plain.npz"), 1, "plain.npz", "stats file")


# ---- moved from the acceptance audit --------------------------------------------------


def test_threads_option_is_honoured(tmp_path):
    import numba

    x = np.random.default_rng(5).normal(size=(64, 8, 30))
    np.save(tmp_path / "t.npy", x)
    before = numba.get_num_threads()
    ref = ref_moments(x, "NCL")
    try:
        for t in (1, 2):
            rc, out, err = run_inproc("moments", tmp_path / "t.npy", "--layout", "NCL", "--threads", t,
                                      "--format", "json")
            assert rc == 0, err
            assert numba.get_num_threads() == min(t, numba.config.NUMBA_NUM_THREADS)
            rec = json.loads(out)["arrays"][0]
            np.testing.assert_allclose(rec["var"], ref.var, rtol=1e-12)
        rc, _, err = run_inproc("normalize", tmp_path / "t.npy", "--layout", "NCL", "--threads", "1",
                                "-o", tmp_path / "n.npy")
        assert rc == 0, err
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)
