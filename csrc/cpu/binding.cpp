// Torch binding of the CPU kernels (noisy_embedding_cpu.h): argument checks, tensors, the id range.
#include <torch/extension.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "../autograd_node.h"
#include "../binding_utils.h"
#include "noisy_embedding_cpu.h"

namespace {

// A side input as a (rows, width) view: 0-, 1- or 2-D, each dim of its size or 1 (broadcast, read
// with stride 0); any strides, any integer or bool dtype.
neft::cpu::IntView row_view(const c10::optional<torch::Tensor>& t, int64_t rows, int64_t width, const char* name) {
  neft::cpu::IntView view;
  if (!t) return view;
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor, got one on ", t->device());
  TORCH_CHECK(neft::cpu::IntView::supports(t->scalar_type()), name, " must be an integer or bool tensor, got ",
              t->scalar_type());
  std::tie(view.stride0, view.stride1) = neft::side_strides(*t, rows, width, name);
  view.data = t->data_ptr();
  view.dtype = t->scalar_type();
  return view;
}

// Fills the per-token scales of n tokens in rows of ``width`` from the optional side inputs:
// the forward's per_sequence path and the token_scales seam share it.
void side_input_scales(float* scales, int64_t n, int64_t width, double alpha, int64_t d,
                       const c10::optional<torch::Tensor>& mask, const c10::optional<torch::Tensor>& positions,
                       const c10::optional<torch::Tensor>& cu_seqlens, const c10::optional<torch::Tensor>& noise_mask) {
  TORCH_CHECK(width > 0 && n % width == 0, "width must divide the number of tokens");
  const int64_t rows = n / width;
  neft::cpu::SideInputs side;
  side.attention_mask = row_view(mask, rows, width, "attention_mask");
  side.position_ids = row_view(positions, rows, width, "position_ids");
  side.noise_mask = row_view(noise_mask, rows, width, "noise_mask");
  if (cu_seqlens) {
    TORCH_CHECK(cu_seqlens->dim() == 1, "cu_seqlens must be 1-D");
    side.n_cu = cu_seqlens->numel();
    if (side.n_cu) side.cu_seqlens = row_view(cu_seqlens, 1, side.n_cu, "cu_seqlens");
    // The scales find entries by binary search, the reference marks them by membership: a
    // descending entry would give each backend other starts. Host memory: no sync to read it.
    for (int64_t k = 1; k < side.n_cu; ++k)
      TORCH_CHECK_VALUE(side.cu_seqlens(0, k - 1) <= side.cu_seqlens(0, k),
                        "cu_seqlens must be ascending (flash-attention's cumulative sequence starts), got ",
                        side.cu_seqlens(0, k - 1), " before ", side.cu_seqlens(0, k), " at index ", k);
  }
  neft::cpu::token_scales(scales, n, width, alpha, d, side);
}

}  // namespace

// ids of any shape into a (V, d) weight -> (ids.shape + (d,) noisy rows, min id, max id), spec v2:
// uniform noise, or Gaussian with ``gaussian``. Scales: with ``per_sequence`` the kernel derives
// each token's scale from ``alpha`` and the side inputs (``mask`` / ``positions`` / ``noise_mask``
// as (rows, width) views, ``cu_seqlens`` 1-D; rows * width = N); otherwise every token takes
// ``scale_value`` (already a float32 value). The id range is returned, not raised: the caller
// raises in Python (a C++ exception inside a compiled graph is not safe).
std::tuple<torch::Tensor, int64_t, int64_t> noisy_embedding_forward(
    const torch::Tensor& ids_in, const torch::Tensor& weight_in, int64_t seed, int64_t offset, double scale_value,
    bool per_sequence, double alpha, int64_t width, const c10::optional<torch::Tensor>& mask,
    const c10::optional<torch::Tensor>& positions, const c10::optional<torch::Tensor>& cu_seqlens,
    const c10::optional<torch::Tensor>& noise_mask, bool gaussian) {
  TORCH_CHECK(ids_in.device().is_cpu() && weight_in.device().is_cpu(), "backend='cpu' needs CPU tensors");
  const auto [ids, weight] = neft::prepare_forward(ids_in, weight_in);
  const int64_t n = ids.numel(), d = weight.size(1);
  const neft::DType dtype = neft::dtype_of(weight);
  torch::Tensor out = torch::empty(neft::output_sizes(ids_in, d), weight.options());
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  int64_t id_min = 0, id_max = -1;
  if (n) {
    const auto [lo, hi] = std::minmax_element(id_ptr, id_ptr + n);
    id_min = *lo;
    id_max = *hi;
  }
  if (n == 0 || d == 0) return {out, id_min, id_max};
  std::vector<float> scales;
  if (per_sequence) {
    scales.resize(n);
    side_input_scales(scales.data(), n, width, alpha, d, mask, positions, cu_seqlens, noise_mask);
  }
  neft::cpu::noisy_embedding_forward(dtype, id_ptr, weight.data_ptr(), out.data_ptr(),
                                     per_sequence ? scales.data() : nullptr, static_cast<float>(scale_value),
                                     static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), n, d, weight.stride(0),
                                     weight.size(0), gaussian);
  return {out, id_min, id_max};
}

// The per-token scales alone (a test seam: the reference computes them with torch ops).
torch::Tensor token_scales(int64_t n, double alpha, int64_t d, int64_t width, const c10::optional<torch::Tensor>& mask,
                           const c10::optional<torch::Tensor>& positions,
                           const c10::optional<torch::Tensor>& cu_seqlens,
                           const c10::optional<torch::Tensor>& noise_mask) {
  torch::Tensor out = torch::empty({n}, torch::kFloat);
  if (n == 0) return out;
  side_input_scales(out.data_ptr<float>(), n, width, alpha, d, mask, positions, cu_seqlens, noise_mask);
  return out;
}

// (N, d) grad rows -> (V, d) weight gradient in grad's dtype: summed per id in float32 in token
// order, rounded once; the padding row gets none; optional division by each id's count.
torch::Tensor embedding_backward(const torch::Tensor& grad_in, const torch::Tensor& ids_in, int64_t num_weights,
                                 int64_t padding_idx, bool scale_grad_by_freq) {
  TORCH_CHECK(grad_in.device().is_cpu() && ids_in.device().is_cpu(), "backend='cpu' needs CPU tensors");
  TORCH_CHECK(grad_in.dim() == 2, "grad must be (N, d)");
  const torch::Tensor grad = grad_in.contiguous();
  const torch::Tensor ids = ids_in.to(torch::kLong).contiguous();
  TORCH_CHECK(ids.numel() == grad.size(0), "one grad row per id");
  const neft::DType dtype = neft::dtype_of(grad);
  torch::Tensor grad_weight = torch::zeros({num_weights, grad.size(1)}, grad.options());
  neft::cpu::embedding_backward(dtype, grad.data_ptr(), ids.data_ptr<int64_t>(), ids.numel(), grad.size(1),
                                grad_weight.data_ptr(), num_weights, padding_idx, scale_grad_by_freq);
  return grad_weight;
}

// The eager call: noisy_embedding_forward's rows, differentiable with respect to the weight through
// NoisyEmbeddingBackward; ids outside the table raise IndexError (no graph is traced here). No
// scale: per-token scales from alpha and the side inputs.
torch::Tensor noisy_embedding_forward_with_grad(const torch::Tensor& ids, const torch::Tensor& weight, int64_t seed,
                                                int64_t offset, c10::optional<double> scale, double alpha,
                                                int64_t width, const c10::optional<torch::Tensor>& mask,
                                                const c10::optional<torch::Tensor>& positions,
                                                const c10::optional<torch::Tensor>& cu_seqlens,
                                                const c10::optional<torch::Tensor>& noise_mask, bool gaussian,
                                                c10::optional<int64_t> padding_idx, bool scale_grad_by_freq,
                                                const c10::optional<torch::Tensor>& bad_ids) {
  (void)bad_ids;  // the CUDA binding's argument; CPU ids are refused here, synchronously
  auto [out, lo, hi] = noisy_embedding_forward(ids, weight, seed, offset, scale.value_or(0.0), !scale.has_value(),
                                               alpha, width, mask, positions, cu_seqlens, noise_mask, gaussian);
  // The message of neft_kernels.id_check.raise_out_of_range.
  TORCH_CHECK_INDEX(lo >= 0 && hi < weight.size(0), "input_ids must lie in [0, ", weight.size(0), "), got values in [",
                    lo, ", ", hi, "]");
  neft::attach_node(out, weight, ids, padding_idx, scale_grad_by_freq, &embedding_backward);
  neft::attach_tangent(out, weight, ids);
  return out;
}

constexpr const char* kTracedSeed =
    "a noise seed drawn while torch.jit.trace runs would be frozen into the trace (every call the same noise): "
    "trace NoisyEmbedding in eval mode, or use torch.export or torch.compile, which draw the seed in the graph";

// torch.randint(-2**63, 2**63 - 1, ()) from a CPU generator (default: torch's): the same value and
// generator state, without a tensor (ATen draws 64 bits for a range of 2**32 or more and maps them
// with uniform_int_from_to). Refused while torch.jit.trace runs: the trace would keep the value.
int64_t draw_seed(const c10::optional<at::Generator>& generator) {
  TORCH_CHECK(!torch::jit::tracer::isTracing(), kTracedSeed);
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  constexpr uint64_t kRange = ~uint64_t{0};  // (2**63 - 1) - (-2**63)
  constexpr int64_t kLow = std::numeric_limits<int64_t>::min();
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return static_cast<int64_t>(gen->random64() % kRange + static_cast<uint64_t>(kLow));
}

// The bare Philox stream: fills ``out`` (n_calls, 4) int32 with the words of counters offset ..
// offset + n_calls under seed, from the same vectorised batches as the forward. A test seam, and
// the benchmark's floor (into a buffer allocated once, so that only generation is timed).
void philox_words(torch::Tensor& out, int64_t seed, int64_t offset) {
  TORCH_CHECK(out.dim() == 2 && out.size(1) == 4 && out.scalar_type() == torch::kInt && out.is_contiguous() &&
                  out.device().is_cpu(),
              "out must be a contiguous (n, 4) int32 CPU tensor");
  neft::cpu::philox_words(reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), out.size(0),
                          static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ABI_VERSION") = 12;  // neft_kernels/backends/_extension.py refuses a build from other sources
  m.def("philox_words", &philox_words, "fill (n, 4) int32 with Philox4x32-10 words of consecutive counters");
  m.def("forward", &noisy_embedding_forward,
        "fused NEFTune forward, noise spec v2 (uniform or Gaussian), scales from side inputs and noise_mask");
  m.def("forward_with_grad", &noisy_embedding_forward_with_grad,
        "forward's rows, differentiable with respect to the weight; bad ids raise IndexError (the eager path)");
  m.def("draw_seed", &draw_seed, "torch.randint(-2**63, 2**63 - 1, ()) from a CPU generator, as an int");
  m.def("token_scales", &token_scales,
        "spec v2 per-token scales from attention_mask / position_ids / cu_seqlens / noise_mask");
  m.def("backward", &embedding_backward, "deterministic embedding backward, float32 accumulation");
  m.def(
      "cpu_isa", [] { return std::string(neft::cpu::cpu_isa()); },
      "the instruction set the kernels use (avx512, avx2 or generic): the CPU's best, or NEFT_KERNELS_CPU_ISA's");
  m.def("cpu_isas", &neft::cpu::cpu_isas, "the instruction sets this build and CPU can run, best first");
}
