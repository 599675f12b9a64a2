"""The torch-free CUDA sources compile with nvcc for sm_80 and sm_90 without spills (where nvcc is)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", [80, 90])
def test_cuda_kernels_compile_without_spills(arch, tmp_path):
    res = subprocess.run(
        [NVCC, "-O3", "--fmad=false", "-std=c++17", "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}",
         "-Xptxas", "-v", str(ROOT / "csrc" / "cuda" / "noisy_embedding.cu"), "-o", str(tmp_path / "k.cubin")],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", res.stderr)
    assert len(kernels) == 6  # forward and backward for fp32, bf16, fp16
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr)]
    assert len(spills) == 12 and not any(spills), res.stderr
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", res.stderr)]
    assert len(registers) == 6 and max(registers) <= 64, registers
