// csrc/cuda's kernels (kernels.cuh) run on the CPU, one (block, thread) at a time, with the launch
// shape of noisy_embedding.cu: the suite checks their bits against the reference without a GPU
// (tests/kernels/test_cuda_emulated.py builds this with the host compiler and loads it with ctypes).
// The shared float helpers take their host branches (IEEE operations, rounded to nearest like the
// device intrinsics); what this checks is the kernels' indexing, vector paths, NaN rows, bad-id
// records and summation order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

// The CUDA built-ins the kernels use, for the host.
#undef __global__
#define __global__
#undef __device__
#define __device__
#define __restrict__ __restrict
struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
static EmulatedDim3 blockIdx, blockDim, threadIdx;
static inline float __int_as_float(int bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
static inline long long atomicMin(long long* p, long long v) {
  const long long old = *p;
  *p = std::min(old, v);
  return old;
}
static inline long long atomicMax(long long* p, long long v) {
  const long long old = *p;
  *p = std::max(old, v);
  return old;
}

#include "../../csrc/cuda/kernels.cuh"

namespace {

template <typename T, bool kGaussian, int kVec>
void run_forward(const int64_t* ids, const void* weight, void* out, const float* scales, float scale_value,
                 const int64_t* seed_ptr, uint64_t seed, uint64_t offset, int64_t n_tokens, int64_t d, int64_t w_stride,
                 int64_t num_rows, long long* bad_ids) {
  const int64_t threads = neft::cuda::forward_threads(n_tokens, d, kVec), per_block = neft::cuda::kForwardThreads;
  blockDim = {static_cast<unsigned>(per_block), 1, 1};
  for (int64_t b = 0; b < (threads + per_block - 1) / per_block; ++b) {
    for (int64_t t = 0; t < per_block; ++t) {
      blockIdx = {static_cast<unsigned>(b), 0, 0};
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      neft::cuda::forward_kernel<T, kGaussian, kVec>(ids, weight, out, scales, scale_value, seed_ptr, seed, offset,
                                                     n_tokens, d, w_stride, num_rows, bad_ids);
    }
  }
}

template <typename T>
int forward(const int64_t* ids, const void* weight, void* out, const float* scales, float scale_value,
            const int64_t* seed_ptr, uint64_t seed, uint64_t offset, int64_t n_tokens, int64_t d, int64_t w_stride,
            int64_t num_rows, long long* bad_ids, bool gaussian) {
  constexpr int kVec = 16 / sizeof(T);
  const int lanes = neft::cuda::forward_lanes<T>(d, w_stride, weight, out);
  const auto run = lanes > 1 ? (gaussian ? run_forward<T, true, kVec> : run_forward<T, false, kVec>)
                             : (gaussian ? run_forward<T, true, 1> : run_forward<T, false, 1>);
  run(ids, weight, out, scales, scale_value, seed_ptr, seed, offset, n_tokens, d, w_stride, num_rows, bad_ids);
  return lanes;
}

template <typename T>
void backward(const void* grad, const int64_t* sorted_ids, const int64_t* order, const int64_t* seg_end,
              void* grad_weight, int64_t n_tokens, int64_t d, int64_t num_weights, int64_t padding_idx,
              bool scale_by_freq) {
  const int per_block = neft::cuda::kBackwardThreads;
  blockDim = {static_cast<unsigned>(per_block), 1, 1};
  for (int64_t x = 0; x < n_tokens; ++x) {
    for (int64_t y = 0; y < (d + per_block - 1) / per_block; ++y) {
      for (int t = 0; t < per_block; ++t) {
        blockIdx = {static_cast<unsigned>(x), static_cast<unsigned>(y), 0};
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        neft::cuda::backward_kernel<T>(grad, sorted_ids, order, seg_end, grad_weight, n_tokens, d, num_weights,
                                       padding_idx, scale_by_freq);
      }
    }
  }
}

}  // namespace

// dtype: 0 float32, 1 bfloat16 (raw words), 2 float16. Returns the lanes per thread the launcher
// picked (16 bytes' worth, or 1).
extern "C" int emulated_forward(int dtype, const int64_t* ids, const void* weight, void* out, const float* scales,
                                float scale_value, const int64_t* seed_ptr, uint64_t seed, uint64_t offset,
                                int64_t n_tokens, int64_t d, int64_t w_stride, int64_t num_rows, long long* bad_ids,
                                bool gaussian) {
  switch (dtype) {
    case 0:
      return forward<float>(ids, weight, out, scales, scale_value, seed_ptr, seed, offset, n_tokens, d, w_stride,
                            num_rows, bad_ids, gaussian);
    case 1:
      return forward<uint16_t>(ids, weight, out, scales, scale_value, seed_ptr, seed, offset, n_tokens, d, w_stride,
                               num_rows, bad_ids, gaussian);
    default:
      return forward<__half>(ids, weight, out, scales, scale_value, seed_ptr, seed, offset, n_tokens, d, w_stride,
                             num_rows, bad_ids, gaussian);
  }
}

extern "C" void emulated_backward(int dtype, const void* grad, const int64_t* sorted_ids, const int64_t* order,
                                  const int64_t* seg_end, void* grad_weight, int64_t n_tokens, int64_t d,
                                  int64_t num_weights, int64_t padding_idx, bool scale_by_freq) {
  switch (dtype) {
    case 0:
      return backward<float>(grad, sorted_ids, order, seg_end, grad_weight, n_tokens, d, num_weights, padding_idx,
                             scale_by_freq);
    case 1:
      return backward<uint16_t>(grad, sorted_ids, order, seg_end, grad_weight, n_tokens, d, num_weights, padding_idx,
                                scale_by_freq);
    default:
      return backward<__half>(grad, sorted_ids, order, seg_end, grad_weight, n_tokens, d, num_weights, padding_idx,
                              scale_by_freq);
  }
}
