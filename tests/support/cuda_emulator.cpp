// csrc/cuda's kernels (kernels.cuh) run on the CPU, one (block, thread) at a time, with the variant
// choice and launch shape of noisy_embedding.cu: the suite checks their bits against the reference
// without a GPU
// (tests/kernels/test_cuda_emulated.py builds this with the host compiler and loads it with ctypes).
// The shared float helpers take their host branches (IEEE operations, rounded to nearest like the
// device intrinsics); what this checks is the kernels' indexing, vector paths, NaN rows, bad-id
// records and summation order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ucontext.h>
#include <algorithm>

#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

// The CUDA built-ins the kernels use, for the host.
#undef __global__
#define __global__
#undef __device__
#define __device__
#define __restrict__ __restrict
#undef __shared__
#define __shared__ static  // one block runs at a time: a static is its shared memory
struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
static EmulatedDim3 blockIdx, blockDim, threadIdx;

// A block whose threads cooperate runs them as fibers on this thread (run_block_grid): each runs
// until its next __syncthreads or its end, then the next one; a round of all of them passes a barrier.
struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
  int64_t barriers = 0;  // __syncthreads calls: every thread of a block must make the same number
  bool waited = false;   // wait_for_prerequisites called (the emulated dependent launch)
};
static ucontext_t scheduler;
static std::vector<Fiber> fibers;
static size_t current_fiber = 0;
static const std::function<void()>* fiber_kernel = nullptr;
static bool reverse_order = false;    // threads in descending order within a round
static int64_t divergent_blocks = 0;  // blocks whose threads passed different numbers of barriers
static inline void __syncthreads() {
  ++fibers[current_fiber].barriers;
  swapcontext(&fibers[current_fiber].context, &scheduler);
}
static inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
static inline long long atomicMin(long long* p, long long v) {
  const long long old = *p;
  *p = std::min(old, v);
  return old;
}
static inline long long atomicMax(long long* p, long long v) {
  const long long old = *p;
  *p = std::max(old, v);
  return old;
}

// Programmatic dependent launch, modelled (csrc/cuda/dependent_launch.cuh): in a launch that the
// launcher lets overlap the previous one, each thread finds that launch's output overwritten with
// 0xFF bytes (NaN floats, -1 integers) until it has called wait_for_prerequisites itself, so that a
// read before its own wait gives wrong bits. (The memory shows the running thread's view: swapped
// with the thread, or the fiber.)
struct Prerequisite {
  void* data = nullptr;  // the previous launch's output, while a launch that may overlap it runs
  std::vector<char> bytes;
  bool shown = true;       // whether data holds bytes (else 0xFF)
  bool* waited = nullptr;  // the running thread's: whether it has waited
};
static Prerequisite prerequisite;
static void show_prerequisite(bool shown) {  // as the running thread sees it
  if (prerequisite.data == nullptr || prerequisite.bytes.empty() || prerequisite.shown == shown) return;
  if (shown)
    std::memcpy(prerequisite.data, prerequisite.bytes.data(), prerequisite.bytes.size());
  else
    std::memset(prerequisite.data, 0xFF, prerequisite.bytes.size());
  prerequisite.shown = shown;
}
static void run_as(bool* waited) {  // before a thread (or fiber) runs
  prerequisite.waited = waited;
  show_prerequisite(*waited);
}
namespace neft::cuda {
static inline void allow_dependents() {}
static inline void wait_for_prerequisites() {
  if (prerequisite.waited) *prerequisite.waited = true;
  show_prerequisite(true);
}
}  // namespace neft::cuda
#define NEFT_EMULATED_DEPENDENT_LAUNCH

#include "../../csrc/cuda/kernels.cuh"
#include "../../csrc/cuda/scales.cuh"

namespace {

// While it lives, the launches run as overlapping the one that wrote ``data`` (``size`` bytes).
struct Overlapping {
  Overlapping(void* data, size_t size) {
    const char* p = static_cast<const char*>(data);
    prerequisite.bytes.assign(p, p + size);
    prerequisite.data = data;
  }
  ~Overlapping() {  // the previous launch's output as it left it, whether or not a thread waited
    show_prerequisite(true);
    prerequisite = Prerequisite{};
  }
};

// Every (block, thread) of a launch in turn; blockDim as the launcher sets it.
template <typename Kernel>
void run_grid(int64_t blocks_x, int64_t blocks_y, int64_t threads, Kernel&& kernel) {
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  bool waited = false;  // the running thread's
  for (int64_t x = 0; x < blocks_x; ++x) {
    for (int64_t y = 0; y < blocks_y; ++y) {
      for (int64_t t = 0; t < threads; ++t) {
        waited = false;
        run_as(&waited);
        blockIdx = {static_cast<unsigned>(x), static_cast<unsigned>(y), 0};
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        kernel();
      }
    }
  }
  prerequisite.waited = nullptr;
}

void fiber_main() {
  (*fiber_kernel)();
  fibers[current_fiber].done = true;
}

// Blocks in turn, each block's threads as fibers: for kernels that cooperate through __syncthreads
// and shared memory (a static: one block runs at a time). Within a round every thread sees the
// writes of the threads run before it: a missing barrier shows in ascending or in descending
// order, so the tests run both.
void run_block_grid(int64_t blocks, int64_t threads, const std::function<void()>& kernel) {
  fiber_kernel = &kernel;
  fibers.resize(static_cast<size_t>(threads));
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  for (int64_t x = 0; x < blocks; ++x) {
    blockIdx = {static_cast<unsigned>(x), 0, 0};
    for (Fiber& f : fibers) {
      f.stack.resize(1 << 16);
      f.done = false;
      f.barriers = 0;
      f.waited = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &scheduler;
      makecontext(&f.context, fiber_main, 0);
    }
    for (bool running = true; running;) {  // one round: every live thread to its next barrier
      running = false;
      for (size_t i = 0; i < fibers.size(); ++i) {
        current_fiber = reverse_order ? fibers.size() - 1 - i : i;
        if (fibers[current_fiber].done) continue;
        threadIdx = {static_cast<unsigned>(current_fiber), 0, 0};
        run_as(&fibers[current_fiber].waited);
        swapcontext(&scheduler, &fibers[current_fiber].context);
        running = running || !fibers[current_fiber].done;
      }
    }
    prerequisite.waited = nullptr;
    for (const Fiber& f : fibers) {
      if (f.barriers != fibers[0].barriers) {
        ++divergent_blocks;
        break;
      }
    }
  }
}

neft::DType dtype_of(int code) {
  return code == 0 ? neft::DType::kFloat32 : code == 1 ? neft::DType::kBFloat16 : neft::DType::kFloat16;
}

}  // namespace

// dtype: 0 float32, 1 bfloat16 (raw words), 2 float16. The variant, grid and block of
// noisy_embedding.cu's launch; returns the lanes per thread it picked (16 bytes' worth, or 1).
extern "C" int emulated_forward(int dtype, const int64_t* ids, const void* weight, void* out, const float* scales,
                                float scale_value, const int64_t* seed_ptr, uint64_t seed, uint64_t offset,
                                int64_t n_tokens, int64_t d, int64_t w_stride, int64_t num_rows, long long* bad_ids,
                                int* bad_word, bool gaussian) {
  return neft::cuda::dispatch_forward(dtype_of(dtype), gaussian, d, w_stride, weight, out, [&](auto variant) {
    using V = decltype(variant);
    const int64_t threads = neft::cuda::kForwardThreads;
    const neft::cuda::LaneGroups lanes = neft::cuda::lane_groups(n_tokens, d, V::kVec);
    // Per-token scales come from the scales kernel just before: the launcher lets this one overlap it.
    const Overlapping overlap(const_cast<float*>(scales), scales ? n_tokens * sizeof(float) : 0);
    run_grid((lanes.threads + threads - 1) / threads, 1, threads, [&] {
      neft::cuda::forward_kernel<typename V::type, V::kGaussian, V::kVec>(ids, weight, out, scales, scale_value,
                                                                          seed_ptr, seed, offset, lanes, d, w_stride,
                                                                          num_rows, bad_ids, bad_word);
    });
    return V::kVec;
  });
}

// The token of forward thread g: lane_groups' and token_of's choice of multiply or division.
extern "C" int64_t emulated_token_of(int64_t n_tokens, int64_t d, int lanes_per_thread, int64_t g) {
  return neft::cuda::token_of(neft::cuda::lane_groups(n_tokens, d, lanes_per_thread), g);
}

// lane_groups' multiplier (0: the launch divides).
extern "C" uint32_t emulated_lane_multiplier(int64_t n_tokens, int64_t d, int lanes_per_thread) {
  return neft::cuda::lane_groups(n_tokens, d, lanes_per_thread).magic;
}

extern "C" void emulated_backward(int dtype, const void* grad, const int64_t* sorted_ids, const int64_t* order,
                                  const int64_t* seg_end, void* grad_weight, int64_t n_tokens, int64_t d,
                                  int64_t num_weights, int64_t padding_idx, bool scale_by_freq) {
  neft::cuda::dispatch_storage(dtype_of(dtype), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int threads = neft::cuda::kBackwardThreads;
    run_grid(n_tokens, (d + threads - 1) / threads, threads, [&] {
      neft::cuda::backward_kernel<T>(grad, sorted_ids, order, seg_end, grad_weight, n_tokens, d, num_weights,
                                     padding_idx, scale_by_freq);
    });
  });
}

// token_scales_cuda's launches. Side inputs: data[i] with strides[2 i], strides[2 i + 1] and
// bytes[i] for mask, positions, noise_mask, cu_seqlens (nullptr where absent).
extern "C" void emulated_token_scales(const void* const* data, const int64_t* strides, const int* bytes, int64_t n_cu,
                                      int64_t rows, int64_t width, int64_t d, double alpha, const double* alpha_ptr,
                                      float* out) {
  neft::ScaleArgs args;
  neft::SideView* views[] = {&args.mask, &args.positions, &args.noise_mask, &args.cu_seqlens};
  for (int i = 0; i < 4; ++i) *views[i] = {data[i], strides[2 * i], strides[2 * i + 1], bytes[i]};
  args.n_cu = n_cu;
  args.rows = rows;
  args.width = width;
  args.d = d;
  args.alpha = alpha;
  args.alpha_ptr = alpha_ptr;
  const int64_t tiles = neft::cuda::scale_tiles_per_row(width);
  std::vector<int64_t> workspace(neft::cuda::scale_workspace(rows, width));
  if (tiles > 1) {
    run_block_grid(rows * tiles, neft::cuda::kScaleThreads,
                   [&] { neft::cuda::tile_summary_kernel(args, tiles, workspace.data()); });
  }
  const Overlapping overlap(workspace.data(), workspace.size() * sizeof(int64_t));  // after the summaries
  run_block_grid(rows * tiles, neft::cuda::kScaleThreads,
                 [&] { neft::cuda::token_scales_kernel(args, tiles, tiles > 1 ? workspace.data() : nullptr, out); });
}

// The order of threads within a round (descending where ``reverse``).
extern "C" void emulated_set_reverse_order(bool reverse) { reverse_order = reverse; }

// Blocks since the last call whose threads passed different numbers of __syncthreads (undefined
// behaviour on a GPU, where it may hang).
extern "C" int64_t emulated_divergent_blocks() {
  const int64_t n = divergent_blocks;
  divergent_blocks = 0;
  return n;
}
