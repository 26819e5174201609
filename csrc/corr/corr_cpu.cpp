// CPU kernels of corr_warp and _corr_warp_backward.
//
// Flash-style on tiles: the matrix products of a (query tile x key tile) block run as GEMMs on raw
// pointers into the tile buffers, the softmax bookkeeping runs on the tile in place, so no
// (Nq x Nk) tensor is ever allocated. The per-element maths comes from corr_math.h.
//
// Three implementations of the GEMMs, one loop structure: the kernels of corr_cpu_simd.h (fp32
// accumulation on a CPU with AVX-512F), ATen's GEMMs (MKL) on views of the same buffers, and for
// bfloat16 inputs the AVX512-BF16 kernels of corr_cpu_bf16.h (bf16 operands converted from the
// fp32 buffers, fp32 sums). The row passes run on corr_cpu_simd.h's kernels with the first and
// the last, on the portable loops and ATen's vectorised exp with ATen's GEMMs. Which path runs is
// measured per machine and shape class (corr_cpu_path.h); float64 always takes ATen's.
//
// Determinism: the work partition depends on the sizes only, never on the thread count, and
// every floating-point sum has a fixed order. The forward owns one (batch, query tile) per task.
// The backward owns one key tile per task (its dK and dV rows), and writes its contributions to
// D and dQ into partial buffers per key tile, which are summed in key-tile order afterwards.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <ctime>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/aligned_buffer.h"
#include "corr/corr_check.h"
#include "corr/corr_cpu_bf16.h"
#include "corr/corr_cpu_path.h"
#include "corr/corr_cpu_simd.h"
#include "corr/corr_math.h"

namespace pncc {
namespace corr {
namespace {

// Query rows and keys per tile. A 256 x 512 fp32 score tile is 512 KiB: it stays in L2 between
// the GEMM that writes it, the softmax passes and the GEMM that reads it; 256 rows measured ~5%
// faster than 128 in the forward. The backward's chunks of query rows are whole multiples of
// kTileQ rows (see kChunkBudget).
constexpr int64_t kFwdTileQ = 256;
constexpr int64_t kTileQ = 128;
constexpr int64_t kTileK = 512;
static_assert(kTileK % simd::kPanel == 0, "key tiles must start on whole packed panels");
// Upper bound, in elements, of the backward's per-chunk buffers: the chunk's P and dP and the
// per-key-tile partials of D and dQ (4 MiB in fp32; a chunk is never less than one query tile).
// Deeper chunks would make the dV and dK GEMMs deeper (384 rows instead of 128 at N = 4096: 7%
// faster backward), but cost the fwd+bwd peak-memory target (1/8 of unfused at B = 1).
constexpr int64_t kChunkBudget = int64_t(1) << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row statistics and the normalisation itself run in double whatever the input dtype: they are
// O(N * C) work next to the O(Nq * Nk * C) products, and rounding q^ and k^ only once keeps the
// scores (up to 1/temperature = 1000 in magnitude) as accurate as an unfused fp32 implementation.
using stat_t = double;

// combine(...combine(init, term(0))..., term(n - 1)) as eight interleaved partial results
// combined pairwise at the end: a single running value would chain every term to the previous one
// through the latency of `combine` (the row statistics below spent 4 ns an element so). The order
// is fixed by n alone, so the result is as reproducible as a sequential loop.
template <typename acc_t, typename Term, typename Combine>
acc_t fold_of(int64_t n, acc_t init, const Term& term, const Combine& combine) {
  acc_t part[8] = {init, init, init, init, init, init, init, init};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int r = 0; r < 8; ++r) part[r] = combine(part[r], term(j + r));
  for (; j < n; ++j) part[0] = combine(part[0], term(j));
  return combine(combine(combine(part[0], part[1]), combine(part[2], part[3])),
                 combine(combine(part[4], part[5]), combine(part[6], part[7])));
}

// sum over j < n of term(j).
template <typename acc_t, typename Term>
acc_t sum_of(int64_t n, const Term& term) {
  return fold_of<acc_t>(n, acc_t(0), term, [](acc_t a, acc_t b) { return a + b; });
}

// Rows whose statistics and normalisation run on AVX-512 (simd::row_moments, simd::normalize_row:
// the same values, bit for bit; the scalar loops spent ~9% of the bf16 forward on AMX here), and
// their elements as those functions take them.
template <typename scalar_t>
constexpr bool kVectorRows =
    std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;

template <typename scalar_t>
const auto* vector_row(const scalar_t* x) {
  if constexpr (std::is_same_v<scalar_t, float>)
    return x;
  else
    return reinterpret_cast<const uint16_t*>(x);
}

// Statistics of one contiguous row of C elements (two passes; see row_norm_finish).
template <typename scalar_t>
RowNorm<stat_t> row_stats(const scalar_t* x, int64_t C, stat_t scale, bool normalize,
                          stat_t eps) {
  if constexpr (kVectorRows<scalar_t>) {
    if (simd::available()) {
      const simd::RowMoments mo = simd::row_moments(vector_row(x), C);
      return row_norm_finish<stat_t>(mo.sum_sq, mo.mean, scale, normalize, eps);
    }
  }
  const auto at = [x](int64_t c) { return static_cast<stat_t>(x[c]); };
  const stat_t mean = sum_of<stat_t>(C, at) / static_cast<stat_t>(C);
  const stat_t sum_sq = sum_of<stat_t>(C, [&](int64_t c) {
    const stat_t d = at(c) - mean;
    return d * d;
  });
  return row_norm_finish<stat_t>(sum_sq, mean, scale, normalize, eps);
}

// x^ of one row of C values into out.
template <typename scalar_t, typename acc_t>
void normalize_row_into(const scalar_t* x, int64_t C, stat_t scale, bool normalize, stat_t eps,
                        acc_t* out) {
  const RowNorm<stat_t> st = row_stats(x, C, scale, normalize, eps);
  if constexpr (kVectorRows<scalar_t> && std::is_same_v<acc_t, float>) {
    if (simd::available()) return simd::normalize_row(vector_row(x), C, st.mean, st.inv, out);
  }
  for (int64_t c = 0; c < C; ++c)
    out[c] = static_cast<acc_t>(row_norm_apply(st, static_cast<stat_t>(x[c])));
}

// x^ of every row of a contiguous (R, C) tensor, as a new contiguous acc_t tensor. `serial` runs
// it on the calling thread (a few rows are not worth a parallel region and its barrier).
template <typename scalar_t, typename acc_t>
at::Tensor normalized_rows(const at::Tensor& x, stat_t scale, bool normalize, stat_t eps,
                           bool serial = false) {
  const int64_t C = x.size(-1), R = x.numel() / C;
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* op = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, R, serial ? std::max<int64_t>(R, 1) : 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      normalize_row_into(xp + r * C, C, scale, normalize, eps, op + r * C);
  });
  return out;
}

// In place: turns g = dL/dx^ (rows of a contiguous acc_t tensor) into dL/dx, for the rows of the
// contiguous input x they were computed from.
template <typename scalar_t, typename acc_t>
void normalized_rows_backward(at::Tensor& g, const at::Tensor& x, stat_t scale, bool normalize,
                              stat_t eps) {
  const int64_t C = x.size(-1), R = x.numel() / C;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* gp = g.mutable_data_ptr<acc_t>();
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    std::vector<stat_t> dc(C);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * C;
      acc_t* gr = gp + r * C;
      const RowNorm<stat_t> st = row_stats(xr, C, scale, normalize, eps);
      if constexpr (kVectorRows<scalar_t> && std::is_same_v<acc_t, float>) {
        if (simd::available()) {
          const stat_t coef =
              row_norm_grad_coef(st, simd::centred_dot(gr, vector_row(xr), C, st.mean), eps);
          simd::grad_through_norm(gr, vector_row(xr), C, st.mean, st.inv, coef, st.centred);
          continue;
        }
      }
      const stat_t g_dot_c = sum_of<stat_t>(C, [&](int64_t c) {
        return static_cast<stat_t>(gr[c]) * (static_cast<stat_t>(xr[c]) - st.mean);
      });
      const stat_t coef = row_norm_grad_coef(st, g_dot_c, eps);
      for (int64_t c = 0; c < C; ++c)
        dc[c] = row_norm_grad_c(st, coef, static_cast<stat_t>(gr[c]), static_cast<stat_t>(xr[c]));
      const stat_t sum = sum_of<stat_t>(C, [&](int64_t c) { return dc[c]; });
      const stat_t mean = st.centred ? sum / static_cast<stat_t>(C) : stat_t(0);
      for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<acc_t>(dc[c] - mean);
    }
  });
}

// Max of a row (n >= 1).
template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  return fold_of<acc_t>(n, x[0], [x](int64_t j) { return x[j]; },
                        [](acc_t m, acc_t v) { return v > m ? v : m; });
}

template <typename acc_t>
acc_t row_sum(const acc_t* x, int64_t n) {
  return sum_of<acc_t>(n, [x](int64_t j) { return x[j]; });
}

// The row passes of the softmax, on the SIMD kernels when `fast` (fp32 only) and as the portable
// loops above otherwise. exp_shifted_rows: row i of the (rows x n) tile x becomes exp(x - m[i]),
// sums[i] its new sum.
template <typename acc_t>
acc_t row_max(bool fast, const acc_t* x, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>)
    if (fast) return simd::row_max(x, n);
  return row_max(x, n);
}

template <typename acc_t>
void exp_shifted_rows(bool fast, acc_t* x, int64_t rows, int64_t n, const acc_t* m, acc_t* sums) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (fast) {
      for (int64_t i = 0; i < rows; ++i) sums[i] = simd::exp_shifted_sum(x + i * n, n, m[i]);
      return;
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) x[i * n + j] -= m[i];
  // ATen's vectorised exp; the tile's shape is fixed by the partition, so the result does not
  // depend on the thread count.
  at::from_blob(x, {rows * n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value))
      .exp_();
  for (int64_t i = 0; i < rows; ++i) sums[i] = row_sum(x + i * n, n);
}

// Column passes over the backward's (rows x cols) tiles, contiguous, whose columns are softmax
// rows (see corr_cpu_simd.h). probs_from_lse_cols: column j becomes softmax_prob(s, lse j).
template <typename acc_t>
void probs_from_lse_cols(bool fast, acc_t* s, int64_t rows, int64_t cols, const acc_t* lse_hi,
                         const acc_t* lse_lo) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (fast) return simd::probs_from_lse_cols(s, rows, cols, cols, lse_hi, lse_lo);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      s[i * cols + j] = score_minus_lse(s[i * cols + j], SplitLse<acc_t>{lse_hi[j], lse_lo[j]});
  // ATen's vectorised exp over the whole tile (its shape depends on the sizes only).
  at::from_blob(s, {rows * cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value))
      .exp_();
}

// d[j] = sum_i p[i][j] * dp[i][j], as four partial sums over i mod 4 added pairwise.
template <typename acc_t>
void col_dots(bool fast, const acc_t* p, const acc_t* dp, int64_t rows, int64_t cols, acc_t* d) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (fast) return simd::col_dots(p, dp, rows, cols, cols, d);
  }
  std::vector<acc_t> part(4 * cols, acc_t(0));
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* acc = part.data() + (i % 4) * cols;
    for (int64_t j = 0; j < cols; ++j) acc[j] += p[i * cols + j] * dp[i * cols + j];
  }
  for (int64_t j = 0; j < cols; ++j)
    d[j] = (part[j] + part[cols + j]) + (part[2 * cols + j] + part[3 * cols + j]);
}

// dp[i][j] = softmax_grad(p[i][j], dp[i][j], d[j]).
template <typename acc_t>
void softmax_grad_cols(bool fast, const acc_t* p, acc_t* dp, int64_t rows, int64_t cols,
                       const acc_t* d) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (fast) return simd::softmax_grad_cols(p, dp, rows, cols, cols, d);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j)
      dp[i * cols + j] = softmax_grad(p[i * cols + j], dp[i * cols + j], d[j]);
}

template <typename acc_t>
void scale_row(bool fast, acc_t* x, int64_t n, acc_t s) {
  if constexpr (std::is_same_v<acc_t, float>)
    if (fast) return simd::scale_row(x, n, s);
  for (int64_t j = 0; j < n; ++j) x[j] *= s;
}

// C (m x n, row stride ldc) = A B, or C + A B when `accumulate`, on raw pointers, where
//   A(i, kk) = a[i * a_rs + kk * a_cs] and B(kk, j) = b[kk * b_rs + j * b_cs].
// On the SIMD path (`simd`, fp32 only) a B with b_cs != 1 (the transpose of a row-major matrix)
// is read from `b_packed`, its pack_transposed form; otherwise ATen's GEMM (MKL) runs on views of
// the buffers.
template <typename acc_t>
void gemm_on_path(bool simd, int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t a_rs,
                  int64_t a_cs, const acc_t* b, int64_t b_rs, int64_t b_cs, const acc_t* b_packed,
                  acc_t* c, int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (simd) {
      if (b_cs == 1) {
        simd::gemm(m, n, k, a, a_rs, a_cs, b, b_rs, simd::kPanel, c, ldc, accumulate);
      } else {
        TORCH_INTERNAL_ASSERT_DEBUG_ONLY(b_packed != nullptr);
        simd::gemm(m, n, k, a, a_rs, a_cs, b_packed, simd::kPanel, k * simd::kPanel, c, ldc,
                   accumulate);
      }
      return;
    }
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor ta = at::from_blob(const_cast<acc_t*>(a), {m, k}, {a_rs, a_cs}, opts);
  const at::Tensor tb = at::from_blob(const_cast<acc_t*>(b), {k, n}, {b_rs, b_cs}, opts);
  at::Tensor tc = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (accumulate)
    tc.addmm_(ta, tb);
  else
    at::mm_out(tc, ta, tb);
}

// gemm_on_path, counted for the _corr_cpu_path_stats debug op (one relaxed atomic add per tile
// product, each of which is tens of microseconds or more).
template <typename acc_t>
void tile_gemm(bool simd, int64_t m, int64_t n, int64_t k, const acc_t* a, int64_t a_rs,
               int64_t a_cs, const acc_t* b, int64_t b_rs, int64_t b_cs, const acc_t* b_packed,
               acc_t* c, int64_t ldc, bool accumulate) {
  path::count_product(std::is_same_v<acc_t, float> && simd ? path::Tiles::kSimd
                                                           : path::Tiles::kAten);
  gemm_on_path<acc_t>(simd, m, n, k, a, a_rs, a_cs, b, b_rs, b_cs, b_packed, c, ldc, accumulate);
}

// bf16::gemm, counted likewise.
void bf16_tile_gemm(int64_t m, int64_t n, int64_t kp, const uint32_t* a, int64_t a_rs,
                    int64_t a_ps, const uint32_t* b, int64_t ldb, int64_t b_panel_stride,
                    float* c, int64_t ldc, bool accumulate) {
  path::count_product(path::Tiles::kBf16);
  bf16::gemm(m, n, kp, a, a_rs, a_ps, b, ldb, b_panel_stride, c, ldc, accumulate);
}

// bf16 pairs (corr_cpu_bf16.h) of matrices that the bf16 tile products read many times, converted
// once, in parallel (the conversions are O(size), the products that read them O(size * tile)).
// Cache-line aligned, as the AMX tile loads need to run at full speed (aligned_buffer.h).
using Pairs = AlignedBuffer<uint32_t>;

// The row width of v's operands and of the P V / dV accumulators: on the bf16 path, Cv rounded up
// to whole panels of the bf16 kernels (zero columns past Cv), so that those products read and
// write them in place on 64-byte-aligned rows. At Cv = 258 (the model's 256 features and two grid
// channels) rows of 258 were unaligned for AMX tile loads and the last two columns went through
// the kernels' ragged-block copies: forward 26% and forward+backward 14% slower than at 256. The
// kernels compute whole 32-column blocks anyway, and each output's sum is the same either way.
int64_t value_row_width(bool use_bf16, int64_t Cv) {
  return use_bf16 ? ceil_div(Cv, bf16::kPanel) * bf16::kPanel : Cv;
}

// rows_to_pairs of every row of a contiguous (R, C) matrix of fp32 values or bf16 bits:
// R rows of ld_out >= pairs(C) pairs (the pairs from pairs(C) on zero).
template <typename T>
Pairs rows_as_pairs(const T* x, int64_t R, int64_t C, bool serial = false, int64_t ld_out = 0) {
  const int64_t kp = bf16::pairs(C);
  if (ld_out == 0) ld_out = kp;
  Pairs out(static_cast<size_t>(R * ld_out));
  at::parallel_for(0, R, serial ? std::max<int64_t>(R, 1) : 256, [&](int64_t begin, int64_t end) {
    bf16::rows_to_pairs(x + begin * C, end - begin, C, C, out.data() + begin * ld_out, ld_out);
    if (ld_out > kp)
      for (int64_t r = begin; r < end; ++r)
        std::fill(out.data() + r * ld_out + kp, out.data() + (r + 1) * ld_out, 0u);
  });
  return out;
}

// cols_to_pairs of each (R, C) matrix of a contiguous (batch, R, C) array of fp32 values or bf16
// bits: pairs(R) rows of ld_out >= C pairs per matrix (the columns from C on zero), matrix b's
// block at b * pairs(R) * ld_out.
template <typename T>
Pairs cols_as_pairs(const T* x, int64_t R, int64_t C, bool serial = false, int64_t batch = 1,
                    int64_t ld_out = 0) {
  if (ld_out == 0) ld_out = C;
  const int64_t rp = bf16::pairs(R), rows = batch * rp;
  Pairs out(static_cast<size_t>(rows * ld_out));
  at::parallel_for(0, rows, serial ? std::max<int64_t>(rows, 1) : 128,
                   [&](int64_t begin, int64_t end) {
    // One call per matrix that the range [begin, end) of pair rows touches.
    for (int64_t t = begin; t < end;) {
      const int64_t b = t / rp, p0 = t % rp, p1 = std::min(rp, p0 + (end - t));
      bf16::cols_to_pairs(x + (b * R + 2 * p0) * C, std::min(2 * p1, R) - 2 * p0, C, C,
                          out.data() + t * ld_out, ld_out);
      if (ld_out > C)
        for (int64_t r = t; r < t + (p1 - p0); ++r)
          std::fill(out.data() + r * ld_out + C, out.data() + (r + 1) * ld_out, 0u);
      t += p1 - p0;
    }
  });
  return out;
}

// pack_transposed of a contiguous (R, C) matrix of fp32 values or bf16 bits, one panel of kPanel
// rows per task.
template <typename T>
Pairs transposed_as_pairs(const T* x, int64_t R, int64_t C, bool serial = false) {
  const int64_t kp = bf16::pairs(C), panels = ceil_div(R, bf16::kPanel);
  Pairs out(static_cast<size_t>(bf16::packed_size(R, C)));
  at::parallel_for(0, panels, serial ? std::max<int64_t>(panels, 1) : 8,
                   [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * bf16::kPanel;
      bf16::pack_transposed(x + r0 * C, std::min(bf16::kPanel, R - r0), C, C,
                            out.data() + r0 * kp);
    }
  });
  return out;
}

// The bf16 forward's operands made straight from the inputs, without fp32 copies of whole
// tensors (their allocation, page faults and passes were a tenth of the bf16 forward at
// Nq = 32768): the same values as rows_as_pairs / transposed_as_pairs of normalized_rows' output
// (and v's pairs come from its bf16 bits through cols_as_pairs).
// x^ of every row of a contiguous (R, C) tensor, by rows: R x pairs(C).
template <typename scalar_t>
Pairs normalized_row_pairs(const at::Tensor& x, stat_t scale, bool normalize, stat_t eps) {
  const int64_t C = x.size(-1), R = x.numel() / C, kp = bf16::pairs(C);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  Pairs out(static_cast<size_t>(R * kp));
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(C));
    for (int64_t r = begin; r < end; ++r) {
      normalize_row_into(xp + r * C, C, scale, normalize, eps, row.data());
      bf16::rows_to_pairs(row.data(), 1, C, C, out.data() + r * kp, kp);
    }
  });
  return out;
}

// x^ of each (N, C) matrix of a contiguous (B, N, C) tensor, transposed and packed
// (bf16::pack_transposed), entry b's block at b * packed_size(N, C).
template <typename scalar_t>
Pairs normalized_transposed_pairs(const at::Tensor& x, stat_t scale, bool normalize, stat_t eps) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), kp = bf16::pairs(C);
  const int64_t per = bf16::packed_size(N, C), panels = ceil_div(N, bf16::kPanel);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  Pairs out(static_cast<size_t>(B * per));
  at::parallel_for(0, B * panels, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(static_cast<size_t>(bf16::kPanel * C));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / panels, r0 = (t % panels) * bf16::kPanel;
      const int64_t nn = std::min(bf16::kPanel, N - r0);
      for (int64_t r = 0; r < nn; ++r)
        normalize_row_into(xp + (b * N + r0 + r) * C, C, scale, normalize, eps, rows.data() + r * C);
      bf16::pack_transposed(rows.data(), nn, C, C, out.data() + b * per + r0 * kp);
    }
  });
  return out;
}

// x^ of every row of a contiguous (R, C) tensor both by rows (rows_as_pairs: R x pairs(C)) and by
// pairs of rows (cols_as_pairs: pairs(R) x C), each row normalised once: the bf16 backward's k^.
struct RowAndColPairs {
  Pairs rows, cols;
};
template <typename scalar_t>
RowAndColPairs normalized_row_and_col_pairs(const at::Tensor& x, stat_t scale, bool normalize,
                                            stat_t eps) {
  const int64_t C = x.size(-1), R = x.numel() / C, kp = bf16::pairs(C), rp = bf16::pairs(R);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  RowAndColPairs out{Pairs(static_cast<size_t>(R * kp)), Pairs(static_cast<size_t>(rp * C))};
  at::parallel_for(0, rp, 32, [&](int64_t begin, int64_t end) {
    std::vector<float> two(static_cast<size_t>(2 * C));
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n = std::min<int64_t>(2, R - 2 * p);
      for (int64_t r = 0; r < n; ++r)
        normalize_row_into(xp + (2 * p + r) * C, C, scale, normalize, eps, two.data() + r * C);
      bf16::rows_to_pairs(two.data(), n, C, C, out.rows.data() + 2 * p * kp, kp);
      bf16::cols_to_pairs(two.data(), n, C, C, out.cols.data() + p * C, C);
    }
  });
  return out;
}

// pack_transposed of every (rows x cols) matrix of a contiguous (batch, rows, cols) fp32 tensor,
// for the SIMD path's B operands (an undefined tensor elsewhere). O(batch * rows * cols) memory.
template <typename acc_t>
at::Tensor pack_rows_transposed(bool simd, const at::Tensor& x) {
  if (!(std::is_same_v<acc_t, float> && simd)) return at::Tensor();
  const int64_t rows = x.size(-2), cols = x.size(-1);
  const int64_t batch = x.numel() / std::max<int64_t>(rows * cols, 1);
  const int64_t per = simd::packed_size(rows, cols), panels = ceil_div(rows, simd::kPanel);
  at::Tensor out = at::empty({batch, per}, x.options());
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, batch * panels, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / panels, r0 = (t % panels) * simd::kPanel;
      simd::pack_transposed(xp + (b * rows + r0) * cols, std::min(simd::kPanel, rows - r0), cols,
                            cols, op + b * per + r0 * cols);
    }
  });
  return out;
}

// Start of the packed B operand of the rows [r0, ...) of matrix b of a pack_rows_transposed
// result (r0 a multiple of kPanel), or nullptr when nothing was packed.
template <typename acc_t>
const acc_t* packed_at(const at::Tensor& packed, int64_t b, int64_t r0, int64_t cols) {
  if constexpr (std::is_same_v<acc_t, float>)
    if (packed.defined()) return packed.const_data_ptr<float>() + b * packed.size(1) + r0 * cols;
  return nullptr;
}

// Seconds of CPU time of the calling thread: a calibration round on a shared machine is not
// stretched by the time its thread spends descheduled.
double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// The calibration (corr_cpu_path.h) of the shape class (C, Cv). A round is the forward's two
// products for one query tile against one key tile on one path (on the bf16 path with the
// conversion of the probabilities between them, as in the forward); every thread runs the rounds
// at once, as the kernel runs its tiles (so ATen's GEMMs run single-threaded inside the parallel
// region, as there), and the first task's times are kept, in CPU time. One parallel region for the
// whole calibration: on a busy machine each region's barrier waits for a descheduled thread. The
// query rows are cut so that a round stays near 2^23 multiply-adds (32 rows at C = Cv = 256,
// about 0.2 ms on one Zen 5 core): a calibration is then a few milliseconds of CPU time.
class TileProductTimer {
 public:
  TileProductTimer(int64_t C, int64_t Cv)
      : C_(C), Cv_(Cv),
        rows_(std::clamp<int64_t>((int64_t(1) << 23) / (kTileK * (C + Cv)), 8, kFwdTileQ)),
        tiles_(std::max<int64_t>(1, at::get_num_threads())) {}

  void operator()(path::Tiles first, path::Tiles second, const path::Enough& enough,
                  std::vector<double>& first_s, std::vector<double>& second_s) {
    std::atomic<bool> stop{false};
    at::parallel_for(0, int64_t(tiles_.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        Tile& t = tiles_[task];
        fill(t, first == path::Tiles::kBf16 || second == path::Tiles::kBf16);
        // Round -1 is the warm-up (caches, MKL's first call). Task 0 decides when to stop.
        for (int r = -1; !stop.load(std::memory_order_relaxed); ++r) {
          const double a = time_round(t, first), b = time_round(t, second);
          if (task != 0 || r < 0) continue;
          first_s.push_back(a);
          second_s.push_back(b);
          if (enough(first_s, second_s)) stop.store(true, std::memory_order_relaxed);
        }
      }
    });
  }

 private:
  struct Tile {
    std::vector<float> q, k, k_packed, v;
    AlignedBuffer<float> s, out;  // the products' outputs (AMX stores need aligned rows)
    Pairs q_pairs, k_pairs, v_pairs, s_pairs;  // the bf16 path's operands
  };

  // The tile's inputs (small values of mixed sign: the products must not overflow or
  // denormalise) and, for the paths that need them, their packed and bf16 forms.
  void fill(Tile& t, bool bf16_too) const {
    t.q.resize(rows_ * C_);
    t.k.resize(kTileK * C_);
    t.v.resize(kTileK * Cv_);
    t.s.resize(rows_ * kTileK);
    t.out.resize(rows_ * Cv_);
    for (size_t i = 0; i < t.q.size(); ++i) t.q[i] = float((i * 37) % 17) / 17.0f - 0.5f;
    for (size_t i = 0; i < t.k.size(); ++i) t.k[i] = float((i * 11) % 13) / 13.0f - 0.5f;
    for (size_t i = 0; i < t.v.size(); ++i) t.v[i] = float((i * 7) % 19) / 19.0f - 0.5f;
    if (simd::available()) {
      t.k_packed.resize(simd::packed_size(kTileK, C_));
      simd::pack_transposed(t.k.data(), kTileK, C_, C_, t.k_packed.data());
    }
    if (bf16_too) {
      t.q_pairs = rows_as_pairs(t.q.data(), rows_, C_, /*serial=*/true);
      t.k_pairs = transposed_as_pairs(t.k.data(), kTileK, C_, /*serial=*/true);
      t.v_pairs = cols_as_pairs(t.v.data(), kTileK, Cv_, /*serial=*/true);
      t.s_pairs.resize(rows_ * bf16::pairs(kTileK));
    }
  }

  // Seconds of one round on one tile.
  double time_round(Tile& t, path::Tiles tiles) const {
    const double start = thread_seconds();
    if (tiles == path::Tiles::kBf16) {
      const int64_t pc = bf16::pairs(C_), pk = bf16::pairs(kTileK);
      bf16::gemm(rows_, kTileK, pc, t.q_pairs.data(), pc, 1, t.k_pairs.data(), bf16::kPanel,
                 pc * bf16::kPanel, t.s.data(), kTileK, false);
      bf16::rows_to_pairs(t.s.data(), rows_, kTileK, kTileK, t.s_pairs.data(), pk);
      bf16::gemm(rows_, Cv_, pk, t.s_pairs.data(), pk, 1, t.v_pairs.data(), Cv_, bf16::kPanel,
                 t.out.data(), Cv_, false);
    } else {
      const bool simd = tiles == path::Tiles::kSimd;
      gemm_on_path<float>(simd, rows_, kTileK, C_, t.q.data(), C_, 1, t.k.data(), 1, C_,
                          t.k_packed.data(), t.s.data(), kTileK, false);
      gemm_on_path<float>(simd, rows_, Cv_, kTileK, t.s.data(), kTileK, 1, t.v.data(), Cv_, 1,
                          nullptr, t.out.data(), Cv_, false);
    }
    return thread_seconds() - start;
  }

  int64_t C_, Cv_, rows_;
  std::vector<Tile> tiles_;
};

// The path of this call's tile products: ATen's for float64 (and float16, whose opmath type is
// float but which has no bf16 kernels: it takes the fp32 choice), measured or forced otherwise.
// bfloat16 rows that rounds_normalised_rows (corr_math.h) keeps at fp32 precision (C < 16) take
// the fp32 choice too: the bf16 kernels round q^ and k^.
template <typename scalar_t>
path::Tiles choose_tiles(int64_t C, int64_t Cv) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (!std::is_same_v<acc_t, float>) return path::Tiles::kAten;
  const bool bf16_rows =
      std::is_same_v<scalar_t, c10::BFloat16> && rounds_normalised_rows(true, C);
  // The timer (and its buffers) is built only when a calibration actually runs, with this call's
  // sizes standing for their shape class.
  return path::choose(C, Cv, bf16_rows,
                      [C, Cv](path::Tiles first, path::Tiles second, const path::Enough& enough,
                              std::vector<double>& first_s, std::vector<double>& second_s) {
                        TileProductTimer(C, Cv)(first, second, enough, first_s, second_s);
                      });
}

// out[i] = scalar_t(x[i]) without an ATen op: the forward's tasks store their rows of the output
// this way, since a copy_ into a view of `out` inside the op is recorded by the profiler as an
// undeclared mutation, which torch's memory profiler rejects ("version mismatch").
template <typename scalar_t, typename acc_t>
void store_converted(const acc_t* x, int64_t n, scalar_t* out) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    if (simd::available()) return simd::to_bf16(x, n, reinterpret_cast<uint16_t*>(out));
  }
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(x[i]);
}

template <typename scalar_t>
void corr_warp_forward_impl(const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, double temperature, bool normalize,
                            double eps, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = query.size(0), Nq = query.size(1), Nk = key.size(1);
  const int64_t C = query.size(2), Cv = value.size(2);
  const auto acc_opts = query.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const path::Tiles tiles = choose_tiles<scalar_t>(C, Cv);
  // The row passes run on the SIMD kernels with either of the project's products.
  const bool fast = tiles != path::Tiles::kAten, use_bf16 = tiles == path::Tiles::kBf16;
  // The operands: q^, k^ and v in acc_t, and k^ packed as the B operand of q^ k^T on the SIMD
  // path; or, on the bf16 path, q^ by rows, k^ transposed and packed, v by pairs of keys (each
  // batch entry's block at a multiple of its size).
  at::Tensor qs, kn, kn_packed, v;
  const int64_t pc = bf16::pairs(C), kn_per = bf16::packed_size(Nk, C);
  const int64_t ld_v = value_row_width(use_bf16, Cv);  // v's pairs and the output accumulator
  const int64_t v_per = bf16::pairs(Nk) * ld_v;
  Pairs q_pairs, k_pairs, v_pairs;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (use_bf16) {
      q_pairs = normalized_row_pairs<scalar_t>(query, 1.0 / temperature, normalize, eps);
      k_pairs = normalized_transposed_pairs<scalar_t>(key, 1.0, normalize, eps);
      v_pairs = cols_as_pairs(reinterpret_cast<const uint16_t*>(value.const_data_ptr<scalar_t>()),
                              Nk, Cv, /*serial=*/false, B, ld_v);
    }
  }
  if (!use_bf16) {
    qs = normalized_rows<scalar_t, acc_t>(query, 1.0 / temperature, normalize, eps);
    kn = normalized_rows<scalar_t, acc_t>(key, 1.0, normalize, eps);
    kn_packed = pack_rows_transposed<acc_t>(tiles == path::Tiles::kSimd, kn);
    v = value.to(acc_opts.dtype());
  }
  // The output rows are the accumulator when out is acc_t; otherwise each task accumulates in a
  // buffer of its own and converts its rows at the end (no acc_t copy of the whole output).
  const bool out_is_acc = out.scalar_type() == acc_opts.dtype();
  const acc_t* qp = use_bf16 ? nullptr : qs.const_data_ptr<acc_t>();
  const acc_t* kp = use_bf16 ? nullptr : kn.const_data_ptr<acc_t>();
  const acc_t* vp = use_bf16 ? nullptr : v.const_data_ptr<acc_t>();
  double* lse_p = lse.mutable_data_ptr<double>();
  const int64_t n_qt = ceil_div(Nq, kFwdTileQ), n_kt = ceil_div(Nk, kTileK);

  at::parallel_for(0, B * n_qt, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<acc_t> s_buf(kFwdTileQ * kTileK), acc_buf(out_is_acc ? 0 : kFwdTileQ * ld_v);
    std::vector<acc_t> m(kFwdTileQ), l(kFwdTileQ), alpha(kFwdTileQ), tile_sum(kFwdTileQ);
    Pairs p_pairs(use_bf16 ? kFwdTileQ * bf16::pairs(kTileK) : 0);  // P of the tile, bf16
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_qt, q0 = (task % n_qt) * kFwdTileQ;
      const int64_t nq = std::min(kFwdTileQ, Nq - q0);
      const acc_t* q_tile = use_bf16 ? nullptr : qp + (b * Nq + q0) * C;
      // The output rows (owned by this task alone) or the task's buffer.
      acc_t* acc = out_is_acc ? out.mutable_data_ptr<acc_t>() + (b * Nq + q0) * Cv : acc_buf.data();
      const int64_t ld_acc = out_is_acc ? Cv : ld_v;
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int64_t kt = 0; kt < n_kt; ++kt) {
        const int64_t k0 = kt * kTileK, nk = std::min(kTileK, Nk - k0);
        acc_t* sp = s_buf.data();
        if constexpr (std::is_same_v<acc_t, float>) {
          if (use_bf16)
            bf16_tile_gemm(nq, nk, pc, q_pairs.data() + (b * Nq + q0) * pc, pc, 1,
                           k_pairs.data() + b * kn_per + k0 * pc, bf16::kPanel,
                           pc * bf16::kPanel, sp, nk, false);
        }
        if (!use_bf16)
          tile_gemm<acc_t>(fast, nq, nk, C, q_tile, C, 1, kp + (b * Nk + k0) * C, 1, C,
                           packed_at<acc_t>(kn_packed, b, k0, C), sp, nk, false);
        for (int64_t i = 0; i < nq; ++i) {
          const OnlineSoftmaxStep<acc_t> st =
              online_softmax_step(m[i], row_max(fast, sp + i * nk, nk));
          m[i] = st.m_new;
          alpha[i] = st.alpha;
        }
        const int64_t pk = bf16::pairs(nk);
        if constexpr (std::is_same_v<acc_t, float>) {
          // P goes straight to bf16 pairs (its fp32 values are only summed).
          if (use_bf16) {
            uint16_t* p16 = reinterpret_cast<uint16_t*>(p_pairs.data());
            for (int64_t i = 0; i < nq; ++i)
              tile_sum[i] = bf16::exp_shifted_sum(sp + i * nk, nk, m[i], p16 + i * 2 * pk);
          }
        }
        if (!use_bf16) exp_shifted_rows(fast, sp, nq, nk, m.data(), tile_sum.data());
        for (int64_t i = 0; i < nq; ++i) {
          // Rescale the old sum and output row; the first tile overwrites them instead.
          l[i] = kt == 0 ? tile_sum[i] : l[i] * alpha[i] + tile_sum[i];
          if (kt > 0 && alpha[i] != acc_t(1)) scale_row(fast, acc + i * ld_acc, Cv, alpha[i]);
        }
        if constexpr (std::is_same_v<acc_t, float>) {
          if (use_bf16) {
            bf16_tile_gemm(nq, ld_v, pk, p_pairs.data(), pk, 1,
                           v_pairs.data() + b * v_per + (k0 / 2) * ld_v, ld_v, bf16::kPanel, acc,
                           ld_acc, /*accumulate=*/kt > 0);
          }
        }
        if (!use_bf16)
          tile_gemm<acc_t>(fast, nq, Cv, nk, sp, nk, 1, vp + (b * Nk + k0) * Cv, Cv, 1, nullptr,
                           acc, ld_acc, /*accumulate=*/kt > 0);
      }
      for (int64_t i = 0; i < nq; ++i) {
        scale_row(fast, acc + i * ld_acc, Cv, acc_t(1) / l[i]);
        lse_p[b * Nq + q0 + i] = online_softmax_lse(m[i], l[i]);
      }
      if (!out_is_acc)
        for (int64_t i = 0; i < nq; ++i)
          store_converted(acc + i * ld_acc, Cv,
                          out.mutable_data_ptr<scalar_t>() + (b * Nq + q0 + i) * Cv);
    }
  });
}

// dst[r] = parts[0][r] + parts[1][r] + ... (in index order) for rows r in [r_begin, r_end), where
// parts holds n_parts blocks of rows x cols values, part_stride apart.
template <typename acc_t>
void sum_parts_in_order(const acc_t* parts, int64_t n_parts, int64_t part_stride, int64_t cols,
                        int64_t r_begin, int64_t r_end, acc_t* dst) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = parts[r * cols + c];
    for (int64_t p = 1; p < n_parts; ++p) {
      const acc_t* src = parts + p * part_stride + r * cols;
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] += src[c];
    }
  }
}

// The backward, one chunk of query rows at a time, in two phases parallel over key tiles:
//   1. recompute P = exp(S - lse) and dP = dO V^T for the chunk's rows and every key, keep both,
//      and sum D = rowsum(P * dP) (per key tile, then in key-tile order);
//   2. dS = P * (dP - D); dV += P^T dO and dK += dS^T q^ into the tile's own rows; dS k^ into the
//      tile's dQ partial, summed in key-tile order afterwards.
// Each phase runs one GEMM per product over the whole chunk and key tile. The tiles are stored
// transposed (keys down, the chunk's queries across): then every product reads k^, v, q^ and dO
// in their own row-major layout except q^ and dO of the chunk, which the SIMD path packs once a
// chunk (O(chunk * C)), instead of packing k^ and v of a whole batch entry (O(Nk * C) memory).
// D comes from the very P and dP that dS uses, as in an unfused softmax backward, rather than from
// rowsum(dO * out): on a saturated row dP - D cancels to a few ulps, and the rounding of `out`
// would otherwise reach dS (and, times 1/temperature, dQ and dK) unattenuated. Keeping P and dP of
// one chunk costs 2 * chunk * Nk values, bounded by kChunkBudget; it saves recomputing them.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> corr_warp_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& lse, double temperature, bool normalize,
    double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = query.size(0), Nq = query.size(1), Nk = key.size(1);
  const int64_t C = query.size(2), Cv = value.size(2);
  const auto acc_opts = query.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const path::Tiles tiles = choose_tiles<scalar_t>(C, Cv);
  const bool fast = tiles != path::Tiles::kAten, use_bf16 = tiles == path::Tiles::kBf16;
  const bool simd_products = tiles == path::Tiles::kSimd;
  // The bf16 path (bf16 inputs only) makes its operands from the bits of v and dO and from k^'s
  // rows as they are normalised: no fp32 copies of them (12 MiB at N = 4096, C = Cv = 256).
  const at::Tensor v = use_bf16 ? at::Tensor() : value.to(acc_opts.dtype());
  const at::Tensor d_out = use_bf16 ? at::Tensor() : grad_out.to(acc_opts.dtype());
  const uint16_t* v_bits = nullptr;
  const uint16_t* do_bits = nullptr;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    v_bits = reinterpret_cast<const uint16_t*>(value.const_data_ptr<scalar_t>());
    do_bits = reinterpret_cast<const uint16_t*>(grad_out.const_data_ptr<scalar_t>());
  }

  at::Tensor grad_qs = at::empty({B, Nq, C}, acc_opts);
  at::Tensor grad_kn = at::zeros({B, Nk, C}, acc_opts);
  const int64_t ld_v = value_row_width(use_bf16, Cv);  // v's and dO's operands, dV's accumulator
  at::Tensor grad_v = at::zeros({B, Nk, ld_v}, acc_opts);
  const int64_t n_kt = ceil_div(Nk, kTileK);
  // Query rows per chunk: whole tiles, as many as the budget allows (from the sizes only).
  const int64_t per_row = 2 * Nk + n_kt * (C + 1);
  const int64_t chunk = std::min(ceil_div(Nq, kTileQ) * kTileQ,
                                 std::max<int64_t>(1, kChunkBudget / (per_row * kTileQ)) * kTileQ);
  // Per key tile: its P and dP for the chunk (chunk x kTileK each), its D and dQ partials.
  at::Tensor p_store = at::empty({n_kt, chunk * kTileK}, acc_opts);
  at::Tensor dp_store = at::empty({n_kt, chunk * kTileK}, acc_opts);
  at::Tensor d_part = at::empty({n_kt, chunk}, acc_opts);
  at::Tensor dq_part = at::empty({n_kt, chunk, C}, acc_opts);
  const double* lse_p = lse.const_data_ptr<double>();

  // The dQ partials of a finished chunk are summed inside the next parallel region (each task
  // takes a fixed share of the rows), so a chunk costs two parallel regions, not four: every
  // region ends in a barrier, and on a busy machine each barrier waits for a descheduled thread.
  struct Chunk {
    int64_t b = -1, c0 = 0, n = 0;
  } pending;
  const auto reduce_dq_share = [&](int64_t task) {
    if (pending.b < 0) return;
    acc_t* dst = grad_qs.mutable_data_ptr<acc_t>() + (pending.b * Nq + pending.c0) * C;
    sum_parts_in_order(dq_part.const_data_ptr<acc_t>(), n_kt, chunk * C, C,
                       pending.n * task / n_kt, pending.n * (task + 1) / n_kt, dst);
  };
  const acc_t* dop = use_bf16 ? nullptr : d_out.const_data_ptr<acc_t>();
  acc_t* gkp = grad_kn.mutable_data_ptr<acc_t>();
  acc_t* gvp = grad_v.mutable_data_ptr<acc_t>();
  acc_t* p_base = p_store.mutable_data_ptr<acc_t>();
  acc_t* dp_base = dp_store.mutable_data_ptr<acc_t>();
  acc_t* d_base = d_part.mutable_data_ptr<acc_t>();
  acc_t* dq_base = dq_part.mutable_data_ptr<acc_t>();
  std::vector<acc_t> lse_hi(chunk), lse_lo(chunk);
  for (int64_t b = 0; b < B; ++b) {
    // k^ of one batch entry and q^ of one chunk at a time: the backward's peak memory stays close
    // to its outputs.
    const at::Tensor kn =
        use_bf16 ? at::Tensor() : normalized_rows<scalar_t, acc_t>(key[b], 1.0, normalize, eps);
    const acc_t* kp = use_bf16 ? nullptr : kn.const_data_ptr<acc_t>();
    const acc_t* vp = use_bf16 ? nullptr : v.const_data_ptr<acc_t>() + b * Nk * Cv;
    // The bf16 path's operands of the batch entry: k^ and v by rows (A of P^T and dP^T), k^ by
    // pairs of keys (B of dQ).
    RowAndColPairs kn_pairs;
    Pairs v_rows;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (use_bf16) {
        kn_pairs = normalized_row_and_col_pairs<scalar_t>(key[b], 1.0, normalize, eps);
        v_rows = rows_as_pairs(v_bits + b * Nk * Cv, Nk, Cv, /*serial=*/false, ld_v / 2);
      }
    }
    const Pairs& kn_rows = kn_pairs.rows;
    const Pairs& kn_cols = kn_pairs.cols;
    for (int64_t c0 = 0; c0 < Nq; c0 += chunk) {
      const int64_t n_chunk = std::min(chunk, Nq - c0);
      const at::Tensor qs = normalized_rows<scalar_t, acc_t>(
          query[b].narrow(0, c0, n_chunk), 1.0 / temperature, normalize, eps, /*serial=*/true);
      const acc_t* qp = qs.const_data_ptr<acc_t>();
      const acc_t* dop_chunk = use_bf16 ? nullptr : dop + (b * Nq + c0) * Cv;
      // q^T and dO^T of the chunk as packed B operands (SIMD path only).
      const at::Tensor qs_packed = pack_rows_transposed<acc_t>(simd_products, qs);
      const at::Tensor do_packed = pack_rows_transposed<acc_t>(
          simd_products, use_bf16 ? at::Tensor() : d_out[b].narrow(0, c0, n_chunk));
      // The bf16 path's operands of the chunk: q^T and dO^T packed (B of P^T and dP^T), q^ and dO
      // by pairs of queries (B of dK and dV). One parallel region for the four.
      Pairs qs_t, do_t, qs_cols, do_cols;
      if constexpr (std::is_same_v<acc_t, float>) {
        if (use_bf16) {
          const uint16_t* do_chunk_bits = do_bits + (b * Nq + c0) * Cv;
          // dO^T's reduction runs over ld_v channels, so pack_transposed reads the chunk's rows
          // zero-padded to ld_v: a small copy (72 KiB at Cv = 258), only where Cv needs padding.
          std::vector<uint16_t> do_padded;
          if (ld_v != Cv) {
            do_padded.assign(static_cast<size_t>(n_chunk * ld_v), 0);
            for (int64_t i = 0; i < n_chunk; ++i)
              std::copy_n(do_chunk_bits + i * Cv, Cv, do_padded.data() + i * ld_v);
          }
          const uint16_t* do_rows = ld_v != Cv ? do_padded.data() : do_chunk_bits;
          at::parallel_for(0, 4, 1, [&](int64_t begin, int64_t end) {
            for (int64_t job = begin; job < end; ++job) {
              if (job == 0) qs_t = transposed_as_pairs(qp, n_chunk, C, true);
              if (job == 1) do_t = transposed_as_pairs(do_rows, n_chunk, ld_v, true);
              if (job == 2) qs_cols = cols_as_pairs(qp, n_chunk, C, true);
              if (job == 3)
                do_cols = cols_as_pairs(do_chunk_bits, n_chunk, Cv, true, /*batch=*/1, ld_v);
            }
          });
        }
      }
      for (int64_t i = 0; i < n_chunk; ++i) {
        const SplitLse<acc_t> split = split_lse<acc_t>(lse_p[b * Nq + c0 + i]);
        lse_hi[i] = split.hi;
        lse_lo[i] = split.lo;
      }
      // The (nk x n_chunk) tile of key tile kt: P^T (or dP^T, dS^T), contiguous.
      const auto tile = [&](acc_t* store, int64_t kt) { return store + kt * chunk * kTileK; };
      // out = X Y^T on this call's path, for the nk rows of X (Nk x c) from k0 and the chunk's
      // rows of Y (n_chunk x c): given as rows and as bf16 pairs of rows (X), as rows, packed and
      // bf16-transposed (Y).
      const auto tile_times_chunk_t = [&](int64_t k0, int64_t nk, int64_t c, const acc_t* x,
                                          const Pairs& x_pairs, const acc_t* y,
                                          const at::Tensor& y_packed, const Pairs& y_t,
                                          acc_t* out) {
        if constexpr (std::is_same_v<acc_t, float>) {
          if (use_bf16) {
            const int64_t pairs = bf16::pairs(c);
            bf16_tile_gemm(nk, n_chunk, pairs, x_pairs.data() + k0 * pairs, pairs, 1, y_t.data(),
                           bf16::kPanel, pairs * bf16::kPanel, out, n_chunk, false);
            return;
          }
        }
        tile_gemm<acc_t>(fast, nk, n_chunk, c, x + k0 * c, c, 1, y, 1, c,
                         packed_at<acc_t>(y_packed, 0, 0, c), out, n_chunk, false);
      };
      at::parallel_for(0, n_kt, 1, [&](int64_t begin, int64_t end) {  // phase 1
        for (int64_t kt = begin; kt < end; ++kt) {
          reduce_dq_share(kt);
          // P^T = k^ q^T and dP^T = v dO^T of the key tile and the whole chunk: one GEMM each.
          const int64_t k0 = kt * kTileK, nk = std::min(kTileK, Nk - k0);
          acc_t* pt = tile(p_base, kt);
          acc_t* dpt = tile(dp_base, kt);
          tile_times_chunk_t(k0, nk, C, kp, kn_rows, qp, qs_packed, qs_t, pt);
          probs_from_lse_cols(fast, pt, nk, n_chunk, lse_hi.data(), lse_lo.data());
          tile_times_chunk_t(k0, nk, ld_v, vp, v_rows, dop_chunk, do_packed, do_t, dpt);
          col_dots(fast, pt, dpt, nk, n_chunk, d_base + kt * chunk);
        }
      });
      at::parallel_for(0, n_kt, 1, [&](int64_t begin, int64_t end) {  // phase 2
        // D of the chunk's rows, summed by every task alike (n_kt values a row: cheaper than a
        // parallel region of its own).
        std::vector<acc_t> d_row(n_chunk);
        // P and dS of the key tile in bf16 (bf16 path): by rows (A of dV and dK), and dS by pairs
        // of keys (the transposed A of dQ).
        const int64_t pq = bf16::pairs(n_chunk);
        Pairs p_rows(use_bf16 ? kTileK * pq : 0), ds_rows(p_rows.size()),
            ds_cols(use_bf16 ? bf16::pairs(kTileK) * n_chunk : 0);
        sum_parts_in_order(d_part.const_data_ptr<acc_t>(), n_kt, chunk, 1, 0, n_chunk,
                           d_row.data());
        for (int64_t kt = begin; kt < end; ++kt) {
          const int64_t k0 = kt * kTileK, nk = std::min(kTileK, Nk - k0);
          acc_t* gk_tile = gkp + (b * Nk + k0) * C;
          acc_t* gv_tile = gvp + (b * Nk + k0) * ld_v;
          const acc_t* pt = tile(p_base, kt);
          acc_t* dst = tile(dp_base, kt);
          // dV += P^T dO and dK += dS^T q^ over the chunk's rows, and the chunk's dQ partial
          // dS k^ (A transposed: a_rs = 1, a_cs = n_chunk).
          if constexpr (std::is_same_v<acc_t, float>) {
            if (use_bf16) {
              bf16::softmax_grad_pairs(pt, dst, nk, n_chunk, n_chunk, d_row.data(), p_rows.data(),
                                       ds_rows.data(), pq, ds_cols.data(), n_chunk);
              bf16_tile_gemm(nk, ld_v, pq, p_rows.data(), pq, 1, do_cols.data(), ld_v,
                             bf16::kPanel, gv_tile, ld_v, true);
              bf16_tile_gemm(nk, C, pq, ds_rows.data(), pq, 1, qs_cols.data(), C, bf16::kPanel,
                             gk_tile, C, true);
              bf16_tile_gemm(n_chunk, C, bf16::pairs(nk), ds_cols.data(), 1, n_chunk,
                             kn_cols.data() + (k0 / 2) * C, C, bf16::kPanel,
                             dq_base + kt * chunk * C, C, false);
            }
          }
          if (!use_bf16) {
            softmax_grad_cols(fast, pt, dst, nk, n_chunk, d_row.data());
            tile_gemm<acc_t>(fast, nk, Cv, n_chunk, pt, n_chunk, 1, dop_chunk, Cv, 1, nullptr,
                             gv_tile, Cv, true);
            tile_gemm<acc_t>(fast, nk, C, n_chunk, dst, n_chunk, 1, qp, C, 1, nullptr, gk_tile,
                             C, true);
            tile_gemm<acc_t>(fast, n_chunk, C, nk, dst, 1, n_chunk, kp + k0 * C, C, 1, nullptr,
                             dq_base + kt * chunk * C, C, false);
          }
        }
      });
      pending = Chunk{b, c0, n_chunk};
    }
  }
  at::parallel_for(0, n_kt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kt = begin; kt < end; ++kt) reduce_dq_share(kt);
  });
  // Through the normalisation (and the 1/temperature folded into q^), row by row, in place.
  normalized_rows_backward<scalar_t, acc_t>(grad_qs, query, 1.0 / temperature, normalize, eps);
  normalized_rows_backward<scalar_t, acc_t>(grad_kn, key, 1.0, normalize, eps);
  const auto dtype = query.scalar_type();
  return {grad_qs.to(dtype), grad_kn.to(dtype), grad_v.narrow(-1, 0, Cv).to(dtype).contiguous()};
}

// corr_warp on CPU.
//
// Args:
//   query:       (B, Nq, C) float32 | float16 | bfloat16 | float64, any strides.
//   key:         (B, Nk, C), dtype of query.
//   value:       (B, Nk, Cv), dtype of query.
//   temperature: softmax temperature, finite and > 0.
//   normalize:   centre and L2-normalise query and key rows over C first.
//   eps:         added to the row norms, > 0.
// Returns:
//   out: (B, Nq, Cv), dtype of query: softmax(q^ k^T / temperature) @ value; 0 when Nk == 0.
//   lse: (B, Nq), float64: per-row log-sum-exp of the scores q^ k^T / temperature, -inf when
//        Nk == 0. Saved for the backward.
std::tuple<at::Tensor, at::Tensor> corr_warp_cpu(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, double temperature,
                                                 bool normalize, double eps) {
  check_inputs(query, key, value, temperature, eps);
  // The tile GEMMs below are ATen calls on views of the inputs, which may require grad; the
  // autograd formula of this op is registered in Python, so they must not record a graph. The
  // guard covers this thread; the inputs are detached because OpenMP workers do not inherit it.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [out, lse] = forward_outputs(query, key, value);
  if (forward_is_trivial(query, key)) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "corr_warp_cpu",
                                  [&] {
                                    corr_warp_forward_impl<scalar_t>(
                                        query.detach().contiguous(), key.detach().contiguous(),
                                        value.detach().contiguous(),
                                        temperature, normalize, eps, out, lse);
                                  });
  return {out, lse};
}

// _corr_warp_backward on CPU.
//
// Args:
//   grad_out:    (B, Nq, Cv), dtype of query: dL/dout.
//   query, key, value, temperature, normalize, eps: as given to corr_warp.
//   out, lse:    the two outputs of corr_warp for these inputs (this kernel only needs lse:
//                it sums D = rowsum(P * dP) itself, see corr_warp_backward_impl).
// Returns:
//   grad_query (B, Nq, C), grad_key (B, Nk, C), grad_value (B, Nk, Cv), dtype of query,
//   contiguous. Bitwise reproducible for any thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> corr_warp_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse, double temperature,
    bool normalize, double eps) {
  check_backward_inputs(grad_out, query, key, value, out, lse, temperature, eps);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in corr_warp_cpu
  if (forward_is_trivial(query, key)) return zero_grads(query, key, value);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "corr_warp_backward_cpu", [&] {
        grads = corr_warp_backward_impl<scalar_t>(
            grad_out.detach().contiguous(), query.detach().contiguous(),
            key.detach().contiguous(), value.detach().contiguous(), lse.detach().contiguous(),
            temperature, normalize, eps);
      });
  return grads;
}

}  // namespace

std::string path::path_for(int64_t channels, int64_t value_channels, bool bf16_inputs) {
  TORCH_CHECK(channels > 0 && value_channels > 0,
              "_corr_cpu_path needs positive channel counts, got C=", channels,
              " and Cv=", value_channels);
  return tiles_name(bf16_inputs ? choose_tiles<c10::BFloat16>(channels, value_channels)
                                : choose_tiles<float>(channels, value_channels));
}

TORCH_LIBRARY_IMPL(pncc, CPU, m) {
  m.impl("corr_warp", &corr_warp_cpu);
  m.impl("_corr_warp_backward", &corr_warp_backward_cpu);
}

}  // namespace corr
}  // namespace pncc
