// The spec's per-token scale, float32(alpha / sqrt(L * d)): L (at least 1) and d as float64, the
// product, root and quotient each rounded to nearest, then one rounding to float32
// (neft_kernels/lengths.py). One definition for host and device: the CPU and CUDA scales share it.
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"  // NEFT_HD

namespace neft {

NEFT_HD float scale_of(double alpha, int64_t length, int64_t d) {
  const double l = static_cast<double>(length > 1 ? length : 1), dims = static_cast<double>(d);
#if defined(__CUDA_ARCH__)
  return __double2float_rn(__ddiv_rn(alpha, __dsqrt_rn(__dmul_rn(l, dims))));
#else
  return static_cast<float>(alpha / std::sqrt(l * dims));
#endif
}

}  // namespace neft
