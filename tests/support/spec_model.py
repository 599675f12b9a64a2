"""An independent NumPy model of noise spec v2 (v1's uniform stream and v2's Gaussian), written from
``docs/spec.md``.

It shares no code with ``neft_kernels``: Philox in uint32/uint64 arithmetic, lengths by plain
loops over rows, bf16 rounding by integer ops. Tests compare every backend with it bit for bit.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
U32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 of counters ``ctr`` (shape (..., 4), uint32) under a 2-word key."""
    c = [ctr[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = key
    for _ in range(10):
        p0 = M0 * c[0]  # < 2**64: exact in uint64
        p1 = M1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & U32,
             (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1), p0 & U32]
        k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
    return np.stack([x.astype(np.uint32) for x in c], axis=-1)


F = np.float32


def _poly(x: np.ndarray, coefficients) -> np.ndarray:
    p = np.full_like(x, F(coefficients[0]))
    for c in coefficients[1:]:
        p = (p * x).astype(np.float32) + F(c)
    return p


def _ln(u: np.ndarray) -> np.ndarray:
    """docs/spec.md's float32 log of u in (0, 1)."""
    bits = u.view(np.uint32)
    e = (bits >> np.uint32(23)).astype(np.int32) - 127
    mbits = (bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000)
    m = mbits.view(np.float32)
    big = mbits > np.uint32(0x3FB504F3)
    m = np.where(big, m * F(0.5), m)
    e = np.where(big, e + 1, e)
    s = (m - F(1)) / (m + F(1))
    z = s * s
    return e.astype(np.float32) * F(0.693147182) + ((s + s) + (s * z) * _poly(z, (0.222222224, 0.285714298,
                                                                                 0.400000006, 0.666666687)))


def _box_muller(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two uint32 words -> two float32 normals, step by step as docs/spec.md writes them."""
    u1 = ((a >> np.uint32(9)).astype(np.float32) + F(0.5)) * F(2.0 ** -23)
    u2 = (b >> np.uint32(8)).astype(np.float32) * F(2.0 ** -24)
    r = np.sqrt(np.maximum(_ln(u1) * F(-2), F(0)))
    t = u2 * F(4)
    q = t.astype(np.int32)
    phi = ((t - q.astype(np.float32)) - F(0.5)) * F(1.57079637)
    p = phi * phi
    sin = phi + (phi * p) * _poly(p, (2.75573188e-06, -0.000198412701, 0.00833333377, -0.166666672))
    cos = F(1) + p * _poly(p, (2.48015876e-05, -0.00138888892, 0.0416666679, -0.5))
    c, s = (cos - sin) * F(0.707106769), (cos + sin) * F(0.707106769)
    cos_t = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    sin_t = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    return r * cos_t, r * sin_t


def unit_noise(n_tokens: int, d: int, seed: int, offset: int, distribution: str = "uniform") -> np.ndarray:
    """``e`` of spec v2 as float32 (n_tokens, d): uniform (v1) or Gaussian."""
    q = (d + 3) // 4
    n = np.arange(n_tokens, dtype=np.uint64)[:, None]
    k = np.arange(q, dtype=np.uint64)[None, :]
    c = np.uint64(offset) + n * np.uint64(q) + k
    ctr = np.zeros(c.shape + (4,), dtype=np.uint32)
    ctr[..., 0] = (c & U32).astype(np.uint32)
    ctr[..., 1] = (c >> np.uint64(32)).astype(np.uint32)
    s = seed % (1 << 64)
    r = philox4x32_10(ctr, (s & 0xFFFFFFFF, s >> 32))  # (n, q, 4)
    if distribution == "gaussian":
        z = [*_box_muller(r[..., 0], r[..., 1]), *_box_muller(r[..., 2], r[..., 3])]
        e = np.stack(z, axis=-1).astype(np.float32)
        return np.transpose(e, (0, 2, 1)).reshape(n_tokens, 4 * q)[:, :d]
    x = r.view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x)
    u = x.astype(np.float32) * np.float32(4.6566127342e-10)
    e = (u * np.float32(2)) - np.float32(1)
    # dim j = w * q + k takes word w of lane k
    return np.transpose(e, (0, 2, 1)).reshape(n_tokens, 4 * q)[:, :d].astype(np.float32)


def token_lengths(ids_shape, attention_mask=None, position_ids=None, length_mode="per_sequence", cu_seqlens=None):
    """(L per token, noised per token) by direct loops over rows and sub-sequences."""
    width = ids_shape[-1] if len(ids_shape) else 1
    rows = int(np.prod(ids_shape)) // width if width else 0
    mask = np.ones((rows, width), bool) if attention_mask is None else (
        np.asarray(attention_mask).reshape(rows, width) != 0)
    if length_mode == "padded":
        return np.full(rows * width, width), np.ones(rows * width, bool)
    if length_mode != "per_sequence":
        raise ValueError(length_mode)
    pos = None if position_ids is None else np.asarray(position_ids).reshape(rows, width)
    cu = set() if cu_seqlens is None else {int(c) for c in np.asarray(cu_seqlens)}
    lengths = np.zeros((rows, width), np.int64)
    for r in range(rows):
        bounds = [0] + [t for t in range(1, width)
                        if (pos is not None and pos[r, t] == 0) or r * width + t in cu] + [width]
        for a, b in itertools.pairwise(bounds):
            lengths[r, a:b] = mask[r, a:b].sum()
    return lengths.reshape(-1), mask.reshape(-1)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> dtype with round-to-nearest-even; bf16 returned as uint16 words."""
    if dtype == "float32":
        return x.astype(np.float32)
    if dtype == "float16":
        return x.astype(np.float16)
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def widen(w: np.ndarray, dtype: str) -> np.ndarray:
    """Weight values (bf16 as uint16 words) to float32."""
    if dtype == "bfloat16":
        return (w.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return w.astype(np.float32)


def noisy_embedding(ids: np.ndarray, weight: np.ndarray, dtype: str, alpha: float, seed: int,
                    offset: int = 0, attention_mask=None, position_ids=None,
                    length_mode="per_sequence", cu_seqlens=None, distribution="uniform",
                    noise_mask=None) -> np.ndarray:
    """Spec v2 output, flattened to (N, d), in ``dtype`` (bf16 as uint16 words). ``noise_mask``:
    tokens where it is 0 get no noise (they still count towards L)."""
    d = weight.shape[1]
    flat = np.asarray(ids).reshape(-1)
    lengths, noised = token_lengths(np.shape(ids), attention_mask, position_ids, length_mode, cu_seqlens)
    if noise_mask is not None:
        noised = noised & (np.broadcast_to(np.asarray(noise_mask), np.shape(ids)).reshape(-1) != 0)
    scale = np.array([np.float32(alpha / math.sqrt(L * d)) if (ok and L > 0) else np.float32(0)
                      for L, ok in zip(lengths, noised, strict=True)], dtype=np.float32)
    e = unit_noise(flat.size, d, seed, offset, distribution)
    w = widen(weight[flat], dtype)
    return round_to(w + (e * scale[:, None]).astype(np.float32), dtype)
