"""Per-token noise scales: which tokens get noise and which sequence length ``L`` each sees.

All of it is O(number of tokens) tensor work on the ids' device, with no host-device sync.
"""

from __future__ import annotations

import math
from typing import overload

import torch

LENGTH_MODES = ("per_sequence", "padded")


def device_of(*tensors: object) -> torch.device:
    """The device of the first tensor among ``tensors`` (side inputs and alpha, where no device is given)."""
    return next(t.device for t in tensors if isinstance(t, torch.Tensor))


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length): the last dim is the sequence, leading dims are rows; 0-d is one token."""
    width = shape[-1] if len(shape) else 1
    return (math.prod(shape) // width if width else 0), width


_FLOAT32_MIN_NORMAL = 2.0**-126
_FLOAT32_MAX = (2 - 2.0**-23) * 2.0**127


def round_to_float32(x: float) -> float:
    """A finite non-negative double rounded to nearest-even float32 (IEEE, once), in pure Python
    (traceable): the value ``float32(x)`` holds, ``inf`` past the float32 range.

    Python's ``round`` is round-half-even: a normal float32 rounds its 24-bit mantissa, a subnormal
    one to a multiple of ``2**-149`` (rounding it to 24 bits first would round twice: a tiny alpha's
    one-scale path then differed from the per-token scales' single rounding).
    """
    if x == 0:
        return 0.0
    if x < _FLOAT32_MIN_NORMAL:
        return math.ldexp(round(math.ldexp(x, 149)), -149)
    mantissa, exponent = math.frexp(x)
    rounded = math.ldexp(round(mantissa * (1 << 24)), exponent - 24)
    return rounded if rounded <= _FLOAT32_MAX else math.inf


@overload
def scale_for_length(alpha: float, length: int, embedding_dim: int) -> float: ...
@overload
def scale_for_length(alpha: float | torch.Tensor, length: torch.Tensor, embedding_dim: int) -> torch.Tensor: ...


def scale_for_length(alpha: float | torch.Tensor, length: int | torch.Tensor,
                     embedding_dim: int) -> float | torch.Tensor:
    """The spec's ``float32(alpha / sqrt(L * d))``, computed in float64 and rounded once; 0 for d = 0
    (no noise). The one place the formula is written: a Python float for an int ``length`` and a
    float ``alpha``; a float32 tensor for a float64 tensor of lengths (each at least 1) and a float
    or 0-d tensor ``alpha``."""
    if not isinstance(length, torch.Tensor):  # then alpha is a float (the first overload); no cast: a hot path
        return 0.0 if embedding_dim == 0 else round_to_float32(
            alpha / math.sqrt(length * embedding_dim))  # type: ignore[arg-type]
    if embedding_dim == 0:
        return torch.zeros(length.shape, dtype=torch.float32, device=length.device)
    root = torch.sqrt(length * embedding_dim)
    # A true float64 division: ``alpha / tensor`` would be reciprocal-then-multiply, two roundings.
    if isinstance(alpha, torch.Tensor):
        numerator = alpha.to(torch.float64).expand_as(root)
    else:
        numerator = torch.full_like(root, alpha)
    return torch.div(numerator, root).to(torch.float32)


def _subsequence_lengths(starts: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Per token, the real tokens of its sub-sequence (float64); ``starts`` is (rows, width) bool."""
    starts = starts.clone()
    starts[:, :1] = True  # every row starts a sub-sequence
    starts = starts.reshape(-1)
    n = starts.numel()
    idx = torch.arange(n, device=starts.device)
    first = torch.cummax(torch.where(starts, idx, 0), 0).values
    is_last = torch.ones_like(starts)
    is_last[:-1] = starts[1:]
    last = torch.flip(torch.cummin(torch.flip(torch.where(is_last, idx, n), (0,)), 0).values, (0,))
    weights = real.to(torch.int64) if real is not None else torch.ones(n, dtype=torch.int64, device=starts.device)
    cum = torch.cat([weights.new_zeros(1), torch.cumsum(weights, 0)])
    return (cum[last + 1] - cum[first]).to(torch.float64)


def _cu_starts(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) bool: which flat tokens an entry of ``cu_seqlens`` starts (entries outside [0, n) mark none)."""
    flags = torch.zeros(n + 1, dtype=torch.bool, device=cu_seqlens.device)
    flags.scatter_(0, cu_seqlens.to(torch.int64).clamp(0, n), True)
    return flags[:n]


def token_lengths(shape: tuple[int, ...], *, device: torch.device, attention_mask: torch.Tensor | None = None,
                  position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                  noise_mask: torch.Tensor | None = None,
                  length_mode: str = "per_sequence") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(L_n, noised_n)`` of every token of an ``input_ids`` of ``shape`` on ``device``, flattened
    row-major: the float64 lengths and a bool tensor (None: every token is noised). See
    :func:`token_scales`."""
    rows, width = _rows(shape)
    n = rows * width
    if length_mode == "padded":
        attention_mask = position_ids = cu_seqlens = None
    real = (attention_mask.expand(shape).reshape(n) != 0) if attention_mask is not None else None
    if position_ids is None and cu_seqlens is None:  # a padded batch, or plain rows: one sequence per row
        if real is None:
            length = torch.full((n,), float(width), dtype=torch.float64, device=device)
        else:
            length = real.view(rows, width).sum(-1, keepdim=True, dtype=torch.float64).expand(rows, width).reshape(n)
    else:
        starts = torch.zeros(n, dtype=torch.bool, device=device)
        if position_ids is not None:
            starts |= position_ids.expand(shape).reshape(n) == 0
        if cu_seqlens is not None:
            starts |= _cu_starts(cu_seqlens, n)
        length = _subsequence_lengths(starts.view(rows, width), real)
    noised = real
    if noise_mask is not None:
        wanted = noise_mask.expand(shape).reshape(n) != 0
        noised = wanted if noised is None else noised & wanted
    return length, noised


def token_scales(shape: tuple[int, ...], alpha: float | torch.Tensor, embedding_dim: int, *,
                 attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None,
                 noise_mask: torch.Tensor | None = None,
                 length_mode: str = "per_sequence",
                 device: torch.device | None = None) -> torch.Tensor | float:
    """``scale_n`` of every token of an ``input_ids`` of ``shape``, flattened row-major.

    Returns one float when every token shares it (``"padded"``, or no side input, with a float
    ``alpha`` and no ``noise_mask``), else a float32 tensor of ``numel`` scales on ``device``
    (default: the side inputs'), 0 for tokens that get no noise.

    * ``"padded"``: Hugging Face's rule, ``L`` = the row width, every token noised.
    * ``"per_sequence"``: a sub-sequence starts at each row start, wherever ``position_ids``
      is 0 and at each entry of ``cu_seqlens`` (flat token indices); ``L_n`` counts the real
      (``attention_mask != 0``) tokens of token n's sub-sequence; masked tokens get no noise.
    * ``noise_mask``: tokens where it is 0 get no noise; they still count towards ``L``.
    * ``alpha``: a float, or a 0-d float64 tensor (read on the device, not on the host).

    The reference for every backend's on-device scales: about ten tensor ops per call.
    """
    rows, width = _rows(shape)
    if length_mode == "padded":
        attention_mask = position_ids = cu_seqlens = None
    side = (attention_mask, position_ids, cu_seqlens, noise_mask)
    if all(t is None for t in side) and not isinstance(alpha, torch.Tensor):
        return scale_for_length(alpha, max(width, 1), embedding_dim)
    if device is None:
        device = device_of(*side, alpha)
    if rows * width == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    length, noised = token_lengths(shape, attention_mask=attention_mask, position_ids=position_ids,
                                   cu_seqlens=cu_seqlens, noise_mask=noise_mask, device=device)
    scale = scale_for_length(alpha, length.clamp(min=1), embedding_dim)
    if noised is not None:
        scale = torch.where(noised, scale, 0.0)
    return scale
