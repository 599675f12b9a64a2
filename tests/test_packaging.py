"""The source distribution carries what building the compiled backends needs, and the type marker."""

import shutil
import subprocess
import sys
import tarfile

from support import ROOT

_PROJECT = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "csrc", "neft_kernels")


def test_sdist_has_every_source_and_header_and_the_type_marker(tmp_path):
    """setuptools alone ships only the extensions' listed .cpp/.cu files: without their headers (and
    without the CUDA sources where no nvcc was found) an install from the sdist cannot build."""
    for name in _PROJECT:  # a copy: the build writes its egg-info beside setup.py
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(src, tmp_path / name)
    env = {"NEFT_KERNELS_BUILD_EXT": "0", "PATH": "/usr/bin:/bin"}  # no torch import, no compiler needed
    res = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", "dist"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("neft_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    csrc = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert csrc and csrc <= shipped, sorted(csrc - shipped)
    assert "neft_kernels/py.typed" in shipped
    assert not any(name.startswith("tests/") for name in shipped)  # they need the repository


def _setup_with_torch(tmp_path, torch_init: str) -> subprocess.CompletedProcess:
    """``setup.py --name`` where ``import torch`` runs ``torch_init`` (a stand-in package)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(torch_init)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, str(ROOT / "setup.py"), "--name"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_build_that_cannot_import_torch_says_how_to_install(tmp_path):
    """pip builds in an isolated environment by default, where torch is missing: setup.py says to
    install torch first and build without isolation, instead of a bare ModuleNotFoundError."""
    res = _setup_with_torch(tmp_path, "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    assert res.returncode != 0
    assert "install torch first" in res.stderr and "--no-build-isolation" in res.stderr


def test_a_torch_that_fails_to_import_is_not_reported_as_missing(tmp_path):
    """A torch whose own import fails (a dependency of it missing) keeps its error."""
    res = _setup_with_torch(tmp_path, "import a_dependency_torch_lacks\n")
    assert res.returncode != 0
    assert "a_dependency_torch_lacks" in res.stderr and "install torch first" not in res.stderr
