// CPU kernels: the fused NEFTune forward (spec v2, uniform or Gaussian, bit-exact), the per-token
// scales, and the deterministic embedding backward with float32 accumulation. Parallel over tokens;
// the inner loop runs over a block of quarter lanes so that the Philox rounds (and the Gaussian
// transform) vectorise. No torch tensors: binding.cpp owns those.
#include "noisy_embedding_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "../gaussian.h"
#include "../philox.h"

namespace {

constexpr int64_t kLaneBlock = 256;  // quarter lanes per Philox batch; a multiple of 16
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define NEFT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define NEFT_HAVE_AVX512 1
#else
#define NEFT_CLONES
#define NEFT_HAVE_AVX512 0
#endif

using WordBlock = uint32_t[4][kLaneBlock];

// Portable batch: the compiler vectorises the lane loop (64-bit products of 32-bit words).
NEFT_CLONES void philox_block_generic(uint64_t first_counter, uint64_t seed, int64_t count, WordBlock& words) {
  for (int64_t i = 0; i < count; ++i) {
    const neft::Words4 r = neft::philox4x32_10(first_counter + static_cast<uint64_t>(i), seed);
    words[0][i] = r.r[0];
    words[1][i] = r.r[1];
    words[2][i] = r.r[2];
    words[3][i] = r.r[3];
  }
}

#if NEFT_HAVE_AVX512
// Hi and lo words of a * b in 16 lanes: even lanes from one vpmuludq, odd lanes from another.
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i b, __m512i* hi, __m512i* lo) {
  const __m512i even = _mm512_mul_epu32(a, b);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// The same words, 16 lanes per instruction; writes whole groups of 16 (the block has room).
__attribute__((target("avx512f"))) void philox_block_avx512(uint64_t first_counter, uint64_t seed, int64_t count,
                                                            WordBlock& words) {
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int>(neft::kPhiloxMulA));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int>(neft::kPhiloxMulB));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t i = 0; i < count; i += 16) {
    const uint64_t c = first_counter + static_cast<uint64_t>(i);
    const __m512i lo_base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c)));
    const __m512i hi_base = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c >> 32)));
    __m512i c0 = _mm512_add_epi32(lo_base, iota);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo_base);  // low word wrapped: bump the high one
    __m512i c1 = _mm512_mask_add_epi32(hi_base, carry, hi_base, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m512i hi_a, lo_a, hi_b, lo_b;
      mulhilo16(mul_a, c0, &hi_a, &lo_a);
      mulhilo16(mul_b, c2, &hi_b, &lo_b);
      c0 = _mm512_ternarylogic_epi32(hi_b, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // 3-way xor
      c2 = _mm512_ternarylogic_epi32(hi_a, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
      c1 = lo_b;
      c3 = lo_a;
      k0 += neft::kPhiloxKeyA;
      k1 += neft::kPhiloxKeyB;
    }
    _mm512_storeu_si512(words[0] + i, c0);
    _mm512_storeu_si512(words[1] + i, c1);
    _mm512_storeu_si512(words[2] + i, c2);
    _mm512_storeu_si512(words[3] + i, c3);
  }
}
#endif

void philox_block(uint64_t first_counter, uint64_t seed, int64_t count, WordBlock& words) {
#if NEFT_HAVE_AVX512
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return philox_block_avx512(first_counter, seed, count, words);
#endif
  philox_block_generic(first_counter, seed, count, words);
}

// One quarter's run of uniform dims: widen, add e * scale (spec v1's stream, rounded first), narrow. One per dtype so
// that each gets its own vector clones.
NEFT_CLONES void noise_run(const float* row, float* dst, const uint32_t* words, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = neft::noisy_value(row[i], words[i], scale);
}
NEFT_CLONES void noise_run_bf16_generic(const uint16_t* row, uint16_t* dst, const uint32_t* words, int64_t n,
                                        float scale) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = neft::to_bf16_bits(neft::noisy_value(neft::from_bf16_bits(row[i]), words[i], scale));
}

#if NEFT_HAVE_AVX512
// The bf16 run in 16-lane vectors (compilers keep the 16/32-bit mix narrow): the same operations
// as philox.h in the same order, each rounded once, no FMA.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void noise_run_bf16_avx512(const uint16_t* row, uint16_t* dst,
                                                                                const uint32_t* words, int64_t n,
                                                                                float scale) {
  const __m512 v_scale = _mm512_set1_ps(scale), u_scale = _mm512_set1_ps(neft::kUniformScale);
  const __m512 two = _mm512_set1_ps(2.0f), minus_one = _mm512_set1_ps(-1.0f);
  const __m512i one = _mm512_set1_epi32(1), round_bias = _mm512_set1_epi32(0x7FFF),
                quiet_nan = _mm512_set1_epi32(0x7FC0);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512i x = _mm512_maskz_loadu_epi32(m, words + i);
    x = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));  // ~x where negative
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(x), u_scale);
    const __m512 e = _mm512_add_ps(_mm512_mul_ps(u, two), minus_one);
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
#endif

void noise_run(const uint16_t* row, uint16_t* dst, const uint32_t* words, int64_t n, float scale) {
#if NEFT_HAVE_AVX512
  static const bool avx512 = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (avx512) return noise_run_bf16_avx512(row, dst, words, n, scale);
#endif
  noise_run_bf16_generic(row, dst, words, n, scale);
}
NEFT_CLONES void noise_run(const c10::Half* row, c10::Half* dst, const uint32_t* words, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(neft::noisy_value(static_cast<float>(row[i]), words[i], scale));
}

// The Gaussian noise of a block of lanes (spec v2): quarters 0 and 1 from words (r0, r1), 2 and 3
// from (r2, r3). Branch-free per lane, so the clones vectorise it.
using NoiseBlock = float[4][kLaneBlock];

NEFT_CLONES void gaussian_block(const WordBlock& words, int64_t count, NoiseBlock& noise) {
  for (int64_t i = 0; i < count; ++i) {
    neft::gaussian_pair(words[0][i], words[1][i], noise[0][i], noise[1][i]);
    neft::gaussian_pair(words[2][i], words[3][i], noise[2][i], noise[3][i]);
  }
}

// One quarter's run of dims from ready noise e: widen, add e * scale (rounded first), narrow.
NEFT_CLONES void add_noise_run(const float* row, float* dst, const float* e, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = neft::add_noise(row[i], e[i], scale);
}
NEFT_CLONES void add_noise_run(const uint16_t* row, uint16_t* dst, const float* e, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i)
    dst[i] = neft::to_bf16_bits(neft::add_noise(neft::from_bf16_bits(row[i]), e[i], scale));
}
NEFT_CLONES void add_noise_run(const c10::Half* row, c10::Half* dst, const float* e, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(neft::add_noise(static_cast<float>(row[i]), e[i], scale));
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
void forward_rows(const int64_t* ids, const T* weight, T* out, const float* scales, float scale_value, uint64_t seed,
                  uint64_t offset, int64_t first, int64_t last, int64_t d, int64_t w_stride, int64_t num_rows) {
  const int64_t q = (d + 3) / 4;
  alignas(64) WordBlock words;
  alignas(64) NoiseBlock noise;  // the Gaussian path only
  for (int64_t n = first; n < last; ++n) {
    const float scale = scales ? scales[n] : scale_value;
    T* dst = out + n * d;
    if (ids[n] < 0 || ids[n] >= num_rows) {  // never read: Python refuses these first, this is a guard
      std::fill(dst, dst + d, from_f32<T>(std::numeric_limits<float>::quiet_NaN()));
      continue;
    }
    const T* row = weight + ids[n] * w_stride;
    for (int64_t k0 = 0; k0 < q; k0 += kLaneBlock) {
      const int64_t count = std::min(kLaneBlock, q - k0);
      philox_block(offset + static_cast<uint64_t>(n * q + k0), seed, count, words);
      if constexpr (kGaussian) gaussian_block(words, count, noise);
      for (int64_t w = 0; w < 4; ++w) {
        const int64_t j0 = w * q + k0, len = std::min(count, d - j0);
        if constexpr (kGaussian) {
          add_noise_run(row + j0, dst + j0, noise[w], len, scale);
        } else {
          noise_run(row + j0, dst + j0, words[w], len, scale);
        }
      }
    }
  }
}

template <typename T, bool kGaussian>
void forward_tokens(const int64_t* ids, const T* weight, T* out, const float* scales, float scale_value, uint64_t seed,
                    uint64_t offset, int64_t n, int64_t d, int64_t w_stride, int64_t num_rows) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, n, grain, [&](int64_t first, int64_t last) {
    forward_rows<T, kGaussian>(ids, weight, out, scales, scale_value, seed, offset, first, last, d, w_stride, num_rows);
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
        const float s = d == 0 ? 0.0f
                               : static_cast<float>(alpha / std::sqrt(static_cast<double>(std::max<int64_t>(count, 1)) *
                                                                      static_cast<double>(d)));
        for (int64_t j = a; j < b; ++j) {
          const bool noised = (!mask.present() || mask(r, j) != 0) && (!noise_mask.present() || noise_mask(r, j) != 0);
          scales[base + j] = noised ? s : 0.0f;
        }
        a = b;
      }
    }
  });
}

template <typename T>
void backward_segments(const T* grad, const int64_t* order, const int64_t* sorted, const std::vector<int64_t>& starts,
                       T* gw, int64_t d, int64_t num_weights, int64_t padding_idx, bool scale_by_freq) {
  const int64_t n_segments = static_cast<int64_t>(starts.size()) - 1;
  at::parallel_for(0, n_segments, 1, [&](int64_t first, int64_t last) {
    std::vector<float> acc(d);
    for (int64_t s = first; s < last; ++s) {
      const int64_t begin = starts[s], end = starts[s + 1], id = sorted[begin];
      if (id == padding_idx || id < 0 || id >= num_weights) continue;  // out of range: never written
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t i = begin; i < end; ++i) {  // fixed order: deterministic
        const T* g = grad + order[i] * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += load_f32(g + j);
      }
      const float count = static_cast<float>(end - begin);
      T* dst = gw + id * d;
      for (int64_t j = 0; j < d; ++j) dst[j] = from_f32<T>(scale_by_freq ? acc[j] / count : acc[j]);
    }
  });
}

// The storage type of each dtype on the CPU: bfloat16 as raw words, rounded by integer ops.
template <typename Fn>
decltype(auto) dispatch_cpu(neft::DType dtype, Fn&& fn) {
  return neft::dispatch_dtype<float, uint16_t, c10::Half>(dtype, std::forward<Fn>(fn));
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
  dispatch_cpu(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* w = static_cast<const T*>(weight);
    T* o = static_cast<T*>(out);
    if (gaussian) {
      forward_tokens<T, true>(ids, w, o, scales, scale_value, seed, offset, n, d, w_stride, num_rows);
    } else {
      forward_tokens<T, false>(ids, w, o, scales, scale_value, seed, offset, n, d, w_stride, num_rows);
    }
  });
}

void embedding_backward(DType dtype, const void* grad, const int64_t* ids, int64_t n, int64_t d, void* grad_weight,
                        int64_t num_weights, int64_t padding_idx, bool scale_by_freq) {
  if (n == 0 || d == 0) return;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
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
  const int64_t n_blocks = (n_calls + kLaneBlock - 1) / kLaneBlock;
  at::parallel_for(0, n_blocks, 16, [&](int64_t first, int64_t last) {
    alignas(64) WordBlock words;
    for (int64_t b = first; b < last; ++b) {
      const int64_t k0 = b * kLaneBlock, count = std::min(kLaneBlock, n_calls - k0);
      philox_block(offset + static_cast<uint64_t>(k0), seed, count, words);
      for (int64_t i = 0; i < count; ++i)
        for (int w = 0; w < 4; ++w) out[(k0 + i) * 4 + w] = words[w][i];
    }
  });
}

}  // namespace neft::cpu
