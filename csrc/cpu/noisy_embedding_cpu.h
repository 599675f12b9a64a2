// The CPU kernels: raw pointers and sizes, no torch tensors (the binding, binding.cpp, checks the
// arguments and owns the tensors). Parallel over tokens with ATen's thread pool.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../dtype.h"

namespace neft::cpu {

// An integer or bool side input read element by element whatever its dtype (masks and position
// ids arrive as any integer or bool dtype; a per-element switch costs far less than a
// conversion). Broadcast dims have stride 0; an absent input has no data.
struct IntView {
  const void* data = nullptr;
  c10::ScalarType dtype = c10::ScalarType::Long;
  int64_t stride0 = 0, stride1 = 0;

  static bool supports(c10::ScalarType t) {
    switch (t) {
      case c10::ScalarType::Bool:
      case c10::ScalarType::Byte:
      case c10::ScalarType::Char:
      case c10::ScalarType::Short:
      case c10::ScalarType::Int:
      case c10::ScalarType::Long:
      case c10::ScalarType::UInt16:
      case c10::ScalarType::UInt32:
      case c10::ScalarType::UInt64:
        return true;
      default:
        return false;
    }
  }
  bool present() const { return data != nullptr; }
  int64_t operator()(int64_t row, int64_t col) const {
    const int64_t i = row * stride0 + col * stride1;
    switch (dtype) {
      case c10::ScalarType::Bool:
        return static_cast<const bool*>(data)[i];
      case c10::ScalarType::Byte:
        return static_cast<const uint8_t*>(data)[i];
      case c10::ScalarType::Char:
        return static_cast<const int8_t*>(data)[i];
      case c10::ScalarType::Short:
        return static_cast<const int16_t*>(data)[i];
      case c10::ScalarType::Int:
        return static_cast<const int32_t*>(data)[i];
      case c10::ScalarType::UInt16:
        return static_cast<const uint16_t*>(data)[i];
      case c10::ScalarType::UInt32:
        return static_cast<const uint32_t*>(data)[i];
      case c10::ScalarType::UInt64:  // only == 0 matters
        return static_cast<int64_t>(static_cast<const uint64_t*>(data)[i]);
      default:  // Long; the binding admits only the types of supports()
        return static_cast<const int64_t*>(data)[i];
    }
  }
};

// The inputs that decide each token's scale, as (rows, width) views; cu_seqlens is 1-D (stride1).
struct SideInputs {
  IntView attention_mask, position_ids, cu_seqlens, noise_mask;
  int64_t n_cu = 0;  // cu_seqlens entries
};

// Spec v2's per-token scales of n = rows * width tokens: float32(alpha / sqrt(L * d)), 0 for a
// token that gets no noise (attention_mask or noise_mask 0; d = 0).
void token_scales(float* scales, int64_t n, int64_t width, double alpha, int64_t d, const SideInputs& side);

// (n,) ids into a (num_rows, d) weight with row stride w_stride -> (n, d) out, spec v2: uniform
// noise, or Gaussian with ``gaussian``. scales: (n,) float32, or nullptr for scale_value on every
// token. An id outside [0, num_rows) is never read: its row is NaN.
void noisy_embedding_forward(DType dtype, const int64_t* ids, const void* weight, void* out, const float* scales,
                             float scale_value, uint64_t seed, uint64_t offset, int64_t n, int64_t d, int64_t w_stride,
                             int64_t num_rows, bool gaussian);

// (n, d) contiguous grad rows -> grad_weight (num_weights, d), zero-initialised by the caller: each
// id's rows summed in float32 in token order (deterministic), rounded once; the padding row and
// ids outside [0, num_weights) get none; optionally divided by each id's count.
void embedding_backward(DType dtype, const void* grad, const int64_t* ids, int64_t n, int64_t d, void* grad_weight,
                        int64_t num_weights, int64_t padding_idx, bool scale_by_freq);

// The bare Philox stream: (n_calls, 4) words of counters offset .. offset + n_calls under seed.
void philox_words(uint32_t* out, int64_t n_calls, uint64_t seed, uint64_t offset);

// The instruction set the kernels use: "avx512", "avx2" or "generic", chosen once at first use, the
// best this CPU runs unless NEFT_KERNELS_CPU_ISA names one (an unknown name, or an ISA this CPU
// lacks, raises c10::Error on every call that needs the kernels).
const char* cpu_isa();

// The ISAs this build and CPU can run, best first (NEFT_KERNELS_CPU_ISA plays no part).
std::vector<std::string> cpu_isas();

}  // namespace neft::cpu
