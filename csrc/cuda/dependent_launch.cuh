// Programmatic dependent launch (sm_90+). A kernel launched with the programmatic stream
// serialization attribute may start while the stream's previous kernel still runs, as soon as every
// block of that kernel has called allow_dependents (or exited); it may read what that kernel writes
// only after wait_for_prerequisites, which returns once that kernel (and any it overlaps in turn)
// has finished and its writes are visible. What the stream ran before the first kernel of such a
// chain has finished when the chain starts. Both are no-ops before sm_90 and in a kernel launched
// the ordinary way. tests/support/cuda_emulator.cpp defines its own, which hide the previous
// launch's output until the wait.
#pragma once

namespace neft::cuda {

#ifndef NEFT_EMULATED_DEPENDENT_LAUNCH
__device__ inline void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ inline void wait_for_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
#endif

}  // namespace neft::cuda
