// csrc/cuda's kernels (kernels.cuh) run on the CPU, one (block, thread) at a time, with the variant
// choice and launch shape of noisy_embedding.cu: the suite checks their bits against the reference
// without a GPU
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

// Every (block, thread) of a launch in turn; blockDim as the launcher sets it.
template <typename Kernel>
void run_grid(int64_t blocks_x, int64_t blocks_y, int64_t threads, Kernel&& kernel) {
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  for (int64_t x = 0; x < blocks_x; ++x) {
    for (int64_t y = 0; y < blocks_y; ++y) {
      for (int64_t t = 0; t < threads; ++t) {
        blockIdx = {static_cast<unsigned>(x), static_cast<unsigned>(y), 0};
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        kernel();
      }
    }
  }
}

neft::DType dtype_of(int code) {
  return code == 0 ? neft::DType::kFloat32 : code == 1 ? neft::DType::kBFloat16 : neft::DType::kFloat16;
}

}  // namespace

// dtype: 0 float32, 1 bfloat16 (raw words), 2 float16. The variant, grid and block of
// noisy_embedding.cu's launch; returns the lanes per thread it picked (16 bytes' worth, or 1).
extern "C" int emulated_forward(int dtype, const int64_t* ids, const void* weight, void* out, const float* scales,
                                float scale_value, const int64_t* seed_ptr, uint64_t seed, uint64_t offset,
                                int64_t n_tokens, int64_t d, int64_t w_stride, int64_t num_rows, long long* bad_ids,
                                bool gaussian) {
  return neft::cuda::dispatch_forward(dtype_of(dtype), gaussian, d, w_stride, weight, out, [&](auto variant) {
    using V = decltype(variant);
    const int64_t threads = neft::cuda::kForwardThreads;
    run_grid((neft::cuda::forward_threads(n_tokens, d, V::kVec) + threads - 1) / threads, 1, threads, [&] {
      neft::cuda::forward_kernel<typename V::type, V::kGaussian, V::kVec>(
          ids, weight, out, scales, scale_value, seed_ptr, seed, offset, n_tokens, d, w_stride, num_rows, bad_ids);
    });
    return V::kVec;
  });
}

extern "C" void emulated_backward(int dtype, const void* grad, const int64_t* sorted_ids, const int64_t* order,
                                  const int64_t* seg_end, void* grad_weight, int64_t n_tokens, int64_t d,
                                  int64_t num_weights, int64_t padding_idx, bool scale_by_freq) {
  neft::cuda::dispatch_storage(dtype_of(dtype), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int threads = neft::cuda::kBackwardThreads;
    run_grid(n_tokens, (d + threads - 1) / threads, threads, [&] {
      neft::cuda::backward_kernel<T>(grad, sorted_ids, order, seg_end, grad_weight, n_tokens, d, num_weights,
                                     padding_idx, scale_by_freq);
    });
  });
}
