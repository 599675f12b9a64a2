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
// read, its output row is NaN, bad_ids (device, {min, max, V}; may be nullptr) records it and
// bad_word (a mapped host int; may be nullptr) is set to 1.
// after_scales: the stream's last launch was token_scales_cuda's, writing scales, and nothing the
// forward reads but scales: the forward may then start while it runs (dependent_launches). The
// stream must be the current device's (as for token_scales_cuda).
cudaError_t noisy_embedding_forward_cuda(DType dtype, const int64_t* ids, const void* weight, void* out,
                                         const float* scales, float scale_value, const int64_t* seed_ptr, uint64_t seed,
                                         uint64_t offset, int64_t n_tokens, int64_t d, int64_t w_stride,
                                         int64_t num_rows, long long* bad_ids, int* bad_word, bool gaussian,
                                         bool after_scales, cudaStream_t stream);

// An integer or bool side input as a (rows, width) view (stride 0 along a broadcast dim) of elements
// of ``bytes`` bytes; data nullptr where absent. cu_seqlens: 1-D, its stride in s1.
struct SideView {
  const void* data = nullptr;
  int64_t s0 = 0, s1 = 0;
  int bytes = 8;
};

// What the per-token scales of rows * width tokens depend on; alpha_ptr: alpha in device memory (a
// graph's alpha tensor), else alpha.
struct ScaleArgs {
  SideView mask, positions, noise_mask, cu_seqlens;
  int64_t n_cu = 0, rows = 0, width = 0, d = 0;
  double alpha = 0.0;
  const double* alpha_ptr = nullptr;
};

// Device indices below this have per-device state (the overlap decision, the id check's word).
constexpr int kMaxDevices = 1024;

// Whether launches that follow one of ours on ``device`` may overlap it (programmatic dependent
// launch): on Hopper (sm_90) GPUs running this build's sm_90 code, with a CUDA 12.3+ driver, unless
// NEFT_KERNELS_CUDA_PDL=0.
bool dependent_launches(int device);

// cudaSuccess where this build has kernels for the current device (setup.py's architectures), else
// the error a launch would give (cudaErrorNoKernelImageForDevice).
cudaError_t kernel_image_status();

// int64 elements of workspace token_scales_cuda needs (0: none, the nullptr it then takes).
int64_t token_scales_workspace(int64_t rows, int64_t width);

// Spec v2's per-token scales (scales.cuh) into out (rows * width float32): one launch where rows fit
// in a tile, else two.
cudaError_t token_scales_cuda(const ScaleArgs& args, int64_t* workspace, float* out, cudaStream_t stream);

// grad (n_tokens, d) -> grad_weight (V, d), zero-initialised by the caller; ids sorted stably with
// their order and the end of each id's run (searchsorted right). Ids outside [0, num_weights) are
// skipped.
cudaError_t embedding_backward_cuda(DType dtype, const void* grad, const int64_t* sorted_ids, const int64_t* order,
                                    const int64_t* seg_end, void* grad_weight, int64_t n_tokens, int64_t d,
                                    int64_t num_weights, int64_t padding_idx, bool scale_by_freq, cudaStream_t stream);

}  // namespace neft
