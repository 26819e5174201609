// Macros and arithmetic helpers shared by the CPU and CUDA builds of every kernel core.
//
// This header is torch-free on purpose: the CMake build compiles the kernel cores with plain g++
// for C++ unit tests and AddressSanitizer/UBSan runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#define HOST_DEVICE __host__ __device__
#elif defined(__GNUC__)
// Forced: the CPU loops rely on these small functions being inlined into the per-triangle loop
// (a call per triangle, with its closures passed by reference, measured 45% slower).
#define HOST_DEVICE_INLINE inline __attribute__((always_inline))
#define HOST_DEVICE
#else
#define HOST_DEVICE_INLINE inline
#define HOST_DEVICE
#endif

namespace pncc {

// Products rounded on their own, never fused into an FMA.
//
// Coverage decisions compare edge functions `a*b - c*d` against 0. nvcc contracts such
// expressions into FMAs by default and g++ may do so with -mfma; either would make CUDA, CPU and
// the PyTorch reference disagree about pixels that lie within one rounding error of an edge.
// Rounding each product separately makes all three bit-identical.
HOST_DEVICE_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

HOST_DEVICE_INLINE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename T>
HOST_DEVICE_INLINE T min3(T a, T b, T c) {
  T m = a < b ? a : b;
  return m < c ? m : c;
}

template <typename T>
HOST_DEVICE_INLINE T max3(T a, T b, T c) {
  T m = a > b ? a : b;
  return m > c ? m : c;
}

// True for finite values; written so that NaN fails it (every comparison with NaN is false).
template <typename T>
HOST_DEVICE_INLINE bool is_finite_value(T v) {
  return v - v == T(0);
}

}  // namespace pncc
