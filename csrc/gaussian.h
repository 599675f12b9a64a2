// Spec v2's Gaussian stream: two Philox words to two float32 standard normals by Box-Muller, each
// step the IEEE-rounded float32 operation that neft_kernels/spec.py (gaussian_pair, log_f32) writes,
// in its order. One definition for host and device (CPU and CUDA backends share it).
// No FMA: the host build needs -ffp-contract=off (setup.py), the device code goes through
// __fmul_rn/__fadd_rn/__fsub_rn, __fdiv_rn and __fsqrt_rn, which nvcc never contracts or approximates.
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"

namespace neft {

// spec.py's float32 constants, as hex literals equal to np.float32(value).
constexpr float kLn2 = 0x1.62e43p-1f;        // LN2 = 0.693147182
constexpr float kLogPoly0 = 0x1.c71c72p-3f;  // LOG_POLY: 2/9, 2/7, 2/5, 2/3
constexpr float kLogPoly1 = 0x1.24924ap-2f;
constexpr float kLogPoly2 = 0x1.99999ap-2f;
constexpr float kLogPoly3 = 0x1.555556p-1f;
constexpr float kHalfPi = 0x1.921fb6p+0f;     // HALF_PI = 1.57079637
constexpr float kSinPoly0 = 0x1.71de3ap-19f;  // SIN_POLY: 1/9!, -1/7!, 1/5!, -1/3!
constexpr float kSinPoly1 = -0x1.a01a02p-13f;
constexpr float kSinPoly2 = 0x1.111112p-7f;
constexpr float kSinPoly3 = -0x1.555556p-3f;
constexpr float kCosPoly0 = 0x1.a01a02p-16f;  // COS_POLY: 1/8!, -1/6!, 1/4!, -1/2!
constexpr float kCosPoly1 = -0x1.6c16c2p-10f;
constexpr float kCosPoly2 = 0x1.555556p-5f;
constexpr float kCosPoly3 = -0x1p-1f;
constexpr float kSqrtHalf = 0x1.6a09e6p-1f;   // SQRT_HALF = 0.707106769
constexpr uint32_t kSqrt2Bits = 0x3FB504F3u;  // float32(sqrt 2): larger mantissas are halved

NEFT_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

NEFT_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Correctly rounded float32 square root (spec.py rounds the float64 root, which is the same value).
NEFT_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// ((c0 * x + c1) * x + c2) * x + c3, each product and sum rounded (spec.py's _horner).
NEFT_HD float horner4(float x, float c0, float c1, float c2, float c3) {
  float p = add_rn(mul_rn(c0, x), c1);
  p = add_rn(mul_rn(p, x), c2);
  return add_rn(mul_rn(p, x), c3);
}

// spec.py's log_f32 of u in (0, 1): u = m * 2^E with m in [sqrt(1/2), sqrt(2)], s = (m - 1) / (m + 1),
// ln m = (s + s) + (s * z) * P(z) with z = s * s, ln u = float32(E) * LN2 + ln m.
NEFT_HD float log_f32(float u) {
  const uint32_t bits = float_bits(u);
  const uint32_t mantissa_bits = (bits & 0x7FFFFFu) | 0x3F800000u;
  const bool big = mantissa_bits > kSqrt2Bits;
  const int32_t exponent = static_cast<int32_t>(bits >> 23) - 127 + (big ? 1 : 0);
  // Halved when big; the product with 1 is exact, so the select stays branch-free (vectorises).
  const float m = mul_rn(bits_float(mantissa_bits), big ? 0.5f : 1.0f);
  const float s = div_rn(sub_rn(m, 1.0f), add_rn(m, 1.0f));
  const float z = mul_rn(s, s);
  const float ln_m = add_rn(add_rn(s, s), mul_rn(mul_rn(s, z), horner4(z, kLogPoly0, kLogPoly1, kLogPoly2, kLogPoly3)));
  return add_rn(mul_rn(static_cast<float>(exponent), kLn2), ln_m);
}

// spec.py's gaussian_pair: words (a, b) -> (R cos, R sin).
//   u1 = (float32(a >> 9) + 0.5) * 2^-23 in (0, 1), u2 = float32(b >> 8) * 2^-24 in [0, 1): exact;
//   R = sqrt(max(-2 * log_f32(u1), 0));
//   t = u2 * 4, q = int(t), phi = ((t - q) - 0.5) * HALF_PI, p = phi * phi,
//   sin phi = phi + (phi * p) * S(p), cos phi = 1 + p * C(p),
//   c = (cos phi - sin phi) * SQRT_HALF, s = (cos phi + sin phi) * SQRT_HALF (the angle pi/4 + phi),
//   turned by q quarter turns: (c, s), (-s, c), (-c, -s), (s, -c) for q = 0, 1, 2, 3.
NEFT_HD void gaussian_pair(uint32_t a, uint32_t b, float& z_cos, float& z_sin) {
  // Both shifted words are below 2^24, so the int32 -> float32 conversions are exact.
  const float u1 = mul_rn(add_rn(static_cast<float>(static_cast<int32_t>(a >> 9)), 0.5f), 0x1p-23f);
  const float u2 = mul_rn(static_cast<float>(static_cast<int32_t>(b >> 8)), 0x1p-24f);
  const float r2 = mul_rn(log_f32(u1), -2.0f);
  const float radius = sqrt_rn(r2 < 0.0f ? 0.0f : r2);
  const float t = mul_rn(u2, 4.0f);
  const int32_t q = static_cast<int32_t>(t);  // t in [0, 4): truncation is the quadrant
  const float phi = mul_rn(sub_rn(sub_rn(t, static_cast<float>(q)), 0.5f), kHalfPi);
  const float p = mul_rn(phi, phi);
  const float sin_phi = add_rn(phi, mul_rn(mul_rn(phi, p), horner4(p, kSinPoly0, kSinPoly1, kSinPoly2, kSinPoly3)));
  const float cos_phi = add_rn(1.0f, mul_rn(p, horner4(p, kCosPoly0, kCosPoly1, kCosPoly2, kCosPoly3)));
  const float c = mul_rn(sub_rn(cos_phi, sin_phi), kSqrtHalf);
  const float s = mul_rn(add_rn(cos_phi, sin_phi), kSqrtHalf);
  // The quarter turns of the table above: odd q swaps c and s; cos is negated for q = 1, 2 and
  // sin for q = 2, 3 (a negation only flips the sign bit, as in spec.py).
  const bool odd = (q & 1) != 0;
  const float x = odd ? s : c, y = odd ? c : s;
  z_cos = mul_rn(radius, (q == 1 || q == 2) ? -x : x);
  z_sin = mul_rn(radius, q >= 2 ? -y : y);
}

}  // namespace neft
