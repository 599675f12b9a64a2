"""Argument checks shared by every backend, run once before any kernel launches."""

from __future__ import annotations

import math
import os

import torch

from .lengths import LENGTH_MODES
from .spec import SUPPORTED_DTYPES, num_lanes

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64
_check_device_ids = os.environ.get("NEFT_KERNELS_CHECK_IDS", "1") != "0"


def set_id_check(enabled: bool) -> bool:
    """Turn the id range check on accelerator tensors on or off; returns the previous setting.

    On by default (``NEFT_KERNELS_CHECK_IDS=0`` turns it off at import). It costs one fused
    min/max over the ids and one host-device sync per forward. Off, a bad id is still never
    read: its output row is NaN and it gets no gradient. CPU ids are always checked (no sync).
    """
    global _check_device_ids
    previous, _check_device_ids = _check_device_ids, bool(enabled)
    return previous


def check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_embeddings, embedding_dim), got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight dtype must be one of {SUPPORTED_DTYPES}, got {weight.dtype}")


def check_ids(input_ids: torch.Tensor, weight: torch.Tensor) -> None:
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    if input_ids.device != weight.device:
        raise ValueError(f"input_ids on {input_ids.device} but weight on {weight.device}")


def check_id_range(ids: torch.Tensor, num_embeddings: int, *, allow_sync: bool = True) -> None:
    """Ids index rows: any outside ``[0, num_embeddings)`` is refused with an ``IndexError``.

    CPU ids always; accelerator ids when :func:`set_id_check` is on and ``allow_sync`` (one
    host-device sync), except while a CUDA graph is being captured, where a sync is illegal.
    """
    if not ids.numel():
        return
    if ids.device.type != "cpu":
        capturing = ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not (_check_device_ids and allow_sync) or capturing:
            return
    lo, hi = torch.aminmax(ids)
    if bool((lo < 0) | (hi >= num_embeddings)):  # the one sync
        raise IndexError(f"input_ids must lie in [0, {num_embeddings}), got values in [{int(lo)}, {int(hi)}]")


def check_side_input(name: str, tensor: torch.Tensor | None, input_ids: torch.Tensor) -> None:
    if tensor is None:
        return
    try:
        fits = torch.broadcast_shapes(tensor.shape, input_ids.shape) == input_ids.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} must have (or broadcast to) the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(tensor.shape)}")
    if tensor.device != input_ids.device:
        raise ValueError(f"{name} on {tensor.device} but input_ids on {input_ids.device}")
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must be an integer or bool tensor, got {tensor.dtype}")


def normalize_seed(seed: int | torch.Tensor) -> torch.Tensor:
    """The seed as a 0-d int64 CPU tensor with the same two's-complement bits.

    Ints may lie anywhere in ``[-2**63, 2**64)``; tensors must be one int64 value on the CPU
    (reading a device tensor would need a host-device sync).
    """
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device.type != "cpu":
            raise TypeError(f"a tensor seed must hold one int64 value on the CPU, got {seed.dtype} "
                            f"of shape {tuple(seed.shape)} on {seed.device}")
        return seed.reshape(())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a 0-d int64 tensor, got {type(seed).__name__}")
    if not _INT64_MIN <= seed < _UINT64_END:
        raise ValueError(f"seed must lie in [-2**63, 2**64), got {seed}")
    return torch.tensor(seed - (1 << 64) if seed >= 1 << 63 else seed, dtype=torch.int64)


def check_offset(offset: int, n_tokens: int, embedding_dim: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0 or offset + n_tokens * num_lanes(embedding_dim) > 1 << 63:
        raise ValueError(f"offset must be >= 0 and keep every Philox counter below 2**63, got {offset}")


def check_alpha(noise_alpha: float) -> float:
    alpha = float(noise_alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"noise_alpha must be finite and >= 0, got {noise_alpha}")
    return alpha


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def normalize_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    """nn.Embedding's rule: negative indices count from the end."""
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must lie within num_embeddings ({num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings


def check_all(input_ids: torch.Tensor, weight: torch.Tensor, noise_alpha: float, seed: int | torch.Tensor,
              offset: int, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
              length_mode: str, backend: str) -> tuple[float, torch.Tensor]:
    """Every check of :func:`neft_kernels.noisy_embedding`; returns (alpha, normalized seed)."""
    check_weight(weight)
    check_ids(input_ids, weight)
    check_side_input("attention_mask", attention_mask, input_ids)
    check_side_input("position_ids", position_ids, input_ids)
    check_choice("length_mode", length_mode, LENGTH_MODES)
    check_choice("backend", backend, BACKENDS)
    check_offset(offset, input_ids.numel(), weight.shape[1])
    return check_alpha(noise_alpha), normalize_seed(seed)
