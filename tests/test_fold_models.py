"""Real architectures folded end to end (issue 11, acceptance 2): torchvision models and a
UNet, every format, both --bn modes, loaded back strictly and run against the original; the
folded weights against torch.nn.utils.fusion. The harness is tests/fold_models.py (which also
prints the table of README "fold")."""

from __future__ import annotations

import functools

import pytest

import fold_models

pytestmark = pytest.mark.slow


@functools.lru_cache(maxsize=None)
def _model(name):
    return fold_models.build(name)


@pytest.mark.parametrize("mode", ["drop", "identity"])
@pytest.mark.parametrize("fmt", fold_models.FORMATS)
@pytest.mark.parametrize("name", fold_models.MODELS)
def test_real_architecture(name, fmt, mode, tmp_path):
    from conftest import import_torchvision

    if name != "unet":
        import_torchvision()
    else:
        pytest.importorskip("torch", reason="torch builds the model and is the reference")
    r = fold_models.run_case(name, fmt, mode, _model(name), workdir=str(tmp_path))
    assert r["wrong"] == []  # no BN folded into a layer that does not feed it
    assert r["rel_err"] < 1e-5 and r["fused_err"] < 1e-5
    res = r["result"]
    for p in res.pairs:  # certain pairs rest on more than shapes
        assert p.evidence
    for u in res.unpaired:  # every BN left alone says why
        assert u.reason
    if fmt in ("npz", "hdf5-tracked"):  # a file order: every BN fed straight by a layer folds,
        unfolded = r["foldable"] - r["folded"]  # but for unnamed conv-transposes
        assert unfolded == (1 if name == "unet" else 0), [u.reason for u in res.unpaired]
