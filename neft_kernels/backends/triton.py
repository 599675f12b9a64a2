"""Triton kernels: the fused NEFTune forward, its per-token scales and the deterministic embedding backward.

The kernels run compiled on CUDA and, under ``TRITON_INTERPRET=1``, on CPU tensors. bf16 is moved
as raw 16-bit words, widened by a shift and rounded to nearest even: by the GPU's conversion when
compiled, by integer ops under the interpreter (whose own conversion does not round to nearest
even), so both give the same bits.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .. import spec, validation
from ..id_check import check_id_range
from ..lengths import device_of
from ..spec import num_lanes

# Elements handled per program; bounds registers per thread at 4 warps.
_FWD_ELEMENTS = 4096
_MAX_BLOCK_D = 1024
# Philox4x32-10's constants, as the spec defines them (the kernels' Philox must give its words).
_PHILOX_ROUNDS = tl.constexpr(spec.PHILOX_ROUNDS)
_PHILOX_MUL_A = tl.constexpr(spec.PHILOX_MUL_A)
_PHILOX_MUL_B = tl.constexpr(spec.PHILOX_MUL_B)
_PHILOX_KEY_A = tl.constexpr(spec.PHILOX_KEY_A)
_PHILOX_KEY_B = tl.constexpr(spec.PHILOX_KEY_B)
_UNIFORM_SCALE_X2 = tl.constexpr(spec.UNIFORM_SCALE_X2)
# The Gaussian stream's float32 constants, from the spec.
_SQRT2_BITS = tl.constexpr(spec.SQRT2_BITS)
_LN2 = tl.constexpr(spec.LN2)
_HALF_PI = tl.constexpr(spec.HALF_PI)
_SQRT_HALF = tl.constexpr(spec.SQRT_HALF)
_LOG_0, _LOG_1, _LOG_2, _LOG_3 = (tl.constexpr(c) for c in spec.LOG_POLY)
_SIN_0, _SIN_1, _SIN_2, _SIN_3 = (tl.constexpr(c) for c in spec.SIN_POLY)
_COS_0, _COS_1, _COS_2, _COS_3 = (tl.constexpr(c) for c in spec.COS_POLY)
# Gradient rows of one id loaded per step of the backward's in-order sum.
_BWD_ROWS = 8
# Never let a kernel contract a*b + c into an FMA: the spec rounds every product first.
LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=False)
# The scales kernel holds a 1024-token block in several scans: 8 warps keep it out of local memory.
SCALES_LAUNCH_OPTIONS = dict(num_warps=8, enable_fp_fusion=False)


@triton.jit
def _probe():
    """Never launched: its type tells whether ``@triton.jit`` interprets here."""


# Whether the kernels run in Triton's interpreter: triton decides when it decorates them, reading
# TRITON_INTERPRET as a flag (1, true, on, yes, ...), so ask triton rather than the variable.
INTERPRETED = not isinstance(_probe, triton.runtime.JITFunction)  # InterpretedFunction is not one


def _cpu_unavailable() -> str | None:
    """Why these kernels cannot take CPU tensors here, or None when the interpreter runs them."""
    if not INTERPRETED:
        return ("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported to "
                "run the kernels on the CPU")
    import re

    import numpy

    def release(version: str) -> tuple[int, int] | None:
        found = re.match(r"(\d+)\.(\d+)", version)
        return (int(found[1]), int(found[2])) if found else None

    # Before 3.7 the interpreter turns a loop bound into an int by int() of a one-element array, which
    # numpy 2.4 refuses (triton-lang/triton#9171): every kernel here with a run-time loop would fail.
    # Versions that do not parse are not refused.
    triton_release, numpy_release = release(triton.__version__), release(numpy.__version__)
    if triton_release and numpy_release and triton_release < (3, 7) and numpy_release >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with numpy {numpy.__version__} "
                "(loop bounds go through int() of a one-element array, which numpy 2.4 refuses: "
                "triton-lang/triton#9171, fixed in triton 3.7); use triton >= 3.7 or numpy < 2.4")
    return None


CPU_UNAVAILABLE = _cpu_unavailable()

# Compiled kernels round float32 -> bf16 with the GPU's conversion (one instruction per pair of
# elements, where integer rounding took about six per element); the interpreter's conversion does
# not round to nearest even, so there integer ops do. The same bits (NaN payloads are not part of
# the spec).
_HW_BF16 = tl.constexpr(not INTERPRETED)


@triton.jit
def _load_f32(ptr, offsets, mask, IS_BF16: tl.constexpr, OTHER_NAN: tl.constexpr = False):
    """Load as float32 (masked-off elements 0, or NaN); bf16 arrives as int16 words and widens
    exactly by a 16-bit shift."""
    if IS_BF16:
        bits = tl.load(ptr + offsets, mask=mask, other=0x7FC0 if OTHER_NAN else 0).to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offsets, mask=mask, other=float("nan") if OTHER_NAN else 0).to(tl.float32)


@triton.jit
def _store_f32(ptr, offsets, value, mask, IS_BF16: tl.constexpr):
    """Store float32 rounded to nearest even into the pointer's dtype (bf16: int16 words)."""
    if IS_BF16:
        if _HW_BF16:
            rounded = value.to(tl.bfloat16).to(tl.int16, bitcast=True)
        else:
            bits = value.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(value != value, 0x7FC0, rounded)  # keep NaN a NaN (the carry could make it inf)
            rounded = rounded.to(tl.uint16).to(tl.int16, bitcast=True)
        tl.store(ptr + offsets, rounded, mask=mask)
    else:
        tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_quarter(w_ptr, w_row, col, valid, in_range, d, IS_BF16: tl.constexpr):
    """One quarter of the dims of each row, widened to float32. An out-of-range id reads nothing and
    gets NaN, which the noise's add carries to the output: no select per element."""
    return _load_f32(w_ptr, w_row + col, valid & (col < d) & in_range, IS_BF16, OTHER_NAN=True)


@triton.jit
def _store_quarter(out_ptr, out_row, col, valid, w, e, scale, d, IS_BF16: tl.constexpr):
    """``w + e * scale`` (spec rounding) stored."""
    _store_f32(out_ptr, out_row + col, w + e * scale, valid & (col < d), IS_BF16)


@triton.jit
def _noisy_quarter(w_ptr, out_ptr, w_row, out_row, col, valid, in_range, e, scale, d, IS_BF16: tl.constexpr):
    """One quarter loaded, noised and stored."""
    w = _load_quarter(w_ptr, w_row, col, valid, in_range, d, IS_BF16)
    _store_quarter(out_ptr, out_row, col, valid, w, e, scale, d, IS_BF16)


@triton.jit
def _mulhilo(a, b):
    """(high, low) 32-bit words of the 64-bit product of uint32 ``a`` and ``b``: one widening multiply
    (IMAD.WIDE.U32) where ``tl.randint4x``'s separate high and low products take about three."""
    p = a.to(tl.uint64) * b.to(tl.uint64)
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def _philox(key, counter):
    """Philox4x32-10 of the 64-bit ``counter`` (words lo, hi, 0, 0) under the 64-bit ``key``: the
    same four words as ``tl.randint4x(key, counter)``, with widening multiplies."""
    key = key.to(tl.int64).to(tl.uint64)  # a value cast (the interpreter may hold a seed as 32 bits)
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = (key >> 32).to(tl.uint32)
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c2
    round_a = tl.full([], _PHILOX_MUL_A, tl.uint32)
    round_b = tl.full([], _PHILOX_MUL_B, tl.uint32)
    for _ in tl.static_range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, round_b)
        hi_a, lo_a = _mulhilo(c0, round_a)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = tl.add(k0, _PHILOX_KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _uniform(bits):
    """Spec v1's ``e`` in [-1, 1) from a 32-bit word: ``tl.uint_to_uniform_float(bits) * 2 - 1``, with
    the doubling folded into the scale (the same float32 for every word: see ``spec.UNIFORM_SCALE_X2``)."""
    x = bits.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, -x - 1, x)
    return x.to(tl.float32) * _UNIFORM_SCALE_X2 - 1.0


@triton.jit
def _horner4(x, c0: tl.constexpr, c1: tl.constexpr, c2: tl.constexpr, c3: tl.constexpr):
    """``((c0 x + c1) x + c2) x + c3`` in float32, each product and sum rounded (no FMA)."""
    return ((c0 * x + c1) * x + c2) * x + c3


@triton.jit
def _log_f32(u):
    """Spec v2's float32 log of ``u`` in (0, 1) (``neft_kernels.spec.log_f32``): IEEE ops only."""
    bits = u.to(tl.int32, bitcast=True)
    exponent = (bits >> 23) - 127
    mantissa_bits = (bits & 0x7FFFFF) | 0x3F800000
    big = mantissa_bits > _SQRT2_BITS
    m = mantissa_bits.to(tl.float32, bitcast=True)
    m = tl.where(big, m * 0.5, m)
    exponent = tl.where(big, exponent + 1, exponent)
    s = tl.div_rn(m - 1.0, m + 1.0)
    z = s * s
    p = _horner4(z, _LOG_0, _LOG_1, _LOG_2, _LOG_3)
    return exponent.to(tl.float32) * _LN2 + ((s + s) + (s * z) * p)


@triton.jit
def _gaussian_pair(a, b):
    """Spec v2's two standard normals from two 32-bit words (``neft_kernels.spec.gaussian_pair``)."""
    u1 = ((a >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
    u2 = (b >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
    radius = tl.sqrt_rn(tl.maximum(_log_f32(u1) * -2.0, 0.0))
    t = u2 * 4.0
    quadrant = t.to(tl.int32)
    phi = ((t - quadrant.to(tl.float32)) - 0.5) * _HALF_PI
    p = phi * phi
    sin_phi = phi + (phi * p) * _horner4(p, _SIN_0, _SIN_1, _SIN_2, _SIN_3)
    cos_phi = 1.0 + p * _horner4(p, _COS_0, _COS_1, _COS_2, _COS_3)
    c = (cos_phi - sin_phi) * _SQRT_HALF
    s = (cos_phi + sin_phi) * _SQRT_HALF
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    return radius * cos, radius * sin


@triton.jit(do_not_specialize=["seed", "offset"])
def _noisy_embedding_fwd_kernel(
    ids_ptr, w_ptr, out_ptr, scale_ptr, scale_value, seed, seed_ptr, offset, bad_ptr,
    n_tokens, d, n_lanes, w_stride, n_rows,
    PER_TOKEN_SCALE: tl.constexpr, SEED_FROM_PTR: tl.constexpr, RECORD_BAD: tl.constexpr, IS_BF16: tl.constexpr,
    GAUSSIAN: tl.constexpr, EARLY_LOADS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    lane = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    tok_mask = tok < n_tokens
    valid = tok_mask[:, None] & (lane < n_lanes)[None, :]

    ids = tl.load(ids_ptr + tok, mask=tok_mask, other=0).to(tl.int64)
    tok_in_range = (ids >= 0) & (ids < n_rows)
    in_range = tok_in_range[:, None]
    if RECORD_BAD:  # (min, max) of out-of-range ids and the table's V, for the host to raise without a sync
        if tl.program_id(1) == 0:
            bad = tok_mask & ~tok_in_range
            zero = tl.zeros_like(ids)
            tl.atomic_min(bad_ptr + zero, ids, mask=bad, sem="relaxed")
            tl.atomic_max(bad_ptr + 1 + zero, ids, mask=bad, sem="relaxed")
            tl.atomic_max(bad_ptr + 2 + zero, zero + n_rows, mask=bad, sem="relaxed")
    if PER_TOKEN_SCALE:
        scale = tl.load(scale_ptr + tok, mask=tok_mask, other=0.0)[:, None]
    else:
        scale = scale_value
    if SEED_FROM_PTR:  # read on the device: each replay of a captured CUDA graph sees its own seed
        key = tl.load(seed_ptr)
    else:
        key = seed.to(tl.int64)

    w_row = ids[:, None] * w_stride
    col = lane[None, :]
    if EARLY_LOADS:
        # 16-bit rows, uniform noise: the four quarters' loads go out before the Philox rounds, so
        # that their latency overlaps the arithmetic. Issued after it, each quarter waited behind the
        # previous one's store: too few bytes in flight per SM for the memory. (fp32 programs have
        # enough in flight already and the Gaussian ones are compute-bound: there the extra
        # registers would only cost occupancy.)
        w0 = _load_quarter(w_ptr, w_row, col, valid, in_range, d, IS_BF16)
        w1 = _load_quarter(w_ptr, w_row, col + n_lanes, valid, in_range, d, IS_BF16)
        w2 = _load_quarter(w_ptr, w_row, col + 2 * n_lanes, valid, in_range, d, IS_BF16)
        w3 = _load_quarter(w_ptr, w_row, col + 3 * n_lanes, valid, in_range, d, IS_BF16)

    counter = offset + tok[:, None] * n_lanes + lane[None, :]
    r0, r1, r2, r3 = _philox(key, counter)
    if GAUSSIAN:
        e0, e1 = _gaussian_pair(r0, r1)
        e2, e3 = _gaussian_pair(r2, r3)
    else:
        e0, e1, e2, e3 = _uniform(r0), _uniform(r1), _uniform(r2), _uniform(r3)
    out_row = tok[:, None] * d
    if EARLY_LOADS:
        _store_quarter(out_ptr, out_row, col, valid, w0, e0, scale, d, IS_BF16)
        _store_quarter(out_ptr, out_row, col + n_lanes, valid, w1, e1, scale, d, IS_BF16)
        _store_quarter(out_ptr, out_row, col + 2 * n_lanes, valid, w2, e2, scale, d, IS_BF16)
        _store_quarter(out_ptr, out_row, col + 3 * n_lanes, valid, w3, e3, scale, d, IS_BF16)
    else:  # each quarter loaded just before its store: fewer registers
        _noisy_quarter(w_ptr, out_ptr, w_row, out_row, col, valid, in_range, e0, scale, d, IS_BF16)
        _noisy_quarter(w_ptr, out_ptr, w_row, out_row, col + n_lanes, valid, in_range, e1, scale, d, IS_BF16)
        _noisy_quarter(w_ptr, out_ptr, w_row, out_row, col + 2 * n_lanes, valid, in_range, e2, scale, d, IS_BF16)
        _noisy_quarter(w_ptr, out_ptr, w_row, out_row, col + 3 * n_lanes, valid, in_range, e3, scale, d, IS_BF16)


@triton.jit
def _embedding_bwd_kernel(
    grad_ptr, sorted_ids_ptr, order_ptr, seg_end_ptr, gw_ptr, d, n_rows, padding_idx,
    SCALE_BY_FREQ: tl.constexpr, IS_BF16: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):
    """The program at the first sorted position of each id sums that id's rows in token order (float32)
    and writes the weight-dtype row once; later positions of a run exit. Whole groups of ROWS rows
    go with all their loads in flight, then the rest one by one (most ids of a large vocabulary
    occur once: a single row costs a single load)."""
    i = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = col < d
    idx = tl.load(sorted_ids_ptr + i).to(tl.int64)
    prev = tl.load(sorted_ids_ptr + i - 1, mask=i > 0, other=-1).to(tl.int64)
    if (idx != prev) & (idx != padding_idx) & (idx >= 0) & (idx < n_rows):
        end = tl.load(seg_end_ptr + i)
        grouped = i + (end - i) // ROWS * ROWS
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(i, grouped, ROWS):
            for r in tl.static_range(ROWS):  # the loads do not wait on the adds: all in flight at once
                acc += _load_f32(grad_ptr, tl.load(order_ptr + j + r) * d + col, col_mask, IS_BF16)
        for j in range(grouped, end):
            acc += _load_f32(grad_ptr, tl.load(order_ptr + j) * d + col, col_mask, IS_BF16)
        if SCALE_BY_FREQ:
            acc = tl.div_rn(acc, (end - i).to(tl.float32))  # IEEE, as the other backends divide
        _store_f32(gw_ptr, idx * d + col, acc, col_mask, IS_BF16)


@triton.jit
def _starts_and_real(row, col, width, mask_ptr, m_s0, m_s1, pos_ptr, p_s0, p_s1, cu_ptr, n_cu, cu_steps,
                     HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr, HAS_CU: tl.constexpr):
    """Per column of one row: does a sub-sequence start here, and is the token real (unmasked)?"""
    inside = (col >= 0) & (col < width)
    start = col == 0
    if HAS_POS:
        start = start | (tl.load(pos_ptr + row * p_s0 + col * p_s1, mask=inside, other=1) == 0)
    if HAS_CU:  # is the flat index an entry of cu_seqlens? A binary search over its ascending entries.
        n = row * width + col
        lo = tl.zeros_like(n)
        hi = lo + n_cu
        for _ in range(cu_steps):
            active = lo < hi
            mid = (lo + hi) // 2
            right = active & (tl.load(cu_ptr + mid, mask=active & inside, other=0).to(tl.int64) <= n)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & ~right, mid, hi)
        start = start | (tl.load(cu_ptr + lo - 1, mask=(lo > 0) & inside, other=-1).to(tl.int64) == n)
    if HAS_MASK:
        real = tl.load(mask_ptr + row * m_s0 + col * m_s1, mask=inside, other=0) != 0
    else:
        real = inside
    return start & inside, real & inside


@triton.jit
def _max_op(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_op(a, b):
    return tl.minimum(a, b)


@triton.jit(do_not_specialize=["alpha_bits"])
def _token_scales_kernel(mask_ptr, m_s0, m_s1, pos_ptr, p_s0, p_s1, cu_ptr, n_cu, cu_steps, noise_ptr, n_s0, n_s1,
                         out_ptr, width, alpha_bits, alpha_ptr, d, HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr,
                         HAS_CU: tl.constexpr, HAS_NOISE_MASK: tl.constexpr, ALPHA_FROM_PTR: tl.constexpr,
                         BLOCK: tl.constexpr, WALK: tl.constexpr):
    """Spec ``scale_n`` of BLOCK tokens of one row (grid: rows x blocks of a row).

    Within the block, scans find each token's sub-sequence piece and its real tokens; a piece that
    crosses the block's edge adds what a walk over the neighbouring chunks (WALK at a time, until
    the next start) counts. So a long packed row is spread over many programs, none serialised.
    """
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1).to(tl.int64) * BLOCK
    idx = tl.arange(0, BLOCK)
    col = first + idx
    start, real = _starts_and_real(row, col, width, mask_ptr, m_s0, m_s1, pos_ptr, p_s0, p_s1, cu_ptr, n_cu, cu_steps,
                                   HAS_MASK, HAS_POS, HAS_CU)
    after, _ = _starts_and_real(row, col + 1, width, mask_ptr, m_s0, m_s1, pos_ptr, p_s0, p_s1, cu_ptr, n_cu, cu_steps,
                                HAS_MASK, HAS_POS, HAS_CU)
    # Piece of token i within the block: [piece_lo, piece_hi); -1 / BLOCK where it crosses an edge.
    piece_lo = tl.associative_scan(tl.where(start, idx, -1), 0, _max_op)
    piece_hi = tl.associative_scan(tl.where(after, idx + 1, BLOCK), 0, _min_op, reverse=True)
    count = tl.cumsum(real.to(tl.int32), 0)
    before = tl.where(piece_lo > 0, tl.gather(count, tl.maximum(piece_lo - 1, 0), 0), 0)
    length = tl.gather(count, piece_hi - 1, 0) - before

    # Real tokens of the first piece before the block, and of the last piece after it.
    carry_in = tl.sum(tl.zeros_like(count), 0)
    done = tl.max(tl.where(idx == 0, start.to(tl.int32), 0), 0) != 0
    pos = first
    while not done:
        c = pos - WALK + tl.arange(0, WALK)
        s, r = _starts_and_real(row, c, width, mask_ptr, m_s0, m_s1, pos_ptr, p_s0, p_s1, cu_ptr, n_cu, cu_steps,
                                HAS_MASK, HAS_POS, HAS_CU)
        last = tl.max(tl.where(s, c, -1), 0)
        carry_in += tl.sum((r & (c >= last)).to(tl.int32), 0)
        done = last >= 0
        pos -= WALK
    carry_out = tl.sum(tl.zeros_like(count), 0)
    pos = first + BLOCK
    done = pos >= width
    while not done:
        c = pos + tl.arange(0, WALK)
        s, r = _starts_and_real(row, c, width, mask_ptr, m_s0, m_s1, pos_ptr, p_s0, p_s1, cu_ptr, n_cu, cu_steps,
                                HAS_MASK, HAS_POS, HAS_CU)
        nxt = tl.min(tl.where(s, c, width), 0)
        carry_out += tl.sum((r & (c < nxt)).to(tl.int32), 0)
        pos += WALK
        done = (nxt < width) | (pos >= width)
    length += tl.where(piece_lo < 0, carry_in, 0) + tl.where(piece_hi >= BLOCK, carry_out, 0)

    # float32(alpha / sqrt(L * d)) in float64 (IEEE div and sqrt), rounded once. alpha arrives as its
    # bits, or is read from memory (a compiled or captured graph's alpha tensor).
    if ALPHA_FROM_PTR:
        alpha = tl.load(alpha_ptr)
    else:
        alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)
    scale = (alpha / tl.sqrt(tl.maximum(length, 1).to(tl.float64) * d)).to(tl.float32)
    if HAS_NOISE_MASK:  # tokens kept clean still counted towards L above
        real = real & (tl.load(noise_ptr + row * n_s0 + col * n_s1, mask=col < width, other=0) != 0)
    tl.store(out_ptr + row * width + col, tl.where(real, scale, 0.0), mask=col < width)


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors travel as int16 words (see module docstring)."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def fitted_block(n: int, cap: int) -> int:
    """The largest power of two <= ``cap`` whose multiples cover ``n`` with at most 1/8 idle (32 at
    the least): a block need not divide a width (d = 1152 has 288 lanes: 5 x 64, not 1 x 512)."""
    block = min(triton.next_power_of_2(max(n, 1)), cap)
    while block > 32 and (-n) % block * 8 > n:
        block //= 2
    return block


def forward_blocks(embedding_dim: int) -> tuple[int, int]:
    """(BLOCK_N tokens, BLOCK_Q lanes) per forward program for an embedding dim."""
    block_q = fitted_block(num_lanes(embedding_dim), _MAX_BLOCK_D)
    return max(1, _FWD_ELEMENTS // (4 * block_q)), block_q


def backward_block(embedding_dim: int) -> int:
    """BLOCK_D dims per backward program for an embedding dim."""
    return fitted_block(embedding_dim, _MAX_BLOCK_D)


def early_loads(dtype: torch.dtype, gaussian: bool) -> bool:
    """Whether the forward loads its rows before the Philox rounds: 16-bit rows with uniform noise."""
    return dtype.itemsize == 2 and not gaussian


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and CPU_UNAVAILABLE is not None:
        raise RuntimeError(CPU_UNAVAILABLE)


def forward(ids: torch.Tensor, weight: torch.Tensor, seed: int | torch.Tensor, offset: int, scale: float | None,
            alpha: float | torch.Tensor, width: int, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None,
            gaussian: bool, bad_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The backend contract (see ``backends/__init__.py``): at most two launches, scales then rows."""
    _check_device(weight)
    if ids.device.type == "cpu":  # the interpreter: CPU ids are checked on the host, no device to sync
        check_id_range(ids, weight.shape[0])
    scales = scale if scale is not None else token_scales(
        width, ids.numel(), alpha, weight.shape[1], attention_mask, position_ids, cu_seqlens, noise_mask, ids.device)
    return fused_forward(ids, weight, scales, seed, offset, bad_ids, gaussian)


def fused_forward(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | float, seed: int | torch.Tensor,
                  offset: int, bad_ids: torch.Tensor | None = None, gaussian: bool = False) -> torch.Tensor:
    """Ids of any shape into a (V, d) weight -> ``ids.shape + (d,)`` noisy rows, spec v2, in one launch.

    ``seed``: a signed int64 value, or a 0-d int64 tensor on the weight's device that the kernel
    reads (graph-safe). ``bad_ids``: an int64 ``(3,)`` tensor on that device into which the kernel
    folds the (min, max) of ids outside ``[0, V)`` and V, or None.
    """
    _check_device(weight)
    n_tokens, d = ids.numel(), weight.shape[1]
    out = torch.empty((*ids.shape, d), dtype=weight.dtype, device=weight.device)
    if n_tokens == 0 or d == 0:
        return out
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    q = num_lanes(d)
    block_n, block_q = forward_blocks(d)
    per_token = isinstance(scale, torch.Tensor)
    if isinstance(scale, torch.Tensor) and not (scale.dtype == torch.float32 and scale.is_contiguous()):
        scale = scale.to(torch.float32).contiguous()  # only where needed: one dispatch less per call
    scale_arg = scale if per_token else out  # unused when scalar
    seed_ptr = isinstance(seed, torch.Tensor)
    grid = (triton.cdiv(n_tokens, block_n), triton.cdiv(q, block_q))
    _noisy_embedding_fwd_kernel[grid](
        ids if ids.is_contiguous() else ids.contiguous(), _bits_view(weight), _bits_view(out), scale_arg,
        0.0 if per_token else float(scale), 0 if seed_ptr else seed, seed if seed_ptr else ids, offset,
        ids if bad_ids is None else bad_ids, n_tokens, d, q, weight.stride(0), weight.shape[0],
        PER_TOKEN_SCALE=per_token, SEED_FROM_PTR=seed_ptr, RECORD_BAD=bad_ids is not None,
        IS_BF16=weight.dtype == torch.bfloat16, GAUSSIAN=gaussian, EARLY_LOADS=early_loads(weight.dtype, gaussian),
        BLOCK_N=block_n, BLOCK_Q=block_q, **LAUNCH_OPTIONS,
    )
    return out


def backward(grad: torch.Tensor, ids: torch.Tensor, num_weights: int, padding_idx: int | None,
             scale_grad_by_freq: bool) -> torch.Tensor:
    """(N, d) grad rows -> (V, d) weight gradient in ``grad``'s dtype, deterministic: a stable sort of the
    ids, then each id's rows summed in float32 in token order. Beyond the gradient itself it allocates
    only O(N) index buffers, never a float32 (V, d) one."""
    _check_device(grad)
    n_tokens, d = grad.shape
    out_dtype = grad.dtype
    grad_weight = torch.zeros(num_weights, d, dtype=out_dtype, device=grad.device)
    if n_tokens == 0 or d == 0:
        return grad_weight
    sorted_ids, order = torch.sort(ids.contiguous(), stable=True)
    seg_end = torch.searchsorted(sorted_ids, sorted_ids, right=True)
    block_d = backward_block(d)
    _embedding_bwd_kernel[(n_tokens, triton.cdiv(d, block_d))](
        _bits_view(grad.contiguous()), sorted_ids, order, seg_end, _bits_view(grad_weight), d, num_weights,
        -1 if padding_idx is None else padding_idx, SCALE_BY_FREQ=scale_grad_by_freq,
        IS_BF16=out_dtype == torch.bfloat16, BLOCK_D=block_d, ROWS=_BWD_ROWS, **LAUNCH_OPTIONS,
    )
    return grad_weight


_SCALES_BLOCK = 1024  # tokens of a row per program
_SCALES_WALK = 4096  # tokens per step of the walk past a block's edge


def token_scales(width: int, n_tokens: int, alpha: float | torch.Tensor, embedding_dim: int,
                 attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                 cu_seqlens: torch.Tensor | None, noise_mask: torch.Tensor | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """Spec per-token scales of ``n_tokens`` tokens in rows of ``width``.

    ``attention_mask`` / ``position_ids`` / ``noise_mask``: (rows, width) views (broadcast strides
    welcome); ``cu_seqlens``: 1-D cumulative sequence starts over the flat tokens; none of them:
    ``L`` = ``width``. ``alpha``: a float, or a 0-d float64 tensor the kernel reads. One launch;
    the same bits as :func:`neft_kernels.lengths.token_scales`.
    """
    side = (attention_mask, position_ids, cu_seqlens, noise_mask)
    if cu_seqlens is not None:  # the kernel's binary search needs ascending entries
        validation.check_cu_seqlens_ascending(cu_seqlens)
    if device is None:
        device = device_of(*side, alpha)
    out = torch.empty(n_tokens, dtype=torch.float32, device=device)
    _check_device(out)
    if not n_tokens:
        return out
    rows = n_tokens // width
    mask, noise = (t.view(torch.uint8) if t is not None and t.dtype == torch.bool else t
                   for t in (attention_mask, noise_mask))
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()  # the kernel indexes it densely
    n_cu = 0 if cu_seqlens is None else cu_seqlens.numel()
    alpha_ptr = isinstance(alpha, torch.Tensor)
    block = min(triton.next_power_of_2(width), _SCALES_BLOCK)
    _token_scales_kernel[(rows, triton.cdiv(width, block))](
        out if mask is None else mask, *(mask.stride() if mask is not None else (0, 0)),
        out if position_ids is None else position_ids, *(position_ids.stride() if position_ids is not None else (0, 0)),
        out if cu_seqlens is None else cu_seqlens, n_cu, n_cu.bit_length(),
        out if noise is None else noise, *(noise.stride() if noise is not None else (0, 0)), out, width,
        0 if alpha_ptr else struct.unpack("<q", struct.pack("<d", alpha))[0], alpha if alpha_ptr else out,
        embedding_dim, HAS_MASK=mask is not None, HAS_POS=position_ids is not None, HAS_CU=cu_seqlens is not None,
        HAS_NOISE_MASK=noise is not None, ALPHA_FROM_PTR=alpha_ptr, BLOCK=block, WALK=_SCALES_WALK,
        **SCALES_LAUNCH_OPTIONS,
    )
    return out
