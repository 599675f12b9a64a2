"""The backend interface over the compiled extensions (``csrc/``)."""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch

from ..id_check import raise_out_of_range
from ..lengths import device_of

ABI_VERSION = 12  # what csrc/ exports as ABI_VERSION: bumped whenever a binding's signature or behaviour changes


def check_abi(ext: ModuleType) -> None:
    """An extension built from other sources would fail on every call: refuse it at import, so that
    ``backend="auto"`` falls back (with a warning) and a named backend says to rebuild."""
    if getattr(ext, "ABI_VERSION", 1) != ABI_VERSION:
        raise ImportError(f"{ext.__name__} was built from older sources (ABI {getattr(ext, 'ABI_VERSION', 1)}, "
                          f"need {ABI_VERSION}): rebuild with `pip install --no-build-isolation -e .`")


def _backward(ext: ModuleType) -> Callable:
    def backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int | None,
                 scale_grad_by_freq: bool) -> torch.Tensor:
        return ext.backward(grad, ids, num_weights, -1 if padding_idx is None else padding_idx, scale_grad_by_freq)

    return backward


def cpu_functions(ext: ModuleType) -> tuple[Callable, Callable, Callable, Callable]:
    """``forward``, ``backward``, ``token_scales`` and ``forward_with_grad`` over ``_C_cpu``: one C++
    call derives the scales and checks the ids (and, eagerly, attaches the autograd node)."""

    def forward(ids: torch.Tensor, weight: torch.Tensor, seed: int, offset: int, scale: float | None, alpha: float,
                width: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None, gaussian: bool,
                bad_ids: torch.Tensor | None = None) -> torch.Tensor:
        del bad_ids  # CPU ids are refused here, synchronously
        out, lo, hi = ext.forward(ids, weight, seed, offset, 0.0 if scale is None else scale, scale is None, alpha,
                                  width, attention_mask, position_ids, cu_seqlens, noise_mask, gaussian)
        if lo < 0 or hi >= weight.shape[0]:
            raise_out_of_range(lo, hi, weight.shape[0])
        return out

    def token_scales(width: int, n_tokens: int, alpha: float, embedding_dim: int,
                     attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                     cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
        del device  # the CPU's
        return ext.token_scales(n_tokens, alpha, embedding_dim, width, attention_mask, position_ids, cu_seqlens,
                                noise_mask)

    # Backend.forward_with_grad as is: one C++ call (a Python wrapper would add a third of its host time);
    # its last argument, the CUDA binding's id check record, is unused (CPU ids raise in the call).
    return forward, _backward(ext), token_scales, ext.forward_with_grad


def cuda_functions(ext: ModuleType) -> tuple[Callable, Callable, Callable, Callable]:
    """``forward``, ``backward``, ``token_scales`` and ``forward_with_grad`` over ``_C_cuda``: one C++
    call derives the scales on the device and writes the rows (one launch with a single scale, two or three
    with per-token scales). ``alpha``: a
    float, or a 0-d float64 CUDA tensor the kernels read (alpha as data, for CUDA graphs)."""

    def forward(ids: torch.Tensor, weight: torch.Tensor, seed: int | torch.Tensor, offset: int, scale: float | None,
                alpha: float | torch.Tensor, width: int, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None,
                gaussian: bool, bad_ids: torch.Tensor | None = None) -> torch.Tensor:
        tensor_alpha, tensor_seed = isinstance(alpha, torch.Tensor), isinstance(seed, torch.Tensor)
        return ext.forward(ids, weight, 0 if tensor_seed else seed, offset, 0.0 if scale is None else scale,
                           scale is None, 0.0 if tensor_alpha else alpha, alpha if tensor_alpha else None, width,
                           attention_mask, position_ids, cu_seqlens, noise_mask, seed if tensor_seed else None,
                           bad_ids, gaussian)

    def token_scales(width: int, n_tokens: int, alpha: float | torch.Tensor, embedding_dim: int,
                     attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                     cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
        tensor_alpha = isinstance(alpha, torch.Tensor)
        if device is None:
            device = device_of(attention_mask, position_ids, cu_seqlens, noise_mask, alpha)
        return ext.token_scales(n_tokens, 0.0 if tensor_alpha else alpha, alpha if tensor_alpha else None,
                                embedding_dim, width, attention_mask, position_ids, cu_seqlens, noise_mask,
                                torch.device(device))

    # Backend.forward_with_grad as is (its last argument: the id check's record, or None).
    return forward, _backward(ext), token_scales, ext.forward_with_grad
