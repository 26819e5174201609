// CUDA kernels of corr_warp and _corr_warp_backward.
//
// Flash-style: a block owns BR rows of one batch entry and streams the other side in tiles of BC,
// so no (Nq x Nk) tensor exists. One tile kernel, specialised by Mode, serves all five passes:
//
//   mode  rows  cols  score tile          output GEMM          output
//   kFwd  q     k     S = q^ k^T          O = O*alpha + P V    out (online softmax), lse
//   kD    q     k     S, dP = dO V^T      (none)               D = rowsum(P * dP) (fp32)
//   kDq   q     k     S, dP = dO V^T      acc += dS k^         dL/dq^ (fp32)
//   kDk   k     q     S^T, dP^T = V dO^T  acc += dS^T q^       dL/dk^ (fp32)
//   kDv   k     q     S^T                 acc += P^T dO        dL/dV
//
// Every output row is written by one block, so the backward needs no atomics and is
// deterministic. The price is recomputing S in four passes instead of one (flash-attention's
// single pass with dQ atomics would save that but give up bitwise repeatability).
//
// D comes from the recomputed P and dP (the kD pass), as in the CPU kernel, not from
// rowsum(dO * out) as in flash-attention: dS = P * (dP - D) cancels to a few ulps on a row where
// one key takes nearly all the weight, and D must then be the sum of the very products dP that it
// is subtracted from. With the flash form a single key (Nk = 1, where P = 1 and the exact dL/dq is
// 0) gave dL/dq of about 1e-5: test_stress_sizes[1] failed on tools/cuda_emu.
//
// Matrix products of a tile run on tensor cores (nvcuda::wmma, fp32 accumulation) for fp16 and
// bf16 and as plain fp32 FMAs for float32. Softmax statistics are fp32; the saved lse is double
// (see corr_math.h). The per-element maths comes from corr_math.h; this file owns only the
// thread mapping.
//
// UNTESTED ON HARDWARE: written and compiled for sm_80/sm_90 on a machine without a GPU. The CUDA
// tests in tests/test_corr.py (marked `cuda`) check it against the float64 reference.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "corr/corr_check.h"
#include "corr/corr_math.h"

namespace pncc {
namespace corr {
namespace {

constexpr int kBR = 64;      // rows per block
constexpr int kBC = 64;      // columns (other side) per tile
constexpr int kKC = 32;      // channels per chunk of a score product
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxBatchPerLaunch = 65535;  // gridDim.z limit
static_assert(kBR % 16 == 0 && kBC % 16 == 0 && kKC % 16 == 0,
              "tiles are whole wmma fragments (and even-sized, as TileMma<float> needs)");
static_assert(kThreads >= kBR && kThreads >= kBC, "one thread per row or column of statistics");

enum class Mode { kFwd, kD, kDq, kDk, kDv };

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

// c10 element types to their CUDA twins (same bits).
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// ---- tile matrix products in shared memory ----
//
// C (fp32, M x N) += A (M x K) * op(B), with B stored (N x K) and op = transpose when kBT ("nt",
// the score products), or B stored (K x N) and op = identity otherwise ("nn", the output
// products). M, N, K are multiples of 16; every thread of the block calls them.

template <bool kBT>
__device__ __forceinline__ int b_offset(int j, int k, int ldb) {
  return kBT ? j * ldb + k : k * ldb + j;
}

template <typename T>
struct TileMma {
  // Tensor cores: one 16 x 16 output fragment per warp at a time.
  template <bool kBT>
  static __device__ void run(const T* A, int lda, const T* B, int ldb, float* C, int ldc, int M,
                             int N, int K) {
    using namespace nvcuda;
    using BLayout = std::conditional_t<kBT, wmma::col_major, wmma::row_major>;
    const int warp = threadIdx.x / 32, tiles_n = N / 16;
    for (int f = warp; f < (M / 16) * tiles_n; f += kWarps) {
      const int i = f / tiles_n, j = f % tiles_n;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, C + i * 16 * ldc + j * 16, ldc, wmma::mem_row_major);
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
        wmma::load_matrix_sync(a, A + i * 16 * lda + k, lda);
        wmma::load_matrix_sync(b, B + b_offset<kBT>(j * 16, k, ldb), ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(C + i * 16 * ldc + j * 16, acc, ldc, wmma::mem_row_major);
    }
  }
};

// float32: no tensor cores (TF32 would lose the accuracy of a plain fp32 implementation).
// Even and odd products go to separate sums (K is even: kKC or kBC), as in the CPU GEMM
// (corr_cpu_simd.cpp): one FMA chain per score had a larger error than an unfused GEMM and, on
// tools/cuda_emu, failed the 3x gradient rule of test_stress_sizes[2]; two chains pass it.
template <>
struct TileMma<float> {
  template <bool kBT>
  static __device__ void run(const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                             int M, int N, int K) {
    for (int e = threadIdx.x; e < M * N; e += kThreads) {
      const int i = e / N, j = e % N;
      float even = 0.f, odd = 0.f;
      for (int k = 0; k < K; k += 2) {
        even = fmaf(A[i * lda + k], B[b_offset<kBT>(j, k, ldb)], even);
        odd = fmaf(A[i * lda + k + 1], B[b_offset<kBT>(j, k + 1, ldb)], odd);
      }
      C[i * ldc + j] += even + odd;
    }
  }
};

// ---- shared-memory layout of the tile kernel, computed alike on host and device ----

template <typename T>
struct TileLayout {
  // Row padding: 16-bit tiles by 8 elements (16 bytes), fp32 tiles by 4; keeps wmma's 32-byte
  // fragment alignment and staggers rows across banks.
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

// Pointers and sizes of one tile pass (see the table at the top of the file).
template <typename T>
struct TileParams {
  const T* rows;        // (B, n_rows, C) normalised rows
  const T* cols;        // (B, n_cols, C) normalised columns
  const T* rows2;       // (B, n_rows, Cv): dO (kDq) or V (kDk), the row side of dP
  const T* cols2;       // (B, n_cols, Cv): V (kDq) or dO (kDk), the column side of dP
  const T* x;           // (B, n_cols, n_out): right operand of the output product
  const double* lse;    // (B, Nq), read by the backward modes
  const float* d;       // (B, Nq): rowsum(P * dP), read by kDq and kDk
  float* d_out;         // (B, Nq): kD
  T* out;               // (B, n_rows, n_out): kFwd and kDv
  float* out_f32;       // (B, n_rows, n_out): kDq and kDk
  double* lse_out;      // (B, Nq): kFwd
  int64_t n_rows, n_cols, C, Cv, n_out;
  int out_tile;         // output columns per block, a multiple of 16
  int64_t batch_offset;
};

// Copies a (tile_rows x tile_cols) window of a row-major (n, ld_global) matrix into shared
// memory, zero-filling everything outside [0, n) x [0, width).
template <typename T>
__device__ void load_tile(T* dst, int ld_dst, const T* src, int64_t ld_src, int64_t r0, int64_t n,
                          int64_t c0, int64_t width, int tile_rows, int tile_cols) {
  for (int e = threadIdx.x; e < tile_rows * tile_cols; e += kThreads) {
    const int i = e / tile_cols, j = e % tile_cols;
    const int64_t gr = r0 + i, gc = c0 + j;
    dst[i * ld_dst + j] = (gr < n && gc < width) ? src[gr * ld_src + gc] : from_float<T>(0.f);
  }
}

__device__ void zero_f32(float* dst, int ld, int rows, int cols) {
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
    TileMma<T>::template run<true>(a_s, ld_ab, b_s, ld_ab, out, ld_out, kBR, kBC, kKC);
  }
}

template <typename T, Mode mode>
__global__ void __launch_bounds__(kThreads) corr_tile_kernel(const TileParams<T> prm) {
  extern __shared__ __align__(128) unsigned char smem[];
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
  const T* rows = prm.rows + b * prm.n_rows * prm.C;
  const T* cols = prm.cols + b * prm.n_cols * prm.C;
  const T* x = prm.x + b * prm.n_cols * prm.n_out;

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
      score_tile(a_s, b_s, L.ld_ab, prm.rows2 + b * prm.n_rows * prm.Cv, row0, prm.n_rows,
                 prm.cols2 + b * prm.n_cols * prm.Cv, col0, prm.n_cols, prm.Cv, dp_s, L.ld_s);
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

    const int valid_cols = static_cast<int>(std::min<int64_t>(kBC, prm.n_cols - col0));
    if constexpr (mode == Mode::kFwd) {
      // One thread per row: the online-softmax update of corr_math.h.
      if (threadIdx.x < kBR) {
        const int i = threadIdx.x;
        float* s_row = s_s + i * L.ld_s;
        float tile_max = -INFINITY;
        for (int j = 0; j < valid_cols; ++j) tile_max = fmaxf(tile_max, s_row[j]);
        const OnlineSoftmaxStep<float> st = online_softmax_step(m_s[i], tile_max);
        float row_sum = 0.f;
        for (int j = 0; j < kBC; ++j) {
          const float p = j < valid_cols ? acc_exp(s_row[j] - st.m_new) : 0.f;
          const T p_t = from_float<T>(p);
          p_s[i * L.ld_p + j] = p_t;
          // Sum what the product with V will see, so numerator and denominator round alike.
          row_sum += to_float(p_t);
        }
        m_s[i] = st.m_new;
        l_s[i] = l_s[i] * st.alpha + row_sum;
        alpha_s[i] = st.alpha;
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
          sum += softmax_prob(s_s[i * L.ld_s + j], lse) * dp_s[i * L.ld_s + j];
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
          const float p = softmax_prob(s_s[i * L.ld_s + j], lse);
          v = kNeedsDp ? softmax_grad(p, dp_s[i * L.ld_s + j], d_s[st]) : p;
        }
        p_s[i * L.ld_p + j] = from_float<T>(v);
      }
    }
    load_tile(x_s, L.ld_x, x, prm.n_out, col0, prm.n_cols, out0, prm.n_out, kBC, out_w);
    __syncthreads();
    TileMma<T>::template run<false>(p_s, L.ld_p, x_s, L.ld_x, acc_s, L.ld_acc, kBR, out_w, kBC);
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
        prm.out[idx] = from_float<T>(v);
      }
    }
  }
  if constexpr (mode == Mode::kFwd) {
    if (blockIdx.y == 0 && threadIdx.x < kBR && row0 + threadIdx.x < prm.n_rows)
      prm.lse_out[b * Nq + row0 + threadIdx.x] =
          online_softmax_lse(m_s[threadIdx.x], l_s[threadIdx.x]);
  }
}

// ---- per-row kernels: normalisation and its backward; one warp per row ----

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Row statistics in double, as the CPU kernel computes them (two passes; see row_norm_finish).
template <typename T>
__device__ RowNorm<double> warp_row_stats(const T* x, int64_t C, double scale, bool normalize,
                                          double eps) {
  const int lane = threadIdx.x % 32;
  double sum = 0;
  for (int64_t c = lane; c < C; c += 32) sum += to_float(x[c]);
  const double mean = warp_sum(sum) / static_cast<double>(C);
  double sum_sq = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const double d = to_float(x[c]) - mean;
    sum_sq += d * d;
  }
  return row_norm_finish<double>(warp_sum(sum_sq), mean, scale, normalize, eps);
}

template <typename T>
__global__ void corr_normalize_kernel(const T* x, int64_t n_rows, int64_t C, double scale,
                                      bool normalize, double eps, T* out) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (r >= n_rows) return;  // whole warps leave together: n_rows is per warp
  const RowNorm<double> st = warp_row_stats(x + r * C, C, scale, normalize, eps);
  for (int64_t c = threadIdx.x % 32; c < C; c += 32) {
    const double xc = to_float(x[r * C + c]);
    out[r * C + c] = from_float<T>(static_cast<float>(row_norm_apply(st, xc)));
  }
}

template <typename T>
__global__ void corr_normalize_backward_kernel(const float* g, const T* x, int64_t n_rows,
                                               int64_t C, double scale, bool normalize,
                                               double eps, T* grad_x) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  if (r >= n_rows) return;
  const int lane = threadIdx.x % 32;
  const T* xr = x + r * C;
  const float* gr = g + r * C;
  const RowNorm<double> st = warp_row_stats(xr, C, scale, normalize, eps);
  double g_dot_c = 0;
  for (int64_t c = lane; c < C; c += 32) g_dot_c += double(gr[c]) * (to_float(xr[c]) - st.mean);
  const double coef = row_norm_grad_coef(st, warp_sum(g_dot_c), eps);
  double sum = 0;
  for (int64_t c = lane; c < C; c += 32)
    sum += row_norm_grad_c(st, coef, double(gr[c]), double(to_float(xr[c])));
  const double mean = st.centred ? warp_sum(sum) / static_cast<double>(C) : 0.0;
  for (int64_t c = lane; c < C; c += 32) {
    const double dc = row_norm_grad_c(st, coef, double(gr[c]), double(to_float(xr[c])));
    grad_x[r * C + c] = from_float<T>(static_cast<float>(dc - mean));
  }
}

// ---- launchers ----

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

dim3 warp_per_row_grid(int64_t n_rows) {
  return dim3(static_cast<unsigned>(ceil_div(n_rows * 32, 256)));
}

template <typename T>
void launch_normalize(const at::Tensor& x, double scale, bool normalize, double eps,
                      at::Tensor& out, cudaStream_t stream) {
  const int64_t C = x.size(-1), n_rows = x.numel() / C;
  corr_normalize_kernel<T><<<warp_per_row_grid(n_rows), 256, 0, stream>>>(
      reinterpret_cast<const T*>(x.const_data_ptr()), n_rows, C, scale, normalize, eps,
      reinterpret_cast<T*>(out.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs one tile pass over every batch entry, choosing the widest output window that fits the
// device's shared memory (one window covers Cv = 256 + 2 coordinate channels on an H100).
template <typename T, Mode mode>
void launch_tile(TileParams<T> prm, int64_t batch, cudaStream_t stream) {
  // kD has no output product (n_out == 0): one window of the smallest width.
  if (prm.n_rows == 0 || (prm.n_out == 0 && mode != Mode::kD) || batch == 0) return;
  int device = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  int out_tile = static_cast<int>(std::clamp<int64_t>(ceil_div(prm.n_out, 16) * 16, 16, 512));
  while (out_tile > 16 && TileLayout<T>(out_tile).bytes > static_cast<size_t>(max_smem))
    out_tile -= 16;
  const size_t smem = TileLayout<T>(out_tile).bytes;
  TORCH_CHECK(smem <= static_cast<size_t>(max_smem), "corr_warp: the CUDA tile needs ", smem,
              " bytes of shared memory, the device offers ", max_smem);
  const int64_t windows = std::max<int64_t>(1, ceil_div(prm.n_out, out_tile));
  TORCH_CHECK_VALUE(windows <= 65535 && ceil_div(prm.n_rows, kBR) <= 2147483647,
                    "corr_warp: too many channels or rows for one CUDA launch (", prm.n_out,
                    " channels, ", prm.n_rows, " rows)");
  prm.out_tile = out_tile;
  auto kernel = corr_tile_kernel<T, mode>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  for (int64_t b0 = 0; b0 < batch; b0 += kMaxBatchPerLaunch) {
    prm.batch_offset = b0;
    const dim3 grid(static_cast<unsigned>(ceil_div(prm.n_rows, kBR)),
                    static_cast<unsigned>(windows),
                    static_cast<unsigned>(std::min<int64_t>(kMaxBatchPerLaunch, batch - b0)));
    kernel<<<grid, kThreads, smem, stream>>>(prm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mut_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// The operands of one tile pass: `rows` (B, n_rows, C) against `cols` (B, n_cols, C), with the
// output product taken against `x` (B, n_cols, n_out); dP operands, statistics and outputs are
// set by the caller.
template <typename T>
TileParams<T> tile_params(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& x,
                          int64_t Cv) {
  TileParams<T> prm{};
  prm.rows = ptr<T>(rows);
  prm.cols = ptr<T>(cols);
  prm.x = ptr<T>(x);
  prm.n_rows = rows.size(1);
  prm.n_cols = cols.size(1);
  prm.C = rows.size(2);
  prm.Cv = Cv;
  prm.n_out = x.size(2);
  return prm;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  double temperature, bool normalize, double eps, at::Tensor& out,
                  at::Tensor& lse, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  at::Tensor qs = at::empty_like(query);
  at::Tensor kn = at::empty_like(key);
  launch_normalize<T>(query, 1.0 / temperature, normalize, eps, qs, stream);
  launch_normalize<T>(key, 1.0, normalize, eps, kn, stream);
  // Without value channels lse is still an output: take the product with 16 channels of zeros.
  const bool no_channels = value.size(2) == 0;
  const at::Tensor v = no_channels ? at::zeros({key.size(0), key.size(1), 16}, value.options())
                                   : value;
  at::Tensor o = no_channels ? at::empty({query.size(0), query.size(1), 16}, value.options()) : out;
  TileParams<T> prm = tile_params<T>(qs, kn, v, value.size(2));
  prm.out = mut_ptr<T>(o);
  prm.lse_out = lse.mutable_data_ptr<double>();
  launch_tile<T, Mode::kFwd>(prm, query.size(0), stream);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& lse, double temperature, bool normalize,
    double eps, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const int64_t B = query.size(0), Nq = query.size(1), Nk = key.size(1);
  const int64_t C = query.size(2), Cv = value.size(2);
  at::Tensor qs = at::empty_like(query);
  at::Tensor kn = at::empty_like(key);
  launch_normalize<T>(query, 1.0 / temperature, normalize, eps, qs, stream);
  launch_normalize<T>(key, 1.0, normalize, eps, kn, stream);
  const auto f32 = query.options().dtype(at::kFloat);
  at::Tensor d = at::empty({B, Nq}, f32);
  if (Cv > 0) {
    // D = rowsum(P * dP): rows are queries, no output product.
    TileParams<T> dd = tile_params<T>(qs, kn, kn, Cv);
    dd.n_out = 0;
    dd.rows2 = ptr<T>(grad_out);
    dd.cols2 = ptr<T>(value);
    dd.lse = lse.const_data_ptr<double>();
    dd.d_out = d.mutable_data_ptr<float>();
    launch_tile<T, Mode::kD>(dd, B, stream);
  } else {
    d.zero_();  // dP = 0
  }
  at::Tensor grad_qs = at::empty({B, Nq, C}, f32);
  at::Tensor grad_kn = at::empty({B, Nk, C}, f32);
  at::Tensor grad_v = at::empty({B, Nk, Cv}, value.options());

  // dL/dq^: rows are queries.
  TileParams<T> dq = tile_params<T>(qs, kn, kn, Cv);
  dq.rows2 = ptr<T>(grad_out);
  dq.cols2 = ptr<T>(value);
  // dL/dk^ and dL/dV: rows are keys.
  TileParams<T> dk = tile_params<T>(kn, qs, qs, Cv);
  dk.rows2 = ptr<T>(value);
  dk.cols2 = ptr<T>(grad_out);
  TileParams<T> dv = tile_params<T>(kn, qs, grad_out, Cv);
  for (TileParams<T>* prm : {&dq, &dk, &dv}) {
    prm->lse = lse.const_data_ptr<double>();
    prm->d = d.const_data_ptr<float>();
  }
  dq.out_f32 = grad_qs.mutable_data_ptr<float>();
  dk.out_f32 = grad_kn.mutable_data_ptr<float>();
  dv.out = mut_ptr<T>(grad_v);
  launch_tile<T, Mode::kDq>(dq, B, stream);
  launch_tile<T, Mode::kDk>(dk, B, stream);
  launch_tile<T, Mode::kDv>(dv, B, stream);

  at::Tensor grad_query = at::empty_like(query);
  at::Tensor grad_key = at::empty_like(key);
  corr_normalize_backward_kernel<T><<<warp_per_row_grid(B * Nq), 256, 0, stream>>>(
      grad_qs.const_data_ptr<float>(), ptr<T>(query), B * Nq, C, 1.0 / temperature, normalize,
      eps, mut_ptr<T>(grad_query));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  corr_normalize_backward_kernel<T><<<warp_per_row_grid(B * Nk), 256, 0, stream>>>(
      grad_kn.const_data_ptr<float>(), ptr<T>(key), B * Nk, C, 1.0, normalize, eps,
      mut_ptr<T>(grad_key));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_query, grad_key, grad_v};
}

// corr_warp on CUDA.
//
// Args:
//   query:       (B, Nq, C) float32 | float16 | bfloat16, any strides (copied when not
//                contiguous).
//   key:         (B, Nk, C), value: (B, Nk, Cv); same dtype and device.
//   temperature: finite, > 0. normalize, eps: as in corr_math.h.
// Returns:
//   out, lse: as corr_warp_cpu (corr_cpu.cpp).
std::tuple<at::Tensor, at::Tensor> corr_warp_cuda(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, double temperature,
                                                  bool normalize, double eps) {
  check_inputs(query, key, value, temperature, eps);
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto [out, lse] = forward_outputs(query, key, value);
  if (forward_is_trivial(query, key)) return {out, lse};
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  switch (query.scalar_type()) {
    case at::kFloat:
      forward_impl<float>(q, k, v, temperature, normalize, eps, out, lse, stream);
      break;
    case at::kHalf:
      forward_impl<c10::Half>(q, k, v, temperature, normalize, eps, out, lse, stream);
      break;
    case at::kBFloat16:
      forward_impl<c10::BFloat16>(q, k, v, temperature, normalize, eps, out, lse, stream);
      break;
    default:  // check_inputs admits no other dtype on CUDA
      C10_THROW_ERROR(TypeError, "corr_warp: unsupported dtype on CUDA");
  }
  return {out, lse};
}

// _corr_warp_backward on CUDA.
//
// Args and Returns: as corr_warp_backward_cpu (corr_cpu.cpp), except that the gradients are
// deterministic run to run (no atomics) rather than across devices. Like the CPU kernel it sums
// D = rowsum(P * dP) itself (the kD pass) and does not read `out`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> corr_warp_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse, double temperature,
    bool normalize, double eps) {
  check_backward_inputs(grad_out, query, key, value, out, lse, temperature, eps);
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (forward_is_trivial(query, key)) return zero_grads(query, key, value);
  const at::Tensor go = grad_out.contiguous(), q = query.contiguous(), k = key.contiguous();
  const at::Tensor v = value.contiguous(), l = lse.contiguous();
  switch (query.scalar_type()) {
    case at::kFloat:
      return backward_impl<float>(go, q, k, v, l, temperature, normalize, eps, stream);
    case at::kHalf:
      return backward_impl<c10::Half>(go, q, k, v, l, temperature, normalize, eps, stream);
    case at::kBFloat16:
      return backward_impl<c10::BFloat16>(go, q, k, v, l, temperature, normalize, eps, stream);
    default:  // check_inputs admits no other dtype on CUDA
      C10_THROW_ERROR(TypeError, "corr_warp: unsupported dtype on CUDA");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pncc, CUDA, m) {
  m.impl("corr_warp", &corr_warp_cuda);
  m.impl("_corr_warp_backward", &corr_warp_backward_cuda);
}

}  // namespace corr
}  // namespace pncc
