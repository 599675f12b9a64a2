// The eager path's autograd node, shared by the CPU and CUDA bindings (torch side only): the rule of
// neft_kernels/ops.py's _NoisyEmbeddingFunction (the weight's gradient is the backward kernel of the
// output gradient's rows; nothing else gets one; the gradient differentiable again), native because a Python
// autograd.Function alone costs about as much host time as F.embedding's whole call. Built the way
// ATen's generated nodes are (EmbeddingBackward0).
#pragma once

#include <torch/extension.h>

#include <torch/csrc/autograd/functions/utils.h>

#include <functional>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

namespace neft {

// A new autograd node: torch 2.13 holds them by c10::intrusive_ptr, older releases (2.11) by
// std::shared_ptr with their iterative deleter (found by argument-dependent lookup: 2.13 has none).
// The one torch-version-sensitive point of the C++ sources.
template <class T>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, T>) {
    return c10::make_intrusive<T>();
  } else {
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });
  }
}

// (N, d) grad rows, (N,) ids, V, padding_idx (-1: none), scale_grad_by_freq -> (V, d) weight gradient.
using BackwardKernel = torch::Tensor (*)(const torch::Tensor&, const torch::Tensor&, int64_t, int64_t, bool);

// The weight gradient's own backward (create_graph): the gradient is linear in the output gradient,
// so this gathers a cotangent's rows at the ids, none for padding_idx, as F.embedding's double
// backward does (embedding_dense_double_backward; not divided by scale_grad_by_freq's counts: that
// gradient is a rescaling, and so a Hessian-vector product is the derivative of the gradient
// returned), with differentiable ops so that higher derivatives record on. The Python
// _WeightGradFunction's backward is the same.
struct NoisyEmbeddingGradBackward : torch::autograd::Node {
  torch::autograd::SavedVariable ids;  // flat
  int64_t padding_idx = -1;
  std::vector<int64_t> grad_sizes;

  std::string name() const override { return "NoisyEmbeddingGradBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    ids.reset_data();
  }
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grads[0].defined()) return {torch::Tensor()};
    const torch::Tensor flat_ids = ids.unpack();
    torch::Tensor rows = grads[0].index_select(0, flat_ids);
    if (padding_idx >= 0) rows = rows.masked_fill(flat_ids.eq(padding_idx).unsqueeze(-1), 0);
    return {rows.reshape(grad_sizes)};
  }
};

struct NoisyEmbeddingBackward : torch::autograd::Node {
  torch::autograd::SavedVariable ids;
  int64_t num_weights = 0, padding_idx = -1;
  bool scale_grad_by_freq = false;
  BackwardKernel kernel = nullptr;
  std::function<void(const torch::Tensor&)> before;  // run first with the output gradient, if set

  std::string name() const override { return "NoisyEmbeddingBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    ids.reset_data();
  }
  // The kernel's gradient of ``rows_grad`` (shaped as the output), recorded for create_graph.
  torch::Tensor weight_grad(const torch::Tensor& rows_grad, const torch::Tensor& flat_ids) const {
    torch::Tensor grad_weight;
    {
      const at::NoGradGuard no_grad;  // a kernel: its history, where needed, is NoisyEmbeddingGradBackward
      grad_weight = kernel(rows_grad.reshape({flat_ids.numel(), rows_grad.size(-1)}), flat_ids, num_weights,
                           padding_idx, scale_grad_by_freq);
    }
    if (torch::autograd::GradMode::is_enabled() && rows_grad.requires_grad()) {  // create_graph
      auto node = make_node<NoisyEmbeddingGradBackward>();
      node->set_next_edges(torch::autograd::collect_next_edges(rows_grad));
      node->ids = torch::autograd::SavedVariable(flat_ids, /*is_output=*/false);
      node->padding_idx = padding_idx;
      node->grad_sizes = rows_grad.sizes().vec();
      torch::autograd::set_history(grad_weight, node);
    }
    return grad_weight;
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const torch::Tensor flat_ids = ids.unpack().reshape(-1);
    // An absent output gradient counts as zeros, as a Python Function's materialised grads do.
    const torch::Tensor grad = grads[0].defined() ? grads[0] : input_metadata(0).zeros_like();
    if (before) before(grad);
    // Forward over reverse (a dual output gradient): the gradient is linear in it, so is its tangent.
    const torch::Tensor grad_tangent =
        torch::autograd::isFwGradDefined(grad) ? grad._fw_grad(/*level=*/0) : torch::Tensor();
    torch::Tensor grad_weight = weight_grad(grad, flat_ids);
    if (grad_tangent.defined())
      grad_weight._set_fw_grad(weight_grad(grad_tangent, flat_ids), /*level=*/0, /*is_inplace_op=*/false);
    return {grad_weight};
  }
};

// Forward-mode AD, as the Python Function's jvp: the noise does not depend on the weight, so the
// output's tangent is the lookup of the weight's (F.embedding's). Ids are clamped into the table:
// bad ones are reported as for the output itself (the CUDA path reports them later).
inline void attach_tangent(torch::Tensor& out, const torch::Tensor& weight, const torch::Tensor& ids) {
  if (!torch::autograd::isFwGradDefined(weight)) return;
  const at::Tensor tangent = at::embedding(weight._fw_grad(/*level=*/0), ids.clamp(0, weight.size(0) - 1));
  out._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
}

// Makes ``out`` differentiable with respect to ``weight`` through a NoisyEmbeddingBackward (where the
// weight requires a gradient).
inline void attach_node(torch::Tensor& out, const torch::Tensor& weight, const torch::Tensor& ids,
                        c10::optional<int64_t> padding_idx, bool scale_grad_by_freq, BackwardKernel kernel,
                        std::function<void(const torch::Tensor&)> before = nullptr) {
  if (!torch::autograd::compute_requires_grad(weight)) return;
  auto node = make_node<NoisyEmbeddingBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(weight));
  node->ids = torch::autograd::SavedVariable(ids, /*is_output=*/false);
  node->num_weights = weight.size(0);
  node->padding_idx = padding_idx.value_or(-1);
  node->scale_grad_by_freq = scale_grad_by_freq;
  node->kernel = kernel;
  node->before = std::move(before);
  torch::autograd::set_history(out, node);
}

}  // namespace neft
