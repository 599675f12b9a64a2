// The CUDA kernels themselves (forward and backward), the forward's variant choice and launch shape:
// included by noisy_embedding.cu, which launches them, and by tests/support/cuda_emulator.cpp, which
// runs them on the CPU one (block, thread) at a time so that the suite checks their bits without a
// GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../dtype.h"
#include "../gaussian.h"
#include "../philox.h"
#include "dependent_launch.cuh"

namespace neft::cuda {

// Element conversions of each storage type to and from float32, rounded to nearest even: singly and
// in pairs (one instruction per pair on sm_80+), and the storage's NaN.
template <typename T>
struct Io;
template <>
struct Io<float> {
  __device__ static float to_f32(float v) { return v; }
  __device__ static float from_f32(float v) { return v; }
  __device__ static void from_f32x2(float a, float b, float* out) { out[0] = a, out[1] = b; }
  static constexpr uint32_t kNanWord = 0x7FC00000u;  // 32 bits of NaN elements
};
template <>
struct Io<uint16_t> {  // bfloat16 as raw words
  __device__ static float to_f32(uint16_t v) { return neft::from_bf16_bits(v); }
  __device__ static uint16_t from_f32(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  __device__ static void from_f32x2(float a, float b, uint16_t* out) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(a, b);
    out[0] = __bfloat16_as_ushort(pair.x), out[1] = __bfloat16_as_ushort(pair.y);
  }
  static constexpr uint32_t kNanWord = 0x7FC07FC0u;
};
template <>
struct Io<__half> {
  __device__ static float to_f32(__half v) { return __half2float(v); }
  __device__ static __half from_f32(float v) { return __float2half_rn(v); }
  __device__ static void from_f32x2(float a, float b, __half* out) {
    const __half2 pair = __floats2half2_rn(a, b);
    out[0] = pair.x, out[1] = pair.y;
  }
  static constexpr uint32_t kNanWord = 0x7E007E00u;
};

// 16 bytes of NaN elements of each storage type: what a thread reads for an out-of-range id, with
// the 16-byte path's vector load. The alignment is the struct's: nvcc ignores alignas on a
// __device__ variable template itself (its PTX said .align 4).
struct alignas(16) NanRow {
  uint32_t words[4];
};
template <typename T>
__device__ const NanRow kNanRow = {{Io<T>::kNanWord, Io<T>::kNanWord, Io<T>::kNanWord, Io<T>::kNanWord}};

// kVec consecutive elements, moved as one aligned access (16 bytes when kVec * sizeof(T) == 16).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// A forward launch's threads, laid out once on the host: one per (token, group of kVec lanes), q
// lanes a token. A thread finds its token with a multiply and a shift (exact for fewer than 2^31
// threads: the multiplier is ceil(2^(31 + k) / groups), 2^k >= groups), else by a 64-bit division.
struct LaneGroups {
  int64_t q = 0, groups = 0, threads = 0;
  uint32_t magic = 0, shift = 0;  // magic 0: divide
};

inline LaneGroups lane_groups(int64_t n_tokens, int64_t d, int kVec) {
  LaneGroups s;
  s.q = (d + 3) / 4;
  s.groups = (s.q + kVec - 1) / kVec;
  s.threads = n_tokens * s.groups;
  if (s.groups > 1 && s.threads < (int64_t{1} << 31)) {
    uint32_t k = 1;
    while ((int64_t{1} << k) < s.groups) ++k;
    s.magic = static_cast<uint32_t>(((uint64_t{1} << (31 + k)) + s.groups - 1) / s.groups);
    s.shift = k - 1;
  }
  return s;
}

// The token of thread g < s.threads.
__device__ inline int64_t token_of(const LaneGroups& s, int64_t g) {
  if (s.magic) return __umulhi(static_cast<uint32_t>(g), s.magic) >> s.shift;
  return s.groups == 1 ? g : g / s.groups;
}

// One thread per (token, kVec consecutive lanes): a Philox call per lane feeds the lane's dim in each
// of the 4 quarters (Gaussian: words (r0, r1) give quarters 0 and 1, (r2, r3) quarters 2 and 3). The
// kVec lanes' dims of a quarter are contiguous, so each quarter is one vector load and store; the
// host picks kVec > 1 only where q, the row stride and both pointers are aligned for it. Threads run
// over (token, lane group) pairs flat, so no width leaves part of a block idle.
template <typename T, bool kGaussian, int kVec>
__global__ void forward_kernel(const int64_t* __restrict__ ids, const void* __restrict__ weight, void* __restrict__ out,
                               const float* scales, float scale_value, const int64_t* __restrict__ seed_ptr,
                               uint64_t seed, uint64_t offset, LaneGroups lanes, int64_t d, int64_t w_stride,
                               int64_t num_rows, long long* bad_ids, int* bad_word) {
  using P = Pack<T, kVec>;
  const int64_t q = lanes.q;
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= lanes.threads) return;
  const int64_t n = token_of(lanes, g);
  const int64_t k0 = (g - n * lanes.groups) * kVec;
  // A seed in device memory is read here, not on the host: a captured CUDA graph draws anew per replay.
  const uint64_t key = seed_ptr ? static_cast<uint64_t>(*seed_ptr) : seed;
  const int64_t id = ids[n], row = id * w_stride, dst = n * d;
  // An id outside [0, V) is never read: its row becomes NaN, the range of such ids and V are
  // recorded in bad_ids (min, max, V), and bad_word (host memory) is set, for the host to raise.
  const bool in_range = id >= 0 && id < num_rows;
  if (!in_range && bad_ids && k0 == 0) {
    atomicMin(bad_ids, static_cast<long long>(id));
    atomicMax(bad_ids + 1, static_cast<long long>(id));
    atomicMax(bad_ids + 2, static_cast<long long>(num_rows));
    if (bad_word) *static_cast<volatile int*>(bad_word) = 1;
  }
  // One quarter's kVec dims of the row. An out-of-range id reads kNanRow instead, never the table:
  // the noise's add carries its NaN to the output, with no branch or select per element.
  const T* src = in_range ? static_cast<const T*>(weight) + row + k0 : reinterpret_cast<const T*>(kNanRow<T>.words);
  const int64_t quarter = in_range ? q : 0;
  const auto load = [&](int w, P& in) {
    if constexpr (kVec > 1) {  // d == 4q, q % kVec == 0: the kVec dims all exist, 16-byte aligned
      in = *reinterpret_cast<const P*>(src + w * quarter);
    } else if (w * q + k0 < d) {
      in.v[0] = src[w * quarter];
    }
  };
  // 16-byte accesses of 16-bit rows with uniform noise load all four quarters before the Philox
  // rounds, so that their latency overlaps the arithmetic: issued after it, each quarter's load
  // waited behind the previous one's store, too few bytes in flight for the memory. (fp32 threads
  // have enough in flight already, Gaussian ones are compute-bound and one-lane ones move 2 bytes a
  // load: there the extra registers would only cost occupancy.)
  constexpr bool kEarlyLoads = sizeof(T) == 2 && !kGaussian && kVec > 1;
  P early[kEarlyLoads ? 4 : 1];
  if constexpr (kEarlyLoads) {
#pragma unroll
    for (int w = 0; w < 4; ++w) load(w, early[w]);
  }
  float e[4][kVec];
#pragma unroll
  for (int v = 0; v < kVec; ++v) {
    const neft::Words4 r = neft::philox4x32_10(offset + static_cast<uint64_t>(n * q + k0 + v), key);
    if constexpr (kGaussian) {
      neft::gaussian_pair(r.r[0], r.r[1], e[0][v], e[1][v]);
      neft::gaussian_pair(r.r[2], r.r[3], e[2][v], e[3][v]);
    } else {
#pragma unroll
      for (int w = 0; w < 4; ++w) e[w][v] = neft::uniform_pm1(r.r[w]);
    }
  }
  // Launched after the scales kernel, this one may have started while that one runs (sm_90): the
  // scales are read only after the wait, and with a coherent load (not the read-only path, which
  // ptxas may move across it); the ids and rows are older.
  wait_for_prerequisites();
  const float scale = scales ? scales[n] : scale_value;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const int64_t j = w * q + k0;
    if (kVec == 1 && j >= d) continue;
    P late;
    if constexpr (!kEarlyLoads) load(w, late);
    const P& in = kEarlyLoads ? early[w] : late;
    P result;
    if constexpr (kVec > 1) {
#pragma unroll
      for (int v = 0; v < kVec; v += 2)
        Io<T>::from_f32x2(neft::add_noise(Io<T>::to_f32(in.v[v]), e[w][v], scale),
                          neft::add_noise(Io<T>::to_f32(in.v[v + 1]), e[w][v + 1], scale), result.v + v);
    } else {
      result.v[0] = Io<T>::from_f32(neft::add_noise(Io<T>::to_f32(in.v[0]), e[w][0], scale));
    }
    static_cast<P*>(out)[static_cast<uint64_t>(dst + j) / kVec] = result;  // kVec == 1: dst + j itself
  }
}

// Grid: x over sorted positions, y over chunks of 128 dims; a thread per dim. Only the blocks at
// the first sorted position of each id do work: they sum that id's rows in sorted (= token) order,
// deterministically, in float32 and round once; the blocks at later positions of a run exit.
template <typename T>
__global__ void backward_kernel(const void* __restrict__ grad, const int64_t* __restrict__ sorted_ids,
                                const int64_t* __restrict__ order, const int64_t* __restrict__ seg_end,
                                void* grad_weight, int64_t n_tokens, int64_t d, int64_t num_weights,
                                int64_t padding_idx, bool scale_by_freq) {
  const int64_t i = blockIdx.x;  // sorted position (grid x allows 2^31 - 1)
  const int64_t j = blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n_tokens || j >= d) return;
  const int64_t id = sorted_ids[i];
  // Out-of-range ids get no row (sorted, so each run is skipped as a whole).
  if ((i > 0 && sorted_ids[i - 1] == id) || id == padding_idx || id < 0 || id >= num_weights) return;
  const int64_t end = seg_end[i];
  float acc = 0.0f;
  for (int64_t s = i; s < end; ++s)
    acc = neft::add_rn(acc, Io<T>::to_f32(static_cast<const T*>(grad)[order[s] * d + j]));
  if (scale_by_freq) acc = neft::div_rn(acc, static_cast<float>(end - i));
  static_cast<T*>(grad_weight)[id * d + j] = Io<T>::from_f32(acc);
}

// Whether a forward thread moves 16 bytes (kVec lanes): where d = 4q with q, the row stride and both
// pointers aligned for it; else one lane.
template <typename T>
inline bool forward_vectorised(int64_t d, int64_t w_stride, const void* weight, const void* out) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t q = (d + 3) / 4;
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return d == 4 * q && q % kVec == 0 && w_stride % kVec == 0 && aligned(weight) && aligned(out);
}

constexpr int64_t kForwardThreads = 256;  // per block; the grid covers n_tokens * lane groups flat

// The forward kernel a launch runs, as a type: storage type, noise stream, lanes per thread.
template <typename T, bool Gaussian, int Vec>
struct ForwardVariant {
  using type = T;
  static constexpr bool kGaussian = Gaussian;
  static constexpr int kVec = Vec;
};

// Calls fn(TypeTag<T>{}) with T the storage type of dtype on the GPU: bfloat16 as raw words.
template <typename Fn>
decltype(auto) dispatch_storage(DType dtype, Fn&& fn) {
  return dispatch_dtype<float, uint16_t, __half>(dtype, fn);
}

// Calls fn(ForwardVariant<...>{}) for the variant that serves these arguments: the launcher and the
// CPU emulation both choose through it.
template <typename Fn>
decltype(auto) dispatch_forward(DType dtype, bool gaussian, int64_t d, int64_t w_stride, const void* weight,
                                const void* out, Fn&& fn) {
  return dispatch_storage(dtype, [&](auto tag) -> decltype(auto) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(T);
    const bool vector = forward_vectorised<T>(d, w_stride, weight, out);
    if (gaussian) return vector ? fn(ForwardVariant<T, true, kVec>{}) : fn(ForwardVariant<T, true, 1>{});
    return vector ? fn(ForwardVariant<T, false, kVec>{}) : fn(ForwardVariant<T, false, 1>{});
  });
}

constexpr int kBackwardThreads = 128;  // dims per backward block; grid: (sorted positions, d / 128)

}  // namespace neft::cuda
