"""Issue 17's "what a new user tripped over": the silent surprises of the CLI, each with
its warning, error or grammar (README.md "Output formats", "Exit codes")."""

from __future__ import annotations

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
