// What a CUDA adapter (csrc/**/*_cuda.cu) needs, beyond emu_runtime.h, to compile as host C++
// unchanged: the torch headers, and its TORCH_LIBRARY_IMPL(ns, CUDA, m) block registering the
// same functions for the CPU dispatch key, so that a process that loads the result runs the pncc
// ops on CPU tensors through the CUDA adapters and kernels (pytest_plugin.py). With
// EMU_NO_REGISTER nothing is registered (race_driver.cpp calls the adapters directly).
//
// build.py compiles each split adapter (one with a *_kernels.cuh beside it) as a one-line .cpp that
// includes this header and then the .cu file; the CUDA headers it includes resolve to shim/.
#pragma once

#include "emu_runtime.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#undef TORCH_LIBRARY_IMPL
#ifdef EMU_NO_REGISTER
#define TORCH_LIBRARY_IMPL(ns, k, m) \
  [[maybe_unused]] static void C10_CONCATENATE(emu_unregistered_##ns##_##k##_, C10_UID)(torch::Library & m)
#else
// Only CUDA registrations are remapped; any other key is a compile error (EMU_KEY_<key> undefined).
#define EMU_KEY_CUDA CPU
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, EMU_KEY_##k, m, C10_UID)
#endif
