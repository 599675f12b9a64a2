// Torch binding of the CUDA kernels (noisy_embedding.h): checks, the stable sort for the backward,
// stream and dtype.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../binding_utils.h"
#include "noisy_embedding.h"

namespace {

void check(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "neft_kernels CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

// ids of any shape into a (V, d) weight -> ids.shape + (d,) noisy rows, spec v2: uniform noise, or
// Gaussian with ``gaussian``. scales: (N,) per-token scales, else ``scale_value`` for every token.
// seed_tensor: a 0-d int64 CUDA tensor read by the kernel (graph-safe), else ``seed``. bad_ids: a
// (3,) int64 CUDA tensor {min, max, V} that records out-of-range ids, or none.
torch::Tensor noisy_embedding_forward(const torch::Tensor& ids_in, const torch::Tensor& weight_in,
                                      const c10::optional<torch::Tensor>& scales_in, double scale_value, int64_t seed,
                                      int64_t offset, const c10::optional<torch::Tensor>& seed_tensor,
                                      const c10::optional<torch::Tensor>& bad_ids, bool gaussian) {
  TORCH_CHECK(weight_in.is_cuda() && ids_in.is_cuda(), "backend='cuda' needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const auto [ids, weight] = neft::prepare_forward(ids_in, weight_in);
  const neft::DType dtype = neft::dtype_of(weight);
  if (scales_in) TORCH_CHECK(scales_in->is_cuda() && scales_in->numel() == ids.numel(), "scales: one per token");
  const c10::optional<torch::Tensor> scales =
      scales_in ? c10::optional<torch::Tensor>(neft::float_contiguous(*scales_in)) : c10::nullopt;
  torch::Tensor out = torch::empty(neft::output_sizes(ids_in, weight.size(1)), weight.options());
  if (ids.numel() == 0 || weight.size(1) == 0) return out;
  if (seed_tensor) TORCH_CHECK(seed_tensor->is_cuda() && seed_tensor->scalar_type() == torch::kLong, "seed tensor");
  if (bad_ids)
    TORCH_CHECK(bad_ids->is_cuda() && bad_ids->scalar_type() == torch::kLong && bad_ids->numel() >= 3, "bad_ids");
  check(neft::noisy_embedding_forward_cuda(
      dtype, ids.data_ptr<int64_t>(), weight.data_ptr(), out.data_ptr(), scales ? scales->data_ptr<float>() : nullptr,
      static_cast<float>(scale_value), seed_tensor ? seed_tensor->data_ptr<int64_t>() : nullptr,
      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), ids.numel(), weight.size(1), weight.stride(0),
      weight.size(0), bad_ids ? reinterpret_cast<long long*>(bad_ids->data_ptr<int64_t>()) : nullptr, gaussian,
      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

torch::Tensor embedding_backward(const torch::Tensor& grad_in, const torch::Tensor& ids_in, int64_t num_weights,
                                 int64_t padding_idx, bool scale_grad_by_freq) {
  TORCH_CHECK(grad_in.is_cuda() && ids_in.is_cuda(), "backend='cuda' needs CUDA tensors");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const torch::Tensor grad = grad_in.contiguous();
  const torch::Tensor ids = ids_in.to(torch::kLong).contiguous().view(-1);
  const neft::DType dtype = neft::dtype_of(grad);
  torch::Tensor grad_weight = torch::zeros({num_weights, grad.size(1)}, grad.options());
  if (ids.numel() == 0 || grad.size(1) == 0) return grad_weight;
  auto [sorted_ids, order] = at::sort(ids, /*stable=*/std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const torch::Tensor seg_end = torch::searchsorted(sorted_ids, sorted_ids, /*out_int32=*/false, /*right=*/true);
  check(neft::embedding_backward_cuda(dtype, grad.data_ptr(), sorted_ids.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                                      seg_end.data_ptr<int64_t>(), grad_weight.data_ptr(), ids.numel(), grad.size(1),
                                      num_weights, padding_idx, scale_grad_by_freq,
                                      c10::cuda::getCurrentCUDAStream().stream()));
  return grad_weight;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ABI_VERSION") = 4;  // neft_kernels/backends/_extension.py refuses a build from other sources
  m.def("forward", &noisy_embedding_forward, "fused NEFTune forward, noise spec v2: uniform or Gaussian (CUDA)");
  m.def("backward", &embedding_backward, "deterministic embedding backward, float32 accumulation (CUDA)");
}
