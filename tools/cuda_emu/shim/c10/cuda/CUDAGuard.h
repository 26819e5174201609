// tools/cuda_emu stand-in for <c10/cuda/CUDAGuard.h>: the emulated runtime defines what the kernels use.
#pragma once
#include "emu_torch.h"
