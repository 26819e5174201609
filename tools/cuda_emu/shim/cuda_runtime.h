// tools/cuda_emu stand-in for <cuda_runtime.h>: the emulated runtime defines what the kernels use.
#pragma once
#include "emu_torch.h"
