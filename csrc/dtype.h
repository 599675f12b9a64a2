// The weight dtypes the kernels serve and the one dispatch from a dtype to a kernel template.
// No torch: the CUDA kernels (nvcc alone) and the CPU kernels both use it; the bindings map a
// torch dtype to DType once (binding_utils.h).
#pragma once

namespace neft {

enum class DType { kFloat32, kBFloat16, kFloat16 };

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<X>{}) with X the storage type of dtype: Float32, BFloat16 or Float16 as each
// side spells them (bfloat16 travels as raw uint16_t words on both sides; the CPU rounds it by
// integer ops, the GPU with cvt.rn).
//   dispatch_dtype<float, uint16_t, c10::Half>(dtype, [&](auto tag) {
//     using T = typename decltype(tag)::type; ... });
template <typename Float32, typename BFloat16, typename Float16, typename Fn>
decltype(auto) dispatch_dtype(DType dtype, Fn&& fn) {
  if (dtype == DType::kFloat32) return fn(TypeTag<Float32>{});
  if (dtype == DType::kBFloat16) return fn(TypeTag<BFloat16>{});
  return fn(TypeTag<Float16>{});
}

}  // namespace neft
