// bfloat16 tile products of the CPU corr_warp on AVX512-BF16 (`vdpbf16ps`), torch-free.
//
// Why our own kernel: libtorch does not export its bf16 x bf16 -> fp32 GEMM
// (at::native::cpublas::gemm), at::mm has no CPU out-dtype variant, and a bf16 at::mm rounds the
// products themselves to bf16. `vdpbf16ps` multiplies pairs of bf16 values exactly and adds them
// into fp32 accumulators at twice the fp32 FMA rate, so bf16 inputs can run at bf16 speed with
// fp32 sums, which is what SDPA does with bf16 inputs on such a CPU (through oneDNN).
//
// Rounding (the same places as a GPU's unfused bf16 implementation, the reference of the tests'
// accuracy rule): the normalised rows q^ and k^, the probabilities P and, in the backward, dS are
// rounded to bf16 (round to nearest even, NaN kept NaN) before their products; every sum is fp32.
// value and dL/dout are bf16 inputs already, so they are exact.
//
// Operands are arrays of "pairs": one uint32_t holds two bf16 values of consecutive indices of
// the reduction dimension, the even one in the low half (vdpbf16ps's operand format). A reduction
// dimension of odd length is padded with a zero.
//
// Run-time dispatch: available() checks the CPU for AVX-512F, AVX-512BW and AVX512-BF16 (CPUID,
// through GCC's __builtin_cpu_supports). corr_cpu_path.h decides whether this path runs; without
// these features bf16 inputs take the fp32 tile products (corr_cpu_simd.h or ATen's GEMMs).
// Where the CPU also has AMX-BF16 (Sapphire Rapids and later), gemm runs on AMX tiles
// (corr_cpu_amx.cpp) unless PNCC_CORR_AMX=0: same operands, same rounding of the operands, fp32
// sums in another order (AMX adds 16 pairs per instruction).
// Determinism: each output's summation order is fixed by the sizes and the engine alone, and the
// engine by the CPU and the environment, once per process.
#pragma once

#include <cstdint>

namespace pncc {
namespace corr {
namespace bf16 {

// True when the kernels below can run on this CPU (and the build has them: GCC on x86-64).
bool available();

// Columns per panel of a packed B operand (see gemm).
constexpr int64_t kPanel = 32;

// Pairs of a reduction dimension of length k.
inline int64_t pairs(int64_t k) { return (k + 1) / 2; }

// The bf16 value of x as it is rounded here (round to nearest, ties to even; a NaN stays a quiet
// NaN of the same sign), as its 16 bits. The portable statement of the vector conversion, for tests.
inline uint16_t round_to_bf16(uint32_t bits) {
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((bits >> 16) | 0x40u);
  return uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// out[r * ld_out + p] = pair(x(r, 2p), x(r, 2p + 1)) for r < rows, p < pairs(cols), where
// x(r, c) = x[r * ldx + c] (0 for c >= cols). Row-major A operands (a_rs = ld_out, a_ps = 1).
void rows_to_pairs(const float* x, int64_t rows, int64_t cols, int64_t ldx, uint32_t* out,
                   int64_t ld_out);

// rows_to_pairs of bf16 values given as their bits (exact; a NaN becomes a quiet NaN, as
// round_to_bf16 makes it).
void rows_to_pairs(const uint16_t* x, int64_t rows, int64_t cols, int64_t ldx, uint32_t* out,
                   int64_t ld_out);

// out[p * ld_out + j] = pair(x(2p, j), x(2p + 1, j)) for p < pairs(rows), j < cols, where
// x(r, j) = x[r * ldx + j] (0 for r >= rows). B operands with ldb = ld_out and
// b_panel_stride = kPanel, or transposed A operands (a_rs = 1, a_ps = ld_out).
void cols_to_pairs(const float* x, int64_t rows, int64_t cols, int64_t ldx, uint32_t* out,
                   int64_t ld_out);

// cols_to_pairs of bf16 values given as their bits: x(r, j) = x[r * ldx + j] exactly (the
// conversion of bf16 values is exact; a NaN becomes a quiet NaN, as round_to_bf16 makes it).
void cols_to_pairs(const uint16_t* x, int64_t rows, int64_t cols, int64_t ldx, uint32_t* out,
                   int64_t ld_out);

// The bf16 forward's exp pass over one row of scores: e_j = exp(x[j] - m) for j < n, where
// x[j] - m <= 0 (m is the row's maximum) or NaN; out[j] = e_j rounded to bf16 (round to nearest
// even; values below 2^-126 flush to zero, NaN stays a quiet NaN), out[n] = 0 when n is odd (the
// zero that pads the last pair); returns the fp32 sum of the unrounded e_j in a fixed order.
// e_j is 2^t, t = (x[j] - m) log2(e), by a degree-5 polynomial on the fraction of t: within
// 2e-7 + |x[j] - m| 7e-8 of exp relative (the second term is t's rounding, and only large where
// e_j is a small part of the row), exactly 1 at x[j] = m; P needs 8 bits and its sum fp32's 24.
// The fp32 path's exp (simd::exp_shifted_sum, 1 ulp) costs twice the instructions. Needs
// available().
float exp_shifted_sum(const float* x, int64_t n, float m, uint16_t* out);

// The bf16 backward's dS pass over one key tile (rows = keys, cols = the chunk's queries; P and
// dP row-major with row stride ld): dS = P (dP - D) in fp32 (corr_math.h's softmax_grad, d[j] the
// D of column j), and the three bf16 operands the dV, dK and dQ products read, each as
// rows_to_pairs / cols_to_pairs would make them of the fp32 values: p_rows and ds_rows, pairs of
// columns (row r at r * ld_rows), and ds_cols, pairs of rows (pair p at p * ld_cols). One pass
// instead of four (the dS tile itself is never stored). Needs available().
void softmax_grad_pairs(const float* p, const float* dp, int64_t rows, int64_t cols, int64_t ld,
                        const float* d, uint32_t* p_rows, uint32_t* ds_rows, int64_t ld_rows,
                        uint32_t* ds_cols, int64_t ld_cols);

// Pairs of pack_transposed's output for a row-major (n x k) matrix.
inline int64_t packed_size(int64_t n, int64_t k) {
  return (n + kPanel - 1) / kPanel * kPanel * pairs(k);
}

// Packs X^T, for a row-major (n x k) X with row stride ldx, as the B operand (k x n) of gemm:
// out[(j / kPanel) * pairs(k) * kPanel + p * kPanel + j % kPanel] = pair(X(j, 2p), X(j, 2p + 1)),
// zero-padded to whole panels (ldb = kPanel, b_panel_stride = pairs(k) * kPanel).
void pack_transposed(const float* x, int64_t n, int64_t k, int64_t ldx, uint32_t* out);
void pack_transposed(const uint16_t* x, int64_t n, int64_t k, int64_t ldx, uint32_t* out);

// C = A B (accumulate = false) or C = C + A B, C in fp32, over kp pairs of the reduction
// dimension, where pair p of A's row i is a[i * a_rs + p * a_ps] (one of a_rs, a_ps is 1), pair p
// of B's column j is b[(j / kPanel) * b_panel_stride + p * ldb + j % kPanel], and
// C(i, j) = c[i * ldc + j], i < m, j < n. Every product of two bf16 values is exact in fp32.
// Runs gemm_amx when amx_in_use(), gemm_avx512 otherwise.
void gemm(int64_t m, int64_t n, int64_t kp, const uint32_t* a, int64_t a_rs, int64_t a_ps,
          const uint32_t* b, int64_t ldb, int64_t b_panel_stride, float* c, int64_t ldc,
          bool accumulate);

// gemm on vdpbf16ps: each output is one fp32 sum over p in order (each step adds the pair's two
// products to it), then added to C when accumulating. Needs available().
void gemm_avx512(int64_t m, int64_t n, int64_t kp, const uint32_t* a, int64_t a_rs, int64_t a_ps,
                 const uint32_t* b, int64_t ldb, int64_t b_panel_stride, float* c, int64_t ldc,
                 bool accumulate);

// True when this CPU has AMX-TILE and AMX-BF16, the OS enabled them and granted this process the
// tile state (Linux's arch_prctl(ARCH_REQ_XCOMP_PERM), asked for on the first call).
bool amx_available();

// True when gemm runs on AMX: amx_available() and PNCC_CORR_AMX is not "0" (read once).
bool amx_in_use();

// gemm on AMX tiles: each output starts from 0 (C when accumulating) and adds the products 16
// pairs per tile instruction, in order. Needs amx_available().
void gemm_amx(int64_t m, int64_t n, int64_t kp, const uint32_t* a, int64_t a_rs, int64_t a_ps,
              const uint32_t* b, int64_t ldb, int64_t b_panel_stride, float* c, int64_t ldc,
              bool accumulate);

}  // namespace bf16
}  // namespace corr
}  // namespace pncc
