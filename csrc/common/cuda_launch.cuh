// How kernels are launched and how they reach dynamic shared memory, spelled once so that the host
// emulation (tools/cuda_emu, which defines PNCC_CUDA_EMU and its own versions of both) compiles
// the kernel headers (*_kernels.cuh) as they are, with no source rewriting.
//
//   PNCC_LAUNCH(grid, block, smem_bytes, stream, kernel<T, 64>)(args...);
//   T* tile = pncc::dynamic_smem<T>();
// The kernel comes last so that template arguments with commas need no extra parentheses.
#pragma once

#if defined(PNCC_CUDA_EMU)
// tools/cuda_emu/emu_runtime.h defines PNCC_LAUNCH and pncc::dynamic_smem.
#else

#define PNCC_LAUNCH(grid, block, smem_bytes, stream, ...) \
  __VA_ARGS__<<<(grid), (block), (smem_bytes), (stream)>>>

namespace pncc {
// One byte array for every kernel: `extern __shared__ T name[]` with different T in different
// template instantiations is a redeclaration error.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char pncc_dynamic_smem[];
  return reinterpret_cast<T*>(pncc_dynamic_smem);
}
}  // namespace pncc

#endif  // PNCC_CUDA_EMU
