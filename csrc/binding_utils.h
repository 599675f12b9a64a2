// Argument preparation shared by the CPU and CUDA bindings (torch side only).
#pragma once

#include <torch/extension.h>

#include <utility>
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

// A side input's strides as a (rows, width) view: 0-, 1- or 2-D, each dim of its size or 1
// (broadcast: stride 0); an integer or bool tensor. Returns {row stride, column stride}.
inline std::pair<int64_t, int64_t> side_strides(const torch::Tensor& t, int64_t rows, int64_t width, const char* name) {
  TORCH_CHECK(!t.is_floating_point() && !t.is_complex(), name, " must be an integer or bool tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() <= 2, name, " reaches the kernel as (rows, width), got shape ", t.sizes());
  int64_t s0 = 0, s1 = 0;
  if (t.dim() >= 1) {
    const int64_t size = t.size(-1);
    TORCH_CHECK(size == width || size == 1, name, " of shape ", t.sizes(), " does not fit rows of width ", width);
    s1 = size == 1 ? 0 : t.stride(-1);
  }
  if (t.dim() == 2) {
    const int64_t size = t.size(0);
    TORCH_CHECK(size == rows || size == 1, name, " of shape ", t.sizes(), " does not fit ", rows, " rows");
    s0 = size == 1 ? 0 : t.stride(0);
  }
  return {s0, s1};
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
