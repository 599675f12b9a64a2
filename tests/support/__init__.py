"""Helpers shared by the tests, imported as ``support.<module>`` (pytest.ini puts tests/ on the path).

``devices``: where tests run (and the Triton interpreter without a GPU); ``asserts``: bit-for-bit
comparisons; ``backends``: the backends under test and the one parametrization over them;
``cases``: inputs and the spec-model check; ``spec_model``: the independent NumPy model of the
spec; ``hf_models``: tiny Hugging Face models; ``cuda_emulator.cpp``: the CUDA kernels on the CPU;
``cuda_include``: where the CUDA headers are.

Importing the package imports ``devices`` first, which without a GPU sets TRITON_INTERPRET=1: that
must happen before triton is imported (``import neft_kernels`` imports it), so that the Triton
kernels run under the interpreter wherever a ``support`` module is imported first.
"""

import shutil
from pathlib import Path

from . import devices  # noqa: F401

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (beside nvcc's, or under /usr/local/cuda*), or None."""
    nvcc = shutil.which("nvcc")
    candidates = [*([Path(nvcc).resolve().parent.parent / "include"] if nvcc else []),
                  *sorted(Path("/usr/local").glob("cuda*/include"))]
    return next((c for c in candidates if (c / "cuda_runtime_api.h").exists()), None)
