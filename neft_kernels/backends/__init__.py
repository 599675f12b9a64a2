"""Kernels, one module per backend, each with the same two functions:

* ``forward(ids, weight, seed, offset, scale, alpha, width, attention_mask, position_ids,
  cu_seqlens, noise_mask, gaussian, bad_ids=None)``: ids of any shape -> ``ids.shape + (d,)``
  noisy rows, spec v2 (``gaussian``: the Gaussian stream, else the uniform one). ``scale`` is
  every token's scale, or None: then the backend derives per-token scales on the tensors' device
  from ``alpha`` and the side inputs (``(rows, width)`` views, ``cu_seqlens`` 1-D; none: ``L`` =
  ``width``), zero where ``noise_mask`` is 0. ``alpha``: a float, or (accelerators only) a 0-d
  float64 tensor on the weight's device that the kernel reads. ``seed``: an int, or a 0-d int64
  tensor on the weight's device that the kernel reads. Out-of-range ids are never read (NaN
  rows); CPU ids raise ``IndexError``, accelerator ids are folded into ``bad_ids`` (min, max, V).
* ``backward(grad, ids, num_weights, padding_idx, scale_grad_by_freq, deterministic)``: (N, d)
  grad rows and (N,) ids -> the weight gradient, summed in float32, in ``grad``'s dtype.

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
    if name not in _MODULES and name != "auto":
        raise ValueError(f"backend must be one of {('auto', *_MODULES)}, got {name!r}")
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
