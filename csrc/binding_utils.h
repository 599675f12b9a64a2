// Argument preparation shared by the CPU and CUDA bindings (torch side only).
#pragma once

#include <torch/extension.h>

#include <vector>

namespace neft {

struct ForwardArgs {
  torch::Tensor ids;     // int64, contiguous
  torch::Tensor weight;  // unit stride along the embedding dim
};

// Ids of any shape as a flat int64 tensor; the weight with unit stride along the embedding dim.
inline ForwardArgs prepare_forward(const torch::Tensor& ids, const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D");
  return {ids.to(torch::kLong).contiguous().view(-1), weight.stride(1) == 1 ? weight : weight.contiguous()};
}

// The forward's output shape: the ids' shape plus the embedding dim.
inline std::vector<int64_t> output_sizes(const torch::Tensor& ids, int64_t d) {
  std::vector<int64_t> sizes(ids.sizes().begin(), ids.sizes().end());
  sizes.push_back(d);
  return sizes;
}

}  // namespace neft
