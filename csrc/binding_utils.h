// Argument preparation shared by the CPU and CUDA bindings (torch side only).
#pragma once

#include <torch/extension.h>

namespace neft {

struct ForwardArgs {
  torch::Tensor ids;     // int64, contiguous
  torch::Tensor weight;  // unit stride along the embedding dim
};

inline ForwardArgs prepare_forward(const torch::Tensor& ids, const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D");
  return {ids.to(torch::kLong).contiguous(), weight.stride(1) == 1 ? weight : weight.contiguous()};
}

}  // namespace neft
