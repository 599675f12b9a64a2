// CPU kernels: the fused NEFTune forward (spec v1, bit-exact) and the deterministic embedding
// backward with float32 accumulation. Parallel over tokens; the inner loop runs over a block of
// quarter lanes so that the Philox rounds vectorise.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "../binding_utils.h"
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

// One quarter's run of dims: widen, add e * scale (spec v1 rounding), narrow. One per dtype so
// that each gets its own vector clones.
NEFT_CLONES void noise_run(const float* row, float* dst, const uint32_t* words, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = neft::noisy_value(row[i], words[i], scale);
}
NEFT_CLONES void noise_run_bf16_generic(const uint16_t* row, uint16_t* dst, const uint32_t* words, int64_t n,
                                        float scale) {
  for (int64_t i = 0; i < n; ++i) dst[i] = neft::to_bf16_bits(neft::noisy_value(neft::from_bf16_bits(row[i]), words[i], scale));
}

#if NEFT_HAVE_AVX512
// The bf16 run in 16-lane vectors (compilers keep the 16/32-bit mix narrow): the same operations
// as philox.h in the same order, each rounded once, no FMA.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void noise_run_bf16_avx512(
    const uint16_t* row, uint16_t* dst, const uint32_t* words, int64_t n, float scale) {
  const __m512 v_scale = _mm512_set1_ps(scale), u_scale = _mm512_set1_ps(neft::kUniformScale);
  const __m512 two = _mm512_set1_ps(2.0f), minus_one = _mm512_set1_ps(-1.0f);
  const __m512i one = _mm512_set1_epi32(1), round_bias = _mm512_set1_epi32(0x7FFF), quiet_nan = _mm512_set1_epi32(0x7FC0);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512i x = _mm512_maskz_loadu_epi32(m, words + i);
    x = _mm512_xor_si512(x, _mm512_srai_epi32(x, 31));  // ~x where negative
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(x), u_scale);
    const __m512 e = _mm512_add_ps(_mm512_mul_ps(u, two), minus_one);
    const __m512 w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, row + i)), 16));
    const __m512 v = _mm512_add_ps(w, _mm512_mul_ps(e, v_scale));
    const __m512i bits = _mm512_castps_si512(v);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(bits, round_bias), _mm512_and_si512(_mm512_srli_epi32(bits, 16), one));
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

template <typename T>
void forward_rows(const int64_t* ids, const T* weight, T* out, const float* scales, float scale_value,
                  uint64_t seed, uint64_t offset, int64_t first, int64_t last, int64_t d, int64_t w_stride,
                  int64_t num_rows) {
  const int64_t q = (d + 3) / 4;
  alignas(64) WordBlock words;
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
      for (int64_t w = 0; w < 4; ++w) {
        const int64_t j0 = w * q + k0;
        noise_run(row + j0, dst + j0, words[w], std::min(count, d - j0), scale);
      }
    }
  }
}

template <typename T>
void dispatch_forward(const torch::Tensor& ids, const torch::Tensor& weight, torch::Tensor& out, const float* s_ptr,
                      double scale_value, uint64_t seed, uint64_t offset) {
  const int64_t n_tokens = ids.numel(), d = weight.size(1), w_stride = weight.stride(0);
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  const T* w_ptr = reinterpret_cast<const T*>(weight.data_ptr());
  T* o_ptr = reinterpret_cast<T*>(out.data_ptr());
  const float s_val = static_cast<float>(scale_value);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, n_tokens, grain, [&](int64_t first, int64_t last) {
    forward_rows<T>(id_ptr, w_ptr, o_ptr, s_ptr, s_val, seed, offset, first, last, d, w_stride, weight.size(0));
  });
}

}  // namespace

namespace {

// An integer or bool tensor read element by element whatever its dtype (masks and position ids
// arrive as bool, uint8, int32 or int64; a per-element switch costs far less than a conversion).
struct IntView {
  const void* data = nullptr;
  torch::ScalarType dtype = torch::kLong;
  int64_t stride0 = 0, stride1 = 0;

  explicit IntView(const c10::optional<torch::Tensor>& t) {
    if (!t) return;
    TORCH_CHECK(t->dim() <= 2, "side inputs reach the kernel as (rows, width)");
    data = t->data_ptr();
    dtype = t->scalar_type();
    stride0 = t->dim() == 2 ? t->stride(0) : 0;
    stride1 = t->dim() ? t->stride(-1) : 0;
  }
  bool present() const { return data != nullptr; }
  int64_t operator()(int64_t row, int64_t col) const {
    const int64_t i = row * stride0 + col * stride1;
    switch (dtype) {
      case torch::kBool: return static_cast<const bool*>(data)[i];
      case torch::kByte: return static_cast<const uint8_t*>(data)[i];
      case torch::kChar: return static_cast<const int8_t*>(data)[i];
      case torch::kShort: return static_cast<const int16_t*>(data)[i];
      case torch::kInt: return static_cast<const int32_t*>(data)[i];
      case torch::kLong: return static_cast<const int64_t*>(data)[i];
      case torch::kUInt16: return static_cast<const uint16_t*>(data)[i];
      case torch::kUInt32: return static_cast<const uint32_t*>(data)[i];
      case torch::kUInt64: return static_cast<int64_t>(static_cast<const uint64_t*>(data)[i]);  // only == 0 matters
      default: TORCH_CHECK(false, "side inputs must be integer or bool tensors, got ", dtype);
    }
  }
};

// Spec v1's per-token scale: float32(alpha / sqrt(L * d)) in double, rounded once; 0 unless real.
// A sub-sequence starts at every row start, where position_ids is 0 and at every cu_seqlens entry;
// L counts its real (attention_mask != 0) tokens. Rows are independent, so they run in parallel.
void per_sequence_scales(float* scales, int64_t rows, int64_t width, double alpha, int64_t d, const IntView& mask,
                         const IntView& positions, const IntView& cu_seqlens, int64_t n_cu) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1)), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const int64_t base = r * width;
      // The first cu_seqlens entry past this row's first token (entries are cumulative, ascending).
      int64_t k = 0;
      if (cu_seqlens.present()) {
        int64_t lo = 0, hi = n_cu;
        while (lo < hi) {
          const int64_t mid = (lo + hi) / 2;
          if (cu_seqlens(0, mid) <= base) lo = mid + 1; else hi = mid;
        }
        k = lo;
      }
      for (int64_t a = 0; a < width;) {
        int64_t b = a + 1, count = mask.present() ? (mask(r, a) != 0) : 1;
        for (; b < width; ++b) {
          bool start = positions.present() && positions(r, b) == 0;
          if (cu_seqlens.present()) {
            while (k < n_cu && cu_seqlens(0, k) < base + b) ++k;
            start = start || (k < n_cu && cu_seqlens(0, k) == base + b);
          }
          if (start) break;
          count += mask.present() ? (mask(r, b) != 0) : 1;
        }
        const float s = static_cast<float>(alpha / std::sqrt(static_cast<double>(std::max<int64_t>(count, 1)) *
                                                             static_cast<double>(d)));
        for (int64_t j = a; j < b; ++j) scales[base + j] = (!mask.present() || mask(r, j) != 0) ? s : 0.0f;
        a = b;
      }
    }
  });
}

// The per-token scales of n tokens in rows of ``width`` from the optional side inputs.
void side_input_scales(float* scales, int64_t n, int64_t width, double alpha, int64_t d,
                       const c10::optional<torch::Tensor>& mask, const c10::optional<torch::Tensor>& positions,
                       const c10::optional<torch::Tensor>& cu_seqlens) {
  TORCH_CHECK(width > 0 && n % width == 0, "width must divide the number of tokens");
  if (cu_seqlens) TORCH_CHECK(cu_seqlens->dim() == 1, "cu_seqlens must be 1-D");
  per_sequence_scales(scales, n / width, width, alpha, d, IntView(mask), IntView(positions), IntView(cu_seqlens),
                      cu_seqlens ? cu_seqlens->numel() : 0);
}

}  // namespace

// ids of any shape into a (V, d) weight -> (ids.shape + (d,) noisy rows, min id, max id), spec v1.
// Scales: with ``per_sequence`` the kernel derives each token's scale from ``alpha`` and the side
// inputs (``mask`` / ``positions`` as (rows, width) views, ``cu_seqlens`` 1-D; rows * width = N);
// otherwise every token takes ``scale_value`` (already a float32 value). The id range is returned,
// not raised: the caller raises in Python (a C++ exception inside a compiled graph is not safe).
std::tuple<torch::Tensor, int64_t, int64_t> noisy_embedding_forward(
    const torch::Tensor& ids_in, const torch::Tensor& weight_in, int64_t seed, int64_t offset, double scale_value,
    bool per_sequence, double alpha, int64_t width, const c10::optional<torch::Tensor>& mask,
    const c10::optional<torch::Tensor>& positions, const c10::optional<torch::Tensor>& cu_seqlens) {
  const auto [ids, weight] = neft::prepare_forward(ids_in, weight_in);
  const int64_t n = ids.numel(), d = weight.size(1);
  torch::Tensor out = torch::empty(neft::output_sizes(ids_in, d), weight.options());
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  int64_t id_min = 0, id_max = -1;
  if (n) {
    const auto [lo, hi] = std::minmax_element(id_ptr, id_ptr + n);
    id_min = *lo;
    id_max = *hi;
  }
  if (n == 0 || d == 0) return {out, id_min, id_max};
  std::vector<float> scales;
  if (per_sequence) {
    scales.resize(n);
    side_input_scales(scales.data(), n, width, alpha, d, mask, positions, cu_seqlens);
  }
  const float* s_ptr = per_sequence ? scales.data() : nullptr;
  const auto s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  switch (weight.scalar_type()) {
    case torch::kFloat: dispatch_forward<float>(ids, weight, out, s_ptr, scale_value, s, o); break;
    case torch::kBFloat16: dispatch_forward<uint16_t>(ids, weight, out, s_ptr, scale_value, s, o); break;
    case torch::kHalf: dispatch_forward<c10::Half>(ids, weight, out, s_ptr, scale_value, s, o); break;
    default: TORCH_CHECK(false, "weight dtype must be float32, bfloat16 or float16, got ", weight.scalar_type());
  }
  return {out, id_min, id_max};
}

// The per-token scales alone (a test seam: the reference computes them with torch ops).
torch::Tensor token_scales(int64_t n, double alpha, int64_t d, int64_t width, const c10::optional<torch::Tensor>& mask,
                           const c10::optional<torch::Tensor>& positions,
                           const c10::optional<torch::Tensor>& cu_seqlens) {
  torch::Tensor out = torch::empty({n}, torch::kFloat);
  if (n == 0) return out;
  side_input_scales(out.data_ptr<float>(), n, width, alpha, d, mask, positions, cu_seqlens);
  return out;
}

namespace {

template <typename T>
void backward_segments(const T* grad, const int64_t* order, const int64_t* sorted,
                       const std::vector<int64_t>& starts, T* gw, int64_t d, int64_t num_weights,
                       int64_t padding_idx, bool scale_by_freq) {
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

}  // namespace

// (N, d) grad rows -> (V, d) weight gradient in grad's dtype: summed per id in float32 in token
// order, rounded once; the padding row gets none; optional division by each id's count.
torch::Tensor embedding_backward(const torch::Tensor& grad_in, const torch::Tensor& ids_in, int64_t num_weights,
                                 int64_t padding_idx, bool scale_grad_by_freq) {
  const torch::Tensor grad = grad_in.contiguous();
  const torch::Tensor ids = ids_in.to(torch::kLong).contiguous();
  const int64_t n = ids.numel(), d = grad.size(1);
  torch::Tensor gw = torch::zeros({num_weights, d}, grad.options());
  if (n == 0 || d == 0) return gw;
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return id_ptr[a] < id_ptr[b]; });
  std::vector<int64_t> sorted(n), starts;
  for (int64_t i = 0; i < n; ++i) {
    sorted[i] = id_ptr[order[i]];
    if (i == 0 || sorted[i] != sorted[i - 1]) starts.push_back(i);
  }
  starts.push_back(n);
  switch (grad.scalar_type()) {
    case torch::kFloat:
      backward_segments<float>(grad.data_ptr<float>(), order.data(), sorted.data(), starts,
                               gw.data_ptr<float>(), d, num_weights, padding_idx, scale_grad_by_freq);
      break;
    case torch::kBFloat16:
      backward_segments<uint16_t>(reinterpret_cast<const uint16_t*>(grad.data_ptr()), order.data(),
                                  sorted.data(), starts, reinterpret_cast<uint16_t*>(gw.data_ptr()), d,
                                  num_weights, padding_idx, scale_grad_by_freq);
      break;
    case torch::kHalf:
      backward_segments<c10::Half>(grad.data_ptr<c10::Half>(), order.data(), sorted.data(), starts,
                                   gw.data_ptr<c10::Half>(), d, num_weights, padding_idx, scale_grad_by_freq);
      break;
    default: TORCH_CHECK(false, "grad dtype must be float32, bfloat16 or float16, got ", grad.scalar_type());
  }
  return gw;
}

// The bare Philox stream: fills ``out`` (n_calls, 4) int32 with the words of counters offset ..
// offset + n_calls under seed, from the same vectorised batches as the forward. A test seam, and
// the benchmark's floor (into a buffer allocated once, so that only generation is timed).
void philox_words(torch::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK(out.dim() == 2 && out.size(1) == 4 && out.scalar_type() == torch::kInt && out.is_contiguous(),
              "out must be a contiguous (n, 4) int32 tensor");
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int64_t n_calls = out.size(0), n_blocks = (n_calls + kLaneBlock - 1) / kLaneBlock;
  at::parallel_for(0, n_blocks, 16, [&](int64_t first, int64_t last) {
    alignas(64) WordBlock words;
    for (int64_t b = first; b < last; ++b) {
      const int64_t k0 = b * kLaneBlock, count = std::min(kLaneBlock, n_calls - k0);
      philox_block(static_cast<uint64_t>(offset) + static_cast<uint64_t>(k0), static_cast<uint64_t>(seed), count, words);
      for (int64_t i = 0; i < count; ++i)
        for (int w = 0; w < 4; ++w) dst[(k0 + i) * 4 + w] = words[w][i];
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ABI_VERSION") = 2;  // neft_kernels/backends/_extension.py refuses a build from other sources
  m.def("philox_words", &philox_words, "fill (n, 4) int32 with Philox4x32-10 words of consecutive counters");
  m.def("forward", &noisy_embedding_forward, "fused NEFTune forward, noise spec v1, scales from side inputs");
  m.def("token_scales", &token_scales, "spec v1 per-token scales from attention_mask / position_ids / cu_seqlens");
  m.def("backward", &embedding_backward, "deterministic embedding backward, float32 accumulation");
}
