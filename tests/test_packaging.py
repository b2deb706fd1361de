"""pyproject.toml and .ci/run: console script, Python version, dependencies, test extra."""

from __future__ import annotations

import os
import re
import stat
import tomllib

from conftest import REPO


def test_packaging():
    """Issue 2, repo bullet: console script, Python >= 3.11, the five dependencies, a test
    extra with pytest and hypothesis, and .ci/run installing .[test] and running pytest."""
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    assert project["scripts"]["bnstat"] == "bnstat.cli:main"
    assert project["requires-python"].replace(" ", "") == ">=3.11"
    deps = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert deps == {"numpy", "click", "h5py", "rich", "numba"}
    test = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["optional-dependencies"]["test"]}
    assert {"pytest", "hypothesis"} <= test
    assert os.path.exists(os.path.join(REPO, "bnstat", "__main__.py"))
    ci = os.path.join(REPO, ".ci", "run")
    assert os.stat(ci).st_mode & stat.S_IXUSR
    with open(ci, encoding="utf-8") as fh:
        text = fh.read()
    assert ".[test]" in text and "pytest" in text
