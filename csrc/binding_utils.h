// Argument preparation shared by the CPU and CUDA bindings (torch side only).
#pragma once

#include <torch/extension.h>

#include <vector>

#include "dtype.h"

namespace neft {

struct ForwardArgs {
  torch::Tensor ids;     // int64, contiguous
  torch::Tensor weight;  // unit stride along the embedding dim
};

// Ids of any shape as contiguous int64 (the kernels read them flat); the weight with unit stride along
// the embedding dim. Tensors that already qualify pass through without a dispatcher call: this is
// on every call's path.
inline ForwardArgs prepare_forward(const torch::Tensor& ids, const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D");
  const bool ids_ready = ids.scalar_type() == torch::kLong && ids.is_contiguous();
  return {ids_ready ? ids : ids.to(torch::kLong).contiguous(), weight.stride(1) == 1 ? weight : weight.contiguous()};
}

// A float32 contiguous view of t, or t itself where it is one already.
inline torch::Tensor float_contiguous(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat && t.is_contiguous() ? t : t.to(torch::kFloat).contiguous();
}

// The forward's output shape: the ids' shape plus the embedding dim.
inline std::vector<int64_t> output_sizes(const torch::Tensor& ids, int64_t d) {
  std::vector<int64_t> sizes(ids.sizes().begin(), ids.sizes().end());
  sizes.push_back(d);
  return sizes;
}

// The kernels' dtype of a weight or gradient: the one place that maps torch dtypes (the kernels
// then dispatch on DType with dispatch_dtype, dtype.h).
inline DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat:
      return DType::kFloat32;
    case torch::kBFloat16:
      return DType::kBFloat16;
    case torch::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, "dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

}  // namespace neft
