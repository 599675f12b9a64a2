// Argument preparation shared by the CPU and CUDA bindings (torch side only).
#pragma once

#include <torch/extension.h>

namespace neft {

struct ForwardArgs {
  torch::Tensor ids;     // int64, contiguous
  torch::Tensor weight;  // unit stride along the embedding dim
  c10::optional<torch::Tensor> scales;  // float32, contiguous, or none
};

inline ForwardArgs prepare_forward(const torch::Tensor& ids, const torch::Tensor& weight,
                                   const c10::optional<torch::Tensor>& scales) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D");
  ForwardArgs args{ids.to(torch::kLong).contiguous(), weight.stride(1) == 1 ? weight : weight.contiguous(), c10::nullopt};
  if (scales) args.scales = scales->to(torch::kFloat).contiguous();
  return args;
}

// Host tensors only (a device check would need a sync): the kernels index rows with these ids, so
// this also guards paths that skip Python's validation, such as compiled graphs.
inline void check_id_range(const torch::Tensor& ids, int64_t num_embeddings) {
  if (ids.numel() == 0) return;
  const auto [lo, hi] = torch::aminmax(ids);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < num_embeddings, "input_ids must lie in [0, ",
              num_embeddings, "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
}

}  // namespace neft
