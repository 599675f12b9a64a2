// Torch binding of the CUDA kernels (noisy_embedding.h): checks, side-input views, the stable sort
// for the backward, stream and dtype.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/gil_safe_call_once.h>

#include <array>
#include <atomic>
#include <mutex>
#include <tuple>

#include "../autograd_node.h"
#include "../binding_utils.h"
#include "noisy_embedding.h"

namespace {

void check(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "neft_kernels CUDA launch failed: ", cudaGetErrorString(err));
}

// A side input as a (rows, width) view: 0-, 1- or 2-D, each dim of its size or 1 (broadcast, read
// with stride 0); any strides, any integer or bool dtype, on the weight's device.
neft::SideView side_view(const c10::optional<torch::Tensor>& t, int64_t rows, int64_t width, const char* name,
                         const torch::Device& device) {
  neft::SideView view;
  if (!t) return view;
  TORCH_CHECK(t->device() == device, name, " must be on ", device, ", got ", t->device());
  std::tie(view.s0, view.s1) = neft::side_strides(*t, rows, width, name);
  view.data = t->data_ptr();
  view.bytes = static_cast<int>(t->element_size());
  return view;
}

// The id check's word of each device: a host int mapped into the devices' address space, which the
// forward sets to 1 where it records a bad id, so that the host learns of bad ids by reading host
// memory, with no copy, event or sync per call. Made once per device by bad_id_word (the id check
// asks for it when it makes its flag, never under graph capture, where allocating is refused); a
// forward before that sets none.
using neft::kMaxDevices;
std::array<std::atomic<int*>, kMaxDevices> bad_id_words{};  // the device-side pointers

int* bad_id_word_of(const torch::Device& device) {
  const int index = device.index();
  return index >= 0 && index < kMaxDevices ? bad_id_words[index].load(std::memory_order_acquire) : nullptr;
}

// Spec v2's per-token scales of n tokens in rows of ``width`` into ``out`` (n float32 on the device):
// from the side inputs, alpha (or alpha_tensor, a 0-d tensor on the device that the kernel reads).
void fill_scales(torch::Tensor& out, int64_t width, double alpha, const c10::optional<torch::Tensor>& alpha_tensor,
                 int64_t d, const c10::optional<torch::Tensor>& mask, const c10::optional<torch::Tensor>& positions,
                 const c10::optional<torch::Tensor>& cu_seqlens, const c10::optional<torch::Tensor>& noise_mask) {
  const int64_t n = out.numel();
  if (n == 0) return;
  TORCH_CHECK(width > 0 && n % width == 0, "width must divide the number of tokens");
  const torch::Device device = out.device();
  neft::ScaleArgs args;
  args.rows = n / width;
  args.width = width;
  args.d = d;
  args.alpha = alpha;
  args.mask = side_view(mask, args.rows, width, "attention_mask", device);
  args.positions = side_view(positions, args.rows, width, "position_ids", device);
  args.noise_mask = side_view(noise_mask, args.rows, width, "noise_mask", device);
  if (cu_seqlens) {
    // Its values are compared, not only tested against 0: read by size as signed, unsigned ones would not ascend.
    TORCH_CHECK(cu_seqlens->dim() == 1 &&
                    (cu_seqlens->scalar_type() == torch::kInt || cu_seqlens->scalar_type() == torch::kLong),
                "cu_seqlens must be a 1-D int32 or int64 tensor, got ", cu_seqlens->scalar_type(), " of shape ",
                cu_seqlens->sizes());
    args.n_cu = cu_seqlens->numel();
    if (args.n_cu) args.cu_seqlens = side_view(cu_seqlens, 1, args.n_cu, "cu_seqlens", device);
  }
  torch::Tensor alpha_value;
  if (alpha_tensor) {
    TORCH_CHECK(alpha_tensor->device() == device && alpha_tensor->numel() == 1 && alpha_tensor->is_floating_point(),
                "alpha: a one-element floating tensor on ", device, ", got ", alpha_tensor->scalar_type(), " on ",
                alpha_tensor->device());
    alpha_value = alpha_tensor->to(torch::kDouble);  // no copy when it is float64 already
    args.alpha_ptr = alpha_value.data_ptr<double>();
  }
  const int64_t workspace_size = neft::token_scales_workspace(args.rows, width);
  torch::Tensor workspace;
  if (workspace_size) workspace = torch::empty({workspace_size}, out.options().dtype(torch::kLong));
  check(neft::token_scales_cuda(args, workspace_size ? workspace.data_ptr<int64_t>() : nullptr, out.data_ptr<float>(),
                                c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace

// ids of any shape into a (V, d) weight -> ids.shape + (d,) noisy rows, spec v2: uniform noise, or
// Gaussian with ``gaussian``. Scales: with ``per_token`` the kernels derive each token's scale from
// alpha (or ``alpha_tensor``, read on the device) and the side inputs (``mask`` / ``positions`` /
// ``noise_mask`` as (rows, width) views, ``cu_seqlens`` 1-D; rows * width = N); otherwise every
// token takes ``scale_value``. seed_tensor: a 0-d int64 CUDA tensor read by the kernel
// (graph-safe), else ``seed``. bad_ids: a (3,) int64 CUDA tensor {min, max, V} that records
// out-of-range ids, or none. One C++ call, no sync: one launch with a single scale, two or three where
// it derives per-token scales.
torch::Tensor noisy_embedding_forward(
    const torch::Tensor& ids_in, const torch::Tensor& weight_in, int64_t seed, int64_t offset, double scale_value,
    bool per_token, double alpha, const c10::optional<torch::Tensor>& alpha_tensor, int64_t width,
    const c10::optional<torch::Tensor>& mask, const c10::optional<torch::Tensor>& positions,
    const c10::optional<torch::Tensor>& cu_seqlens, const c10::optional<torch::Tensor>& noise_mask,
    const c10::optional<torch::Tensor>& seed_tensor, const c10::optional<torch::Tensor>& bad_ids, bool gaussian) {
  TORCH_CHECK(weight_in.is_cuda() && ids_in.is_cuda(), "backend='cuda' needs CUDA tensors");
  // The kernel dereferences every pointer on the weight's device: one from another GPU would fault
  // there (or be read across the bus where peer access is on), and an empty seed tensor would be
  // taken for no seed tensor at all.
  TORCH_CHECK(ids_in.device() == weight_in.device(), "input_ids on ", ids_in.device(), " but weight on ",
              weight_in.device());
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const auto [ids, weight] = neft::prepare_forward(ids_in, weight_in);
  const neft::DType dtype = neft::dtype_of(weight);
  torch::Tensor out = torch::empty(neft::output_sizes(ids_in, weight.size(1)), weight.options());
  if (ids.numel() == 0 || weight.size(1) == 0) return out;
  if (seed_tensor)
    TORCH_CHECK(seed_tensor->device() == weight.device() && seed_tensor->scalar_type() == torch::kLong &&
                    seed_tensor->numel() == 1,
                "seed tensor: one int64 value on ", weight.device(), ", got ", seed_tensor->scalar_type(), " of shape ",
                seed_tensor->sizes(), " on ", seed_tensor->device());
  if (bad_ids)
    TORCH_CHECK(bad_ids->device() == weight.device() && bad_ids->scalar_type() == torch::kLong &&
                    bad_ids->numel() >= 3 && bad_ids->is_contiguous(),
                "bad_ids: a contiguous (3,) int64 record on ", weight.device());
  torch::Tensor scales;
  if (per_token) {
    scales = torch::empty({ids.numel()}, weight.options().dtype(torch::kFloat));
    fill_scales(scales, width, alpha, alpha_tensor, weight.size(1), mask, positions, cu_seqlens, noise_mask);
  }
  check(neft::noisy_embedding_forward_cuda(
      dtype, ids.data_ptr<int64_t>(), weight.data_ptr(), out.data_ptr(), per_token ? scales.data_ptr<float>() : nullptr,
      static_cast<float>(scale_value), seed_tensor ? seed_tensor->data_ptr<int64_t>() : nullptr,
      static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), ids.numel(), weight.size(1), weight.stride(0),
      weight.size(0), bad_ids ? reinterpret_cast<long long*>(bad_ids->data_ptr<int64_t>()) : nullptr,
      bad_ids ? bad_id_word_of(weight.device()) : nullptr, gaussian, /*after_scales=*/per_token,
      c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

torch::Tensor embedding_backward(const torch::Tensor& grad_in, const torch::Tensor& ids_in, int64_t num_weights,
                                 int64_t padding_idx, bool scale_grad_by_freq) {
  TORCH_CHECK(grad_in.is_cuda() && ids_in.is_cuda(), "backend='cuda' needs CUDA tensors");
  // As the CPU binding: the kernel reads grad row order[s] for every id, so one row per id, on one device.
  TORCH_CHECK(ids_in.device() == grad_in.device(), "ids on ", ids_in.device(), " but grad on ", grad_in.device());
  TORCH_CHECK(grad_in.dim() == 2, "grad must be (N, d), got shape ", grad_in.sizes());
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const torch::Tensor grad = grad_in.contiguous();
  const torch::Tensor ids = ids_in.to(torch::kLong).contiguous().view(-1);
  TORCH_CHECK(ids.numel() == grad.size(0), "one grad row per id: ", ids.numel(), " ids, ", grad.size(0), " rows");
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

namespace {

// The backward's id check: neft_kernels.id_check.pending_error for the gradient's device, raised
// here as the IndexError the Python Function's backward raises (the engine runs this off the
// Python thread: the GIL is taken).
void raise_recorded_bad_ids(const torch::Tensor& grad) {
  const pybind11::gil_scoped_acquire gil;
  // pybind11's once-only store: no deadlock with another thread's first call, no decref after exit.
  PYBIND11_CONSTINIT static pybind11::gil_safe_call_once_and_store<pybind11::object> storage;
  const pybind11::object& pending_error =
      storage
          .call_once_and_store_result(
              [] { return pybind11::module_::import("neft_kernels.id_check").attr("pending_error"); })
          .get_stored();
  const pybind11::object message = pending_error(grad.device());
  TORCH_CHECK_INDEX(message.is_none(), message.is_none() ? std::string() : message.cast<std::string>());
}

}  // namespace

// The eager call: noisy_embedding_forward's rows (an int seed, a float alpha), differentiable with
// respect to the weight through NoisyEmbeddingBackward (csrc/autograd_node.h), whose backward first
// raises bad ids recorded by earlier launches, as the Python Function's does. No scale: per-token
// scales from alpha and the side inputs. bad_ids: the id check's record, or none (check off).
torch::Tensor noisy_embedding_forward_with_grad(const torch::Tensor& ids, const torch::Tensor& weight, int64_t seed,
                                                int64_t offset, c10::optional<double> scale, double alpha,
                                                int64_t width, const c10::optional<torch::Tensor>& mask,
                                                const c10::optional<torch::Tensor>& positions,
                                                const c10::optional<torch::Tensor>& cu_seqlens,
                                                const c10::optional<torch::Tensor>& noise_mask, bool gaussian,
                                                c10::optional<int64_t> padding_idx, bool scale_grad_by_freq,
                                                const c10::optional<torch::Tensor>& bad_ids) {
  torch::Tensor out =
      noisy_embedding_forward(ids, weight, seed, offset, scale.value_or(0.0), !scale.has_value(), alpha, c10::nullopt,
                              width, mask, positions, cu_seqlens, noise_mask, c10::nullopt, bad_ids, gaussian);
  neft::attach_node(out, weight, ids, padding_idx, scale_grad_by_freq, &embedding_backward, &raise_recorded_bad_ids);
  neft::attach_tangent(out, weight, ids);
  return out;
}

// The per-token scales alone (the backend's token_scales): n float32 on ``device``.
torch::Tensor token_scales(int64_t n, double alpha, const c10::optional<torch::Tensor>& alpha_tensor, int64_t d,
                           int64_t width, const c10::optional<torch::Tensor>& mask,
                           const c10::optional<torch::Tensor>& positions,
                           const c10::optional<torch::Tensor>& cu_seqlens,
                           const c10::optional<torch::Tensor>& noise_mask, const torch::Device& device) {
  TORCH_CHECK(device.is_cuda(), "backend='cuda' needs a CUDA device");
  const c10::cuda::CUDAGuard guard(device);
  torch::Tensor out = torch::empty({n}, torch::TensorOptions().dtype(torch::kFloat).device(device));
  fill_scales(out, width, alpha, alpha_tensor, d, mask, positions, cu_seqlens, noise_mask);
  return out;
}

// The id check's read-back (neft_kernels/id_check.py): the (3,) int64 record copied to pinned host
// memory, then ``event`` (a cudaEvent_t, already created) recorded, both on the record's device's
// current stream, where the kernels that fold into it run. No sync; ATen's copy_ spends several
// times the copy's own host time on dispatch and the host allocator's bookkeeping.
void read_back(const torch::Tensor& host, const torch::Tensor& record, int64_t event) {
  TORCH_CHECK(record.is_cuda() && host.device().is_cpu() && record.is_contiguous() && host.is_contiguous() &&
                  host.nbytes() >= record.nbytes() && event != 0,
              "read_back: a contiguous CUDA record, a pinned host tensor at least as large, a created event");
  const c10::cuda::CUDAGuard guard(record.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(record.device().index()).stream();
  check(cudaMemcpyAsync(host.data_ptr(), record.data_ptr(), record.nbytes(), cudaMemcpyDeviceToHost, stream));
  check(cudaEventRecord(reinterpret_cast<cudaEvent_t>(event), stream));
}

// Whether this build has kernels for ``device`` (a CUDA device index): false where none of its images
// can run there (GPUs older than the architectures setup.py compiles for; PTX the driver cannot JIT),
// where every launch would fail. Any other error (a fault left by an earlier kernel, no memory to load
// the module) is raised as itself: taking it for a missing build would send backend="auto" elsewhere
// for the rest of the process.
bool runs_on(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaError_t status = neft::kernel_image_status();
  if (status == cudaSuccess) return true;
  cudaGetLastError();  // a non-sticky error: cleared, so later calls do not see it
  const bool no_image = status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction ||
                        status == cudaErrorUnsupportedPtxVersion || status == cudaErrorInvalidPtx ||
                        status == cudaErrorJitCompilerNotFound || status == cudaErrorJitCompilationDisabled ||
                        status == cudaErrorInvalidKernelImage;
  TORCH_CHECK(no_image, "neft_kernels: CUDA error while asking device ", device,
              " for its kernels: ", cudaGetErrorString(status));
  return false;
}

// The host address of ``device``'s bad-id word, made on first use (holding 0).
int64_t bad_id_word(int64_t device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "CUDA device index ", device, " out of range");
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  static std::array<int*, kMaxDevices> host_words{};
  if (host_words[device] == nullptr) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    int *host = nullptr, *mapped = nullptr;
    cudaError_t err =
        cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable);
    if (err == cudaSuccess) {
      *host = 0;
      err = cudaHostGetDevicePointer(reinterpret_cast<void**>(&mapped), host, 0);
      if (err != cudaSuccess) cudaFreeHost(host);
    }
    if (err != cudaSuccess) cudaGetLastError();  // not sticky: cleared, so that later launches' checks do not see it
    check(err);
    host_words[device] = host;
    bad_id_words[device].store(mapped, std::memory_order_release);
  }
  return reinterpret_cast<int64_t>(host_words[device]);
}

// Whether the forward's launches overlap on ``device`` (neft::dependent_launches).
bool overlaps_launches(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return neft::dependent_launches(static_cast<int>(device));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ABI_VERSION") = 12;  // neft_kernels/backends/_extension.py refuses a build from other sources
  m.def("forward", &noisy_embedding_forward, "fused NEFTune forward, noise spec v2: uniform or Gaussian (CUDA)");
  m.def("runs_on", &runs_on, "whether this build has kernels for the CUDA device of this index");
  m.def("overlaps_launches", &overlaps_launches,
        "whether a call's launches overlap (programmatic dependent launch) on the CUDA device of this index");
  m.def("read_back", &read_back, "copy the id check's record to pinned memory and record an event after it");
  m.def("bad_id_word", &bad_id_word, "the host address of the int the forward sets where it records a bad id");
  m.def("forward_with_grad", &noisy_embedding_forward_with_grad,
        "forward's rows, differentiable with respect to the weight; the backward raises recorded bad ids");
  m.def("token_scales", &token_scales,
        "spec v2 per-token scales from attention_mask / position_ids / cu_seqlens / noise_mask (CUDA)");
  m.def("backward", &embedding_backward, "deterministic embedding backward, float32 accumulation (CUDA)");
}
