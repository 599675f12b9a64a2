"""The NEFTune noise stream, spec v2, in plain PyTorch: the definition every backend reproduces.

:func:`noise` is the unscaled stream; ``backends/reference.py`` adds the lookup, the scales and the
gradient. The spec, in words (also in ``docs/spec.md``). Spec v1 is the uniform stream; v2 keeps it
unchanged and adds the Gaussian stream (:func:`gaussian_pair`), the paper's ablation:

For the token at flattened index ``n`` of ``input_ids``, embedding dim ``d``, 64-bit seed ``s``
and integer ``offset``:

* ``Q = ceil(d / 4)``; dim ``j`` lies in quarter ``w = j // Q`` at lane ``k = j % Q``.
* ``c = offset + n * Q + k``; ``(r0, r1, r2, r3) = Philox4x32-10(counter=(c mod 2^32, c >> 32, 0, 0),
  key=(s mod 2^32, s >> 32))`` -- what Triton's ``tl.randint4x(s, c)`` returns for an int64 ``c``.
* ``u = float32(x) * 4.6566127342e-10f`` with ``x = int32(r_w)``, ``x = -x - 1`` when negative.
* ``e = float32(u * 2) - 1``.
* ``scale_n = float32(alpha / sqrt(L_n * d))`` in float64, rounded once; 0 for a token without noise.
* ``out[n, j] = round_to_weight_dtype(float32(W[id_n, j]) + float32(e * scale_n))`` in float32,
  never fused into an FMA, rounded to nearest even. A NaN result is a NaN; its payload bits are
  not part of the spec (PyTorch itself writes different NaN bits on different paths).
"""

from __future__ import annotations

import torch

SPEC_VERSION = 2
DISTRIBUTIONS = ("uniform", "gaussian")

# Philox4x32-10 constants (Salmon et al. 2011), as used by Triton's tl.randint4x.
PHILOX_ROUNDS = 10
PHILOX_MUL_A = 0xD2511F53
PHILOX_MUL_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
# Triton's uint_to_uniform_float scale: the largest float32 with (2**31 - 1) * scale < 1.
UNIFORM_SCALE = 4.6566127342e-10
# Twice that (exact in float32). float32(float32(x * UNIFORM_SCALE) * 2) == float32(x * UNIFORM_SCALE_X2)
# for every float32 x the map below meets (0 and [1, 2**31]): doubling is exact and commutes with
# rounding away from overflow and subnormals. The kernels use it to save one operation per element;
# tests/spec/test_spec.py checks the identity over every input.
UNIFORM_SCALE_X2 = 2 * UNIFORM_SCALE

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_MASK32 = 0xFFFFFFFF


def num_lanes(embedding_dim: int) -> int:
    """``Q = ceil(d / 4)``: Philox calls per token, each feeding one dim of every quarter."""
    return (embedding_dim + 3) // 4


def seed_words(seed: int) -> tuple[int, int]:
    """The two 32-bit key words of a seed in ``[-2**63, 2**64)`` (negative: two's complement)."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    return s & _MASK32, s >> 32


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 ``b`` < 2**32.

    The product is split on ``a``'s 16-bit halves so that no intermediate leaves int64.
    """
    hi_prod = (a >> 16) * b
    lo_prod = (a & 0xFFFF) * b
    hi = (hi_prod + (lo_prod >> 16)) >> 16
    lo = (((hi_prod & 0xFFFF) << 16) + lo_prod) & _MASK32
    return hi, lo


def philox4x32_10(counter: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of 64-bit counters ``(c mod 2^32, c >> 32, 0, 0)`` under ``seed``.

    ``counter`` is a non-negative int64 tensor; the four outputs are int64 tensors holding
    unsigned 32-bit words.
    """
    c0 = counter & _MASK32
    c1 = counter >> 32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed_words(seed)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(PHILOX_MUL_B, c2)
        hi_a, lo_a = _mul_hi_lo(PHILOX_MUL_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform_pm1(bits: torch.Tensor) -> torch.Tensor:
    """Spec v1's map of unsigned 32-bit words (in int64) to float32 noise ``e`` in ``[-1, 1)``."""
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    x = torch.where(x < 0, -x - 1, x)
    u = x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)
    return (u * 2) - 1


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# Spec v2's Gaussian constants: float32 values (each literal rounds to the float32 written here).
LN2 = 0.693147182  # float32(ln 2)
LOG_POLY = (0.222222224, 0.285714298, 0.400000006, 0.666666687)  # 2/9, 2/7, 2/5, 2/3
HALF_PI = 1.57079637  # float32(pi / 2)
SIN_POLY = (2.75573188e-06, -0.000198412701, 0.00833333377, -0.166666672)  # 1/9!, -1/7!, 1/5!, -1/3!
COS_POLY = (2.48015876e-05, -0.00138888892, 0.0416666679, -0.5)  # 1/8!, -1/6!, 1/4!, -1/2!
SQRT_HALF = 0.707106769  # float32(sqrt(1/2))
SQRT2_BITS = 0x3FB504F3  # float32(sqrt 2): mantissas above it are halved


def _horner(x: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    """``((c0 * x + c1) * x + c2) ...`` in float32, each product and sum rounded (no FMA)."""
    p = _f32(coefficients[0]).to(x.device).expand_as(x)
    for c in coefficients[1:]:
        p = p * x + _f32(c)
    return p


def log_f32(u: torch.Tensor) -> torch.Tensor:
    """Spec v2's natural log of float32 ``u`` in ``(0, 1)``: IEEE ``+ - * /`` and integer ops only.

    ``u = m * 2**E`` with ``m`` in ``[sqrt(1/2), sqrt(2)]``; ``s = (m - 1) / (m + 1)``;
    ``ln m = (s + s) + (s * z) * P(z)`` with ``z = s * s``, ``P`` = :data:`LOG_POLY` by Horner;
    ``ln u = float32(E) * LN2 + ln m``.
    """
    bits = u.view(torch.int32).to(torch.int64)
    exponent = (bits >> 23) - 127
    mantissa_bits = (bits & 0x7FFFFF) | 0x3F800000
    big = mantissa_bits > SQRT2_BITS
    m = mantissa_bits.to(torch.int32).view(torch.float32)
    m = torch.where(big, m * _f32(0.5), m)
    exponent = torch.where(big, exponent + 1, exponent)
    s = (m - 1) / (m + 1)
    z = s * s
    ln_m = (s + s) + (s * z) * _horner(z, LOG_POLY)
    return exponent.to(torch.float32) * _f32(LN2) + ln_m


def gaussian_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec v2's map of two unsigned 32-bit words (in int64) to two float32 standard normals.

    Box-Muller with written-out, IEEE-rounded steps (float32, no FMA):

    * ``u1 = (float32(a >> 9) + 0.5) * 2**-23`` in ``(0, 1)``; ``u2 = float32(b >> 8) * 2**-24``
      in ``[0, 1)`` (both exact).
    * ``R = sqrt(max(-2 * log_f32(u1), 0))``.
    * ``t = u2 * 4``, quadrant ``q = int(t)``, ``h = (t - q) - 0.5``, ``phi = h * HALF_PI``;
      ``p = phi * phi``; ``sin phi = phi + (phi * p) * S(p)``, ``cos phi = 1 + p * C(p)``
      (:data:`SIN_POLY`, :data:`COS_POLY` by Horner); then ``c = (cos phi - sin phi) * SQRT_HALF``,
      ``s = (cos phi + sin phi) * SQRT_HALF`` (the angle ``pi/4 + phi``), turned by ``q``
      quarter turns: ``(c, s)``, ``(-s, c)``, ``(-c, -s)``, ``(s, -c)`` for ``q = 0, 1, 2, 3``.
    * ``(R * cos, R * sin)``.
    """
    u1 = ((a >> 9).to(torch.float32) + _f32(0.5)) * _f32(2.0 ** -23)
    u2 = (b >> 8).to(torch.float32) * _f32(2.0 ** -24)
    # The float32 square root, correctly rounded: ATen's vectorised CPU sqrt is not (AVX-512), and
    # the float64 root rounded to float32 is (its error is far below the distance to a midpoint).
    radius = torch.sqrt(torch.clamp(log_f32(u1) * _f32(-2.0), min=0.0).double()).float()
    t = u2 * _f32(4.0)
    quadrant = t.to(torch.int64)
    phi = ((t - quadrant.to(torch.float32)) - _f32(0.5)) * _f32(HALF_PI)
    p = phi * phi
    sin_phi = phi + (phi * p) * _horner(p, SIN_POLY)
    cos_phi = _f32(1.0) + p * _horner(p, COS_POLY)
    c = (cos_phi - sin_phi) * _f32(SQRT_HALF)
    s = (cos_phi + sin_phi) * _f32(SQRT_HALF)
    cos = torch.where(quadrant == 0, c, torch.where(quadrant == 1, -s, torch.where(quadrant == 2, -c, s)))
    sin = torch.where(quadrant == 0, s, torch.where(quadrant == 1, c, torch.where(quadrant == 2, -s, -c)))
    return radius * cos, radius * sin


def noise(n_tokens: int, embedding_dim: int, seed: int, offset: int = 0,
          device: torch.device | str = "cpu", first_token: int = 0, distribution: str = "uniform") -> torch.Tensor:
    """Unscaled noise ``e`` of tokens ``first_token .. first_token + n_tokens`` as (n_tokens, d) float32."""
    q = num_lanes(embedding_dim)
    tok = torch.arange(first_token, first_token + n_tokens, dtype=torch.int64, device=device)
    lane = torch.arange(q, dtype=torch.int64, device=device)
    counter = offset + tok[:, None] * q + lane[None, :]
    r0, r1, r2, r3 = philox4x32_10(counter, seed)
    quarters: tuple[torch.Tensor, ...]
    if distribution == "gaussian":
        quarters = (*gaussian_pair(r0, r1), *gaussian_pair(r2, r3))
    else:
        quarters = tuple(uniform_pm1(r) for r in (r0, r1, r2, r3))
    # Quarter w of the row comes from word r_w: stacking on dim 1 lays dim j = w * Q + k out row-major.
    e = torch.stack(quarters, dim=1).reshape(n_tokens, 4 * q)
    return e[:, :embedding_dim]
