"""The torch-free CUDA sources compile with nvcc for sm_80 and sm_90 without spills, their PTX has no
FMA, flush-to-zero or approximate instruction, and the binding type-checks (where nvcc is)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, cuda_include

NVCC = shutil.which("nvcc")
# The venv's clang-format (pip install clang-format) or one on PATH; the files were formatted with major 23.
CLANG_FORMAT = shutil.which("clang-format", path=str(Path(sys.executable).parent)) or shutil.which("clang-format")
CLANG_FORMAT_MAJOR = 23


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", [80, 90])
def test_cuda_kernels_compile_without_spills(arch, tmp_path):
    res = subprocess.run(
        [NVCC, "-O3", "--fmad=false", "-std=c++17", "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}",
         "-Xptxas", "-v", str(ROOT / "csrc" / "cuda" / "noisy_embedding.cu"), "-o", str(tmp_path / "k.cubin")],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    kernels = re.findall(r"Compiling entry function '(\w+)'", res.stderr)
    # forward (uniform and Gaussian; one lane or 16 bytes a thread) and backward for fp32, bf16, fp16; the scales
    assert len(kernels) == 17
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr)]
    assert len(spills) == 34 and not any(spills), res.stderr
    stacks = [int(n) for n in re.findall(r"(\d+) bytes stack frame", res.stderr)]  # no local arrays either
    assert len(stacks) == 17 and not any(stacks), res.stderr
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", res.stderr)]
    assert len(registers) == 17 and max(registers) <= 128, registers


def _ptx_entries(ptx: str) -> dict[str, str]:
    """Each kernel's PTX body by its (mangled) name."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry (\w+)\(", ptx)]
    return {name: ptx[start:end] for (start, name), (end, _) in zip(starts, [*starts[1:], (len(ptx), "")],
                                                                    strict=True)}


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("fmad", [False, True])
def test_cuda_ptx_has_only_ieee_rounded_float_math(fmad, tmp_path):
    """The spec rounds every float step: no fma, no .ftz, no approximate div/sqrt/lg2 in any kernel's
    PTX, even with nvcc's default --fmad=true (the kernels use explicit _rn intrinsics throughout).
    The Gaussian forwards divide and take roots with the IEEE instructions and truncate the quadrant."""
    res = subprocess.run(
        [NVCC, "-O3", f"--fmad={str(fmad).lower()}", "-std=c++17", "-ptx", "-arch=compute_90",
         str(ROOT / "csrc" / "cuda" / "noisy_embedding.cu"), "-o", str(tmp_path / "k.ptx")],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    # The NaN rows that out-of-range ids read with 16-byte loads: 16-byte aligned, one per storage type.
    nan_rows = re.findall(r"^\.global \.align (\d+) \.b8 \w*kNanRow\w*\[(\d+)\]", ptx, re.M)
    assert nan_rows == [("16", "16")] * 3, nan_rows
    entries = _ptx_entries(ptx)
    assert len(entries) == 17, list(entries)
    for name, body in entries.items():
        assert not re.search(r"\bfma\.|\.ftz\b|\.approx\b|\b(?:lg2|ex2|sin|cos|rsqrt|rcp)\.", body), name
        # float32 -> 16 bits rounds to nearest even, in pairs where a thread moves 16 bytes
        narrowing = set(re.findall(r"\bcvt\.\w+\.(?:bf16|f16)(?:x2)?\.f32\b", body))
        assert narrowing <= {"cvt.rn.bf16.f32", "cvt.rn.bf16x2.f32", "cvt.rn.f16.f32", "cvt.rn.f16x2.f32"}, name
        if "forward_kernel" in name and "Lb0ELi8E" in name:  # uniform noise, 8 16-bit lanes a thread
            assert narrowing in ({"cvt.rn.bf16x2.f32"}, {"cvt.rn.f16x2.f32"}), name
    gaussian = [body for name, body in entries.items() if "forward_kernel" in name and "Lb1E" in name]
    uniform = [body for name, body in entries.items() if "forward_kernel" in name and "Lb0E" in name]
    assert len(gaussian) == len(uniform) == 6
    for body in gaussian:
        for instruction in ("div.rn.f32", "sqrt.rn.f32", "cvt.rzi.s32.f32", "mul.rn.f32", "add.rn.f32", "sub.rn.f32"):
            assert instruction in body, instruction
    for body in uniform:
        assert not re.search(r"\b(?:div|sqrt)\.[a-z.]*f(?:32|64)\b", body)  # integer division only (token, lanes)
    (scales,) = [body for name, body in entries.items() if "token_scales_kernel" in name]
    for instruction in ("mul.rn.f64", "sqrt.rn.f64", "div.rn.f64", "cvt.rn.f32.f64"):  # scale_of, rounded once
        assert instruction in scales, instruction


def _cuobjdump() -> Path | None:
    """cuobjdump from the triton wheel's CUDA tools, where triton is installed."""
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.exists() else None


def _sass_functions(sass: str) -> dict[str, list[str]]:
    """Each function's SASS instructions (opcode and operands) by its mangled name."""
    functions: dict[str, list[str]] = {}
    current: list[str] = []
    for line in sass.splitlines():
        if m := re.search(r"Function : (\w+)", line):
            current = functions.setdefault(m.group(1), [])
        elif m := re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(.*?)\s*;", line):
            current.append(m.group(1))
    return functions


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_dependent_launches_read_the_previous_kernels_output_after_the_wait(tmp_path):
    """Programmatic dependent launch (sm_90): the scales kernels let the next kernel start early; the
    forward reads the scales, and the scales kernel the tile summaries, only after griddepcontrol.wait
    and with coherent loads (``.nc`` promises data that no one writes while the kernel runs, which
    the scales kernel does). In the sm_90 SASS no coherent load of a forward precedes the wait
    (``ACQBULK``); ptxas places the wait before the Philox rounds, so only the launch, the ids and
    the seed overlap the scales kernel. The sm_80 images have none of it."""
    ptx = {}
    for arch in (80, 90):
        res = subprocess.run(
            [NVCC, "-O3", "--fmad=false", "-std=c++17", "-ptx", f"-arch=compute_{arch}",
             str(ROOT / "csrc" / "cuda" / "noisy_embedding.cu"), "-o", str(tmp_path / f"k{arch}.ptx")],
            capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        ptx[arch] = (tmp_path / f"k{arch}.ptx").read_text()
    assert "griddepcontrol" not in ptx[80]
    entries = _ptx_entries(ptx[90])
    forwards = {name: body for name, body in entries.items() if "forward_kernel" in name}
    assert len(forwards) == 12
    for name, body in forwards.items():
        before, wait, after = body.partition("griddepcontrol.wait;")
        assert wait and "griddepcontrol.wait" not in after, name
        # ids and seed; the 16-bit rows' early loads
        assert {"ld.global.nc.u64"} <= set(re.findall(r"\bld\.global[\w.]*", before)) <= {
            "ld.global.nc.u64", "ld.global.nc.v4.u32"}, name
        assert "ld.global.f32" in after, name  # the scale, not ld.global.nc.f32
    for kernel in ("tile_summary_kernel", "token_scales_kernel"):
        (body,) = [body for name, body in entries.items() if kernel in name]
        assert body.count("griddepcontrol.launch_dependents;") == 1, kernel
    (scales,) = [body for name, body in entries.items() if "token_scales_kernel" in name]
    _, wait, after = scales.partition("griddepcontrol.wait;")
    assert wait and ".nc" not in after  # the summaries and alpha, coherent

    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        return
    res = subprocess.run(
        [NVCC, "-O3", "--fmad=false", "-std=c++17", "-cubin", "-gencode=arch=compute_90,code=sm_90",
         str(ROOT / "csrc" / "cuda" / "noisy_embedding.cu"), "-o", str(tmp_path / "k90.cubin")],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    sass = subprocess.run([str(cuobjdump), "-sass", str(tmp_path / "k90.cubin")], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    functions = {name: code for name, code in _sass_functions(sass).items() if "forward_kernel" in name}
    assert len(functions) == 12
    for name, code in functions.items():
        waits = [i for i, instruction in enumerate(code) if instruction.split()[0] == "ACQBULK"]
        assert len(waits) == 1, name
        early = [op for op in code[:waits[0]] if re.match(r"(?:@!?P\d )?LDG", op) and ".CONSTANT" not in op]
        assert not early, (name, early)


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    """binding.cpp (torch side) type-checks with g++: the CPU wheel ships the c10/cuda headers but
    not CMake's generated macros header, which an empty stub stands in for."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    include = cuda_include()
    if include is None:
        pytest.fail(f"nvcc at {NVCC} but no cuda_runtime_api.h beside it or under /usr/local/cuda*")
    res = subprocess.run(
        ["g++", "-std=c++17", "-fsyntax-only", f"-I{tmp_path}", *(f"-I{p}" for p in include_paths()),
         f"-I{sysconfig.get_paths()['include']}", f"-I{include}", "-DTORCH_EXTENSION_NAME=_C_cuda",
         str(ROOT / "csrc" / "cuda" / "binding.cpp")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _clang_format_major() -> int | None:
    if CLANG_FORMAT is None:
        return None
    out = subprocess.run([CLANG_FORMAT, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"version (\d+)", out)
    return int(found.group(1)) if found else None


@pytest.mark.skipif(_clang_format_major() != CLANG_FORMAT_MAJOR,
                    reason=f"needs clang-format {CLANG_FORMAT_MAJOR} (other versions format details differently)")
def test_csrc_is_clang_formatted():
    """csrc/ follows the repository's .clang-format (Google style, 120 columns)."""
    sources = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".cpp", ".cu"))
    res = subprocess.run([CLANG_FORMAT, "--dry-run", "--Werror", *map(str, sources)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]


_MODULE = """#include <Python.h>
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "%s", 0, -1, 0};
PyMODINIT_FUNC PyInit_%s(void) { return PyModule_Create(&def); }
"""


@pytest.mark.parametrize("failure", ["torch's checks before any build", "a build"])
def test_a_failed_optional_extension_warns_and_the_install_goes_on(failure, tmp_path, monkeypatch, capsys, caplog):
    """setup.py's build command (torch's BuildExtension) on a project with a required extension and an
    optional one that fails: torch raises RuntimeError, before any build (an nvcc of another major
    version than torch's CUDA) or from ninja, where setuptools forgives an optional extension only a
    CompileError. The optional one is left out with a warning; the required one is built."""
    import runpy

    import setuptools
    import torch.utils.cpp_extension as cpp_extension
    from setuptools import Extension

    monkeypatch.delenv("NEFT_KERNELS_BUILD_EXT", raising=False)
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    build_ext = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")["cmdclass"]["build_ext"]
    assert issubclass(build_ext, cpp_extension.BuildExtension)
    monkeypatch.undo()

    (tmp_path / "required.cpp").write_text(_MODULE % ("required", "required"))
    if failure == "a build":
        optional = cpp_extension.CppExtension("optional", ["optional.cpp"], optional=True)
        (tmp_path / "optional.cpp").write_text("#error does not build\n")
    else:
        optional = Extension("optional", ["optional.cu"], optional=True)
        (tmp_path / "optional.cu").write_text("")

        def mismatch(*args):
            raise RuntimeError("The detected CUDA version (13.0) mismatches the version that was used to "
                               "compile PyTorch (12.8)")

        monkeypatch.setattr(cpp_extension, "_check_cuda_version", mismatch)
    monkeypatch.chdir(tmp_path)
    setuptools.setup(name="scratch", ext_modules=[cpp_extension.CppExtension("required", ["required.cpp"]), optional],
                     cmdclass={"build_ext": build_ext}, script_args=["-q", "build_ext", "--inplace"])
    assert list(tmp_path.glob("required*.so")) and not list(tmp_path.glob("optional*.so"))
    printed = capsys.readouterr().err + caplog.text
    assert "optional" in printed and ("mismatches" in printed if failure != "a build" else "failed" in printed)
