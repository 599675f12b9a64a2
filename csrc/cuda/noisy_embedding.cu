// Launchers of the CUDA kernels (kernels.cuh): fused NEFTune forward (spec v2, uniform or Gaussian,
// bit-exact) and the deterministic embedding backward with float32 accumulation. Raw pointers and a
// cudaStream_t only: no torch headers, so nvcc compiles this file alone (tests compile it for
// sm_80/sm_90 with -Xptxas -v, and check its PTX for FMA). Every float operation goes through an
// explicit round-to-nearest intrinsic (philox.h, gaussian.h), so no FMA appears even without
// --fmad=false.
#include <cstdint>

#include "kernels.cuh"
#include "noisy_embedding.h"

namespace {

using neft::cuda::backward_kernel;
using neft::cuda::forward_kernel;

template <typename T, bool kGaussian, int kVec>
cudaError_t launch_forward_vec(const int64_t* ids, const void* weight, void* out, const float* scales,
                               float scale_value, const int64_t* seed_ptr, uint64_t seed, uint64_t offset,
                               int64_t n_tokens, int64_t d, int64_t w_stride, int64_t num_rows, long long* bad_ids,
                               cudaStream_t stream) {
  constexpr int64_t kThreads = neft::cuda::kForwardThreads;
  const int64_t blocks = (neft::cuda::forward_threads(n_tokens, d, kVec) + kThreads - 1) / kThreads;
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;  // grid x's limit
  const dim3 grid(static_cast<unsigned>(blocks));
  forward_kernel<T, kGaussian, kVec><<<grid, kThreads, 0, stream>>>(
      ids, weight, out, scales, scale_value, seed_ptr, seed, offset, n_tokens, d, w_stride, num_rows, bad_ids);
  return cudaGetLastError();
}

template <typename T, bool kGaussian>
cudaError_t launch_forward(const int64_t* ids, const void* weight, void* out, const float* scales, float scale_value,
                           const int64_t* seed_ptr, uint64_t seed, uint64_t offset, int64_t n_tokens, int64_t d,
                           int64_t w_stride, int64_t num_rows, long long* bad_ids, cudaStream_t stream) {
  const auto launch = neft::cuda::forward_lanes<T>(d, w_stride, weight, out) > 1
                          ? launch_forward_vec<T, kGaussian, 16 / sizeof(T)>
                          : launch_forward_vec<T, kGaussian, 1>;
  return launch(ids, weight, out, scales, scale_value, seed_ptr, seed, offset, n_tokens, d, w_stride, num_rows, bad_ids,
                stream);
}

template <typename T>
cudaError_t launch_backward(const void* grad, const int64_t* sorted_ids, const int64_t* order, const int64_t* seg_end,
                            void* grad_weight, int64_t n_tokens, int64_t d, int64_t num_weights, int64_t padding_idx,
                            bool scale_by_freq, cudaStream_t stream) {
  constexpr int kThreads = neft::cuda::kBackwardThreads;
  const dim3 grid(static_cast<unsigned>(n_tokens), static_cast<unsigned>((d + kThreads - 1) / kThreads));
  backward_kernel<T><<<grid, kThreads, 0, stream>>>(grad, sorted_ids, order, seg_end, grad_weight, n_tokens, d,
                                                    num_weights, padding_idx, scale_by_freq);
  return cudaGetLastError();
}

// The storage type of each dtype on the GPU: bfloat16 as raw words, rounded by integer ops.
template <typename Fn>
cudaError_t dispatch_cuda(neft::DType dtype, Fn&& fn) {
  return neft::dispatch_dtype<float, uint16_t, __half>(dtype, fn);
}

}  // namespace

namespace neft {

cudaError_t noisy_embedding_forward_cuda(DType dtype, const int64_t* ids, const void* weight, void* out,
                                         const float* scales, float scale_value, const int64_t* seed_ptr, uint64_t seed,
                                         uint64_t offset, int64_t n_tokens, int64_t d, int64_t w_stride,
                                         int64_t num_rows, long long* bad_ids, bool gaussian, cudaStream_t stream) {
  return dispatch_cuda(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto launch = gaussian ? launch_forward<T, true> : launch_forward<T, false>;
    return launch(ids, weight, out, scales, scale_value, seed_ptr, seed, offset, n_tokens, d, w_stride, num_rows,
                  bad_ids, stream);
  });
}

cudaError_t embedding_backward_cuda(DType dtype, const void* grad, const int64_t* sorted_ids, const int64_t* order,
                                    const int64_t* seg_end, void* grad_weight, int64_t n_tokens, int64_t d,
                                    int64_t num_weights, int64_t padding_idx, bool scale_by_freq, cudaStream_t stream) {
  return dispatch_cuda(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_backward<T>(grad, sorted_ids, order, seg_end, grad_weight, n_tokens, d, num_weights, padding_idx,
                              scale_by_freq, stream);
  });
}

}  // namespace neft
