"""Kernels, one module per backend. Each exposes ``forward`` and ``backward`` on flattened ids.

``resolve`` turns a requested backend name into an available one, ``module`` gives its kernels. The
compiled backends (``cpu``, ``cuda``) are optional extensions; ``auto`` falls back from a missing one
with a single warning.
"""

from __future__ import annotations

import importlib
import warnings
from functools import cache
from types import ModuleType

import torch
import torch._dynamo

_AUTO = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
_MODULES = {"torch": "reference", "triton": "triton", "cpu": "cpu", "cuda": "cuda"}
_DEVICES = {"cpu": "cpu", "cuda": "cuda"}


@cache
def _load(name: str) -> ModuleType | ImportError:
    try:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    except ImportError as err:  # a compiled extension not built, or triton missing
        return err


@cache
def _warn_fallback(wanted: str, used: str, reason: str) -> None:
    warnings.warn(f"neft_kernels: backend {wanted!r} is unavailable ({reason}); using {used!r}", stacklevel=4)


# Availability never changes within a process: compiled graphs take the answer as a constant.
@torch._dynamo.assume_constant_result
def resolve(name: str, device: torch.device) -> str:
    """The available backend that serves ``name`` for tensors on ``device``."""
    if name == "auto":
        candidates = _AUTO.get(device.type, ("torch",))
        for candidate in candidates:
            if not isinstance(_load(candidate), ImportError):
                if candidate != candidates[0]:
                    _warn_fallback(candidates[0], candidate, str(_load(candidates[0])))
                return candidate
    loaded = _load(name)
    if isinstance(loaded, ImportError):
        raise RuntimeError(f"backend={name!r} is unavailable: {loaded}. The compiled backends are built by "
                           "`pip install --no-build-isolation -e .` (NEFT_KERNELS_BUILD_EXT=0 skips them)") from loaded
    if name in _DEVICES and device.type != _DEVICES[name]:
        raise ValueError(f"backend={name!r} runs on {_DEVICES[name]} tensors, got tensors on {device}")
    return name


def module(name: str) -> ModuleType:
    """The kernels of a backend that :func:`resolve` returned."""
    return _load(name)
