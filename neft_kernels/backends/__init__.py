"""Kernels, one module per backend, each implementing :class:`Backend`.

``resolve`` turns a requested backend name into an available one, ``module`` gives its kernels,
``available_backends`` lists what this process can run (``why_unavailable`` says why one cannot),
``draw_seed`` draws a host seed. The compiled backends (``cpu``, ``cuda``) are optional extensions;
``auto`` falls back from a missing one with a single warning.
"""

from __future__ import annotations

import importlib
import warnings
from functools import cache
from types import ModuleType
from typing import Callable, Protocol, cast

import torch

from ..compat import assume_constant_result, functorch_disabled


class Backend(Protocol):
    """What every backend module provides (``reference``, ``triton``, ``cpu``, ``cuda``).

    A backend may also provide ``forward_with_grad(ids, weight, seed, offset, scale, alpha, width,
    attention_mask, position_ids, cu_seqlens, noise_mask, gaussian, padding_idx,
    scale_grad_by_freq, bad_ids)``: :meth:`forward` (an int seed, a float alpha) with the weight's
    gradient attached by a native autograd node of ``ops._NoisyEmbeddingFunction``'s rule (whose
    backward, on an accelerator, first raises bad ids that earlier launches recorded). Eager calls
    then take it instead of the Python Function (the compiled CPU and CUDA backends do).
    """

    def forward(self, ids: torch.Tensor, weight: torch.Tensor, seed: int | torch.Tensor, offset: int,
                scale: float | None, alpha: float | torch.Tensor, width: int, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None,
                gaussian: bool, bad_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Ids of any shape -> ``ids.shape + (d,)`` noisy rows, spec v2 (``gaussian``: the Gaussian
        stream). ``scale``: every token's scale, or None: then the scales come from
        :meth:`token_scales`, on the tensors' device. ``alpha``: a float, or (accelerators only) a
        0-d float64 tensor on the weight's device that the kernel reads. ``seed``: an int, or a
        0-d int64 tensor on the weight's device that the kernel reads. Out-of-range ids are never
        read (NaN rows); CPU ids raise ``IndexError``, accelerator ids are folded into ``bad_ids``
        (min, max, V)."""

    def backward(self, grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int | None,
                 scale_grad_by_freq: bool) -> torch.Tensor:
        """(N, d) grad rows and (N,) ids -> the weight gradient in ``grad``'s dtype: each id's rows summed
        in float32 in token order and rounded once (the same bits on every run and every fused backend),
        with no float32 ``(V, d)`` buffer."""

    def token_scales(self, width: int, n_tokens: int, alpha: float | torch.Tensor, embedding_dim: int,
                     attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                     cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None = None,
                     device: torch.device | None = None) -> torch.Tensor | float:
        """Per-token ``float32(alpha / sqrt(L d))`` of ``n_tokens`` tokens in rows of ``width``
        (``(rows, width)`` side-input views, ``cu_seqlens`` 1-D; none of them: ``L = width``), 0
        where a token gets no noise (masked, or ``noise_mask`` 0); the bits of
        :func:`neft_kernels.lengths.token_scales`."""


_AUTO = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_MODULES = {"torch": "reference", "triton": "triton", "cpu": "cpu", "cuda": "cuda"}
NAMES = ("auto", *_MODULES)  # what backend= accepts
_DEVICES = {"cpu": "cpu", "cuda": "cuda"}


@cache
def _load(name: str) -> ModuleType | ImportError:
    try:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    except ImportError as err:  # a compiled extension not built, or triton missing
        return err


@cache
def _warn_fallback(wanted: str, used: str, reason: str) -> None:
    warnings.warn(f"neft_kernels: backend {wanted!r} is unavailable ({reason}); using {used!r}", stacklevel=5)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backend names that can run here (on ``device``'s type, when given), ``auto`` excluded."""
    device_type = None if device is None else torch.device(device).type
    return [name for name in _MODULES if not isinstance(_load(name), ImportError)
            and (device_type is None or device_type in _runs_on(name))]


def _runs_on(name: str) -> tuple[str, ...]:
    if name == "triton":  # CPU tensors only through the interpreter (called for loaded backends only)
        return ("cuda",) if cast(ModuleType, _load(name)).CPU_UNAVAILABLE else ("cuda", "cpu")
    return (_DEVICES[name],) if name in _DEVICES else ("cpu", "cuda")


_resolved: dict[tuple[str, torch.device], str] = {}


# Availability never changes within a process: compiled graphs take the answer as a constant, and
# each (name, device) is resolved once (``device.type`` alone costs more than the lookup).
@assume_constant_result
def resolve(name: str, device: torch.device) -> str:
    """The available backend that serves ``name`` for tensors on ``device``."""
    key = (name, device)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve(name, device)
    return found


def _why_not(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot serve tensors on ``device``, or None."""
    loaded = _load(name)
    if isinstance(loaded, ImportError):
        return str(loaded)
    if name == "cuda" and device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        if not loaded.runs_on(index):  # built for other architectures (setup.py): every launch would fail
            major, minor = torch.cuda.get_device_capability(index)
            return f"the extension has no kernels for this GPU (sm_{major}{minor}); rebuild it for this GPU"
    return None


_BUILD_HINT = ("the compiled backends are built by `pip install --no-build-isolation -e .` (the CUDA one only where "
               "torch has CUDA and nvcc is present; NEFT_KERNELS_BUILD_EXT=0 skips both)")


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device``'s tensors in this process, or None when it can."""
    device = torch.device(device)
    if name in _DEVICES and device.type != _DEVICES[name]:
        return f"it runs on {_DEVICES[name]} tensors"
    reason = _why_not(name, device)
    if isinstance(_load(name), ImportError):
        return f"{reason}; {_BUILD_HINT}" if name in _DEVICES else reason
    if reason is None and device.type not in _runs_on(name):  # triton on CPU without its interpreter
        return cast(ModuleType, _load(name)).CPU_UNAVAILABLE
    return reason


def _resolve(name: str, device: torch.device) -> str:
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    if name == "auto":
        candidates = _AUTO.get(device.type, ("torch",))
        for candidate in candidates:
            if _why_not(candidate, device) is None:
                if candidate != candidates[0]:
                    _warn_fallback(candidates[0], candidate, _why_not(candidates[0], device))
                return candidate
    reason = _why_not(name, device)
    loaded = _load(name)
    if isinstance(loaded, ImportError):
        hint = f"; {_BUILD_HINT}" if name in _DEVICES else ""
        raise RuntimeError(f"backend={name!r} is unavailable: {reason}{hint}") from loaded
    if name in _DEVICES and device.type != _DEVICES[name]:
        raise ValueError(f"backend={name!r} runs on {_DEVICES[name]} tensors, got tensors on {device}")
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
    return name


def cuda_id_check(device: torch.device) -> tuple[Callable, int | None] | None:
    """For the id check on ``device``, where the CUDA extension is built for its GPU: its ``read_back``
    (the native copy of the record) and the host address of the device's bad-id word (an int the
    extension's forward sets to 1 where it records a bad id; None where the driver cannot map host
    memory, and the copy serves alone); else None."""
    if _why_not("cuda", device) is not None:
        return None
    ext = cast(ModuleType, module("cuda"))  # the extension's own functions, beyond Backend
    try:
        word = ext.bad_id_word(device.index if device.index is not None else torch.cuda.current_device())
    except RuntimeError as err:
        warnings.warn(f"neft_kernels: no mapped host memory on {device} ({err}); the id check copies its record "
                      "back after each call instead", stacklevel=2)
        word = None
    return ext.read_back, word


def module(name: str) -> Backend | ModuleType:
    """The kernels of a backend that :func:`resolve` returned."""
    return _load(name)  # type: ignore[return-value]  # resolve returns only backends that loaded; no cast: a hot path


SEED_LOW, SEED_HIGH = -(1 << 63), (1 << 63) - 1  # torch.randint's bounds of a host seed


# Refused rather than frozen into a torch.jit.trace (C++ draw_seed says the same).
TRACED_SEED = ("a noise seed drawn while torch.jit.trace runs would be frozen into the trace (every call the same "
               "noise): trace NoisyEmbedding in eval mode, or use torch.export or torch.compile, which draw the seed "
               "in the graph")


def draw_seed(generator: torch.Generator | None = None) -> int:
    """``int(torch.randint(-2**63, 2**63 - 1, (), generator=generator))`` for a CPU generator (None:
    torch's default): the same value and generator state, drawn in C++ where the CPU extension is
    built (a tensor and its ``item`` cost about 1.5 us of host time a call)."""
    cpu = _load("cpu")
    if isinstance(cpu, ImportError):
        if torch.jit.is_tracing():
            raise RuntimeError(TRACED_SEED)
        with functorch_disabled():  # under torch.func.vmap: one seed for the whole call, as in C++
            return int(torch.randint(SEED_LOW, SEED_HIGH, (), dtype=torch.int64, generator=generator))
    return cpu.draw_seed(generator)
