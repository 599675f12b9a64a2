// Launchers of the CUDA kernels: raw pointers and a stream, no torch types.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../dtype.h"

namespace neft {

// (n_tokens,) ids into a (V, d) weight with row stride w_stride -> (n_tokens, d) out, spec v2:
// uniform noise, or Gaussian (gaussian.h) with ``gaussian``.
// scales: (n_tokens,) float32, or nullptr to use scale_value for every token. seed_ptr: the seed in
// device memory (graph-safe), or nullptr to use seed. num_rows = V: an id outside [0, V) is never
// read, its output row is NaN, and bad_ids (device, {min, max, V}; may be nullptr) records it.
cudaError_t noisy_embedding_forward_cuda(DType dtype, const int64_t* ids, const void* weight, void* out,
                                         const float* scales, float scale_value, const int64_t* seed_ptr, uint64_t seed,
                                         uint64_t offset, int64_t n_tokens, int64_t d, int64_t w_stride,
                                         int64_t num_rows, long long* bad_ids, bool gaussian, cudaStream_t stream);

// grad (n_tokens, d) -> grad_weight (V, d), zero-initialised by the caller; ids sorted stably with
// their order and the end of each id's run (searchsorted right). Ids outside [0, num_weights) are
// skipped.
cudaError_t embedding_backward_cuda(DType dtype, const void* grad, const int64_t* sorted_ids, const int64_t* order,
                                    const int64_t* seg_end, void* grad_weight, int64_t n_tokens, int64_t d,
                                    int64_t num_weights, int64_t padding_idx, bool scale_by_freq, cudaStream_t stream);

}  // namespace neft
