"""Package build. Metadata lives in pyproject.toml; this file adds the compiled backends.

* ``neft_kernels._C_cpu``: always (unless ``NEFT_KERNELS_BUILD_EXT=0``).
* ``neft_kernels._C_cuda``: when torch was built with CUDA and nvcc is found (optional: a failed
  build warns), unless ``NEFT_KERNELS_BUILD_CUDA=0``.

Build without isolation so that the installed torch is the one compiled against:
``pip install --no-build-isolation -e .``.
"""

import os

from setuptools import setup

# No contraction into FMA (the spec rounds every product); no errno from sqrt, so that the Gaussian
# transform vectorises (results are the same IEEE values either way).
HOST_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
# sm_80 and sm_90 SASS, plus compute_90 PTX that newer GPUs compile at load time.
CUDA_ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=[sm_90,compute_90]"]


def extensions():
    if os.environ.get("NEFT_KERNELS_BUILD_EXT", "1") == "0":
        return [], {}
    import shutil

    try:
        import torch
    except ModuleNotFoundError as err:  # pip's default, an isolated build environment, has no torch
        if err.name != "torch":  # torch is there but cannot import: its own error says why
            raise
        raise SystemExit("neft_kernels compiles its C++ backends against the installed torch, which this build "
                         "cannot import: install torch first, then `pip install --no-build-isolation ...` "
                         "(or set NEFT_KERNELS_BUILD_EXT=0 for the Python backends alone)") from err
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    exts = [CppExtension("neft_kernels._C_cpu", ["csrc/cpu/binding.cpp", "csrc/cpu/noisy_embedding_cpu.cpp"],
                         extra_compile_args=HOST_FLAGS, extra_link_args=["-fopenmp"])]
    nvcc = CUDA_HOME and (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if torch.version.cuda and nvcc and os.environ.get("NEFT_KERNELS_BUILD_CUDA", "1") != "0":
        # Optional: a failed CUDA build (say, an nvcc that does not match torch's CUDA) warns and
        # leaves the CPU backend installed (_optional_tolerant); backend="auto" then uses triton.
        exts.append(CUDAExtension(
            "neft_kernels._C_cuda", ["csrc/cuda/binding.cpp", "csrc/cuda/noisy_embedding.cu"],
            extra_compile_args={"cxx": HOST_FLAGS, "nvcc": ["-O3", "--fmad=false", *CUDA_ARCHS]}, optional=True))
    return exts, {"build_ext": _optional_tolerant(BuildExtension)}


def _optional_tolerant(build_ext):
    """``build_ext`` whose optional extensions, failing, warn and are left out. torch raises
    ``RuntimeError`` where setuptools forgives an optional extension only a distutils
    ``CompileError``: from its checks before any extension is built (an nvcc whose major version is
    not torch's CUDA's, a host compiler that CUDA does not support), and from a failed ninja build
    (missing headers); either would fail the whole install, the CPU extension with it."""
    from setuptools.errors import CompileError

    class OptionalTolerantBuild(build_ext):
        def build_extensions(self):
            self._building = False
            try:
                super().build_extensions()
            except RuntimeError as err:
                optional = [ext for ext in self.extensions if ext.optional]
                if self._building or not optional:
                    raise
                self.warn(f"leaving out {', '.join(ext.name for ext in optional)}: {err}")
                self.extensions = [ext for ext in self.extensions if not ext.optional]
                super().build_extensions()

        def build_extension(self, ext):
            self._building = True
            try:
                super().build_extension(ext)
            except RuntimeError as err:
                if not ext.optional:
                    raise
                raise CompileError(str(err)) from err

    return OptionalTolerantBuild


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
