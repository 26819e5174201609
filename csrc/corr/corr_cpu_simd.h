// AVX-512 building blocks of the CPU corr_warp kernels (fp32 only), torch-free.
//
// Why our own GEMM: MKL, which torch's CPU matmul and SDPA call, runs its AVX2 code on AMD CPUs.
// On a Zen 5 EPYC (full-width AVX-512 FMAs) this register tile ran at 210-245 GFLOP/s a core
// against MKL's 113; on a Zen 4 EPYC (family 25, AVX-512 FMAs at the AVX2 rate: peak 116) at
// 110-114 against 98-100 (bench/RESULTS.md). On Sapphire Rapids MKL wins (issue 11). So this is
// one of the two paths corr_cpu_path.h chooses between, by measuring, when the CPU has AVX-512F
// (checked at run time; the rest of the extension is compiled for the baseline ISA). Otherwise,
// and for float64, corr_cpu.cpp calls ATen's GEMMs instead.
//
// Determinism: every function here computes each output with a summation order fixed by the
// sizes alone, so the results do not depend on the thread count (they may differ from the
// portable path's MKL results in the last bits).
#pragma once

#include <cstdint>

namespace pncc {
namespace corr {
namespace simd {

// True when the AVX-512 kernels can run: the CPU (and OS) support AVX-512F. Whether they do run
// is corr_cpu_path.h's choice.
bool available();

// Columns per panel of a B operand (see gemm).
constexpr int64_t kPanel = 32;

// C = A B (accumulate = false) or C = C + A B (accumulate = true), fp32, where
//   A(i, kk) = a[i * a_rs + kk * a_cs], i < m, kk < k; one of a_rs, a_cs must be 1;
//   B(kk, j) = b[(j / kPanel) * b_panel_stride + kk * ldb + j % kPanel], j < n;
//   C(i, j)  = c[i * ldc + j].
// A row-major B (ldb = its row stride) has b_panel_stride = kPanel; a B packed by
// pack_transposed has ldb = kPanel and b_panel_stride = k * kPanel. Elements of B outside j < n
// are never read.
void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs,
          const float* b, int64_t ldb, int64_t b_panel_stride, float* c, int64_t ldc,
          bool accumulate);

// Number of floats of pack_transposed's output for an (n x k) matrix.
inline int64_t packed_size(int64_t n, int64_t k) {
  return (n + kPanel - 1) / kPanel * kPanel * k;
}

// Packs X^T, for a row-major (n x k) X with row stride ldx, as the B operand (k x n) of gemm:
// out[(j / kPanel) * k * kPanel + kk * kPanel + j % kPanel] = X(j, kk), zero-padded to whole
// panels.
void pack_transposed(const float* x, int64_t n, int64_t k, int64_t ldx, float* out);

// max_j x[j] (n >= 1); NaNs are skipped like the portable path's `x > m ? x : m`.
float row_max(const float* x, int64_t n);

// x[j] = exp(x[j] - m) in place; returns sum_j of the new x[j].
float exp_shifted_sum(float* x, int64_t n, float m);

// out[j] = c10::BFloat16(x[j]) as bits: round to nearest even, every NaN 0x7FC0.
void to_bf16(const float* x, int64_t n, uint16_t* out);

// x[j] *= s.
void scale_row(float* x, int64_t n, float s);

// The double sums of one row's normalisation statistics (corr_cpu.cpp's row_stats), bit for bit
// as its portable fold computes them: eight partial sums, partial r taking the j = r (mod 8) below
// the last multiple of 8 and partial 0 the rest in order, combined ((p0 + p1) + (p2 + p3)) +
// ((p4 + p5) + (p6 + p7)); mean = sum / n, then sum_sq over (x - mean)^2. x as fp32 values or as
// the bits of bf16 ones. And the normalisation itself: out[j] = float((double(x[j]) - mean) * inv),
// corr_math.h's row_norm_apply followed by the cast.
struct RowMoments {
  double mean, sum_sq;
};
RowMoments row_moments(const float* x, int64_t n);
RowMoments row_moments(const uint16_t* bf16_bits, int64_t n);
void normalize_row(const float* x, int64_t n, double mean, double inv, float* out);
void normalize_row(const uint16_t* bf16_bits, int64_t n, double mean, double inv, float* out);

// The normalisation's backward for one row, bit for bit as corr_cpu.cpp's portable loop (the same
// fold): centred_dot = sum of g[j] (x[j] - mean); grad_through_norm turns g = dL/dx^ into dL/dx in
// place, dc_j = inv g_j - coef (x_j - mean) less their mean when `centred` (corr_math.h's
// row_norm_grad_c), each in double, rounded to float at the end.
double centred_dot(const float* g, const float* x, int64_t n, double mean);
double centred_dot(const float* g, const uint16_t* bf16_bits, int64_t n, double mean);
void grad_through_norm(float* g, const float* x, int64_t n, double mean, double inv, double coef,
                       bool centred);
void grad_through_norm(float* g, const uint16_t* bf16_bits, int64_t n, double mean, double inv,
                       double coef, bool centred);

// Column passes over a (rows x cols) tile of row stride ld whose columns are softmax rows (the
// backward's transposed tiles, keys down and queries across):
//   probs_from_lse_cols: s[i][j] = exp(score_minus_lse(s[i][j], {lse_hi[j], lse_lo[j]}));
//   col_dots:            d[j] = sum_i p[i][j] * dp[i][j], as four partial sums over i mod 4
//                        added pairwise;
//   softmax_grad_cols:   dp[i][j] = softmax_grad(p[i][j], dp[i][j], d[j]).
void probs_from_lse_cols(float* s, int64_t rows, int64_t cols, int64_t ld, const float* lse_hi,
                         const float* lse_lo);
void col_dots(const float* p, const float* dp, int64_t rows, int64_t cols, int64_t ld, float* d);
void softmax_grad_cols(const float* p, float* dp, int64_t rows, int64_t cols, int64_t ld,
                       const float* d);

}  // namespace simd
}  // namespace corr
}  // namespace pncc
