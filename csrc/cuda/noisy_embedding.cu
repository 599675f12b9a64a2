// Launchers of the CUDA kernels (kernels.cuh, scales.cuh): per-token scales, fused NEFTune forward
// (spec v2, uniform or Gaussian, bit-exact) and the deterministic embedding backward with float32
// accumulation. Raw pointers and a
// cudaStream_t only: no torch headers, so nvcc compiles this file alone (tests compile it for
// sm_80/sm_90 with -Xptxas -v, and check its PTX for FMA). Every float operation goes through an
// explicit round-to-nearest intrinsic (philox.h, gaussian.h), so no FMA appears even without
// --fmad=false.
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "kernels.cuh"
#include "noisy_embedding.h"
#include "scales.cuh"

namespace {

using neft::cuda::backward_kernel;
using neft::cuda::forward_kernel;

// kernel<<<blocks, threads, 0, stream>>>(args...), or, where ``dependent`` and
// dependent_launches() allow it, a programmatic dependent launch (dependent_launch.cuh): the kernel
// may start while the stream's previous kernel runs, and must read that kernel's output only after
// wait_for_prerequisites.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), int64_t blocks, int threads, cudaStream_t stream, bool dependent,
                   Args... args) {
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;  // grid x's limit
  int device = 0;
  if (dependent) {
    const cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
  }
  cudaLaunchAttribute overlap;
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.stream = stream;
  config.attrs = &overlap;
  config.numAttrs = dependent && neft::dependent_launches(device) ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, args...);
  if (err != cudaSuccess) cudaGetLastError();  // returned here: not left behind for the next launch's check
  return err;
}

template <typename T>
cudaError_t launch_backward(const void* grad, const int64_t* sorted_ids, const int64_t* order, const int64_t* seg_end,
                            void* grad_weight, int64_t n_tokens, int64_t d, int64_t num_weights, int64_t padding_idx,
                            bool scale_by_freq, cudaStream_t stream) {
  constexpr int kThreads = neft::cuda::kBackwardThreads;
  if (n_tokens > 0x7FFFFFFF) return cudaErrorInvalidConfiguration;  // grid x's limit (a cast would wrap)
  const dim3 grid(static_cast<unsigned>(n_tokens), static_cast<unsigned>((d + kThreads - 1) / kThreads));
  backward_kernel<T><<<grid, kThreads, 0, stream>>>(grad, sorted_ids, order, seg_end, grad_weight, n_tokens, d,
                                                    num_weights, padding_idx, scale_by_freq);
  return cudaGetLastError();
}

}  // namespace

namespace neft {

cudaError_t noisy_embedding_forward_cuda(DType dtype, const int64_t* ids, const void* weight, void* out,
                                         const float* scales, float scale_value, const int64_t* seed_ptr, uint64_t seed,
                                         uint64_t offset, int64_t n_tokens, int64_t d, int64_t w_stride,
                                         int64_t num_rows, long long* bad_ids, int* bad_word, bool gaussian,
                                         bool after_scales, cudaStream_t stream) {
  return cuda::dispatch_forward(dtype, gaussian, d, w_stride, weight, out, [&](auto variant) {
    using V = decltype(variant);
    constexpr int64_t kThreads = cuda::kForwardThreads;
    const cuda::LaneGroups lanes = cuda::lane_groups(n_tokens, d, V::kVec);
    return launch(forward_kernel<typename V::type, V::kGaussian, V::kVec>, (lanes.threads + kThreads - 1) / kThreads,
                  kThreads, stream, after_scales, ids, weight, out, scales, scale_value, seed_ptr, seed, offset, lanes,
                  d, w_stride, num_rows, bad_ids, bad_word);
  });
}

bool dependent_launches(int device) {
  // Once per process: the switch and the driver (which must capture such launches into graphs:
  // CUDA 12.3; the headers' version says nothing of the driver's).
  static const bool allowed = [] {
    const char* v = std::getenv("NEFT_KERNELS_CUDA_PDL");
    int driver = 0;
    return (v == nullptr || std::strcmp(v, "0") != 0) && CUDART_VERSION >= 12030 &&
           cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12030;
  }();
  if (!allowed) return false;
  // Hopper only, and only where the kernels it runs are sm_90 code, which waits (sm_80's has no
  // griddepcontrol: a build without sm_90 would run that on a Hopper GPU); later architectures stay
  // in order until they are tested. Decided once per device.
  static std::array<std::atomic<int>, kMaxDevices> decided{};  // 0 unknown, 1 no, 2 yes
  if (device < 0 || device >= kMaxDevices) return false;
  int state = decided[device].load(std::memory_order_relaxed);
  if (state == 0) {
    int major = 0;
    cudaFuncAttributes kernel = {};
    cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess && major == 9) err = cudaFuncGetAttributes(&kernel, cuda::forward_kernel<float, false, 1>);
    if (err != cudaSuccess) cudaGetLastError();  // a failed query, not a launch error: not left for the next check
    const bool yes = err == cudaSuccess && major == 9 && kernel.binaryVersion >= 90;
    state = yes ? 2 : 1;
    decided[device].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

cudaError_t kernel_image_status() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, cuda::forward_kernel<float, false, 1>);
}

int64_t token_scales_workspace(int64_t rows, int64_t width) { return cuda::scale_workspace(rows, width); }

cudaError_t token_scales_cuda(const ScaleArgs& args, int64_t* workspace, float* out, cudaStream_t stream) {
  const int64_t tiles = cuda::scale_tiles_per_row(args.width), blocks = args.rows * tiles;
  if (blocks == 0) return cudaSuccess;
  if (tiles > 1) {
    const cudaError_t err =
        launch(cuda::tile_summary_kernel, blocks, cuda::kScaleThreads, stream, false, args, tiles, workspace);
    if (err != cudaSuccess) return err;
  }
  // After the summaries' kernel, the scales kernel's own scans overlap it.
  return launch(cuda::token_scales_kernel, blocks, cuda::kScaleThreads, stream, tiles > 1, args, tiles,
                tiles > 1 ? workspace : static_cast<int64_t*>(nullptr), out);
}

cudaError_t embedding_backward_cuda(DType dtype, const void* grad, const int64_t* sorted_ids, const int64_t* order,
                                    const int64_t* seg_end, void* grad_weight, int64_t n_tokens, int64_t d,
                                    int64_t num_weights, int64_t padding_idx, bool scale_by_freq, cudaStream_t stream) {
  return cuda::dispatch_storage(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_backward<T>(grad, sorted_ids, order, seg_end, grad_weight, n_tokens, d, num_weights, padding_idx,
                              scale_by_freq, stream);
  });
}

}  // namespace neft
