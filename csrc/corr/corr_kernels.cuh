// CUDA kernels of corr_warp and _corr_warp_backward, and their launchers.
//
// Torch-free on purpose: the kernels take plain-data parameter structs, the launchers return a
// cudaError_t, and corr_cuda.cu (validation, allocation, registration) is the only torch-facing
// file. Tensor-core instructions, async copies, launches and dynamic shared memory go through
// common/ptx.cuh and common/cuda_launch.cuh only, so tools/cuda_emu compiles this header as it is.
//
// The kernels, per direction and dtype:
//
//   kernel                          dtypes       what
//   corr_normalize_kernel           all          q^ = (q - mean) / (|q - mean| + eps), k^ alike,
//                                                in the compute dtype, zero-padded to a row stride;
//                                                optionally the per-row statistics (RowNorm); with
//                                                normalisation off it is a padded copy (V, dO)
//   corr_flash_forward_kernel       bf16, fp16   FlashAttention-2 forward: Q resident in shared
//                                                memory, K and V streamed with cp.async, S = Q K^T
//                                                and O += P V with ldmatrix + mma.sync m16n8k16,
//                                                online softmax in registers, one warp per 16 rows
//   corr_flash_backward_kernel      bf16, fp16   one pass over query tiles per key tile: S, P, dP,
//                                                dS once; dK, dV in registers; dQ by fp32 atomics
//   corr_flash_dq_kernel            bf16, fp16   dQ without atomics (deterministic mode)
//   corr_backward_d_kernel          bf16, fp16   D = rowsum(dO * O) and the padded copy of dO
//   corr_simt_kernel                fp32 (and    the register-tiled SIMT kernel: 4 x 4 score tiles
//                                   fallbacks)   and 4 x 2NB output tiles per thread, fp32 FMAs
//                                                from shared memory (never TF32), modes
//                                                kFwd/kD/kDq/kDk/kDv
//   corr_normalize_backward_kernel  all          dL/dq, dL/dk from dL/dq^, dL/dk^
//
// Statistics are fp32; the saved lse is double (see corr_math.h). 1/temperature is never folded
// into the rounded q^ (at fp16 and C = 16 that tripled the output error, DESIGN-NOTES issue 10):
// the kernels scale the fp32 scores (forward: (s - m) * log2(e)/T, the subtraction first; backward:
// s/T - lse with a split 1/T and FMAs), and the normalisation backward applies 1/T to dL/dq^ and
// dL/dk^ in double (FlashAttention's softmax_scale on dQ and dK, fused into the next kernel).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#if !defined(PNCC_CUDA_EMU)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "common/cuda_launch.cuh"
#include "common/ptx.cuh"
#include "corr/corr_math.h"

namespace pncc {
namespace corr {

// ---- element conversions (torch builds with the implicit half/bf16 conversions disabled) ----

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two values rounded to T and packed into one 32-bit mma operand register, `lo` in the low half
// (the lower column of the fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  static_assert(sizeof(T) == 2, "mma operands are 16-bit");
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return uint32_t(lb) | (uint32_t(hb) << 16);
}

// mma.sync m16n8k16 with fp32 accumulation, D = A B + D, for the element type T.
template <typename T>
struct Mma;
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_bf16(d, a, b, d);
  }
};
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    ptx::mma_m16n8k16_f16(d, a, b, d);
  }
};

// ---- launch hygiene ----

constexpr int kMaxBatchPerLaunch = 65535;  // gridDim.z limit

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

// The device's opt-in maximum of dynamic shared memory per block.
inline cudaError_t max_dynamic_smem(int* bytes) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

// Raises `kernel`'s dynamic shared-memory limit to the device's maximum, once per device and
// kernel. Setting it per launch to that launch's size raced between threads launching different
// sizes (one thread's smaller limit could land between another's set and launch); the maximum is
// the same for every caller, so setting it once under a lock leaves nothing to race on.
template <typename Kernel>
cudaError_t allow_max_dynamic_smem(Kernel* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, bool> done;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  if (done.count(key)) return cudaSuccess;
  int max_smem = 0;
  err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem);
  if (err == cudaSuccess) done[key] = true;
  return err;
}

// ---- per-row kernels: normalisation, its backward, and the backward's D; one warp per row ----

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kRowThreads = 256;  // threads per block of the warp-per-row kernels

// Row statistics in double, as the CPU kernel computes them (two passes; see row_norm_finish).
template <typename T>
__device__ RowNorm<double> warp_row_stats(const T* x, int64_t C, bool normalize, double eps) {
  const int lane = threadIdx.x % 32;
  double sum = 0;
  for (int64_t c = lane; c < C; c += 32) sum += to_float(x[c]);
  const double mean = warp_sum(sum) / static_cast<double>(C);
  double sum_sq = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const double d = to_float(x[c]) - mean;
    sum_sq += d * d;
  }
  return row_norm_finish<double>(warp_sum(sum_sq), mean, 1.0, normalize, eps);
}

// How a row of q^ or k^ enters the score product. Unsplit: x^ rounded to the dtype, C channels.
// Split (where rounds_normalised_rows, corr_math.h, is false: bf16 rows of C < 16): x^ = hi + lo,
// both in the dtype, as three blocks of C channels, queries [qh, qh, ql] and keys [kh, kl, kh], so
// that the kernels' ordinary product over 3C channels is qh.kh + qh.kl + ql.kh: q^.k^ but for the
// dropped ql.kl (2^-16 of it in bf16), with fp32 accumulation. No kernel knows of the split. In the
// backward, dL/dx^ is the sum of the gradients of the blocks holding hi (lo = x^ - hi has no
// derivative of its own).
struct SplitRows {
  int blocks = 1;     // 3 when split
  int lo_block = -1;  // the block holding lo (queries 2, keys 1); -1 unsplit
};

// The part of x^ that one block of a row holds: x^ rounded to T, or, in the lo block, what that
// rounding left.
template <typename T>
__device__ __forceinline__ T split_part(double v, bool lo) {
  const T hi = from_float<T>(static_cast<float>(v));
  return lo ? from_float<T>(static_cast<float>(v - to_float(hi))) : hi;
}

// x (n_rows, C) -> out (n_rows, ld_out): the row (split into blocks when asked) followed by zeros,
// never scaled by 1/temperature. With normalize false it is an exact copy, which pads V and dO for
// the 16-byte copies of the flash kernels.
struct NormalizeParams {
  const void* x;
  void* out;
  RowNorm<double>* stats;  // (n_rows,) or null
  int64_t n_rows, C, ld_out;
  double eps;
  bool normalize;
  SplitRows split;
};

template <typename T>
__global__ void __launch_bounds__(kRowThreads) corr_normalize_kernel(const NormalizeParams p) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (r >= p.n_rows) return;  // whole warps leave together: n_rows is per warp
  const T* x = static_cast<const T*>(p.x) + r * p.C;
  T* out = static_cast<T*>(p.out) + r * p.ld_out;
  const RowNorm<double> st = warp_row_stats(x, p.C, p.normalize, p.eps);
  const int lane = threadIdx.x % 32;
  const int64_t n_used = p.C * p.split.blocks;
  for (int64_t c = lane; c < p.ld_out; c += 32) {
    if (c >= n_used) {
      out[c] = from_float<T>(0.f);
      continue;
    }
    const int block = int(c >= p.C) + int(c >= 2 * p.C);  // c < 3C; 0 unsplit (c < C)
    const double v = row_norm_apply(st, double(to_float(x[c - block * p.C])));
    out[c] = split_part<T>(v, block == p.split.lo_block);
  }
  if (p.stats != nullptr && lane == 0) p.stats[r] = st;
}

// dL/dx from g = T dL/dx^ (fp32, row stride ld_g: the main kernels' products of the unscaled dS,
// over the blocks of a split row) and the statistics of the forward's rows; g_scale =
// 1/temperature is applied here, in double.
struct NormalizeBackwardParams {
  const float* g;
  const void* x;
  const RowNorm<double>* stats;
  void* grad_x;
  int64_t n_rows, C, ld_g;
  double eps, g_scale;
  SplitRows split;
};

// dL/dx^_c of one row: g_scale times the sum of g over the blocks that hold x^'s hi part.
__device__ __forceinline__ double grad_of_row_value(const NormalizeBackwardParams& p,
                                                    const float* gr, int64_t c) {
  double sum = 0;
  for (int b = 0; b < p.split.blocks; ++b)
    if (b != p.split.lo_block) sum += double(gr[b * p.C + c]);
  return sum * p.g_scale;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    corr_normalize_backward_kernel(const NormalizeBackwardParams p) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (r >= p.n_rows) return;
  const int lane = threadIdx.x % 32;
  const T* xr = static_cast<const T*>(p.x) + r * p.C;
  const float* gr = p.g + r * p.ld_g;
  const RowNorm<double> st = p.stats[r];
  double g_dot_c = 0;
  for (int64_t c = lane; c < p.C; c += 32)
    g_dot_c += grad_of_row_value(p, gr, c) * (to_float(xr[c]) - st.mean);
  const double coef = row_norm_grad_coef(st, warp_sum(g_dot_c), p.eps);
  double sum = 0;
  for (int64_t c = lane; c < p.C; c += 32)
    sum += row_norm_grad_c(st, coef, grad_of_row_value(p, gr, c), double(to_float(xr[c])));
  const double mean = st.centred ? warp_sum(sum) / static_cast<double>(p.C) : 0.0;
  T* gx = static_cast<T*>(p.grad_x) + r * p.C;
  for (int64_t c = lane; c < p.C; c += 32) {
    const double dc =
        row_norm_grad_c(st, coef, grad_of_row_value(p, gr, c), double(to_float(xr[c])));
    gx[c] = from_float<T>(static_cast<float>(dc - mean));
  }
}

// D = rowsum(dO * O) in fp32 (the flash backward's pre-pass), and dO copied to a zero-padded row
// stride for the backward's 16-byte copies.
struct BackwardDParams {
  const void* grad_out;  // (n_rows, Cv)
  const void* out;       // (n_rows, Cv)
  void* grad_out_padded;  // (n_rows, ld_padded)
  float* d;               // (n_rows,)
  int64_t n_rows, Cv, ld_padded;
};

template <typename T>
__global__ void __launch_bounds__(kRowThreads) corr_backward_d_kernel(const BackwardDParams p) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (r >= p.n_rows) return;
  const int lane = threadIdx.x % 32;
  const T* go = static_cast<const T*>(p.grad_out) + r * p.Cv;
  const T* o = static_cast<const T*>(p.out) + r * p.Cv;
  T* gp = static_cast<T*>(p.grad_out_padded) + r * p.ld_padded;
  float sum = 0.f;
  for (int64_t c = lane; c < p.ld_padded; c += 32) {
    const T g = c < p.Cv ? go[c] : from_float<T>(0.f);
    if (c < p.Cv) sum += to_float(g) * to_float(o[c]);
    gp[c] = g;
  }
  sum = warp_sum(sum);
  if (lane == 0) p.d[r] = sum;
}

inline unsigned warp_per_row_blocks(int64_t n_rows) {
  return static_cast<unsigned>(ceil_div(n_rows * 32, kRowThreads));
}

template <typename T>
cudaError_t launch_normalize(const NormalizeParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  PNCC_LAUNCH(warp_per_row_blocks(p.n_rows), kRowThreads, 0, stream, corr_normalize_kernel<T>)(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_normalize_backward(const NormalizeBackwardParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  PNCC_LAUNCH(warp_per_row_blocks(p.n_rows), kRowThreads, 0, stream,
              corr_normalize_backward_kernel<T>)(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward_d(const BackwardDParams& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  PNCC_LAUNCH(warp_per_row_blocks(p.n_rows), kRowThreads, 0, stream, corr_backward_d_kernel<T>)(p);
  return cudaGetLastError();
}

// ---- flash kernels (bf16, fp16): shared pieces ----
//
// A block is 4 warps; warp w owns rows 16w..16w+15 of the block's 64-row tile. Shared-memory rows
// are padded by 8 elements (16 bytes) over a multiple of 16 elements, so the 8 row addresses of
// one ldmatrix fall in 8 different 16-byte bank groups (an odd stride in 16-byte units).
constexpr int kFlashWarps = 4;
constexpr int kFlashThreads = 32 * kFlashWarps;
constexpr int kFlashRows = 16 * kFlashWarps;  // rows of the resident tile
constexpr int kFlashCols = 64;                // rows of a streamed tile
constexpr float kLog2e = 1.4426950408889634f;

// The exponent s/T - lse of a probability recomputed in the backward, from the unscaled score s,
// 1/T split into fp32 hi + lo and the split lse. The FMA rounds s * hi - lse.hi once, after the
// subtraction, so scores near the row maximum keep their bits at 1/T = 1000 (s * (1/T) rounded
// first would put an ulp of 1000, 6e-5, on every probability).
__device__ __forceinline__ float scaled_minus_lse(float s, const SplitLse<float>& inv_t,
                                                  const SplitLse<float>& lse) {
  return fmaf(s, inv_t.hi, -lse.hi) + fmaf(s, inv_t.lo, -lse.lo);
}

// The lse of a finished row from its unscaled running maximum m and sum l: m/T + log(l), double.
__device__ __forceinline__ double scaled_lse(float m, float l, double inv_t) {
  return l > 0.f ? double(m) * inv_t + ::log(double(l)) : -double(INFINITY);
}

__host__ __device__ constexpr int smem_stride(int width) { return round_up(width, 16) + 8; }

// Starts the 16-byte async copies of rows [r0, r0 + rows) x chunks [0, chunks) of 8 elements,
// from column c0 on, of a global row-major matrix (row stride `ld` elements, a multiple of 8; `n`
// rows, `width` elements) into shared memory (stride ld_s). Rows >= n and chunks past `width` are
// zero-filled, so the tile's padding holds zeros, never poison. Eight consecutive lanes copy 128
// contiguous bytes of one row (whole sectors); the row's address and validity are computed once
// per row, so a chunk costs an add, a compare and the copy.
template <int kThreadCount = kFlashThreads, typename T>
__device__ __forceinline__ void async_tile(T* dst, int ld_s, const T* src, int64_t ld, int64_t r0,
                                           int64_t n, int64_t c0, int64_t width, int rows,
                                           int chunks) {
  constexpr int kLanesPerRow = 8, kRowsPerPass = kThreadCount / kLanesPerRow;
  const int lane_in_row = threadIdx.x % kLanesPerRow;
  // Valid elements of a row from c0 on, in 32 bits (at most the tile's width).
  const int valid_width = static_cast<int>(width - c0 < 8 * chunks ? width - c0 : 8 * chunks);
  for (int r = threadIdx.x / kLanesPerRow; r < rows; r += kRowsPerPass) {
    const bool row_valid = r0 + r < n;
    const T* row_src = src + (row_valid ? r0 + r : 0) * ld + c0;
    T* row_dst = dst + r * ld_s;
    for (int c = 8 * lane_in_row; c < 8 * chunks; c += 8 * kLanesPerRow) {
      const bool valid = row_valid && c < valid_width;
      ptx::cp_async_16(row_dst + c, row_src + (valid ? c : 0), valid);
    }
  }
}

// ldmatrix addresses: the lane's row and column inside a 16x16 operand tile.
//   A (row-major 16x16), and B stored k-major (V, dO: rows are k, ldmatrix .trans):
//     matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
//   B stored n-major (K, Q: rows are n, cols are k), two n-tiles of 8:
//     matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
__device__ __forceinline__ int ldm_row_a(int lane) { return (lane % 8) + 8 * ((lane / 8) % 2); }
__device__ __forceinline__ int ldm_col_a(int lane) { return 8 * (lane / 16); }
__device__ __forceinline__ int ldm_row_b(int lane) { return (lane % 8) + 8 * (lane / 16); }
__device__ __forceinline__ int ldm_col_b(int lane) { return 8 * ((lane / 8) % 2); }

// acc[0..NT) (16 x 8NT, fp32) += A (16 x 16k, fragments from shared memory at `a`, stride lda)
// times B^T where B (8NT x 16k) is stored n-major at `b` (stride ldb): the score product.
template <typename T, int NT>
__device__ __forceinline__ void mma_nt_smem(float (&acc)[NT][4], const T* a, int lda, const T* b,
                                            int ldb, int k_steps) {
  static_assert(NT % 2 == 0, "score tiles are pairs of n-tiles");
  const int lane = threadIdx.x % 32;
  const T* a_lane = a + ldm_row_a(lane) * lda + ldm_col_a(lane);
  const T* b_lane = b + ldm_row_b(lane) * ldb + ldm_col_b(lane);
  // Not unrolled: the loads of later k-steps, hoisted, would compete with the accumulators.
#pragma unroll 1
  for (int kk = 0; kk < k_steps; ++kk) {
    uint32_t af[4];
    ptx::ldmatrix_x4(af, a_lane + 16 * kk);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      ptx::ldmatrix_x4(bf, b_lane + 16 * np * ldb + 16 * kk);
      Mma<T>::run(acc[2 * np], af, {bf[0], bf[1]});
      Mma<T>::run(acc[2 * np + 1], af, {bf[2], bf[3]});
    }
  }
}

// acc[0..NT) (16 x 8NT) += A (16 x 16, registers) times B (16 x 8NT) stored k-major at `b`
// (stride ldb, rows are k): the output products P V, P^T dO, dS^T Q.
template <typename T, int NT>
__device__ __forceinline__ void mma_nn_regs(float (&acc)[NT][4], const uint32_t (&af)[4],
                                            const T* b, int ldb) {
  const int lane = threadIdx.x % 32;
  const T* b_lane = b + ldm_row_a(lane) * ldb + ldm_col_a(lane);
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    uint32_t bf[4];
    ptx::ldmatrix_x4_trans(bf, b_lane + 16 * np);
    Mma<T>::run(acc[2 * np], af, {bf[0], bf[1]});
    Mma<T>::run(acc[2 * np + 1], af, {bf[2], bf[3]});
  }
  if constexpr (NT % 2 == 1) {  // the last n-tile alone: lanes 0-15 address keys 0-15
    uint32_t bf[2];
    ptx::ldmatrix_x2_trans(bf, b_lane - ldm_col_a(lane) + 8 * (NT - 1));
    Mma<T>::run(acc[NT - 1], af, bf);
  }
}

// The A operand of k-step kk (16 x 16) from a 16 x 8NT fp32 accumulator: n-tiles 2kk and 2kk+1
// (the accumulator's fragment layout is the A operand's, two n-tiles to one k-step).
template <typename T, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&af)[4], const float (&acc)[NT][4], int kk) {
  af[0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
  af[1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
  af[2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  af[3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// ---- flash forward ----

struct FlashForwardParams {
  const void* q;  // (B, Nq, ld_qk): q^ (not scaled by 1/T), channels zero-padded to ld_qk
  const void* k;  // (B, Nk, ld_qk): k^
  const void* v;  // (B, Nk, ld_v), 16-byte aligned rows (ld_v a multiple of 8)
  void* out;      // (B, Nq, Cv)
  double* lse;    // (B, Nq)
  double inv_t;   // 1 / temperature
  int64_t Nq, Nk, Cv;
  int ld_qk;  // a multiple of 16
  int ld_v;
  int batch_offset;
};

// Output channels per block: 8 * NT, a window of the value channels (grid y).
template <int NT>
struct FlashForwardSmem {
  static constexpr int kWidth = 8 * NT;
  static constexpr int kLdV = smem_stride(kWidth);
  static __host__ __device__ size_t bytes(int ld_qk, size_t elem) {
    return (size_t(kFlashRows + kFlashCols) * smem_stride(ld_qk) + size_t(kFlashCols) * kLdV) *
           elem;
  }
};

// One block: 64 query rows x one window of 8 NT value channels of one batch entry. Per key tile j
// the copies overlap the maths: V_j loads during S = Q K_j^T and the softmax, K_{j+1} during
// O += P V_j (K and V are each other's second buffer, FlashAttention-2's pipeline for large head
// dimensions, which keeps a block at about 100 KiB so that two fit an SM).
template <typename T, int NT>
__global__ void __launch_bounds__(kFlashThreads, 2)
    corr_flash_forward_kernel(const FlashForwardParams p) {
  using Smem = FlashForwardSmem<NT>;
  const int ldq = smem_stride(p.ld_qk);
  T* sq = dynamic_smem<T>();
  T* sk = sq + kFlashRows * ldq;
  T* sv = sk + kFlashCols * ldq;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t b = int64_t(blockIdx.z) + p.batch_offset;
  const int64_t q0 = int64_t(blockIdx.x) * kFlashRows;
  const int64_t c0 = int64_t(blockIdx.y) * Smem::kWidth;
  const T* qg = static_cast<const T*>(p.q) + b * p.Nq * p.ld_qk;
  const T* kg = static_cast<const T*>(p.k) + b * p.Nk * p.ld_qk;
  const T* vg = static_cast<const T*>(p.v) + b * p.Nk * p.ld_v;
  const int qk_chunks = p.ld_qk / 8, k_steps = p.ld_qk / 16;

  async_tile(sq, ldq, qg, p.ld_qk, q0, p.Nq, 0, p.ld_qk, kFlashRows, qk_chunks);
  async_tile(sk, ldq, kg, p.ld_qk, 0, p.Nk, 0, p.ld_qk, kFlashCols, qk_chunks);
  ptx::cp_async_commit();

  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of the warp, unscaled scores
  const float scale_log2 = static_cast<float>(p.inv_t * double(kLog2e));  // log2(e) / T
  float l[2] = {0.f, 0.f};              // this lane's part of the row sums
  const T* sq_warp = sq + 16 * warp * ldq;

  for (int64_t k0 = 0; k0 < p.Nk; k0 += kFlashCols) {
    ptx::cp_async_wait<0>();
    __syncthreads();  // K_j (and Q) are in; every warp is done with V_{j-1}
    async_tile(sv, Smem::kLdV, vg, p.ld_v, k0, p.Nk, c0, p.ld_v, kFlashCols, NT);
    ptx::cp_async_commit();

    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    mma_nt_smem<T, 8>(s, sq_warp, ldq, sk, ldq, k_steps);
    if (k0 + kFlashCols > p.Nk) {  // the last tile: keys past Nk take no weight
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (k0 + 8 * n + 2 * t + (e % 2) >= p.Nk) s[n][e] = -INFINITY;
    }

    // Online softmax: the 4 lanes of a group share a row (shuffles over lane bits 0 and 1).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx);  // finite: a tile holds at least one key
      const float alpha = ptx::exp2_approx((m[r] - m_new) * scale_log2);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        // (s - m) first: exact near the maximum, so a large 1/temperature loses nothing to the
        // scale (S is never scaled before the subtraction, q^ never before its rounding).
        s[n][2 * r] = ptx::exp2_approx((s[n][2 * r] - m_new) * scale_log2);
        s[n][2 * r + 1] = ptx::exp2_approx((s[n][2 * r + 1] - m_new) * scale_log2);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        o[n][2 * r] *= alpha;
        o[n][2 * r + 1] *= alpha;
      }
    }

    ptx::cp_async_wait<0>();
    __syncthreads();  // V_j is in; every warp is done with K_j
    if (k0 + kFlashCols < p.Nk) {
      async_tile(sk, ldq, kg, p.ld_qk, k0 + kFlashCols, p.Nk, 0, p.ld_qk, kFlashCols, qk_chunks);
    }
    ptx::cp_async_commit();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t pf[4];
      acc_to_a<T, 8>(pf, s, kk);
      mma_nn_regs<T, NT>(o, pf, sv + 16 * kk * Smem::kLdV, Smem::kLdV);
    }
  }
  ptx::cp_async_wait<0>();

  T* out = static_cast<T*>(p.out) + b * p.Nq * p.Cv;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int64_t row = q0 + 16 * warp + g + 8 * r;
    if (row >= p.Nq) continue;
    const float inv_l = 1.f / l[r];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t col = c0 + 8 * n + 2 * t + e;
        if (col < p.Cv) out[row * p.Cv + col] = from_float<T>(o[n][2 * r + e] * inv_l);
      }
    if (blockIdx.y == 0 && t == 0) p.lse[b * p.Nq + row] = scaled_lse(m[r], l[r], p.inv_t);
  }
}

// The widths of the forward's output window, in n-tiles of 8 channels; the last one covers
// Cv = 258 (256 features + 2 coordinates) in one window, wider Cv takes several.
constexpr int kFlashWindows[] = {2, 4, 8, 16, 33};

inline int flash_window_tiles(int64_t Cv) {
  for (int nt : kFlashWindows)
    if (8 * int64_t(nt) >= Cv) return nt;
  return kFlashWindows[sizeof(kFlashWindows) / sizeof(int) - 1];
}

// Shared memory of the forward for these sizes (to choose between it and the SIMT kernel).
inline size_t flash_forward_smem(int64_t C_padded, int64_t Cv, size_t elem) {
  switch (flash_window_tiles(Cv)) {
    case 2: return FlashForwardSmem<2>::bytes(int(C_padded), elem);
    case 4: return FlashForwardSmem<4>::bytes(int(C_padded), elem);
    case 8: return FlashForwardSmem<8>::bytes(int(C_padded), elem);
    case 16: return FlashForwardSmem<16>::bytes(int(C_padded), elem);
    default: return FlashForwardSmem<33>::bytes(int(C_padded), elem);
  }
}

template <typename T, int NT>
cudaError_t launch_flash_forward_nt(FlashForwardParams p, int64_t batch, cudaStream_t stream) {
  auto kernel = corr_flash_forward_kernel<T, NT>;
  cudaError_t err = allow_max_dynamic_smem(kernel);
  if (err != cudaSuccess) return err;
  const size_t smem = FlashForwardSmem<NT>::bytes(p.ld_qk, sizeof(T));
  const unsigned windows = static_cast<unsigned>(ceil_div(p.Cv, 8 * NT));
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxBatchPerLaunch) {
    p.batch_offset = static_cast<int>(b0);
    const dim3 grid(static_cast<unsigned>(ceil_div(p.Nq, kFlashRows)), windows,
                    static_cast<unsigned>(std::min<int64_t>(kMaxBatchPerLaunch, batch - b0)));
    PNCC_LAUNCH(grid, kFlashThreads, smem, stream, corr_flash_forward_kernel<T, NT>)(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Requires Nq, Nk, Cv > 0 and the caller's check that flash_forward_smem fits the device.
template <typename T>
cudaError_t launch_flash_forward(const FlashForwardParams& p, int64_t batch,
                                 cudaStream_t stream) {
  switch (flash_window_tiles(p.Cv)) {
    case 2: return launch_flash_forward_nt<T, 2>(p, batch, stream);
    case 4: return launch_flash_forward_nt<T, 4>(p, batch, stream);
    case 8: return launch_flash_forward_nt<T, 8>(p, batch, stream);
    case 16: return launch_flash_forward_nt<T, 16>(p, batch, stream);
    default: return launch_flash_forward_nt<T, 33>(p, batch, stream);
  }
}

// ---- flash backward (bf16, fp16) ----
//
// A block owns 64 keys and walks over the query tiles. Its 8 warps split the work of each tile by
// role, so that no warp holds both wide accumulators (dK, 16 x C, and dV, 16 x Cv, would need
// about 260 registers a thread at C = 256, Cv = 258):
//   warps 0-3 (16 keys each): S^T = K Q^T, P^T, dP^T = V dO^T, dS^T = P^T (dP^T - D), which they
//             also write to shared memory; dK += dS^T Q in registers;
//   warps 4-7 (16 keys each): S^T and P^T again (the same instructions, so the same bits), and
//             dV += P^T dO in registers; then, from the shared dS^T, dQ += dS K for 16 queries
//             each, added to an fp32 dQ with atomics, or skipped when a deterministic pass
//             (corr_flash_dq_kernel) computes dQ instead.
// Both roles run their own loop (so neither carries the other's accumulator), meeting at three
// block barriers per tile. Every S, P, dP and dS is computed once per role that needs it.

struct FlashBackwardParams {
  const void* q;     // (B, Nq, ld_qk): q^ (not scaled by 1/T), zero-padded
  const void* k;     // (B, Nk, ld_qk): k^
  const void* v;     // (B, Nk, ld_v)
  const void* dout;  // (B, Nq, ld_v): dO, zero-padded
  const double* lse;  // (B, Nq)
  const float* d;     // (B, Nq): rowsum(dO * O)
  float* dq;          // (B, Nq, ld_qk), zeroed; null: dQ is left to corr_flash_dq_kernel
  float* dk;          // (B, Nk, ld_qk): T dL/dk^ (dQ alike: 1/T is the normalisation backward's)
  void* dv;           // (B, Nk, Cv)
  double inv_t;       // 1 / temperature
  int64_t Nq, Nk, Cv;
  int ld_qk;  // 8 * NTK exactly
  int ld_v;   // a multiple of 8, at most 8 * NTV
  int batch_offset;
  int q_stages;  // q^ buffers of the backward kernel: 2 where they fit (H100 at C = 256), else 1
  // Nk == 1: softmax over one key is the constant 1, so dS = 0 exactly. D = rowsum(dO * O) and
  // dP = dO . V then differ by roundings, which would leave a dQ of ~1e-7 where the exact one and
  // the unfused implementation's are 0 (see DESIGN-NOTES "corr_warp CUDA kernels").
  bool single_key;
};

constexpr int kBackwardThreads = 256;
constexpr int kDsStride = kFlashCols + 8;

template <int NTK, int NTV>
struct FlashBackwardSmem {
  static constexpr int kLdQK = smem_stride(8 * NTK);
  static constexpr int kLdV = smem_stride(8 * NTV);
  // K, Q (kLdQK), V, dO (kLdV), dS^T; then lse hi, lo and D of the query tile (fp32); then, with
  // two Q stages, the second Q buffer.
  static constexpr size_t kElems = size_t(2) * kFlashCols * kLdQK + size_t(2) * kFlashCols * kLdV +
                                   size_t(kFlashCols) * kDsStride;
  static __host__ __device__ size_t bytes(size_t elem, int q_stages = 1) {
    return (kElems + size_t(q_stages - 1) * kFlashCols * kLdQK) * elem +
           3 * kFlashCols * sizeof(float);
  }
};

__device__ __forceinline__ void store_u32(void* p, uint32_t v) {
#if defined(PNCC_CUDA_EMU)
  memcpy(p, &v, 4);
#else
  *static_cast<uint32_t*>(p) = v;
#endif
}

// P^T of one warp's 16 keys x 8 NT queries, in place of the unscaled scores S^T: exp(S/T - lse)
// with the queries' split lse from shared memory; keys past Nk and queries past Nq get 0.
template <int NT>
__device__ __forceinline__ void probabilities_t(float (&s)[NT][4], const float* lse_hi,
                                                const float* lse_lo, const SplitLse<float>& inv_t,
                                                int64_t key0, int64_t Nk, int64_t q0, int64_t Nq) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int qi = 8 * n + 2 * t + (e % 2);
      const bool valid = key0 + g + 8 * (e / 2) < Nk && q0 + qi < Nq;
      const SplitLse<float> lse{lse_hi[qi], lse_lo[qi]};
      s[n][e] = valid ? ptx::exp2_approx(scaled_minus_lse(s[n][e], inv_t, lse) * kLog2e) : 0.f;
    }
}

// Shared-memory views of one backward block.
template <typename T, int NTK, int NTV>
struct BackwardTiles {
  static constexpr int kLdQK = FlashBackwardSmem<NTK, NTV>::kLdQK;
  static constexpr int kLdV = FlashBackwardSmem<NTK, NTV>::kLdV;
  static constexpr int kVChunks = 2 * ((NTV + 1) / 2);  // V, dO: whole k-steps of 16 channels
  T *k, *q, *v, *dout, *ds, *q_second;
  float *lse_hi, *lse_lo, *d;
  __device__ BackwardTiles() {
    k = dynamic_smem<T>();
    q = k + kFlashCols * kLdQK;
    v = q + kFlashCols * kLdQK;
    dout = v + kFlashCols * kLdV;
    ds = dout + kFlashCols * kLdV;
    lse_hi = reinterpret_cast<float*>(ds + kFlashCols * kDsStride);
    lse_lo = lse_hi + kFlashCols;
    d = lse_lo + kFlashCols;
    q_second = reinterpret_cast<T*>(d + kFlashCols);  // 16-byte aligned: 3 x 64 floats before it
  }
  // The buffer of query tile `tile`'s q^: q, or with two stages q and q_second alternately (a
  // select, not an indexed array, which would live in local memory).
  __device__ T* query_rows(int64_t tile, int q_stages) const {
    return q_stages == 2 && (tile & 1) ? q_second : q;
  }
};

// The copies of one query tile are split by when their buffers fall free. dO and the statistics
// are last read before barrier (B) (dP^T, P^T and dS^T in one role, dV += P^T dO in the other), so
// the next tile's are started right after it and land while both roles run their dK and dQ
// products. q^ is read until barrier (C) (dK += dS^T Q): with one buffer its copy starts at the top
// of the tile, exposed; with two (q_stages, where the shared memory allows: an H100 at C = 256,
// not an A100) the next tile's copy starts right after barrier (A) into the other buffer, whose
// last reader finished before the previous (C), and lands behind the whole tile's products. Every
// block thread calls both (async_tile shares the copy among all 256).

// Starts the copy of q^ of query tile `tile` (rows [64 tile, 64 tile + 64)) into its buffer.
template <typename T, int NTK, int NTV>
__device__ __forceinline__ void load_query_rows(const BackwardTiles<T, NTK, NTV>& s,
                                                const FlashBackwardParams& p, int64_t b,
                                                int64_t tile) {
  using Tiles = BackwardTiles<T, NTK, NTV>;
  const T* qg = static_cast<const T*>(p.q) + b * p.Nq * p.ld_qk;
  async_tile<kBackwardThreads>(s.query_rows(tile, p.q_stages), Tiles::kLdQK, qg, p.ld_qk,
                               tile * kFlashCols, p.Nq, 0, p.ld_qk, kFlashCols, NTK);
  ptx::cp_async_commit();
}

// The top of query tile `tile` in either role: its q^ is copied (one stage) or prefetched (two),
// and after barrier (A) the next tile's copy starts (two stages). Returns the tile's q^ buffer.
template <typename T, int NTK, int NTV>
__device__ __forceinline__ const T* begin_query_tile(const BackwardTiles<T, NTK, NTV>& s,
                                                     const FlashBackwardParams& p, int64_t b,
                                                     int64_t tile) {
  if (p.q_stages == 1) load_query_rows(s, p, b, tile);
  ptx::cp_async_wait<0>();
  __syncthreads();  // (A) the query tile is in (its dO and statistics since the last tile)
  if (p.q_stages == 2 && (tile + 1) * kFlashCols < p.Nq) load_query_rows(s, p, b, tile + 1);
  return s.query_rows(tile, p.q_stages);
}

// Starts the copy of dO of query tile [q0, q0 + 64) and stores its statistics (lse, D).
template <typename T, int NTK, int NTV>
__device__ __forceinline__ void load_query_grads(const BackwardTiles<T, NTK, NTV>& s,
                                                 const FlashBackwardParams& p, int64_t b,
                                                 int64_t q0) {
  using Tiles = BackwardTiles<T, NTK, NTV>;
  const T* dog = static_cast<const T*>(p.dout) + b * p.Nq * p.ld_v;
  async_tile<kBackwardThreads>(s.dout, Tiles::kLdV, dog, p.ld_v, q0, p.Nq, 0, p.ld_v, kFlashCols,
                               Tiles::kVChunks);
  ptx::cp_async_commit();
  if (threadIdx.x < kFlashCols) {
    const int64_t q = q0 + threadIdx.x;
    const SplitLse<float> lse = split_lse<float>(q < p.Nq ? p.lse[b * p.Nq + q] : 0.0);
    s.lse_hi[threadIdx.x] = lse.hi;
    s.lse_lo[threadIdx.x] = lse.lo;
    s.d[threadIdx.x] = q < p.Nq ? p.d[b * p.Nq + q] : 0.f;
  }
}

// Warps 0-3: dS^T of their 16 keys, shared with warps 4-7, and dK.
template <typename T, int NTK, int NTV>
__device__ void backward_dk_role(const BackwardTiles<T, NTK, NTV>& s,
                                 const FlashBackwardParams& p, int64_t b, int64_t k0) {
  using Tiles = BackwardTiles<T, NTK, NTV>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float dk[NTK][4];
#pragma unroll
  for (int n = 0; n < NTK; ++n) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.f;
  const T* k_warp = s.k + 16 * warp * Tiles::kLdQK;
  const T* v_warp = s.v + 16 * warp * Tiles::kLdV;
  const SplitLse<float> inv_t = split_lse<float>(p.inv_t);
  for (int64_t tile = 0; tile * kFlashCols < p.Nq; ++tile) {
    const int64_t q0 = tile * kFlashCols;
    const T* sq = begin_query_tile(s, p, b, tile);  // (A)
    float dpt[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
    mma_nt_smem<T, 8>(dpt, v_warp, Tiles::kLdV, s.dout, Tiles::kLdV, Tiles::kVChunks / 2);
    // S^T and P^T in two halves of 32 queries, each turned into dS^T at once: a whole S^T next
    // to dP^T and dK spilled at C = 256.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float st[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n) st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
      mma_nt_smem<T, 4>(st, k_warp, Tiles::kLdQK, sq + 32 * h * Tiles::kLdQK, Tiles::kLdQK,
                        NTK / 2);
      probabilities_t<4>(st, s.lse_hi + 32 * h, s.lse_lo + 32 * h, inv_t, k0 + 16 * warp, p.Nk,
                         q0 + 32 * h, p.Nq);
#pragma unroll
      for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float d = s.d[32 * h + 8 * n + 2 * t + (e % 2)];
          float& ds = dpt[4 * h + n][e];  // dP^T becomes dS^T
          ds = p.single_key ? 0.f : softmax_grad(st[n][e], ds, d);
        }
    }
    uint32_t dst[4][4];  // dS^T packed to T: the A operand of dK += dS^T Q, and what is shared
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      acc_to_a<T, 8>(dst[kk], dpt, kk);
      T* row = s.ds + (16 * warp + g) * kDsStride + 16 * kk + 2 * t;  // n-tiles 2kk, 2kk + 1
      store_u32(row, dst[kk][0]);
      store_u32(row + 8 * kDsStride, dst[kk][1]);
      store_u32(row + 8, dst[kk][2]);
      store_u32(row + 8 * kDsStride + 8, dst[kk][3]);
    }
    __syncthreads();  // (B) dS^T is shared; dO and the statistics are free
    if (q0 + kFlashCols < p.Nq) load_query_grads(s, p, b, q0 + kFlashCols);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      mma_nn_regs<T, NTK>(dk, dst[kk], sq + 16 * kk * Tiles::kLdQK, Tiles::kLdQK);
    __syncthreads();  // (C) every warp is done with the query tile
  }
  float* dk_g = p.dk + b * p.Nk * p.ld_qk;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = k0 + 16 * warp + g + 8 * r;
    if (key >= p.Nk) continue;
#pragma unroll
    for (int n = 0; n < NTK; ++n) {
      dk_g[key * p.ld_qk + 8 * n + 2 * t] = dk[n][2 * r];
      dk_g[key * p.ld_qk + 8 * n + 2 * t + 1] = dk[n][2 * r + 1];
    }
  }
}

// Warps 4-7: dV of their 16 keys, and dQ of 16 queries of each tile from the shared dS^T.
template <typename T, int NTK, int NTV>
__device__ void backward_dv_role(const BackwardTiles<T, NTK, NTV>& s,
                                 const FlashBackwardParams& p, int64_t b, int64_t k0) {
  using Tiles = BackwardTiles<T, NTK, NTV>;
  const int warp = threadIdx.x / 32 - 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float dv[NTV][4];
#pragma unroll
  for (int n = 0; n < NTV; ++n) dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.f;
  const T* k_warp = s.k + 16 * warp * Tiles::kLdQK;
  const SplitLse<float> inv_t = split_lse<float>(p.inv_t);
  for (int64_t tile = 0; tile * kFlashCols < p.Nq; ++tile) {
    const int64_t q0 = tile * kFlashCols;
    const T* sq = begin_query_tile(s, p, b, tile);  // (A)
    float st[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
    mma_nt_smem<T, 8>(st, k_warp, Tiles::kLdQK, sq, Tiles::kLdQK, NTK / 2);
    probabilities_t<8>(st, s.lse_hi, s.lse_lo, inv_t, k0 + 16 * warp, p.Nk, q0, p.Nq);
    uint32_t pt[4][4];  // P^T packed to T up front: half the registers of st next to dv
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) acc_to_a<T, 8>(pt[kk], st, kk);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      mma_nn_regs<T, NTV>(dv, pt[kk], s.dout + 16 * kk * Tiles::kLdV, Tiles::kLdV);
    __syncthreads();  // (B) dS^T is in shared memory; dO and the statistics are free
    if (q0 + kFlashCols < p.Nq) load_query_grads(s, p, b, q0 + kFlashCols);
    if (p.dq != nullptr) {
      // dQ (16 queries of this warp x C) += dS K, 64 channels at a time; dS = (dS^T)^T comes
      // from ldmatrix .trans of the stored dS^T (rows are keys).
      const T* ds_lane = s.ds + ldm_row_b(lane) * kDsStride + 16 * warp + ldm_col_b(lane);
      float* dq_g = p.dq + b * p.Nq * p.ld_qk;
#pragma unroll 1
      for (int c0 = 0; c0 < 8 * NTK; c0 += 64) {
        float acc[8][4];
#pragma unroll
        for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t af[4];
          ptx::ldmatrix_x4_trans(af, ds_lane + 16 * kk * kDsStride);
          mma_nn_regs<T, 8>(acc, af, s.k + 16 * kk * Tiles::kLdQK + c0, Tiles::kLdQK);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t q = q0 + 16 * warp + g + 8 * r;
          if (q >= p.Nq) continue;
#pragma unroll
          for (int n = 0; n < 8; ++n) {
            atomicAdd(dq_g + q * p.ld_qk + c0 + 8 * n + 2 * t, acc[n][2 * r]);
            atomicAdd(dq_g + q * p.ld_qk + c0 + 8 * n + 2 * t + 1, acc[n][2 * r + 1]);
          }
        }
      }
    }
    __syncthreads();  // (C)
  }
  T* dv_g = static_cast<T*>(p.dv) + b * p.Nk * p.Cv;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = k0 + 16 * warp + g + 8 * r;
    if (key >= p.Nk) continue;
#pragma unroll
    for (int n = 0; n < NTV; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t c = 8 * n + 2 * t + e;
        if (c < p.Cv) dv_g[key * p.Cv + c] = from_float<T>(dv[n][2 * r + e]);
      }
  }
}

template <typename T, int NTK, int NTV>
__global__ void __launch_bounds__(kBackwardThreads, 1)
    corr_flash_backward_kernel(const FlashBackwardParams p) {
  using Tiles = BackwardTiles<T, NTK, NTV>;
  const Tiles s;
  const int64_t b = int64_t(blockIdx.y) + p.batch_offset;
  const int64_t k0 = int64_t(blockIdx.x) * kFlashCols;
  const T* kg = static_cast<const T*>(p.k) + b * p.Nk * p.ld_qk;
  const T* vg = static_cast<const T*>(p.v) + b * p.Nk * p.ld_v;
  async_tile<kBackwardThreads>(s.k, Tiles::kLdQK, kg, p.ld_qk, k0, p.Nk, 0, p.ld_qk, kFlashCols,
                               NTK);
  async_tile<kBackwardThreads>(s.v, Tiles::kLdV, vg, p.ld_v, k0, p.Nk, 0, p.ld_v, kFlashCols,
                               Tiles::kVChunks);
  ptx::cp_async_commit();  // waited for with the first query tile's groups
  if (p.Nq > 0) load_query_grads(s, p, b, 0);  // no copy may outlive the block
  if (p.Nq > 0 && p.q_stages == 2) load_query_rows(s, p, b, 0);
  if (threadIdx.x < 32 * 4) {
    backward_dk_role(s, p, b, k0);
  } else {
    backward_dv_role(s, p, b, k0);
  }
}

// The deterministic dQ: a block owns 64 queries and walks over the key tiles, recomputing S, P,
// dP and dS (the price of not adding dQ with atomics); dQ stays in registers.
template <typename T, int NTK, int NTV>
__global__ void __launch_bounds__(kFlashThreads, 1)
    corr_flash_dq_kernel(const FlashBackwardParams p) {
  using Tiles = BackwardTiles<T, NTK, NTV>;
  constexpr int ldq = Tiles::kLdQK, ldv = Tiles::kLdV;
  T* sq = dynamic_smem<T>();  // same sizes as the backward's tiles: Q, K, dO, V
  T* sk = sq + kFlashCols * ldq;
  T* sdo = sk + kFlashCols * ldq;
  T* sv = sdo + kFlashCols * ldv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t b = int64_t(blockIdx.y) + p.batch_offset;
  const int64_t q0 = int64_t(blockIdx.x) * kFlashRows;
  const T* qg = static_cast<const T*>(p.q) + b * p.Nq * p.ld_qk;
  const T* kg = static_cast<const T*>(p.k) + b * p.Nk * p.ld_qk;
  const T* vg = static_cast<const T*>(p.v) + b * p.Nk * p.ld_v;
  const T* dog = static_cast<const T*>(p.dout) + b * p.Nq * p.ld_v;
  async_tile(sq, ldq, qg, p.ld_qk, q0, p.Nq, 0, p.ld_qk, kFlashRows, NTK);
  async_tile(sdo, ldv, dog, p.ld_v, q0, p.Nq, 0, p.ld_v, kFlashRows, Tiles::kVChunks);

  SplitLse<float> lse[2];
  float d[2];
  bool row_valid[2];
  for (int r = 0; r < 2; ++r) {
    const int64_t q = q0 + 16 * warp + g + 8 * r;
    row_valid[r] = q < p.Nq;
    lse[r] = split_lse<float>(row_valid[r] ? p.lse[b * p.Nq + q] : 0.0);
    d[r] = row_valid[r] ? p.d[b * p.Nq + q] : 0.f;
  }
  const SplitLse<float> inv_t = split_lse<float>(p.inv_t);
  float dq[NTK][4];
#pragma unroll
  for (int n = 0; n < NTK; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
  // V_j is last read by dP = dO V_j^T, K_j by dQ += dS K_j: V_{j+1} is copied during the softmax
  // gradient and the dQ product (one extra barrier a tile), K_{j+1} only once K_j is free.
  if (p.Nk > 0) async_tile(sv, ldv, vg, p.ld_v, 0, p.Nk, 0, p.ld_v, kFlashCols, Tiles::kVChunks);
  for (int64_t k0 = 0; k0 < p.Nk; k0 += kFlashCols) {
    async_tile(sk, ldq, kg, p.ld_qk, k0, p.Nk, 0, p.ld_qk, kFlashCols, NTK);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();  // K_j, V_j (and Q, dO) are in
    float sc[8][4], dp[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[n][e] = dp[n][e] = 0.f;
    mma_nt_smem<T, 8>(sc, sq + 16 * warp * ldq, ldq, sk, ldq, NTK / 2);
    mma_nt_smem<T, 8>(dp, sdo + 16 * warp * ldv, ldv, sv, ldv, Tiles::kVChunks / 2);
    if (k0 + kFlashCols < p.Nk) {  // uniform over the block
      __syncthreads();  // every warp is done with V_j
      async_tile(sv, ldv, vg, p.ld_v, k0 + kFlashCols, p.Nk, 0, p.ld_v, kFlashCols,
                 Tiles::kVChunks);
      ptx::cp_async_commit();
    }
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const bool valid = row_valid[r] && k0 + 8 * n + 2 * t + (e % 2) < p.Nk && !p.single_key;
        const float prob = ptx::exp2_approx(scaled_minus_lse(sc[n][e], inv_t, lse[r]) * kLog2e);
        sc[n][e] = valid ? softmax_grad(prob, dp[n][e], d[r]) : 0.f;  // now dS
      }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t af[4];
      acc_to_a<T, 8>(af, sc, kk);
      mma_nn_regs<T, NTK>(dq, af, sk + 16 * kk * ldq, ldq);
    }
    __syncthreads();  // every warp is done with K_j
  }
  float* dq_g = p.dq + b * p.Nq * p.ld_qk;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t q = q0 + 16 * warp + g + 8 * r;
    if (!row_valid[r]) continue;
#pragma unroll
    for (int n = 0; n < NTK; ++n) {
      dq_g[q * p.ld_qk + 8 * n + 2 * t] = dq[n][2 * r];
      dq_g[q * p.ld_qk + 8 * n + 2 * t + 1] = dq[n][2 * r + 1];
    }
  }
}

// The (NTK, NTV) shapes the backward is built for: channels padded to 64 or 256, value channels
// to 32 or 264. Wider rows take the SIMT kernel.
constexpr int kBackwardMaxC = 256;
constexpr int kBackwardMaxCv = 264;

inline int backward_ntk(int64_t C) { return C <= 64 ? 8 : 32; }
inline int backward_ntv(int64_t Cv) { return Cv <= 32 ? 4 : 33; }

inline size_t flash_backward_smem(int64_t C, int64_t Cv, size_t elem) {
  const int ntk = backward_ntk(C), ntv = backward_ntv(Cv);
  if (ntk == 8) return ntv == 4 ? FlashBackwardSmem<8, 4>::bytes(elem)
                                : FlashBackwardSmem<8, 33>::bytes(elem);
  return ntv == 4 ? FlashBackwardSmem<32, 4>::bytes(elem) : FlashBackwardSmem<32, 33>::bytes(elem);
}

template <typename T, int NTK, int NTV>
cudaError_t launch_flash_backward_shape(FlashBackwardParams p, int64_t batch,
                                        cudaStream_t stream) {
  cudaError_t err = allow_max_dynamic_smem(corr_flash_backward_kernel<T, NTK, NTV>);
  if (err != cudaSuccess) return err;
  int max_smem = 0;
  err = max_dynamic_smem(&max_smem);
  if (err != cudaSuccess) return err;
  p.q_stages = FlashBackwardSmem<NTK, NTV>::bytes(sizeof(T), 2) <= size_t(max_smem) ? 2 : 1;
  const size_t smem = FlashBackwardSmem<NTK, NTV>::bytes(sizeof(T), p.q_stages);
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxBatchPerLaunch) {
    p.batch_offset = static_cast<int>(b0);
    const unsigned nb = static_cast<unsigned>(std::min<int64_t>(kMaxBatchPerLaunch, batch - b0));
    PNCC_LAUNCH(dim3(static_cast<unsigned>(ceil_div(p.Nk, kFlashCols)), nb), kBackwardThreads,
                smem, stream, corr_flash_backward_kernel<T, NTK, NTV>)(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The deterministic dQ pass (p.dq must be set; the main backward then ran with dq = null).
template <typename T, int NTK, int NTV>
cudaError_t launch_flash_dq_shape(FlashBackwardParams p, int64_t batch, cudaStream_t stream) {
  cudaError_t err = allow_max_dynamic_smem(corr_flash_dq_kernel<T, NTK, NTV>);
  if (err != cudaSuccess) return err;
  const size_t smem = size_t(2) * kFlashCols *
                      (FlashBackwardSmem<NTK, NTV>::kLdQK + FlashBackwardSmem<NTK, NTV>::kLdV) *
                      sizeof(T);
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxBatchPerLaunch) {
    p.batch_offset = static_cast<int>(b0);
    const unsigned nb = static_cast<unsigned>(std::min<int64_t>(kMaxBatchPerLaunch, batch - b0));
    PNCC_LAUNCH(dim3(static_cast<unsigned>(ceil_div(p.Nq, kFlashRows)), nb), kFlashThreads, smem,
                stream, corr_flash_dq_kernel<T, NTK, NTV>)(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Runs the backward; with `deterministic`, dQ comes from the dQ pass instead of atomics. p.dq is
// the (zeroed, for atomics) fp32 dQ; p.ld_qk must be 8 * backward_ntk(C) and p.ld_v <= 8 * NTV.
template <typename T>
cudaError_t launch_flash_backward(FlashBackwardParams p, int64_t batch, bool deterministic,
                                  cudaStream_t stream) {
  float* dq = p.dq;
  if (deterministic) p.dq = nullptr;
  const int ntk = backward_ntk(p.ld_qk), ntv = backward_ntv(p.Cv);
  cudaError_t err;
  if (ntk == 8) {
    err = ntv == 4 ? launch_flash_backward_shape<T, 8, 4>(p, batch, stream)
                   : launch_flash_backward_shape<T, 8, 33>(p, batch, stream);
  } else {
    err = ntv == 4 ? launch_flash_backward_shape<T, 32, 4>(p, batch, stream)
                   : launch_flash_backward_shape<T, 32, 33>(p, batch, stream);
  }
  if (err != cudaSuccess || !deterministic) return err;
  p.dq = dq;
  if (ntk == 8) {
    return ntv == 4 ? launch_flash_dq_shape<T, 8, 4>(p, batch, stream)
                    : launch_flash_dq_shape<T, 8, 33>(p, batch, stream);
  }
  return ntv == 4 ? launch_flash_dq_shape<T, 32, 4>(p, batch, stream)
                  : launch_flash_dq_shape<T, 32, 33>(p, batch, stream);
}

// ---- register-tiled SIMT kernel (fp32, and the bf16/fp16 fallback; see the table at the top) ----
//
// A block owns 64 rows of one batch entry and streams the other side in tiles of 64; one kernel,
// specialised by Mode, serves five passes:
//
//   mode  rows  cols  score tile          output product       output
//   kFwd  q     k     S = q^ k^T          O = O*alpha + P V    out (online softmax), lse
//   kD    q     k     S, dP = dO V^T      (none)               D = rowsum(P * dP) (fp32)
//   kDq   q     k     S, dP = dO V^T      acc += dS k^         T dL/dq^ (fp32)
//   kDk   k     q     S^T, dP^T = V dO^T  acc += dS^T q^       T dL/dk^ (fp32)
//   kDv   k     q     S^T                 acc += P^T dO        dL/dV
//
// 256 threads as a 16 x 16 grid. Thread (ty, tx) keeps, in registers, the scores (and dP) of rows
// 4ty..4ty+3 and columns 4tx..4tx+3 of the tile, and the output accumulators of its 4 rows and
// the channels 2tx + 32jb + {0, 1}, jb < NB, of the block's window of 32 NB channels. Both
// products are plain fp32 FMAs from shared memory, never TF32: per channel of the score product one
// 16-byte load of 4 row values and one of 4 column values feed 16 FMAs; per key of the output
// product one 16-byte load of P and NB 8-byte loads of X feed 8 NB FMAs. The tiles are staged in
// shared memory as fp32 (16-bit inputs are widened on the copy). Row statistics (the online
// softmax's maximum and sum, D) are reduced over the 16 lanes that share ty with shuffles. Every
// output element is written by one thread of one block: no atomics, deterministic. D comes from
// the recomputed P and dP (kD), as in the CPU kernel: see DESIGN-NOTES "corr_warp".

constexpr int kSimtThreads = 256;
constexpr int kSimtRows = 64;  // rows per block
constexpr int kSimtCols = 64;  // columns (other side) per tile
constexpr int kSimtKC = 32;    // channels per chunk of a score product; keys per chunk of X
constexpr int kSimtLd = kSimtRows + 4;  // k-major tiles: 64 floats + 4, rows on 16 bytes
constexpr int kSimtNarrow = 2;  // output windows of 32 NB channels: 64 (fp32 outputs up to 64)
constexpr int kSimtWide = 9;    // and 288 (Cv = 258 in one window; the 16-bit fallback's only one)

enum class Mode { kFwd, kD, kDq, kDk, kDv };

template <int NB>
struct SimtSmem {
  static constexpr int kWidth = 32 * NB;  // output channels per block (grid y)
  static constexpr int kLdX = kWidth + 4;
  // Region 0: the score chunk (rows^T, cols^T: k-major, 32 x kSimtLd each) or, after it, the X
  // chunk (32 keys x kLdX); region 1: the tile's P^T or dS^T (64 keys x kSimtLd).
  static constexpr int kScore = 2 * kSimtKC * kSimtLd;
  static constexpr int kRegion0 = kScore > kSimtKC * kLdX ? kScore : kSimtKC * kLdX;
  static constexpr size_t kBytes = size_t(kRegion0 + kSimtCols * kSimtLd) * sizeof(float);
};

// Pointers and sizes of one pass (see the table above). Element pointers are T*.
struct TileParams {
  const void* rows;   // (B, n_rows, C) normalised rows (not scaled by 1/T)
  const void* cols;   // (B, n_cols, C) normalised columns
  const void* rows2;  // (B, n_rows, Cv): dO (kD, kDq) or V (kDk), the row side of dP
  const void* cols2;  // (B, n_cols, Cv): V (kD, kDq) or dO (kDk), the column side of dP
  const void* x;      // (B, n_cols, n_out): right operand of the output product
  const double* lse;  // (B, Nq), read by the backward modes
  const float* d;     // (B, Nq): rowsum(P * dP), read by kDq and kDk
  float* d_out;       // (B, Nq): kD
  void* out;          // (B, n_rows, n_out): kFwd and kDv
  float* out_f32;     // (B, n_rows, n_out): kDq and kDk
  double* lse_out;    // (B, Nq): kFwd
  double inv_t;       // 1 / temperature: rows and cols are unscaled, kDq/kDk write T dL/dx^
  int64_t n_rows, n_cols, C, Cv, n_out;
  int64_t batch_offset;
};

// N floats of one shared-memory load, aligned to their size so that the load is one instruction.
template <int N>
struct alignas(4 * N) Floats {
  float v[N];
};

// 16- and 8-byte shared-memory loads (N = 4: LDS.128, N = 2: LDS.64) and a 16-byte store (STS.128).
template <int N>
__device__ __forceinline__ Floats<N> lds(const float* p) {
#if defined(PNCC_CUDA_EMU)
  Floats<N> r;
  memcpy(r.v, p, sizeof(r.v));
  return r;
#else
  return *reinterpret_cast<const Floats<N>*>(p);
#endif
}
__device__ __forceinline__ void sts4(float* p, float a, float b, float c, float d) {
#if defined(PNCC_CUDA_EMU)
  const float v[4] = {a, b, c, d};
  memcpy(p, v, 16);
#else
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
#endif
}

// A value as the product that follows sees it: rounded to T (a 16-bit fallback rounds P and dS
// as the tensor-core kernels do), kept as fp32 for fp32.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  if constexpr (sizeof(T) == 2) return to_float(from_float<T>(v));
  return v;
}

// dst (32 channels x kSimtLd, k-major) = channels [c0, c0 + 32) of rows [r0, r0 + 64) of a
// row-major (n, width) matrix, widened to fp32, zero outside [0, n) x [0, width). Lane l takes
// channel l % 8 (+ 8 per step) of row l / 8 (+ 4 per warp): 8 lanes read 8 consecutive channels
// of one row, and one instruction's 32 stores hit 32 banks (4c + r mod 32 is a permutation).
template <typename T>
__device__ __forceinline__ void simt_load_transposed(float* dst, const T* src, int64_t r0,
                                                     int64_t n, int64_t c0, int64_t width) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int r = lane / 8 + 4 * warp + 32 * (e % 2);
    const int c = lane % 8 + 8 * (e / 2);
    const int64_t gr = r0 + r, gc = c0 + c;
    dst[c * kSimtLd + r] = gr < n && gc < width ? to_float(src[gr * width + gc]) : 0.f;
  }
}

// dst (32 keys x kW channels, stride kW + 4) = rows [r0, r0 + 32), channels [c0, c0 + kW) of a
// row-major (n, width) matrix, widened to fp32, zero outside.
template <int kW, typename T>
__device__ __forceinline__ void simt_load_rows(float* dst, const T* src, int64_t r0, int64_t n,
                                               int64_t c0, int64_t width) {
  for (int e = threadIdx.x; e < kSimtKC * kW; e += kSimtThreads) {
    const int r = e / kW, c = e % kW;
    const int64_t gr = r0 + r, gc = c0 + c;
    dst[r * (kW + 4) + c] = gr < n && gc < width ? to_float(src[gr * width + gc]) : 0.f;
  }
}

// s = this thread's 4 x 4 scores: rows[row0 + 4ty + i] . cols[col0 + 4tx + j] over `width`
// channels, 0 for rows or columns out of range. Even and odd channels run separate FMA chains, as
// the CPU GEMM does (one chain per score failed the 3x gradient rule of test_stress_sizes[2] on
// tools/cuda_emu).
template <typename T>
__device__ __forceinline__ void simt_scores(float (&s)[4][4], float* a_s, float* b_s,
                                            const T* rows, int64_t row0, int64_t n_rows,
                                            const T* cols, int64_t col0, int64_t n_cols,
                                            int64_t width) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float odd[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] = odd[i][j] = 0.f;
  for (int64_t c0 = 0; c0 < width; c0 += kSimtKC) {
    __syncthreads();  // every thread is done with region 0 (the last chunk, X or the other product)
    simt_load_transposed(a_s, rows, row0, n_rows, c0, width);
    simt_load_transposed(b_s, cols, col0, n_cols, c0, width);
    __syncthreads();
#pragma unroll 2
    for (int k = 0; k < kSimtKC; k += 2) {
      const Floats<4> a0 = lds<4>(a_s + k * kSimtLd + 4 * ty);
      const Floats<4> b0 = lds<4>(b_s + k * kSimtLd + 4 * tx);
      const Floats<4> a1 = lds<4>(a_s + (k + 1) * kSimtLd + 4 * ty);
      const Floats<4> b1 = lds<4>(b_s + (k + 1) * kSimtLd + 4 * tx);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s[i][j] = fmaf(a0.v[i], b0.v[j], s[i][j]);
          odd[i][j] = fmaf(a1.v[i], b1.v[j], odd[i][j]);
        }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] += odd[i][j];
}

// Sum or maximum over the 16 lanes that share ty (lane bits 0-3), every lane getting the result.
__device__ __forceinline__ float half_warp_sum(float v) {
  for (int o = 1; o < 16; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float half_warp_max(float v) {
  for (int o = 1; o < 16; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Two blocks per SM (128 registers) where that leaves no spill: the narrow windows except kDq and
// kDk (S and dP both live, plus the queries' statistics); the others take up to 255 registers.
template <Mode mode, int NB>
constexpr int kSimtMinBlocks =
    NB == kSimtNarrow && mode != Mode::kDq && mode != Mode::kDk ? 2 : 1;

template <typename T, Mode mode, int NB>
__global__ void __launch_bounds__(kSimtThreads, (kSimtMinBlocks<mode, NB>))
    corr_simt_kernel(const TileParams prm) {
  using Smem = SimtSmem<NB>;
  float* smem = dynamic_smem<float>();
  float* a_s = smem;                     // region 0: rows^T chunk
  float* b_s = smem + kSimtKC * kSimtLd;  //           cols^T chunk
  float* x_s = smem;                     //           or the X chunk
  float* p_s = smem + Smem::kRegion0;    // region 1: P^T or dS^T

  constexpr bool kRowsAreQueries = mode == Mode::kFwd || mode == Mode::kD || mode == Mode::kDq;
  constexpr bool kNeedsDp = mode == Mode::kD || mode == Mode::kDq || mode == Mode::kDk;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t b = int64_t(blockIdx.z) + prm.batch_offset;
  const int64_t row0 = int64_t(blockIdx.x) * kSimtRows;
  const int64_t out0 = int64_t(blockIdx.y) * Smem::kWidth;
  const int64_t Nq = kRowsAreQueries ? prm.n_rows : prm.n_cols;
  const T* rows = static_cast<const T*>(prm.rows) + b * prm.n_rows * prm.C;
  const T* cols = static_cast<const T*>(prm.cols) + b * prm.n_cols * prm.C;
  const T* rows2 = kNeedsDp ? static_cast<const T*>(prm.rows2) + b * prm.n_rows * prm.Cv : nullptr;
  const T* cols2 = kNeedsDp ? static_cast<const T*>(prm.cols2) + b * prm.n_cols * prm.Cv : nullptr;
  const T* x = static_cast<const T*>(prm.x) + b * prm.n_cols * prm.n_out;
  const float inv_f = static_cast<float>(prm.inv_t);
  const SplitLse<float> inv_t = split_lse<float>(prm.inv_t);

  // The statistics of this thread's rows when they are queries (lse, and D for kDq).
  SplitLse<float> lse_r[4] = {};
  float d_r[4] = {};
  if constexpr (kRowsAreQueries && mode != Mode::kFwd) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t q = row0 + 4 * ty + i;
      lse_r[i] = split_lse<float>(q < Nq ? prm.lse[b * Nq + q] : 0.0);
      if (mode == Mode::kDq) d_r[i] = q < Nq ? prm.d[b * Nq + q] : 0.f;
    }
  }
  float acc[4][2 * NB];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int c = 0; c < 2 * NB; ++c) acc[i][c] = 0.f;
  // kFwd: the running maximum of the unscaled scores (the same in the 16 lanes of a row) and
  // this thread's part of the row sum; kD: this thread's part of D.
  float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
  float l[4] = {0.f, 0.f, 0.f, 0.f};

  for (int64_t col0 = 0; col0 < prm.n_cols; col0 += kSimtCols) {
    float s[4][4], dp[4][4] = {};
    simt_scores(s, a_s, b_s, rows, row0, prm.n_rows, cols, col0, prm.n_cols, prm.C);
    if constexpr (kNeedsDp)
      simt_scores(dp, a_s, b_s, rows2, row0, prm.n_rows, cols2, col0, prm.n_cols, prm.Cv);
    bool col_ok[4];
    SplitLse<float> lse_c[4] = {};  // the columns' statistics when they are queries
    float d_c[4] = {};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = col0 + 4 * tx + j;
      col_ok[j] = col < prm.n_cols;
      if constexpr (!kRowsAreQueries) {
        lse_c[j] = split_lse<float>(col_ok[j] ? prm.lse[b * Nq + col] : 0.0);
        if (kNeedsDp) d_c[j] = col_ok[j] ? prm.d[b * Nq + col] : 0.f;
      }
    }

    float v[4][4];  // P or dS of the tile, rounded as the output product sees it; 0 off range
    if constexpr (mode == Mode::kFwd) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 4; ++j) mx = col_ok[j] ? fmaxf(mx, s[i][j]) : mx;
        // Finite: the tile holds a valid column. The maximum first, then (s - m) / T.
        const float m_new = fmaxf(m[i], half_warp_max(mx));
        const float alpha = m[i] == m_new ? 1.f : acc_exp((m[i] - m_new) * inv_f);
        m[i] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          v[i][j] = col_ok[j] ? round_to<T>(acc_exp((s[i][j] - m_new) * inv_f)) : 0.f;
          sum += v[i][j];  // what the product with V sees, so numerator and denominator agree
        }
        l[i] = l[i] * alpha + sum;
#pragma unroll
        for (int c = 0; c < 2 * NB; ++c) acc[i][c] *= alpha;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float val = 0.f;
          if (col_ok[j]) {
            const float p = acc_exp(scaled_minus_lse(s[i][j], inv_t, kRowsAreQueries ? lse_r[i]
                                                                                     : lse_c[j]));
            if (mode == Mode::kD) {
              l[i] += p * dp[i][j];
            } else {
              val = kNeedsDp ? softmax_grad(p, dp[i][j], kRowsAreQueries ? d_r[i] : d_c[j]) : p;
            }
          }
          v[i][j] = round_to<T>(val);
        }
    }
    if constexpr (mode != Mode::kD) {  // kD has no output product
#pragma unroll
      for (int j = 0; j < 4; ++j)  // P^T: row k of p_s is column k of the tile
        sts4(p_s + (4 * tx + j) * kSimtLd + 4 * ty, v[0][j], v[1][j], v[2][j], v[3][j]);
      for (int kc = 0; kc < kSimtCols; kc += kSimtKC) {
        __syncthreads();  // region 0 is free; P^T is complete
        simt_load_rows<Smem::kWidth>(x_s, x, col0 + kc, prm.n_cols, out0, prm.n_out);
        __syncthreads();
#pragma unroll 2
        for (int k = 0; k < kSimtKC; ++k) {
          const Floats<4> pv = lds<4>(p_s + (kc + k) * kSimtLd + 4 * ty);
#pragma unroll
          for (int jb = 0; jb < NB; ++jb) {
            const Floats<2> xv = lds<2>(x_s + k * Smem::kLdX + 2 * tx + 32 * jb);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              acc[i][2 * jb] = fmaf(pv.v[i], xv.v[0], acc[i][2 * jb]);
              acc[i][2 * jb + 1] = fmaf(pv.v[i], xv.v[1], acc[i][2 * jb + 1]);
            }
          }
        }
      }
    }
  }

  if constexpr (mode == Mode::kFwd || mode == Mode::kD) {
#pragma unroll
    for (int i = 0; i < 4; ++i) l[i] = half_warp_sum(l[i]);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = row0 + 4 * ty + i;
    if (r >= prm.n_rows) continue;
    if constexpr (mode == Mode::kD) {
      if (tx == 0) prm.d_out[b * Nq + r] = l[i];
    } else {
#pragma unroll
      for (int jb = 0; jb < NB; ++jb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t oc = out0 + 2 * tx + 32 * jb + e;
          if (oc >= prm.n_out) continue;
          const int64_t idx = (b * prm.n_rows + r) * prm.n_out + oc;
          float val = acc[i][2 * jb + e];
          if constexpr (mode == Mode::kFwd) val /= l[i];
          if constexpr (mode == Mode::kDq || mode == Mode::kDk) {
            prm.out_f32[idx] = val;
          } else {
            static_cast<T*>(prm.out)[idx] = from_float<T>(val);
          }
        }
    }
    if constexpr (mode == Mode::kFwd) {
      if (blockIdx.y == 0 && tx == 0) prm.lse_out[b * Nq + r] = scaled_lse(m[i], l[i], prm.inv_t);
    }
  }
}

// The output windows of one launch must fit gridDim.y: the caller's check.
inline int64_t simt_windows(int64_t n_out, int nb) {
  const int64_t w = ceil_div(n_out, 32 * nb);
  return w < 1 ? 1 : w;
}
constexpr int64_t kSimtMaxWindows = 65535;

template <typename T, Mode mode, int NB>
cudaError_t launch_simt_nb(TileParams prm, int64_t batch, cudaStream_t stream) {
  cudaError_t err = allow_max_dynamic_smem(corr_simt_kernel<T, mode, NB>);
  if (err != cudaSuccess) return err;
  const int64_t windows = simt_windows(prm.n_out, NB);
  if (windows > kSimtMaxWindows) return cudaErrorInvalidConfiguration;
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxBatchPerLaunch) {
    prm.batch_offset = b0;
    const dim3 grid(static_cast<unsigned>(ceil_div(prm.n_rows, kSimtRows)),
                    static_cast<unsigned>(windows),
                    static_cast<unsigned>(std::min<int64_t>(kMaxBatchPerLaunch, batch - b0)));
    PNCC_LAUNCH(grid, kSimtThreads, SimtSmem<NB>::kBytes, stream,
                corr_simt_kernel<T, mode, NB>)(prm);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Runs one pass over every batch entry. fp32 outputs up to 64 channels take the narrow window;
// wider ones, and every 16-bit fallback (wide by construction), windows of 288. Shared memory is
// at most 54 KiB, so the kernel fits every device from sm_70 on.
template <typename T, Mode mode>
cudaError_t launch_simt(const TileParams& prm, int64_t batch, cudaStream_t stream) {
  // kD has no output product (n_out == 0): one window of the narrow width.
  if (prm.n_rows == 0 || (prm.n_out == 0 && mode != Mode::kD) || batch == 0) return cudaSuccess;
  if constexpr (mode == Mode::kD) {
    return launch_simt_nb<T, mode, kSimtNarrow>(prm, batch, stream);
  } else if constexpr (sizeof(T) == 2) {
    return launch_simt_nb<T, mode, kSimtWide>(prm, batch, stream);
  } else {
    return prm.n_out <= 32 * kSimtNarrow ? launch_simt_nb<T, mode, kSimtNarrow>(prm, batch, stream)
                                         : launch_simt_nb<T, mode, kSimtWide>(prm, batch, stream);
  }
}

}  // namespace corr
}  // namespace pncc
