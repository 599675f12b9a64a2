// Philox4x32-10 and the per-element math of the noise spec (docs/spec.md, neft_kernels/spec.py):
// v1's uniform stream here, v2's Gaussian one in gaussian.h.
// Host and device: no torch, no STL beyond <cstdint>, so nvcc compiles it alone.
// Build with -ffp-contract=off (host) and keep __fmul_rn/__fadd_rn (device): the spec rounds the
// product e * scale before the add.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NEFT_HD __host__ __device__ __forceinline__
#else
#define NEFT_HD inline
#endif

namespace neft {

constexpr uint32_t kPhiloxMulA = 0xD2511F53u;
constexpr uint32_t kPhiloxMulB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr float kUniformScale = 4.6566127342e-10f;  // Triton's uint_to_uniform_float
// (x * kUniformScale) * 2 == x * kUniformScaleX2 in float32 for every x the uniform map meets: doubling
// is exact and commutes with rounding there (spec.py UNIFORM_SCALE_X2; checked over every input).
constexpr float kUniformScaleX2 = 2.0f * kUniformScale;

struct Words4 {
  uint32_t r[4];
};

// The 64-bit product of two 32-bit words. On the device, PTX's mul.wide.u32 (one IMAD.WIDE.U32):
// nvcc lowers the C++ product to that plus an add of a zero high word.
NEFT_HD uint64_t mul_wide(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint64_t p;
  asm("mul.wide.u32 %0, %1, %2;" : "=l"(p) : "r"(a), "r"(b));
  return p;
#else
  return static_cast<uint64_t>(a) * b;
#endif
}

// Philox4x32-10 of counter (c mod 2^32, c >> 32, 0, 0) under key (s mod 2^32, s >> 32).
NEFT_HD Words4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t pa = mul_wide(kPhiloxMulA, c0);
    const uint64_t pb = mul_wide(kPhiloxMulB, c2);
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return Words4{{c0, c1, c2, c3}};
}

NEFT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

NEFT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// e in [-1, 1) from one Philox word: int32 view, x -> -x - 1 when negative, * 2^-31-ish, * 2 - 1 (the
// doubling folded into the scale).
NEFT_HD float uniform_pm1(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;  // -x - 1 without overflow at INT32_MIN
  return add_rn(mul_rn(static_cast<float>(x), kUniformScaleX2), -1.0f);
}

// The spec's last step before narrowing: w + float32(e * scale), the product rounded first.
NEFT_HD float add_noise(float w, float e, float scale) { return add_rn(w, mul_rn(e, scale)); }

NEFT_HD float noisy_value(float w, uint32_t word, float scale) { return add_noise(w, uniform_pm1(word), scale); }

NEFT_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

NEFT_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

// float32 -> bfloat16 bits, round to nearest even; NaN stays NaN.
NEFT_HD uint16_t to_bf16_bits(float f) {
  const uint32_t b = float_bits(f);
  if (f != f) return 0x7FC0;
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

NEFT_HD float from_bf16_bits(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

}  // namespace neft
