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
//   corr_tile_kernel                fp32 (and    the SIMT tile kernel: scores and products as fp32
//                                   fallbacks)   FMAs (never TF32), modes kFwd/kD/kDq/kDk/kDv
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

// x (n_rows, C) -> out (n_rows, ld_out) with out[:, C:] = 0, never scaled by 1/temperature. With
// normalize false it is an exact copy, which pads V and dO for the 16-byte copies of the flash kernels.
struct NormalizeParams {
  const void* x;
  void* out;
  RowNorm<double>* stats;  // (n_rows,) or null
  int64_t n_rows, C, ld_out;
  double eps;
  bool normalize;
};

template <typename T>
__global__ void __launch_bounds__(kRowThreads) corr_normalize_kernel(const NormalizeParams p) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (r >= p.n_rows) return;  // whole warps leave together: n_rows is per warp
  const T* x = static_cast<const T*>(p.x) + r * p.C;
  T* out = static_cast<T*>(p.out) + r * p.ld_out;
  const RowNorm<double> st = warp_row_stats(x, p.C, p.normalize, p.eps);
  const int lane = threadIdx.x % 32;
  for (int64_t c = lane; c < p.ld_out; c += 32) {
    const double v = c < p.C ? row_norm_apply(st, double(to_float(x[c]))) : 0.0;
    out[c] = from_float<T>(static_cast<float>(v));
  }
  if (p.stats != nullptr && lane == 0) p.stats[r] = st;
}

// dL/dx from g = T dL/dx^ (fp32, row stride ld_g: the main kernels' products of the unscaled dS)
// and the statistics of the forward's rows; g_scale = 1/temperature is applied here, in double.
struct NormalizeBackwardParams {
  const float* g;
  const void* x;
  const RowNorm<double>* stats;
  void* grad_x;
  int64_t n_rows, C, ld_g;
  double eps, g_scale;
};

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
    g_dot_c += double(gr[c]) * p.g_scale * (to_float(xr[c]) - st.mean);
  const double coef = row_norm_grad_coef(st, warp_sum(g_dot_c), p.eps);
  double sum = 0;
  for (int64_t c = lane; c < p.C; c += 32)
    sum += row_norm_grad_c(st, coef, double(gr[c]) * p.g_scale, double(to_float(xr[c])));
  const double mean = st.centred ? warp_sum(sum) / static_cast<double>(p.C) : 0.0;
  T* gx = static_cast<T*>(p.grad_x) + r * p.C;
  for (int64_t c = lane; c < p.C; c += 32) {
    const double dc =
        row_norm_grad_c(st, coef, double(gr[c]) * p.g_scale, double(to_float(xr[c])));
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
  // K, Q (kLdQK), V, dO (kLdV), dS^T; then lse hi, lo and D of the query tile (fp32).
  static constexpr size_t kElems = size_t(2) * kFlashCols * kLdQK + size_t(2) * kFlashCols * kLdV +
                                   size_t(kFlashCols) * kDsStride;
  static __host__ __device__ size_t bytes(size_t elem) {
    return kElems * elem + 3 * kFlashCols * sizeof(float);
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
  T *k, *q, *v, *dout, *ds;
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
  }
};

// Starts the copies of query tile [q0, q0 + 64) (q^ and dO) and stores its statistics; both
// roles call it at the top of each tile, after the barrier that ends the previous one.
template <typename T, int NTK, int NTV>
__device__ __forceinline__ void load_query_tile(const BackwardTiles<T, NTK, NTV>& s,
                                                const FlashBackwardParams& p, int64_t b,
                                                int64_t q0) {
  using Tiles = BackwardTiles<T, NTK, NTV>;
  const T* qg = static_cast<const T*>(p.q) + b * p.Nq * p.ld_qk;
  const T* dog = static_cast<const T*>(p.dout) + b * p.Nq * p.ld_v;
  async_tile<kBackwardThreads>(s.q, Tiles::kLdQK, qg, p.ld_qk, q0, p.Nq, 0, p.ld_qk, kFlashCols,
                               NTK);
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
  for (int64_t q0 = 0; q0 < p.Nq; q0 += kFlashCols) {
    load_query_tile(s, p, b, q0);
    ptx::cp_async_wait<0>();
    __syncthreads();  // (A) the query tile is in
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
      mma_nt_smem<T, 4>(st, k_warp, Tiles::kLdQK, s.q + 32 * h * Tiles::kLdQK, Tiles::kLdQK,
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
    __syncthreads();  // (B) dS^T is shared
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      mma_nn_regs<T, NTK>(dk, dst[kk], s.q + 16 * kk * Tiles::kLdQK, Tiles::kLdQK);
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
  for (int64_t q0 = 0; q0 < p.Nq; q0 += kFlashCols) {
    load_query_tile(s, p, b, q0);
    ptx::cp_async_wait<0>();
    __syncthreads();  // (A)
    float st[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.f;
    mma_nt_smem<T, 8>(st, k_warp, Tiles::kLdQK, s.q, Tiles::kLdQK, NTK / 2);
    probabilities_t<8>(st, s.lse_hi, s.lse_lo, inv_t, k0 + 16 * warp, p.Nk, q0, p.Nq);
    uint32_t pt[4][4];  // P^T packed to T up front: half the registers of st next to dv
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) acc_to_a<T, 8>(pt[kk], st, kk);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      mma_nn_regs<T, NTV>(dv, pt[kk], s.dout + 16 * kk * Tiles::kLdV, Tiles::kLdV);
    __syncthreads();  // (B) dS^T is in shared memory
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
  ptx::cp_async_commit();  // waited for with the first query tile's group
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
  for (int64_t k0 = 0; k0 < p.Nk; k0 += kFlashCols) {
    async_tile(sk, ldq, kg, p.ld_qk, k0, p.Nk, 0, p.ld_qk, kFlashCols, NTK);
    async_tile(sv, ldv, vg, p.ld_v, k0, p.Nk, 0, p.ld_v, kFlashCols, Tiles::kVChunks);
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
    __syncthreads();  // every warp is done with K_j, V_j
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
  const size_t smem = FlashBackwardSmem<NTK, NTV>::bytes(sizeof(T));
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

// ---- SIMT tile kernel (fp32; see the table at the top) ----
//
// A block owns kBR rows of one batch entry and streams the other side in tiles of kBC; one kernel,
// specialised by Mode, serves five passes:
//
//   mode  rows  cols  score tile          output GEMM          output
//   kFwd  q     k     S = q^ k^T          O = O*alpha + P V    out (online softmax), lse
//   kD    q     k     S, dP = dO V^T      (none)               D = rowsum(P * dP) (fp32)
//   kDq   q     k     S, dP = dO V^T      acc += dS k^         dL/dq^ (fp32)
//   kDk   k     q     S^T, dP^T = V dO^T  acc += dS^T q^       dL/dk^ (fp32)
//   kDv   k     q     S^T                 acc += P^T dO        dL/dV
//
// Every output row is written by one block, so it needs no atomics and is deterministic. D comes
// from the recomputed P and dP (kD), as in the CPU kernel: see DESIGN-NOTES "corr_warp".

constexpr int kBR = 64;  // rows per block
constexpr int kBC = 64;  // columns (other side) per tile
constexpr int kKC = 32;  // channels per chunk of a score product
constexpr int kThreads = 128;
static_assert(kBR % 16 == 0 && kBC % 16 == 0 && kKC % 16 == 0, "tiles are even-sized");
static_assert(kThreads >= kBR && kThreads >= kBC, "one thread per row or column of statistics");

enum class Mode { kFwd, kD, kDq, kDk, kDv };

template <bool kBT>
__device__ __forceinline__ int b_offset(int j, int k, int ldb) {
  return kBT ? j * ldb + k : k * ldb + j;
}

// C (fp32, M x N) += A (M x K) * op(B), with B stored (N x K) and op = transpose when kBT, or B
// stored (K x N) otherwise. Plain fp32 FMAs (TF32 would lose the accuracy of a plain fp32
// implementation); even and odd products go to separate sums, as in the CPU GEMM: one FMA chain
// per score failed the 3x gradient rule of test_stress_sizes[2] on tools/cuda_emu.
template <typename T, bool kBT>
__device__ void tile_mma(const T* A, int lda, const T* B, int ldb, float* C, int ldc, int M,
                         int N, int K) {
  for (int e = threadIdx.x; e < M * N; e += kThreads) {
    const int i = e / N, j = e % N;
    float even = 0.f, odd = 0.f;
    for (int k = 0; k < K; k += 2) {
      even = fmaf(to_float(A[i * lda + k]), to_float(B[b_offset<kBT>(j, k, ldb)]), even);
      odd = fmaf(to_float(A[i * lda + k + 1]), to_float(B[b_offset<kBT>(j, k + 1, ldb)]), odd);
    }
    C[i * ldc + j] += even + odd;
  }
}

template <typename T>
struct TileLayout {
  // Row padding: 16-bit tiles by 8 elements, fp32 tiles by 4 (staggers rows across banks).
  static constexpr int kPad = sizeof(T) == 2 ? 8 : 4;
  int ld_ab, ld_s, ld_p, ld_x, ld_acc;
  size_t a, b, s, dp, p, x, acc, stats, bytes;

  // Reserves n bytes at `off`, 128-byte aligned, and returns where they start.
  __host__ __device__ static size_t take(size_t& off, size_t n) {
    const size_t start = off;
    off = (off + n + 127) & ~size_t(127);
    return start;
  }

  __host__ __device__ explicit TileLayout(int out_tile) {
    ld_ab = kKC + kPad;
    ld_s = kBC + 4;
    ld_p = kBC + kPad;
    ld_x = out_tile + kPad;
    ld_acc = out_tile + 4;
    size_t off = 0;
    a = take(off, size_t(kBR) * ld_ab * sizeof(T));
    b = take(off, size_t(kBC) * ld_ab * sizeof(T));
    s = take(off, size_t(kBR) * ld_s * sizeof(float));
    dp = take(off, size_t(kBR) * ld_s * sizeof(float));
    p = take(off, size_t(kBR) * ld_p * sizeof(T));
    x = take(off, size_t(kBC) * ld_x * sizeof(T));
    acc = take(off, size_t(kBR) * ld_acc * sizeof(float));
    // m, l, alpha per row; lse hi, lo and D per row or column.
    stats = take(off, size_t(6) * 64 * sizeof(float));
    bytes = off;
  }
};

// Pointers and sizes of one tile pass (see the table above). Element pointers are T*.
struct TileParams {
  const void* rows;   // (B, n_rows, C) normalised rows
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
  int out_tile;  // output columns per block, a multiple of 16
  int64_t batch_offset;
};

// Copies a (tile_rows x tile_cols) window of a row-major (n, ld_src) matrix into shared memory,
// zero-filling everything outside [0, n) x [0, width).
template <typename T>
__device__ void load_tile(T* dst, int ld_dst, const T* src, int64_t ld_src, int64_t r0, int64_t n,
                          int64_t c0, int64_t width, int tile_rows, int tile_cols) {
  for (int e = threadIdx.x; e < tile_rows * tile_cols; e += kThreads) {
    const int i = e / tile_cols, j = e % tile_cols;
    const int64_t gr = r0 + i, gc = c0 + j;
    dst[i * ld_dst + j] = (gr < n && gc < width) ? src[gr * ld_src + gc] : from_float<T>(0.f);
  }
}

__device__ inline void zero_f32(float* dst, int ld, int rows, int cols) {
  for (int e = threadIdx.x; e < rows * cols; e += kThreads) dst[(e / cols) * ld + e % cols] = 0.f;
}

// out (kBR x kBC, fp32) = rows[row0 : row0 + kBR] . cols[col0 : col0 + kBC]^T over `width`
// channels, staged through a_s and b_s chunk by chunk. Out-of-range rows and columns give 0.
template <typename T>
__device__ void score_tile(T* a_s, T* b_s, int ld_ab, const T* rows, int64_t row0, int64_t n_rows,
                           const T* cols, int64_t col0, int64_t n_cols, int64_t width, float* out,
                           int ld_out) {
  zero_f32(out, ld_out, kBR, kBC);
  for (int64_t c0 = 0; c0 < width; c0 += kKC) {
    __syncthreads();  // a_s and b_s are free; the zeroed `out` is visible
    load_tile(a_s, ld_ab, rows, width, row0, n_rows, c0, width, kBR, kKC);
    load_tile(b_s, ld_ab, cols, width, col0, n_cols, c0, width, kBC, kKC);
    __syncthreads();
    tile_mma<T, true>(a_s, ld_ab, b_s, ld_ab, out, ld_out, kBR, kBC, kKC);
  }
}

template <typename T, Mode mode>
__global__ void __launch_bounds__(kThreads) corr_tile_kernel(const TileParams prm) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const TileLayout<T> L(prm.out_tile);
  T* a_s = reinterpret_cast<T*>(smem + L.a);
  T* b_s = reinterpret_cast<T*>(smem + L.b);
  float* s_s = reinterpret_cast<float*>(smem + L.s);
  float* dp_s = reinterpret_cast<float*>(smem + L.dp);
  T* p_s = reinterpret_cast<T*>(smem + L.p);
  T* x_s = reinterpret_cast<T*>(smem + L.x);
  float* acc_s = reinterpret_cast<float*>(smem + L.acc);
  float* m_s = reinterpret_cast<float*>(smem + L.stats);
  float* l_s = m_s + 64;
  float* alpha_s = m_s + 128;
  float* lse_hi_s = m_s + 192;
  float* lse_lo_s = m_s + 256;
  float* d_s = m_s + 320;

  constexpr bool kRowsAreQueries = mode == Mode::kFwd || mode == Mode::kD || mode == Mode::kDq;
  constexpr bool kNeedsDp = mode == Mode::kD || mode == Mode::kDq || mode == Mode::kDk;
  const int64_t b = blockIdx.z + prm.batch_offset;
  const int64_t row0 = int64_t(blockIdx.x) * kBR;
  const int64_t out0 = int64_t(blockIdx.y) * prm.out_tile;
  const int64_t Nq = kRowsAreQueries ? prm.n_rows : prm.n_cols;
  const int out_w = prm.out_tile;
  const T* rows = static_cast<const T*>(prm.rows) + b * prm.n_rows * prm.C;
  const T* cols = static_cast<const T*>(prm.cols) + b * prm.n_cols * prm.C;
  const T* x = static_cast<const T*>(prm.x) + b * prm.n_cols * prm.n_out;

  const float inv_f = static_cast<float>(prm.inv_t);
  const SplitLse<float> inv_t = split_lse<float>(prm.inv_t);
  zero_f32(acc_s, L.ld_acc, kBR, out_w);
  if (threadIdx.x < kBR) {
    m_s[threadIdx.x] = -INFINITY;
    l_s[threadIdx.x] = 0.f;
    if (kRowsAreQueries && mode != Mode::kFwd) {
      const int64_t q = row0 + threadIdx.x;
      const SplitLse<float> lse = split_lse<float>(q < Nq ? prm.lse[b * Nq + q] : 0.0);
      lse_hi_s[threadIdx.x] = lse.hi;
      lse_lo_s[threadIdx.x] = lse.lo;
      if (mode == Mode::kDq) d_s[threadIdx.x] = q < Nq ? prm.d[b * Nq + q] : 0.f;
    }
  }

  for (int64_t col0 = 0; col0 < prm.n_cols; col0 += kBC) {
    score_tile(a_s, b_s, L.ld_ab, rows, row0, prm.n_rows, cols, col0, prm.n_cols, prm.C, s_s,
               L.ld_s);
    if constexpr (kNeedsDp) {
      score_tile(a_s, b_s, L.ld_ab, static_cast<const T*>(prm.rows2) + b * prm.n_rows * prm.Cv,
                 row0, prm.n_rows, static_cast<const T*>(prm.cols2) + b * prm.n_cols * prm.Cv,
                 col0, prm.n_cols, prm.Cv, dp_s, L.ld_s);
    }
    if constexpr (!kRowsAreQueries) {  // the statistics belong to the columns (queries)
      if (threadIdx.x < kBC) {
        const int64_t q = col0 + threadIdx.x;
        const SplitLse<float> lse = split_lse<float>(q < Nq ? prm.lse[b * Nq + q] : 0.0);
        lse_hi_s[threadIdx.x] = lse.hi;
        lse_lo_s[threadIdx.x] = lse.lo;
        if (kNeedsDp) d_s[threadIdx.x] = q < Nq ? prm.d[b * Nq + q] : 0.f;
      }
    }
    __syncthreads();

    const int valid_cols = static_cast<int>(prm.n_cols - col0 < kBC ? prm.n_cols - col0 : kBC);
    if constexpr (mode == Mode::kFwd) {
      // One thread per row: the online-softmax update of corr_math.h.
      if (threadIdx.x < kBR) {
        const int i = threadIdx.x;
        float* s_row = s_s + i * L.ld_s;
        float tile_max = -INFINITY;
        for (int j = 0; j < valid_cols; ++j) tile_max = fmaxf(tile_max, s_row[j]);
        // Unscaled scores: the maximum first, then (s - m) / T (exact near the maximum).
        const float m_new = fmaxf(m_s[i], tile_max);
        const float alpha = m_s[i] == m_new ? 1.f : acc_exp((m_s[i] - m_new) * inv_f);
        float row_sum = 0.f;
        for (int j = 0; j < kBC; ++j) {
          const float p = j < valid_cols ? acc_exp((s_row[j] - m_new) * inv_f) : 0.f;
          const T p_t = from_float<T>(p);
          p_s[i * L.ld_p + j] = p_t;
          // Sum what the product with V will see, so numerator and denominator round alike.
          row_sum += to_float(p_t);
        }
        m_s[i] = m_new;
        l_s[i] = l_s[i] * alpha + row_sum;
        alpha_s[i] = alpha;
      }
      __syncthreads();
      for (int e = threadIdx.x; e < kBR * out_w; e += kThreads) {
        const int i = e / out_w, c = e % out_w;
        acc_s[i * L.ld_acc + c] *= alpha_s[i];
      }
    } else if constexpr (mode == Mode::kD) {
      // One thread per row, in key order: l_s accumulates D (a fixed order, so repeatable).
      if (threadIdx.x < kBR) {
        const int i = threadIdx.x;
        const SplitLse<float> lse{lse_hi_s[i], lse_lo_s[i]};
        float sum = 0.f;
        for (int j = 0; j < valid_cols; ++j)
          sum += acc_exp(scaled_minus_lse(s_s[i * L.ld_s + j], inv_t, lse)) * dp_s[i * L.ld_s + j];
        l_s[i] += sum;
      }
      __syncthreads();  // s_s and dp_s are read before the next tile overwrites them
      continue;         // no output product
    } else {
      for (int e = threadIdx.x; e < kBR * kBC; e += kThreads) {
        const int i = e / kBC, j = e % kBC;
        const int st = kRowsAreQueries ? i : j;  // index of the query's statistics
        float v = 0.f;
        if (j < valid_cols) {
          const SplitLse<float> lse{lse_hi_s[st], lse_lo_s[st]};
          const float p = acc_exp(scaled_minus_lse(s_s[i * L.ld_s + j], inv_t, lse));
          v = kNeedsDp ? softmax_grad(p, dp_s[i * L.ld_s + j], d_s[st]) : p;
        }
        p_s[i * L.ld_p + j] = from_float<T>(v);
      }
    }
    load_tile(x_s, L.ld_x, x, prm.n_out, col0, prm.n_cols, out0, prm.n_out, kBC, out_w);
    __syncthreads();
    tile_mma<T, false>(p_s, L.ld_p, x_s, L.ld_x, acc_s, L.ld_acc, kBR, out_w, kBC);
    __syncthreads();
  }

  if constexpr (mode == Mode::kD) {
    if (threadIdx.x < kBR && row0 + threadIdx.x < prm.n_rows)
      prm.d_out[b * Nq + row0 + threadIdx.x] = l_s[threadIdx.x];
  } else {
    // Epilogue: each output element of this block's rows and column window, written once.
    for (int e = threadIdx.x; e < kBR * out_w; e += kThreads) {
      const int i = e / out_w, c = e % out_w;
      const int64_t r = row0 + i, oc = out0 + c;
      if (r >= prm.n_rows || oc >= prm.n_out) continue;
      const int64_t idx = (b * prm.n_rows + r) * prm.n_out + oc;
      float v = acc_s[i * L.ld_acc + c];
      if constexpr (mode == Mode::kFwd) v /= l_s[i];
      if constexpr (mode == Mode::kDq || mode == Mode::kDk) {
        prm.out_f32[idx] = v;
      } else {
        static_cast<T*>(prm.out)[idx] = from_float<T>(v);
      }
    }
  }
  if constexpr (mode == Mode::kFwd) {
    if (blockIdx.y == 0 && threadIdx.x < kBR && row0 + threadIdx.x < prm.n_rows)
      prm.lse_out[b * Nq + row0 + threadIdx.x] =
          scaled_lse(m_s[threadIdx.x], l_s[threadIdx.x], prm.inv_t);
  }
}

// Runs one tile pass over every batch entry, choosing the widest output window that fits the
// device's shared memory (one window covers Cv = 256 + 2 coordinate channels on an H100). The
// windows-per-launch limit is the caller's check (tile_windows_fit).
template <typename T, Mode mode>
cudaError_t launch_tile(TileParams prm, int64_t batch, cudaStream_t stream) {
  // kD has no output product (n_out == 0): one window of the smallest width.
  if (prm.n_rows == 0 || (prm.n_out == 0 && mode != Mode::kD) || batch == 0) return cudaSuccess;
  int max_smem = 0;
  cudaError_t err = max_dynamic_smem(&max_smem);
  if (err != cudaSuccess) return err;
  int out_tile = static_cast<int>(ceil_div(prm.n_out, 16) * 16);
  out_tile = out_tile < 16 ? 16 : out_tile > 512 ? 512 : out_tile;
  while (out_tile > 16 && TileLayout<T>(out_tile).bytes > static_cast<size_t>(max_smem))
    out_tile -= 16;
  const size_t smem = TileLayout<T>(out_tile).bytes;
  if (smem > static_cast<size_t>(max_smem)) return cudaErrorInvalidConfiguration;
  const int64_t windows = ceil_div(prm.n_out, out_tile) < 1 ? 1 : ceil_div(prm.n_out, out_tile);
  if (windows > 65535) return cudaErrorInvalidConfiguration;
  prm.out_tile = out_tile;
  auto kernel = corr_tile_kernel<T, mode>;
  err = allow_max_dynamic_smem(kernel);
  if (err != cudaSuccess) return err;
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxBatchPerLaunch) {
    prm.batch_offset = b0;
    const dim3 grid(static_cast<unsigned>(ceil_div(prm.n_rows, kBR)),
                    static_cast<unsigned>(windows),
                    static_cast<unsigned>(std::min<int64_t>(kMaxBatchPerLaunch, batch - b0)));
    PNCC_LAUNCH(grid, kThreads, smem, stream, corr_tile_kernel<T, mode>)(prm);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace corr
}  // namespace pncc
