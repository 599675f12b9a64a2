"""Triton kernels: the fused NEFTune forward and the embedding backward (atomic and deterministic).

The kernels run compiled on CUDA and, under ``TRITON_INTERPRET=1``, on CPU tensors. bf16 is moved
as raw 16-bit words and widened/rounded with integer ops, so the interpreter (which truncates
float32 -> bf16) and GPUs (round to nearest even) give the same bits.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..spec import num_lanes

# Elements handled per program; bounds registers per thread at 4 warps.
_FWD_ELEMENTS = 4096
_BWD_ELEMENTS = 4096
_MAX_BLOCK_D = 1024
# Never let a kernel contract a*b + c into an FMA: spec v1 rounds the product first.
LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=False)


@triton.jit
def _load_f32(ptr, offsets, mask, IS_BF16: tl.constexpr):
    """Load as float32; bf16 arrives as int16 words and widens exactly by a 16-bit shift."""
    if IS_BF16:
        bits = tl.load(ptr + offsets, mask=mask, other=0).to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offsets, mask=mask, other=0).to(tl.float32)


@triton.jit
def _store_f32(ptr, offsets, value, mask, IS_BF16: tl.constexpr):
    """Store float32 rounded to nearest even into the pointer's dtype (bf16: int16 words)."""
    if IS_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)  # keep NaN a NaN (the carry could make it inf)
        tl.store(ptr + offsets, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noisy_quarter(w_ptr, out_ptr, w_row, out_row, col, valid, in_range, bits, scale, d, IS_BF16: tl.constexpr):
    """One quarter of the dims: widen the row, add ``e * scale`` (spec v1 rounding), store.

    A token whose id is out of range reads nothing and writes NaN.
    """
    mask = valid & (col < d)
    w = _load_f32(w_ptr, w_row + col, mask & in_range, IS_BF16)
    e = tl.uint_to_uniform_float(bits) * 2.0 - 1.0
    _store_f32(out_ptr, out_row + col, tl.where(in_range, w + e * scale, float("nan")), mask, IS_BF16)


@triton.jit(do_not_specialize=["seed", "offset"])
def _noisy_embedding_fwd_kernel(
    ids_ptr, w_ptr, out_ptr, scale_ptr, scale_value, seed, offset,
    n_tokens, d, n_lanes, w_stride, n_rows,
    PER_TOKEN_SCALE: tl.constexpr, IS_BF16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    lane = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    tok_mask = tok < n_tokens
    valid = tok_mask[:, None] & (lane < n_lanes)[None, :]

    ids = tl.load(ids_ptr + tok, mask=tok_mask, other=0).to(tl.int64)
    in_range = ((ids >= 0) & (ids < n_rows))[:, None]
    if PER_TOKEN_SCALE:
        scale = tl.load(scale_ptr + tok, mask=tok_mask, other=0.0)[:, None]
    else:
        scale = scale_value

    counter = offset + tok[:, None] * n_lanes + lane[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed.to(tl.int64), counter)

    w_row = ids[:, None] * w_stride
    out_row = tok[:, None] * d
    col = lane[None, :]
    _noisy_quarter(w_ptr, out_ptr, w_row, out_row, col, valid, in_range, r0, scale, d, IS_BF16)
    _noisy_quarter(w_ptr, out_ptr, w_row, out_row, col + n_lanes, valid, in_range, r1, scale, d, IS_BF16)
    _noisy_quarter(w_ptr, out_ptr, w_row, out_row, col + 2 * n_lanes, valid, in_range, r2, scale, d, IS_BF16)
    _noisy_quarter(w_ptr, out_ptr, w_row, out_row, col + 3 * n_lanes, valid, in_range, r3, scale, d, IS_BF16)


@triton.jit
def _embedding_bwd_atomic_kernel(
    grad_ptr, ids_ptr, gw_ptr, n_tokens, d, n_rows, padding_idx,
    GRAD_IS_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ids = tl.load(ids_ptr + tok, mask=tok < n_tokens, other=padding_idx).to(tl.int64)
    mask = ((tok < n_tokens) & (ids != padding_idx) & (ids >= 0) & (ids < n_rows))[:, None] & (col < d)[None, :]
    g = _load_f32(grad_ptr, tok[:, None] * d + col[None, :], mask, GRAD_IS_BF16)
    tl.atomic_add(gw_ptr + ids[:, None] * d + col[None, :], g, mask=mask, sem="relaxed")


@triton.jit
def _embedding_bwd_segmented_kernel(
    grad_ptr, sorted_ids_ptr, order_ptr, seg_end_ptr, gw_ptr, d, n_rows, padding_idx,
    SCALE_BY_FREQ: tl.constexpr, GRAD_IS_BF16: tl.constexpr, OUT_IS_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Deterministic: the program at the first sorted position of each id sums its rows in order."""
    i = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = col < d
    idx = tl.load(sorted_ids_ptr + i).to(tl.int64)
    prev = tl.load(sorted_ids_ptr + i - 1, mask=i > 0, other=-1).to(tl.int64)
    if (idx != prev) & (idx != padding_idx) & (idx >= 0) & (idx < n_rows):
        end = tl.load(seg_end_ptr + i)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(i, end):
            row = tl.load(order_ptr + j)
            acc += _load_f32(grad_ptr, row * d + col, col_mask, GRAD_IS_BF16)
        if SCALE_BY_FREQ:
            acc = tl.div_rn(acc, (end - i).to(tl.float32))  # IEEE, as the other backends divide
        _store_f32(gw_ptr, idx * d + col, acc, col_mask, OUT_IS_BF16)


@triton.jit
def _mask_scales_kernel(mask_ptr, stride_row, stride_col, table_ptr, out_ptr, width, BLOCK: tl.constexpr):
    """One row: count its real tokens, then write ``table[count]`` to each of them and 0 elsewhere."""
    row = tl.program_id(0).to(tl.int64)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, width, BLOCK):
        col = start + tl.arange(0, BLOCK)
        m = tl.load(mask_ptr + row * stride_row + col * stride_col, mask=col < width, other=0)
        count += (m != 0).to(tl.int32)
    scale = tl.load(table_ptr + tl.sum(count, axis=0))
    for start in range(0, width, BLOCK):
        col = start + tl.arange(0, BLOCK)
        m = tl.load(mask_ptr + row * stride_row + col * stride_col, mask=col < width, other=0)
        tl.store(out_ptr + row * width + col, tl.where(m != 0, scale, 0.0), mask=col < width)


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors travel as int16 words (see module docstring)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def forward_blocks(embedding_dim: int) -> tuple[int, int]:
    """(BLOCK_N tokens, BLOCK_Q lanes) per forward program for an embedding dim."""
    block_q = min(triton.next_power_of_2(num_lanes(embedding_dim)), _MAX_BLOCK_D)
    return max(1, _FWD_ELEMENTS // (4 * block_q)), block_q


def backward_blocks(embedding_dim: int) -> tuple[int, int]:
    """(BLOCK_N tokens, BLOCK_D dims) per backward program for an embedding dim."""
    block_d = min(triton.next_power_of_2(max(embedding_dim, 1)), _MAX_BLOCK_D)
    return max(1, _BWD_ELEMENTS // block_d), block_d


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "triton is imported to run the kernels on the CPU")


def forward(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | float,
            seed: int, offset: int) -> torch.Tensor:
    """(N,) ids into a (V, d) weight -> (N, d) noisy rows, spec v1; ``seed`` a signed int64 value."""
    _check_device(weight)
    n_tokens, d = ids.numel(), weight.shape[1]
    out = torch.empty(n_tokens, d, dtype=weight.dtype, device=weight.device)
    if n_tokens == 0 or d == 0:
        return out
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    q = num_lanes(d)
    block_n, block_q = forward_blocks(d)
    per_token = isinstance(scale, torch.Tensor)
    scale_arg = scale.to(torch.float32).contiguous() if per_token else out  # unused when scalar
    grid = (triton.cdiv(n_tokens, block_n), triton.cdiv(q, block_q))
    _noisy_embedding_fwd_kernel[grid](
        ids.contiguous(), _bits_view(weight), _bits_view(out), scale_arg,
        0.0 if per_token else float(scale), seed, offset,
        n_tokens, d, q, weight.stride(0), weight.shape[0],
        PER_TOKEN_SCALE=per_token, IS_BF16=weight.dtype == torch.bfloat16,
        BLOCK_N=block_n, BLOCK_Q=block_q, **LAUNCH_OPTIONS,
    )
    return out


def backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int | None,
             scale_grad_by_freq: bool, deterministic: bool) -> torch.Tensor:
    """(N, d) grad rows -> (V, d) weight gradient, summed in float32, in ``grad``'s dtype."""
    _check_device(grad)
    n_tokens, d = grad.shape
    grad = _bits_view(grad.contiguous())
    ids = ids.contiguous()
    pad = -1 if padding_idx is None else padding_idx
    is_bf16 = grad.dtype == torch.int16
    out_dtype = torch.bfloat16 if is_bf16 else grad.dtype
    block_n, block_d = backward_blocks(d)
    if n_tokens == 0 or d == 0:
        return torch.zeros(num_weights, d, dtype=out_dtype, device=grad.device)

    if deterministic:
        grad_weight = torch.zeros(num_weights, d, dtype=out_dtype, device=grad.device)
        sorted_ids, order = torch.sort(ids, stable=True)
        seg_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
        _embedding_bwd_segmented_kernel[(n_tokens, triton.cdiv(d, block_d))](
            grad, sorted_ids, order, seg_end, _bits_view(grad_weight), d, num_weights, pad,
            SCALE_BY_FREQ=scale_grad_by_freq, GRAD_IS_BF16=is_bf16, OUT_IS_BF16=is_bf16,
            BLOCK_D=block_d, **LAUNCH_OPTIONS,
        )
        return grad_weight

    acc = torch.zeros(num_weights, d, dtype=torch.float32, device=grad.device)
    _embedding_bwd_atomic_kernel[(triton.cdiv(n_tokens, block_n), triton.cdiv(d, block_d))](
        grad, ids, acc, n_tokens, d, num_weights, pad,
        GRAD_IS_BF16=is_bf16, BLOCK_N=block_n, BLOCK_D=block_d, **LAUNCH_OPTIONS,
    )
    if scale_grad_by_freq:  # sum first, then divide, as every backend does
        in_range = (ids >= 0) & (ids < num_weights)
        counts = torch.zeros(num_weights, dtype=torch.float32, device=grad.device)
        counts.index_add_(0, ids.clamp(0, max(num_weights - 1, 0)), in_range.to(torch.float32))
        acc /= counts.clamp(min=1)[:, None]
    return acc if out_dtype == torch.float32 else acc.to(out_dtype)


@lru_cache(maxsize=64)
def _scale_table(alpha: float, embedding_dim: int, width: int, device: torch.device) -> torch.Tensor:
    """``table[L]``: the scale of a sequence of ``L`` real tokens, by the ops ``token_scales`` uses."""
    length = torch.arange(width + 1, dtype=torch.float64, device=device).clamp(min=1)
    return torch.div(torch.full_like(length, alpha), torch.sqrt(length * embedding_dim)).to(torch.float32)


def mask_scales(attention_mask: torch.Tensor, alpha: float, embedding_dim: int) -> torch.Tensor:
    """``token_scales`` for a padded batch (mask only, ``"per_sequence"``) in one launch.

    The same bits as :func:`neft_kernels.lengths.token_scales`, whose ten-odd small ops cost more
    host time than the embedding kernel itself on a GPU.
    """
    _check_device(attention_mask)
    width = attention_mask.shape[-1]
    mask = attention_mask.reshape(-1, width)
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    out = torch.empty(mask.numel(), dtype=torch.float32, device=mask.device)
    if out.numel():
        table = _scale_table(alpha, embedding_dim, width, mask.device)
        _mask_scales_kernel[(mask.shape[0],)](mask, mask.stride(0), mask.stride(1), table, out, width,
                                              BLOCK=min(triton.next_power_of_2(width), 1024))
    return out
