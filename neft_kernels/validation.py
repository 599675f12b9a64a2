"""Argument checks shared by every backend, run once before any kernel launches."""

from __future__ import annotations

import math
import operator
from typing import TypeGuard

import torch

from .spec import SUPPORTED_DTYPES, num_lanes

_ID_DTYPES = (torch.int32, torch.int64)
_INT64_MIN, _UINT64_END = -(1 << 63), 1 << 64


def check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_embeddings, embedding_dim), got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight dtype must be one of {SUPPORTED_DTYPES}, got {weight.dtype}")


def check_ids(input_ids: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    if input_ids.device != weight.device:
        raise ValueError(f"input_ids on {input_ids.device} but weight on {weight.device}")


def broadcasts_to(tensor, shape: torch.Size) -> TypeGuard[torch.Tensor]:
    """Whether ``tensor`` is a tensor whose shape broadcasts to ``shape`` (equal shapes: no work)."""
    if not isinstance(tensor, torch.Tensor):
        return False
    if tensor.shape == shape:
        return True
    try:
        return torch.broadcast_shapes(tensor.shape, shape) == shape
    except RuntimeError:
        return False


def check_side_input(name: str, tensor: torch.Tensor | None, shape: torch.Size, device: torch.device,
                     of: str = "input_ids") -> None:
    """A mask or position ids: an integer or bool tensor on ``device`` that broadcasts to ``shape``
    (the shape of ``of``, named in the errors)."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if not broadcasts_to(tensor, shape):
        raise ValueError(f"{name} must have (or broadcast to) the shape of {of} {tuple(shape)}, "
                         f"got {tuple(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"{name} on {tensor.device} but {of} on {device}")
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must be an integer or bool tensor, got {tensor.dtype}")


_SIDE_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
                          torch.uint32, torch.uint64})


def _plain_side_input(tensor, shape: torch.Size, device: torch.device) -> bool:
    """The common case that :func:`check_side_input` accepts, tested quickly: an integer or bool
    tensor of the ids' own shape and device."""
    return type(tensor) is torch.Tensor and tensor.shape == shape and tensor.device == device \
        and tensor.dtype in _SIDE_DTYPES


def normalize_seed(seed: int | torch.Tensor, device: torch.device | None = None) -> int | torch.Tensor:
    """The seed as a signed int64 value (same two's-complement bits), or as a 0-d int64 tensor.

    Ints may lie anywhere in ``[-2**63, 2**64)``. Tensors must hold one int64 value, on the CPU or
    on ``device`` (the weight's), where the kernel reads it without a host-device sync.
    """
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1 or (seed.device.type != "cpu" and seed.device != device):
            raise TypeError(f"a tensor seed must hold one int64 value on the CPU or on the weight's device "
                            f"({device}), got {seed.dtype} of shape {tuple(seed.shape)} on {seed.device}")
        return seed.reshape(())
    if isinstance(seed, bool) or not hasattr(type(seed), "__index__"):
        raise TypeError(f"seed must be an int or a 0-d int64 tensor, got {type(seed).__name__}")
    seed = operator.index(seed)  # a NumPy integer, say
    if not _INT64_MIN <= seed < _UINT64_END:
        raise ValueError(f"seed must lie in [-2**63, 2**64), got {seed}")
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def check_offset(offset: int, n_tokens: int, embedding_dim: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int):
        kind = type(offset)  # qualified: NumPy's int64 is not torch's
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(f"offset must be a Python int, got {name} (int(offset) converts an integer)")
    if offset < 0 or offset + n_tokens * num_lanes(embedding_dim) > 1 << 63:
        raise ValueError(f"offset must be >= 0 and keep every Philox counter below 2**63, got {offset}")


def check_alpha(noise_alpha: float, name: str = "noise_alpha") -> float:
    if isinstance(noise_alpha, (bool, str, bytes)):
        raise TypeError(f"{name} must be a real number, got {type(noise_alpha).__name__}")
    try:
        alpha = float(noise_alpha)  # Python and NumPy numbers, one-value tensors
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a real number, got {type(noise_alpha).__name__}") from err
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {noise_alpha}")
    # -0.0 as +0.0: the one-scale path rounds it to a +0 scale, the per-token one kept a -0 scale,
    # so a call with a mask and one without gave -0.0 weight elements other signs.
    return alpha + 0.0


def check_alpha_arg(noise_alpha: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A functional call's alpha: a checked float, or a one-value floating tensor on the CPU or on
    ``like``'s device, as the 0-d float64 tensor the kernels read. A CPU tensor's value is checked
    (and taken as a float) when not traced; an accelerator's is not read on the host (that would sync)."""
    if not isinstance(noise_alpha, torch.Tensor):
        return check_alpha(noise_alpha)
    if noise_alpha.numel() != 1 or not noise_alpha.is_floating_point() or (
            noise_alpha.device.type != "cpu" and noise_alpha.device != like.device):
        raise TypeError(f"a tensor noise_alpha must hold one floating value on the CPU or on {like.device}, got "
                        f"{noise_alpha.dtype} of shape {tuple(noise_alpha.shape)} on {noise_alpha.device}")
    if noise_alpha.device.type == "cpu" and not torch.compiler.is_compiling():
        return check_alpha(noise_alpha.item())  # item: no warning for an alpha that requires grad
    return noise_alpha.reshape(()).to(torch.float64)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def normalize_padding_idx(padding_idx: int | None, num_embeddings: int) -> int | None:
    """nn.Embedding's rule: negative indices count from the end."""
    if padding_idx is None:
        return None
    if type(padding_idx) is not int:  # NumPy and one-value CPU tensor ints become an int; floats are refused
        if isinstance(padding_idx, torch.Tensor):  # not a device value: that would sync every call
            ok = padding_idx.is_cpu and padding_idx.dtype != torch.bool and not padding_idx.dtype.is_floating_point
            kind = f"{padding_idx.dtype} tensor on {padding_idx.device}"
        else:
            ok = not isinstance(padding_idx, bool) and hasattr(type(padding_idx), "__index__")
            kind = type(padding_idx).__name__
        if not ok:
            raise TypeError(f"padding_idx must be an int, got {kind}")
        padding_idx = operator.index(padding_idx)
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must lie within num_embeddings ({num_embeddings}), got {padding_idx}")
    return padding_idx % num_embeddings


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, device: torch.device, of: str = "input_ids") -> None:
    """flash-attention's ``cu_seqlens``: 1-D int32/int64 on the ids' device, ascending. Its values are
    not read here (the backends read a CPU one's: :func:`check_cu_seqlens_ascending`); entries
    outside ``[0, N)`` mark no start."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be a 1-D int32 or int64 tensor, got {cu_seqlens.dtype} of shape "
                        f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens on {cu_seqlens.device} but {of} on {device}")


def check_cu_seqlens_ascending(cu_seqlens: torch.Tensor) -> None:
    """Refuse a CPU ``cu_seqlens`` whose entries descend anywhere (repeats are fine); the backends
    whose scales read one call it (the C++ one checks in C++).

    The kernels find entries by binary search and the reference by membership, so an unsorted
    tensor would give backend-dependent starts. Reading CPU values costs no sync; an accelerator's
    are not read (that would sync), there ascending entries stay the caller's contract."""
    if not cu_seqlens.is_cpu:
        return
    descends = cu_seqlens[1:] < cu_seqlens[:-1]
    if descends.any():
        at = int(descends.nonzero()[0])
        raise ValueError(f"cu_seqlens must be ascending (flash-attention's cumulative sequence starts), got "
                         f"{int(cu_seqlens[at])} before {int(cu_seqlens[at + 1])} at index {at + 1}")


def check_call(input_ids: torch.Tensor, weight: torch.Tensor, offset: int, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
               noise_mask: torch.Tensor | None = None) -> None:
    """The per-call checks of :func:`neft_kernels.noisy_embedding`: shapes, dtypes and devices only.

    Each check runs its full form (with the error message) only when a quick test fails: this is
    on every call's path.
    """
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype in SUPPORTED_DTYPES):
        check_weight(weight)
    device = weight.device
    if not (isinstance(input_ids, torch.Tensor) and input_ids.dtype in _ID_DTYPES and input_ids.device == device):
        check_ids(input_ids, weight)
    shape = input_ids.shape
    if attention_mask is not None and not _plain_side_input(attention_mask, shape, device):
        check_side_input("attention_mask", attention_mask, shape, device)
    if position_ids is not None and not _plain_side_input(position_ids, shape, device):
        check_side_input("position_ids", position_ids, shape, device)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, device)
    if noise_mask is not None and not _plain_side_input(noise_mask, shape, device):
        check_side_input("noise_mask", noise_mask, shape, device)
    if offset or type(offset) is not int:
        check_offset(offset, input_ids.numel(), weight.shape[1])
