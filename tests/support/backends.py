"""The backends under test, defined once: every backend of neft_kernels with the device its tensors
live on, and ``on_backends``, the one parametrization of a test over them.

    torch    the reference: cpu, and cuda where there is a GPU
    cpu      the C++ CPU extension: cpu
    triton   cuda where there is a GPU, else cpu under TRITON_INTERPRET=1 (the interpreter)
    cuda     the CUDA C++ extension: cuda

A backend that cannot run here is a skipped parameter that says why, never a dropped one. A compiled
extension that the build should have made (``_C_cpu`` unless NEFT_KERNELS_BUILD_EXT=0; ``_C_cuda``
wherever there is a GPU and nvcc) is not skipped when missing: its tests fail. Parameters on CUDA
tensors carry the ``gpu`` mark.
"""

from __future__ import annotations

import importlib
import os
import shutil
from functools import cache

import pytest
import torch

from neft_kernels.backends import available_backends, module

from .devices import HAS_CUDA

NAMES = ("torch", "cpu", "triton", "cuda")  # tests/kernels/test_spec_equivalence.py checks this is all of them
KERNELS = tuple(name for name in NAMES if name != "torch")  # the reference relies on torch's own checks


def devices_of(name: str) -> tuple[str, ...]:
    """The devices ``name`` is tested on."""
    if name == "torch":
        return ("cpu", "cuda") if HAS_CUDA else ("cpu",)
    if name == "triton":
        return ("cuda",) if HAS_CUDA else ("cpu",)
    return (name,)


def interpreted(name: str, device: str) -> bool:
    """Triton on CPU tensors: the interpreter, about 50 times slower than the other backends."""
    return name == "triton" and device == "cpu"


@cache
def why_not(name: str, device: str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` tensors here, or None when it can (or must)."""
    if device == "cuda" and not HAS_CUDA:
        return "needs a CUDA GPU"
    if name in available_backends(device):
        return None
    build_ext = os.environ.get("NEFT_KERNELS_BUILD_EXT") != "0"
    if name == "cpu":
        return None if build_ext else "neft_kernels._C_cpu not built (NEFT_KERNELS_BUILD_EXT=0)"
    if name == "cuda":
        if not build_ext or os.environ.get("NEFT_KERNELS_BUILD_CUDA") == "0":
            return "neft_kernels._C_cuda not built (NEFT_KERNELS_BUILD_EXT=0 or NEFT_KERNELS_BUILD_CUDA=0)"
        return None if shutil.which("nvcc") else "neft_kernels._C_cuda not built: no nvcc at install time"
    if name == "triton":
        try:
            importlib.import_module("triton")
        except ImportError as err:
            return f"triton is not importable: {err}"
        if device == "cpu":  # not interpreted (a GPU machine runs it compiled), or an interpreter that cannot
            from neft_kernels.backends import triton

            return triton.CPU_UNAVAILABLE
    return f"neft_kernels.backends.available_backends({device!r}) lacks it"


def backend_id(name: str, device: str) -> str:
    return name if name == device else f"{name}-{device}"


def targets(*names: str, device: str | None = None) -> list[tuple[str, str]]:
    """(backend, device) for ``names`` (default: every backend), each on its devices or on ``device``."""
    return [(name, dev) for name in names or NAMES for dev in ((device,) if device else devices_of(name))]


def backend_marks(name: str, device: str, slow_interpreter: bool = False) -> list:
    reason = why_not(name, device)
    marks = [pytest.mark.skip(reason=f"backend {name!r} on {device}: {reason}")] if reason else []
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    if slow_interpreter and interpreted(name, device):
        marks.append(pytest.mark.slow)
    return marks


def backend_params(*names: str, device: str | None = None, slow_interpreter: bool = False) -> list:
    """``pytest.param(backend, device)`` for each target, skipped (with the reason) where it cannot run."""
    return [pytest.param(name, dev, id=backend_id(name, dev), marks=backend_marks(name, dev, slow_interpreter))
            for name, dev in targets(*names, device=device)]


def on_backends(*names: str, device: str | None = None, slow_interpreter: bool = False):
    """Parametrize a test's ``backend, device`` arguments over ``names`` (default: every backend), each
    on its devices or on ``device`` only; ``slow_interpreter`` marks the Triton interpreter's runs slow."""
    return pytest.mark.parametrize("backend,device", backend_params(*names, device=device,
                                                                    slow_interpreter=slow_interpreter))


def runnable(*names: str, device: str | None = None) -> list[tuple[str, str]]:
    """The (backend, device) targets that run here, for a test that compares backends with each other."""
    return [target for target in targets(*names, device=device) if why_not(*target) is None]


def requires(name: str, device: str | None = None):
    """Skips a test (or a module, as ``pytestmark``) where backend ``name`` cannot run on ``device``
    (default: the device it is tested on)."""
    device = device or devices_of(name)[0]
    reason = why_not(name, device)
    return pytest.mark.skipif(reason is not None, reason=f"backend {name!r} on {device}: {reason}")


def kernel_alone(backend: str, ids: torch.Tensor, weight: torch.Tensor, scale: float = 0.25,
                 gaussian: bool = False) -> torch.Tensor:
    """The forward kernel of a compiled backend with no id check in front of it (seed 3)."""
    if backend == "triton":
        return module("triton").fused_forward(ids, weight, scale, 3, 0, gaussian=gaussian)
    if backend == "cpu":
        from neft_kernels import _C_cpu
        return _C_cpu.forward(ids, weight, 3, 0, scale, False, 0.0, ids.numel(), None, None, None, None, gaussian)[0]
    from neft_kernels import _C_cuda
    return _C_cuda.forward(ids, weight, 3, 0, scale, False, 0.0, None, ids.numel(), None, None, None, None, None, None,
                           gaussian)
