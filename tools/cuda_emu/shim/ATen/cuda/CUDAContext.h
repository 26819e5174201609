// tools/cuda_emu stand-in for <ATen/cuda/CUDAContext.h>: the current stream and the device
// properties a launcher may ask for, with the emulated device's values (an H100's, or
// EMU_MAX_SMEM_OPTIN for the shared-memory opt-in limit).
#pragma once
#include "emu_torch.h"

struct cudaDeviceProp {
  int major = 9, minor = 0;
  int multiProcessorCount = 132;
  int warpSize = 32;
  int maxThreadsPerBlock = 1024;
  size_t sharedMemPerBlock = 48 * 1024;
  size_t sharedMemPerBlockOptin = 0;
  size_t sharedMemPerMultiprocessor = 228 * 1024;
  int regsPerMultiprocessor = 65536;
};

namespace at {
namespace cuda {
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp prop = [] {
    cudaDeviceProp p;
    p.sharedMemPerBlockOptin = size_t(::emu::max_smem_optin());
    return p;
  }();
  return &prop;
}
using c10::cuda::getCurrentCUDAStream;
}  // namespace cuda
}  // namespace at
