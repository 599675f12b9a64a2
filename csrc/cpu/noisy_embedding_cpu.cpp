// CPU kernels: the fused NEFTune forward (spec v2, uniform or Gaussian, bit-exact), the per-token
// scales, and the deterministic embedding backward with float32 accumulation. Parallel over tokens;
// the inner loop runs over a block of quarter lanes so that the Philox rounds (and the Gaussian
// transform) vectorise. No torch tensors: binding.cpp owns those.
//
// Instruction sets: the forward's per-block kernels exist for AVX-512, AVX2 and generic code (Philox
// and the bf16 uniform run written with intrinsics for the first two, the other loops vectorised by
// the compiler for each); every one gives the same bits. The set is chosen once, at first use: the
// best this CPU runs, or the one NEFT_KERNELS_CPU_ISA names (avx512, avx2, generic).
#include "noisy_embedding_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "../gaussian.h"
#include "../philox.h"
#include "../scale.h"

namespace {

constexpr int64_t kLaneBlock = 256;  // quarter lanes per Philox batch; a multiple of 64

using WordBlock = uint32_t[4][kLaneBlock];
using NoiseBlock = float[4][kLaneBlock];

// Each ISA's kernels are separate functions compiled for that ISA (target attributes, not
// target_clones, whose choice follows the CPU alone), so that NEFT_KERNELS_CPU_ISA can force any
// of them: "generic" (baseline x86-64, or whatever the target is), "avx2", "avx512".
#if defined(__x86_64__) && defined(__GNUC__)
#define NEFT_X86 1
#define NEFT_AVX2 __attribute__((target("avx2")))
#define NEFT_AVX512 __attribute__((target("avx512f")))
#define NEFT_AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl")))
#else
#define NEFT_X86 0
#endif
#define NEFT_ALWAYS_INLINE inline __attribute__((always_inline))

// The portable loops, inlined into each ISA's functions below so that the compiler vectorises
// them for that ISA. Philox: 64-bit products of 32-bit words over a block of lanes.
NEFT_ALWAYS_INLINE void philox_loop(uint64_t first_counter, uint64_t seed, int64_t count, WordBlock& words) {
  for (int64_t i = 0; i < count; ++i) {
    const neft::Words4 r = neft::philox4x32_10(first_counter + static_cast<uint64_t>(i), seed);
    words[0][i] = r.r[0];
    words[1][i] = r.r[1];
    words[2][i] = r.r[2];
    words[3][i] = r.r[3];
  }
}

// One quarter's run of uniform dims: widen, add e * scale (spec v1's stream, rounded first), narrow.
NEFT_ALWAYS_INLINE void noise_loop(const float* row, float* dst, const uint32_t* words, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = neft::noisy_value(row[i], words[i], scale);
}
NEFT_ALWAYS_INLINE void noise_loop(const uint16_t* row, uint16_t* dst, const uint32_t* words, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = neft::to_bf16_bits(neft::noisy_value(neft::from_bf16_bits(row[i]), words[i], scale));
}
NEFT_ALWAYS_INLINE void noise_loop(const c10::Half* row, c10::Half* dst, const uint32_t* words, int64_t n,
                                   float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(neft::noisy_value(static_cast<float>(row[i]), words[i], scale));
}

// The Gaussian noise of a block of lanes (spec v2): quarters 0 and 1 from words (r0, r1), 2 and 3
// from (r2, r3). Branch-free per lane, so it vectorises.
NEFT_ALWAYS_INLINE void gaussian_loop(const WordBlock& words, int64_t count, NoiseBlock& noise) {
  for (int64_t i = 0; i < count; ++i) {
    neft::gaussian_pair(words[0][i], words[1][i], noise[0][i], noise[1][i]);
    neft::gaussian_pair(words[2][i], words[3][i], noise[2][i], noise[3][i]);
  }
}

// One quarter's run of dims from ready noise e: widen, add e * scale (rounded first), narrow.
NEFT_ALWAYS_INLINE void add_noise_loop(const float* row, float* dst, const float* e, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = neft::add_noise(row[i], e[i], scale);
}
NEFT_ALWAYS_INLINE void add_noise_loop(const uint16_t* row, uint16_t* dst, const float* e, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = neft::to_bf16_bits(neft::add_noise(neft::from_bf16_bits(row[i]), e[i], scale));
}
NEFT_ALWAYS_INLINE void add_noise_loop(const c10::Half* row, c10::Half* dst, const float* e, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(neft::add_noise(static_cast<float>(row[i]), e[i], scale));
}

// One ISA's kernels: a forward call looks them up once and passes them down.
struct Kernels {
  const char* name;
  const char* needs;  // what the CPU must have, in words
  void (*philox)(uint64_t first_counter, uint64_t seed, int64_t count, WordBlock& words);
  void (*gaussian)(const WordBlock& words, int64_t count, NoiseBlock& noise);
  void (*noise_f32)(const float*, float*, const uint32_t*, int64_t, float);
  void (*noise_bf16)(const uint16_t*, uint16_t*, const uint32_t*, int64_t, float);
  void (*noise_f16)(const c10::Half*, c10::Half*, const uint32_t*, int64_t, float);
  void (*add_f32)(const float*, float*, const float*, int64_t, float);
  void (*add_bf16)(const uint16_t*, uint16_t*, const float*, int64_t, float);
  void (*add_f16)(const c10::Half*, c10::Half*, const float*, int64_t, float);
};

// The portable loops as functions of one ISA, in namespace NS (an ISA with its own Philox or bf16
// run leaves those unused).
#define NEFT_PORTABLE_KERNELS(NS, ATTR)                                                                           \
  namespace NS {                                                                                                  \
  [[maybe_unused]] ATTR void philox(uint64_t c, uint64_t s, int64_t n, WordBlock& w) { philox_loop(c, s, n, w); } \
  [[maybe_unused]] ATTR void gaussian(const WordBlock& w, int64_t n, NoiseBlock& e) { gaussian_loop(w, n, e); }   \
  [[maybe_unused]] ATTR void noise_f32(const float* r, float* d, const uint32_t* w, int64_t n, float s) {         \
    noise_loop(r, d, w, n, s);                                                                                    \
  }                                                                                                               \
  [[maybe_unused]] ATTR void noise_bf16(const uint16_t* r, uint16_t* d, const uint32_t* w, int64_t n, float s) {  \
    noise_loop(r, d, w, n, s);                                                                                    \
  }                                                                                                               \
  [[maybe_unused]] ATTR void noise_f16(const c10::Half* r, c10::Half* d, const uint32_t* w, int64_t n, float s) { \
    noise_loop(r, d, w, n, s);                                                                                    \
  }                                                                                                               \
  [[maybe_unused]] ATTR void add_f32(const float* r, float* d, const float* e, int64_t n, float s) {              \
    add_noise_loop(r, d, e, n, s);                                                                                \
  }                                                                                                               \
  [[maybe_unused]] ATTR void add_bf16(const uint16_t* r, uint16_t* d, const float* e, int64_t n, float s) {       \
    add_noise_loop(r, d, e, n, s);                                                                                \
  }                                                                                                               \
  [[maybe_unused]] ATTR void add_f16(const c10::Half* r, c10::Half* d, const float* e, int64_t n, float s) {      \
    add_noise_loop(r, d, e, n, s);                                                                                \
  }                                                                                                               \
  }

NEFT_PORTABLE_KERNELS(generic, )

constexpr Kernels kGeneric{"generic",          "nothing",           generic::philox,    generic::gaussian,
                           generic::noise_f32, generic::noise_bf16, generic::noise_f16, generic::add_f32,
                           generic::add_bf16,  generic::add_f16};

#if NEFT_X86
NEFT_PORTABLE_KERNELS(avx2, NEFT_AVX2)
NEFT_PORTABLE_KERNELS(avx512, NEFT_AVX512)

// ---- AVX2: 8 lanes per instruction.

// Hi and lo words of m * b in 8 lanes, m a broadcast 32-bit constant (so its odd words equal its
// even ones): even lanes from one vpmuludq, odd lanes from another, put together by blends.
NEFT_AVX2 NEFT_ALWAYS_INLINE void mulhilo8(__m256i m, __m256i b, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(m, b);
  const __m256i odd = _mm256_mul_epu32(m, _mm256_srli_epi64(b, 32));
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// neft::philox4x32_10's words of counters c .. c + 8 * kVectors - 1 into words[w] + i, 8 lanes per
// instruction. The rounds are a dependent chain (multiply, blend, xor): kVectors independent
// vectors in flight keep the multipliers busy.
template <int kVectors>
NEFT_AVX2 NEFT_ALWAYS_INLINE void philox_group_avx2(uint64_t c, const __m256i* key0, const __m256i* key1,
                                                    WordBlock& words, int64_t i) {
  const __m256i mul_a = _mm256_set1_epi32(static_cast<int>(neft::kPhiloxMulA));
  const __m256i mul_b = _mm256_set1_epi32(static_cast<int>(neft::kPhiloxMulB));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  __m256i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
#pragma GCC unroll 8
  for (int v = 0; v < kVectors; ++v) {
    const uint64_t first = c + static_cast<uint64_t>(8 * v);
    const __m256i lo_base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
    const __m256i hi_base = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
    c0[v] = _mm256_add_epi32(lo_base, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // The low word wrapped (unsigned c0 < lo_base): -1 in that lane, so subtracting bumps the high one.
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(lo_base, sign), _mm256_xor_si256(c0[v], sign));
    c1[v] = _mm256_sub_epi32(hi_base, carry);
    c2[v] = _mm256_setzero_si256();
    c3[v] = _mm256_setzero_si256();
  }
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      __m256i hi_a, lo_a, hi_b, lo_b;
      mulhilo8(mul_a, c0[v], &hi_a, &lo_a);
      mulhilo8(mul_b, c2[v], &hi_b, &lo_b);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[v]), key0[round]);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[v]), key1[round]);
      c1[v] = lo_b;
      c3[v] = lo_a;
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < kVectors; ++v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[0] + i + 8 * v), c0[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[1] + i + 8 * v), c1[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[2] + i + 8 * v), c2[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[3] + i + 8 * v), c3[v]);
  }
}

// A block of lanes: groups of 32, then of 8; writes whole groups of 8 (the block has room).
NEFT_AVX2 void philox_block_avx2(uint64_t first_counter, uint64_t seed, int64_t count, WordBlock& words) {
  __m256i key0[10], key1[10];  // the round keys, broadcast
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    key0[round] = _mm256_set1_epi32(static_cast<int>(k0));
    key1[round] = _mm256_set1_epi32(static_cast<int>(k1));
    k0 += neft::kPhiloxKeyA;
    k1 += neft::kPhiloxKeyB;
  }
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) philox_group_avx2<4>(first_counter + static_cast<uint64_t>(i), key0, key1, words, i);
  for (; i < count; i += 8) philox_group_avx2<1>(first_counter + static_cast<uint64_t>(i), key0, key1, words, i);
}

// The bf16 uniform run in 8-lane vectors: the same operations as philox.h in the same order, each
// rounded once, no FMA; round to nearest even by integer ops, NaN to the quiet NaN. The last n % 8
// dims go through the scalar loop (AVX2 has no 16-bit masked loads), which gives the same bits.
NEFT_AVX2 void noise_run_bf16_avx2(const uint16_t* row, uint16_t* dst, const uint32_t* words, int64_t n, float scale) {
  const __m256 v_scale = _mm256_set1_ps(scale), u_scale = _mm256_set1_ps(neft::kUniformScaleX2);
  const __m256 minus_one = _mm256_set1_ps(-1.0f);
  const __m256i one = _mm256_set1_epi32(1), round_bias = _mm256_set1_epi32(0x7FFF),
                quiet_nan = _mm256_set1_epi32(0x7FC0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + i));
    x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31));  // ~x where negative
    const __m256 e = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(x), u_scale), minus_one);
    const __m256 w = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i))), 16));
    const __m256 v = _mm256_add_ps(w, _mm256_mul_ps(e, v_scale));
    const __m256i bits = _mm256_castps_si256(v);
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(bits, round_bias), _mm256_and_si256(_mm256_srli_epi32(bits, 16), one)), 16);
    r = _mm256_blendv_epi8(r, quiet_nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // Every lane is below 2^16: the unsigned-saturating pack is exact.
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  noise_loop(row + i, dst + i, words + i, n - i, scale);
}

constexpr Kernels kAvx2{
    "avx2",          "AVX2",        philox_block_avx2, avx2::gaussian, avx2::noise_f32, noise_run_bf16_avx2,
    avx2::noise_f16, avx2::add_f32, avx2::add_bf16,    avx2::add_f16};

// ---- AVX-512: 16 lanes per instruction.

// Hi and lo words of m * b in 16 lanes, m a broadcast 32-bit constant: even lanes from one
// vpmuludq, odd lanes from another.
NEFT_AVX512 NEFT_ALWAYS_INLINE void mulhilo16(__m512i m, __m512i b, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(m, b);
  const __m512i odd = _mm512_mul_epu32(m, _mm512_srli_epi64(b, 32));
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// The same words, 16 lanes per instruction, kVectors vectors in flight.
template <int kVectors>
NEFT_AVX512 NEFT_ALWAYS_INLINE void philox_group_avx512(uint64_t c, const __m512i* key0, const __m512i* key1,
                                                        WordBlock& words, int64_t i) {
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int>(neft::kPhiloxMulA));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int>(neft::kPhiloxMulB));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
#pragma GCC unroll 8
  for (int v = 0; v < kVectors; ++v) {
    const uint64_t first = c + static_cast<uint64_t>(16 * v);
    const __m512i lo_base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
    const __m512i hi_base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
    c0[v] = _mm512_add_epi32(lo_base, iota);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0[v], lo_base);  // low word wrapped: bump the high one
    c1[v] = _mm512_mask_add_epi32(hi_base, carry, hi_base, _mm512_set1_epi32(1));
    c2[v] = _mm512_setzero_si512();
    c3[v] = _mm512_setzero_si512();
  }
#pragma GCC unroll 10
  for (int round = 0; round < 10; ++round) {
#pragma GCC unroll 8
    for (int v = 0; v < kVectors; ++v) {
      __m512i hi_a, lo_a, hi_b, lo_b;
      mulhilo16(mul_a, c0[v], &hi_a, &lo_a);
      mulhilo16(mul_b, c2[v], &hi_b, &lo_b);
      c0[v] = _mm512_ternarylogic_epi32(hi_b, c1[v], key0[round], 0x96);  // 3-way xor
      c2[v] = _mm512_ternarylogic_epi32(hi_a, c3[v], key1[round], 0x96);
      c1[v] = lo_b;
      c3[v] = lo_a;
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < kVectors; ++v) {
    _mm512_storeu_si512(words[0] + i + 16 * v, c0[v]);
    _mm512_storeu_si512(words[1] + i + 16 * v, c1[v]);
    _mm512_storeu_si512(words[2] + i + 16 * v, c2[v]);
    _mm512_storeu_si512(words[3] + i + 16 * v, c3[v]);
  }
}

// A block of lanes: groups of 64, then of 16; writes whole groups of 16 (the block has room).
NEFT_AVX512 void philox_block_avx512(uint64_t first_counter, uint64_t seed, int64_t count, WordBlock& words) {
  __m512i key0[10], key1[10];  // the round keys, broadcast
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    key0[round] = _mm512_set1_epi32(static_cast<int>(k0));
    key1[round] = _mm512_set1_epi32(static_cast<int>(k1));
    k0 += neft::kPhiloxKeyA;
    k1 += neft::kPhiloxKeyB;
  }
  int64_t i = 0;
  for (; i + 64 <= count; i += 64)
    philox_group_avx512<4>(first_counter + static_cast<uint64_t>(i), key0, key1, words, i);
  for (; i < count; i += 16) philox_group_avx512<1>(first_counter + static_cast<uint64_t>(i), key0, key1, words, i);
}

// The bf16 run in 16-lane vectors (compilers keep the 16/32-bit mix narrow): the same operations
// as philox.h in the same order, each rounded once, no FMA.
NEFT_AVX512BW void noise_run_bf16_avx512(const uint16_t* row, uint16_t* dst, const uint32_t* words, int64_t n,
                                         float scale) {
  const __m512 v_scale = _mm512_set1_ps(scale), u_scale = _mm512_set1_ps(neft::kUniformScaleX2);
  const __m512 minus_one = _mm512_set1_ps(-1.0f);
  const __m512i one = _mm512_set1_epi32(1), round_bias = _mm512_set1_epi32(0x7FFF),
                quiet_nan = _mm512_set1_epi32(0x7FC0);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512i x = _mm512_maskz_loadu_epi32(m, words + i);
    x = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));  // ~x where negative
    const __m512 e = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(x), u_scale), minus_one);
    const __m512 w =
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, row + i)), 16));
    const __m512 v = _mm512_add_ps(w, _mm512_mul_ps(e, v_scale));
    const __m512i bits = _mm512_castps_si512(v);
    __m512i r =
        _mm512_add_epi32(_mm512_add_epi32(bits, round_bias), _mm512_and_si512(_mm512_srli_epi32(bits, 16), one));
    r = _mm512_mask_mov_epi32(_mm512_srli_epi32(r, 16), _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet_nan);
    _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtepi32_epi16(r));
  }
}

constexpr Kernels kAvx512{"avx512",
                          "AVX-512 (avx512f, avx512bw, avx512vl)",
                          philox_block_avx512,
                          avx512::gaussian,
                          avx512::noise_f32,
                          noise_run_bf16_avx512,
                          avx512::noise_f16,
                          avx512::add_f32,
                          avx512::add_bf16,
                          avx512::add_f16};
#endif

// Every ISA this build has, best first, and whether this CPU runs it.
#if NEFT_X86
constexpr const Kernels* kAllKernels[] = {&kAvx512, &kAvx2, &kGeneric};
#else
constexpr const Kernels* kAllKernels[] = {&kGeneric};
#endif

bool cpu_runs(const Kernels& k) {
#if NEFT_X86
  if (&k == &kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  if (&k == &kAvx2) return __builtin_cpu_supports("avx2");
#endif
  return &k == &kGeneric;
}

std::string supported_list() {
  std::string names;
  for (const Kernels* k : kAllKernels)
    if (cpu_runs(*k)) names += (names.empty() ? "" : ", ") + std::string(k->name);
  return names;
}

// NEFT_KERNELS_CPU_ISA (avx512, avx2 or generic; unset, empty or "auto": the best this CPU runs).
const Kernels& select_kernels() {
  const char* env = std::getenv("NEFT_KERNELS_CPU_ISA");
  std::string want = env ? env : "";
  std::transform(want.begin(), want.end(), want.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (want.empty() || want == "auto") {
    for (const Kernels* k : kAllKernels)
      if (cpu_runs(*k)) return *k;
  }
  for (const Kernels* k : kAllKernels) {
    if (want != k->name) continue;
    TORCH_CHECK(cpu_runs(*k), "NEFT_KERNELS_CPU_ISA=", env, ": this CPU lacks ", k->needs,
                "; it runs: ", supported_list(), " (or leave NEFT_KERNELS_CPU_ISA unset for the best of them)");
    return *k;
  }
#if NEFT_X86
  const char* known = "avx512, avx2 or generic";
#else
  const char* known = "generic (this build is not for x86-64)";
#endif
  TORCH_CHECK(false, "NEFT_KERNELS_CPU_ISA=", env, " is not a CPU ISA of neft_kernels: use ", known,
              ", or leave it unset (or 'auto') for the best this CPU runs");
}

// Chosen once, at first use (a refused choice is not cached: every call raises it again).
const Kernels& kernels() {
  static const Kernels& chosen = select_kernels();
  return chosen;
}

inline void noise_run(const Kernels& k, const float* row, float* dst, const uint32_t* w, int64_t n, float s) {
  k.noise_f32(row, dst, w, n, s);
}
inline void noise_run(const Kernels& k, const uint16_t* row, uint16_t* dst, const uint32_t* w, int64_t n, float s) {
  k.noise_bf16(row, dst, w, n, s);
}
inline void noise_run(const Kernels& k, const c10::Half* row, c10::Half* dst, const uint32_t* w, int64_t n, float s) {
  k.noise_f16(row, dst, w, n, s);
}
inline void add_noise_run(const Kernels& k, const float* row, float* dst, const float* e, int64_t n, float s) {
  k.add_f32(row, dst, e, n, s);
}
inline void add_noise_run(const Kernels& k, const uint16_t* row, uint16_t* dst, const float* e, int64_t n, float s) {
  k.add_bf16(row, dst, e, n, s);
}
inline void add_noise_run(const Kernels& k, const c10::Half* row, c10::Half* dst, const float* e, int64_t n, float s) {
  k.add_f16(row, dst, e, n, s);
}

template <typename T>
inline float load_f32(const T* p) {
  return static_cast<float>(*p);
}
template <>
inline float load_f32<uint16_t>(const uint16_t* p) {  // bfloat16 as raw words
  return neft::from_bf16_bits(*p);
}

template <typename T>
inline T from_f32(float v) {
  return static_cast<T>(v);  // float: identity; c10::Half: round to nearest even
}
template <>
inline uint16_t from_f32<uint16_t>(float v) {
  return neft::to_bf16_bits(v);
}

template <typename T, bool kGaussian>
void forward_rows(const Kernels& k, const int64_t* ids, const T* weight, T* out, const float* scales, float scale_value,
                  uint64_t seed, uint64_t offset, int64_t first, int64_t last, int64_t d, int64_t w_stride,
                  int64_t num_rows) {
  const int64_t q = (d + 3) / 4;
  alignas(64) WordBlock words;
  alignas(64) NoiseBlock noise;  // the Gaussian path only
  for (int64_t n = first; n < last; ++n) {
    const float scale = scales ? scales[n] : scale_value;
    T* dst = out + n * d;
    if (ids[n] < 0 || ids[n] >= num_rows) {  // never read: a NaN row; the caller raises from the ids' range
      std::fill(dst, dst + d, from_f32<T>(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    const T* row = weight + ids[n] * w_stride;
    for (int64_t k0 = 0; k0 < q; k0 += kLaneBlock) {
      const int64_t count = std::min(kLaneBlock, q - k0);
      // The block's four runs of the row start in four pages (a quarter apart), where hardware
      // prefetchers start cold: ask for their lines now, to arrive while Philox computes.
      for (int64_t w = 0; w < 4; ++w) {
        const int64_t j0 = w * q + k0, len = std::min(count, d - j0);
        for (int64_t j = 0; j < len; j += 64 / static_cast<int64_t>(sizeof(T))) {
          __builtin_prefetch(row + j0 + j, 0);
          __builtin_prefetch(dst + j0 + j, 1);
        }
      }
      k.philox(offset + static_cast<uint64_t>(n * q + k0), seed, count, words);
      if constexpr (kGaussian) k.gaussian(words, count, noise);
      for (int64_t w = 0; w < 4; ++w) {
        const int64_t j0 = w * q + k0, len = std::min(count, d - j0);
        if constexpr (kGaussian) {
          add_noise_run(k, row + j0, dst + j0, noise[w], len, scale);
        } else {
          noise_run(k, row + j0, dst + j0, words[w], len, scale);
        }
      }
    }
  }
}

template <typename T, bool kGaussian>
void forward_tokens(const Kernels& k, const int64_t* ids, const T* weight, T* out, const float* scales,
                    float scale_value, uint64_t seed, uint64_t offset, int64_t n, int64_t d, int64_t w_stride,
                    int64_t num_rows) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
    forward_rows<T, kGaussian>(k, ids, weight, out, scales, scale_value, seed, offset, first, last, d, w_stride,
                               num_rows);
  });
}

// A sub-sequence starts at every row start, where position_ids is 0 and at every cu_seqlens entry;
// L counts its real (attention_mask != 0) tokens; scale = float32(alpha / sqrt(L * d)) in double,
// rounded once, and 0 where attention_mask or noise_mask is 0. Rows are independent: parallel.
void per_sequence_scales(float* scales, int64_t rows, int64_t width, double alpha, int64_t d,
                         const neft::cpu::SideInputs& side) {
  const neft::cpu::IntView &mask = side.attention_mask, &positions = side.position_ids, &cu = side.cu_seqlens;
  const neft::cpu::IntView& noise_mask = side.noise_mask;
  const int64_t n_cu = side.n_cu;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1)), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int64_t base = r * width;
      // The first cu_seqlens entry past this row's first token (entries are cumulative, ascending).
      int64_t k = 0;
      if (cu.present()) {
        int64_t lo = 0, hi = n_cu;
        while (lo < hi) {
          const int64_t mid = (lo + hi) / 2;
          if (cu(0, mid) <= base)
            lo = mid + 1;
          else
            hi = mid;
        }
        k = lo;
      }
      for (int64_t a = 0; a < width;) {
        int64_t b = a + 1, count = mask.present() ? (mask(r, a) != 0) : 1;
        for (; b < width; ++b) {
          bool start = positions.present() && positions(r, b) == 0;
          if (cu.present()) {
            while (k < n_cu && cu(0, k) < base + b) ++k;
            start = start || (k < n_cu && cu(0, k) == base + b);
          }
          if (start) break;
          count += mask.present() ? (mask(r, b) != 0) : 1;
        }
        const float s = d == 0 ? 0.0f : neft::scale_of(alpha, count, d);
        for (int64_t j = a; j < b; ++j) {
          const bool noised = (!mask.present() || mask(r, j) != 0) && (!noise_mask.present() || noise_mask(r, j) != 0);
          scales[base + j] = noised ? s : 0.0f;
        }
        a = b;
      }
    }
  });
}

// Whether an id gets a gradient row: in the table and not the padding row.
inline bool has_grad_row(int64_t id, int64_t num_weights, int64_t padding_idx) {
  return id != padding_idx && id >= 0 && id < num_weights;
}

// Columns [j0, j1) of one id's gradient row: its rows summed in token order in float32, rounded once.
template <typename T>
void sum_run(const T* grad, const int64_t* order, int64_t begin, int64_t end, int64_t d, int64_t j0, int64_t j1,
             bool scale_by_freq, std::vector<float>& acc, T* dst) {
  acc.assign(j1 - j0, 0.0f);
  for (int64_t i = begin; i < end; ++i) {  // fixed order: deterministic
    const T* g = grad + order[i] * d;
    for (int64_t j = j0; j < j1; ++j) acc[j - j0] += load_f32(g + j);
  }
  const float count = static_cast<float>(end - begin);
  for (int64_t j = j0; j < j1; ++j) dst[j] = from_f32<T>(scale_by_freq ? acc[j - j0] / count : acc[j - j0]);
}

// Threads take runs by their tokens, not their number. A run of more than half a thread's share of
// the tokens (a pad id through a padded batch, with no padding_idx) is split by columns across the
// threads instead, after the others: alone on one thread it would keep the rest waiting. Each element
// is its rows' sum in token order either way, so the bits do not depend on the split.
template <typename T>
void backward_segments(const T* grad, const int64_t* order, const int64_t* sorted, const std::vector<int64_t>& starts,
                       T* gw, int64_t d, int64_t num_weights, int64_t padding_idx, bool scale_by_freq) {
  const int64_t n = starts.back(), n_segments = static_cast<int64_t>(starts.size()) - 1;
  const int64_t long_run = std::max<int64_t>(n / (2 * at::get_num_threads()), 1);
  const auto is_long = [&](int64_t s) { return starts[s + 1] - starts[s] > long_run; };
  const auto written = [&](int64_t id) { return has_grad_row(id, num_weights, padding_idx); };
  // at least ~16k additions a task
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / d), [&](int64_t first, int64_t last) {
    std::vector<float> acc;
    // the runs that start in [first, last)
    for (auto s = std::lower_bound(starts.begin(), starts.end() - 1, first) - starts.begin();
         s < n_segments && starts[s] < last; ++s) {
      const int64_t id = sorted[starts[s]];
      if (written(id) && !is_long(s))
        sum_run(grad, order, starts[s], starts[s + 1], d, 0, d, scale_by_freq, acc, gw + id * d);
    }
  });
  for (int64_t s = 0; s < n_segments; ++s) {
    const int64_t id = sorted[starts[s]];
    if (!written(id) || !is_long(s)) continue;
    at::parallel_for(0, d, 64, [&](int64_t j0, int64_t j1) {
      std::vector<float> acc;
      sum_run(grad, order, starts[s], starts[s + 1], d, j0, j1, scale_by_freq, acc, gw + id * d);
    });
  }
}

// The storage type of each dtype on the CPU: bfloat16 as raw words, rounded by integer ops.
template <typename Fn>
decltype(auto) dispatch_cpu(neft::DType dtype, Fn&& fn) {
  return neft::dispatch_dtype<float, uint16_t, c10::Half>(dtype, std::forward<Fn>(fn));
}

// float32 gradients (no division by counts): each element is its rows' float32 sum in token order
// from +0, as in backward_segments, so the rows are added straight into the zeroed result as the ids
// come: the gradient is read in order and no sort is needed (2-5x faster where the result stays in
// cache, level with the sort where zeroing a large result dominates). Threads take column blocks.
void backward_in_token_order(const float* grad, const int64_t* ids, int64_t n, float* gw, int64_t d,
                             int64_t num_weights, int64_t padding_idx) {
  at::parallel_for(0, d, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids[i];
      if (!has_grad_row(id, num_weights, padding_idx)) continue;
      const float* g = grad + i * d;
      float* o = gw + id * d;
      for (int64_t j = j0; j < j1; ++j) o[j] += g[j];
    }
  });
}

// The tokens in the stable order of their ids. Where the table is not much larger than the batch, a
// counting sort (O(n + V); ids outside [0, V), which get no row, last in token order): several
// times faster than a comparison sort at a few thousand tokens. Else a stable comparison sort.
std::vector<int64_t> stable_order(const int64_t* ids, int64_t n, int64_t num_weights) {
  std::vector<int64_t> order(n);
  if (num_weights > 4 * n) {
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
    return order;
  }
  const auto bucket = [&](int64_t id) { return id >= 0 && id < num_weights ? id : num_weights; };
  std::vector<int64_t> next(num_weights + 2, 0);  // next[b]: where bucket b's next token goes
  for (int64_t i = 0; i < n; ++i) ++next[bucket(ids[i]) + 1];
  for (int64_t b = 1; b <= num_weights + 1; ++b) next[b] += next[b - 1];
  for (int64_t i = 0; i < n; ++i) order[next[bucket(ids[i])]++] = i;
  return order;
}

}  // namespace

namespace neft::cpu {

void token_scales(float* scales, int64_t n, int64_t width, double alpha, int64_t d, const SideInputs& side) {
  if (n == 0) return;
  per_sequence_scales(scales, n / width, width, alpha, d, side);
}

void noisy_embedding_forward(DType dtype, const int64_t* ids, const void* weight, void* out, const float* scales,
                             float scale_value, uint64_t seed, uint64_t offset, int64_t n, int64_t d, int64_t w_stride,
                             int64_t num_rows, bool gaussian) {
  if (n == 0 || d == 0) return;
  const Kernels& k = kernels();
  dispatch_cpu(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* w = static_cast<const T*>(weight);
    T* o = static_cast<T*>(out);
    if (gaussian) {
      forward_tokens<T, true>(k, ids, w, o, scales, scale_value, seed, offset, n, d, w_stride, num_rows);
    } else {
      forward_tokens<T, false>(k, ids, w, o, scales, scale_value, seed, offset, n, d, w_stride, num_rows);
    }
  });
}

void embedding_backward(DType dtype, const void* grad, const int64_t* ids, int64_t n, int64_t d, void* grad_weight,
                        int64_t num_weights, int64_t padding_idx, bool scale_by_freq) {
  if (n == 0 || d == 0) return;
  if (dtype == DType::kFloat32 && !scale_by_freq) {
    backward_in_token_order(static_cast<const float*>(grad), ids, n, static_cast<float*>(grad_weight), d, num_weights,
                            padding_idx);
    return;
  }
  const std::vector<int64_t> order = stable_order(ids, n, num_weights);
  std::vector<int64_t> sorted(n), starts;
  for (int64_t i = 0; i < n; ++i) {
    sorted[i] = ids[order[i]];
    if (i == 0 || sorted[i] != sorted[i - 1]) starts.push_back(i);
  }
  starts.push_back(n);
  dispatch_cpu(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    backward_segments<T>(static_cast<const T*>(grad), order.data(), sorted.data(), starts, static_cast<T*>(grad_weight),
                         d, num_weights, padding_idx, scale_by_freq);
  });
}

void philox_words(uint32_t* out, int64_t n_calls, uint64_t seed, uint64_t offset) {
  if (n_calls == 0) return;
  const Kernels& k = kernels();
  const int64_t n_blocks = (n_calls + kLaneBlock - 1) / kLaneBlock;
  at::parallel_for(0, n_blocks, 16, [&](int64_t first, int64_t last) {
    alignas(64) WordBlock words;
    for (int64_t b = first; b < last; ++b) {
      const int64_t k0 = b * kLaneBlock, count = std::min(kLaneBlock, n_calls - k0);
      k.philox(offset + static_cast<uint64_t>(k0), seed, count, words);
      for (int64_t i = 0; i < count; ++i)
        for (int w = 0; w < 4; ++w) out[(k0 + i) * 4 + w] = words[w][i];
    }
  });
}

const char* cpu_isa() { return kernels().name; }

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const Kernels* k : kAllKernels)
    if (cpu_runs(*k)) names.emplace_back(k->name);
  return names;
}

}  // namespace neft::cpu
