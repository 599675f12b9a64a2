"""``ruff check`` over the whole repository, with pyproject.toml's settings (tests/ruff.toml adds the
tests' own import block). Lint only: the code is not ruff-formatted, so there is no format check.
``mypy`` over the package, with pyproject.toml's ``[tool.mypy]``."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

# The venv's ruff and mypy (the `lint` extra, part of `test`) or ones on PATH.
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
MYPY = shutil.which("mypy", path=str(Path(sys.executable).parent)) or shutil.which("mypy")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install 'neft_kernels[lint]')")
def test_ruff_check_passes_over_the_repository():
    res = subprocess.run([RUFF, "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(MYPY is None, reason="mypy is not installed (pip install 'neft_kernels[lint]')")
def test_mypy_passes_over_the_package(tmp_path):
    # A fresh cache outside the repository (--no-incremental alone still writes .mypy_cache), and this
    # interpreter's packages (torch, transformers) whichever mypy runs.
    res = subprocess.run([MYPY, "--cache-dir", str(tmp_path), "--python-executable", sys.executable], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
