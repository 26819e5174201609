// AVX512-BF16 kernels of corr_cpu_bf16.h. This file alone is compiled for AVX-512F/BW and
// AVX512-BF16 (the pragma below); nothing in it runs unless bf16::available() said the CPU has
// them. Like corr_cpu_simd.cpp it includes no torch header, so none of its inline functions can
// be picked by the linker for the baseline-ISA files.
#include "corr/corr_cpu_bf16.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PNCC_CORR_BF16_BUILT 1
#else
#define PNCC_CORR_BF16_BUILT 0
#endif

#if PNCC_CORR_BF16_BUILT
#include <immintrin.h>
#endif

namespace pncc {
namespace corr {
namespace bf16 {

bool available() {
  static const bool ok = [] {
#if PNCC_CORR_BF16_BUILT
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return ok;
}

bool amx_in_use() {
  static const bool on = [] {
    const char* env = std::getenv("PNCC_CORR_AMX");
    return amx_available() && !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return on;
}

void gemm(int64_t m, int64_t n, int64_t kp, const uint32_t* a, int64_t a_rs, int64_t a_ps,
          const uint32_t* b, int64_t ldb, int64_t b_panel_stride, float* c, int64_t ldc,
          bool accumulate) {
  if (amx_in_use())
    gemm_amx(m, n, kp, a, a_rs, a_ps, b, ldb, b_panel_stride, c, ldc, accumulate);
  else
    gemm_avx512(m, n, kp, a, a_rs, a_ps, b, ldb, b_panel_stride, c, ldc, accumulate);
}

}  // namespace bf16
}  // namespace corr
}  // namespace pncc

#if PNCC_CORR_BF16_BUILT

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512bf16,prfchw")
// As in corr_cpu_simd.cpp: GCC 12's _mm512_undefined_* initialise a variable from itself.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "corr/corr_cpu_avx512.h"

namespace pncc {
namespace corr {
namespace bf16 {
namespace {

// The register tile: kRows rows x 32 columns, 24 accumulators, two B vectors and a broadcast in
// the 32 registers. One fp32 sum per element: each vdpbf16ps step adds two exact products.
constexpr int kRows = 12;

// C[0:rows, 0:32] (+)= A B for one block of kRows rows (all of them readable: the caller pads a
// short block). kPairMajor: pair p of row r at a[p * a_ps + r]; otherwise at a[r * a_rs + p],
// read through four row-group pointers so that each broadcast is one addressing mode.
#define PNCC_BF_ACC(R) __m512 acc_##R##_0 = _mm512_setzero_ps(), acc_##R##_1 = _mm512_setzero_ps();
#define PNCC_BF_A(R) (kPairMajor ? a[R] : g##R##_3[((R) % 3) * a_rs])
#define PNCC_BF_ROW(R)                                                           \
  {                                                                              \
    const __m512bh av = (__m512bh)_mm512_set1_epi32(int(PNCC_BF_A(R)));          \
    acc_##R##_0 = _mm512_dpbf16_ps(acc_##R##_0, av, b0);                         \
    acc_##R##_1 = _mm512_dpbf16_ps(acc_##R##_1, av, b1);                         \
  }
#define PNCC_BF_STORE(R)                                                         \
  if ((R) < rows) {                                                              \
    float* cr = c + (R) * ldc;                                                   \
    __m512 u = acc_##R##_0, v = acc_##R##_1;                                     \
    if (accumulate) {                                                            \
      u = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, cr), u);                       \
      v = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, cr + 16), v);                  \
    }                                                                            \
    _mm512_mask_storeu_ps(cr, m0, u);                                            \
    _mm512_mask_storeu_ps(cr + 16, m1, v);                                       \
  }

template <bool kPairMajor>
void micro(int64_t kp, const uint32_t* a, int64_t a_rs, int64_t a_ps, const uint32_t* b,
           int64_t ldb, float* c, int64_t ldc, int rows, __mmask16 m0, __mmask16 m1,
           bool accumulate) {
  PNCC_BF_ACC(0) PNCC_BF_ACC(1) PNCC_BF_ACC(2) PNCC_BF_ACC(3) PNCC_BF_ACC(4) PNCC_BF_ACC(5)
  PNCC_BF_ACC(6) PNCC_BF_ACC(7) PNCC_BF_ACC(8) PNCC_BF_ACC(9) PNCC_BF_ACC(10) PNCC_BF_ACC(11)
  // Row-group pointers (row-major A only): g<R>_3 is the pointer of row R's group of three.
  const uint32_t *grp0 = a, *grp1 = a + 3 * a_rs, *grp2 = a + 6 * a_rs, *grp3 = a + 9 * a_rs;
  // As in corr_cpu_simd.cpp: C's lines are requested before the products, not at the stores.
  for (int r = 0; r < rows; ++r) {
    __builtin_prefetch(c + r * ldc, 1, 3);
    __builtin_prefetch(c + r * ldc + 16, 1, 3);
  }
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, b);
    const __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, b + 16);
    b += ldb;
    const uint32_t *g0_3 = grp0, *g1_3 = grp0, *g2_3 = grp0, *g3_3 = grp1, *g4_3 = grp1,
                   *g5_3 = grp1, *g6_3 = grp2, *g7_3 = grp2, *g8_3 = grp2, *g9_3 = grp3,
                   *g10_3 = grp3, *g11_3 = grp3;
    PNCC_BF_ROW(0) PNCC_BF_ROW(1) PNCC_BF_ROW(2) PNCC_BF_ROW(3) PNCC_BF_ROW(4) PNCC_BF_ROW(5)
    PNCC_BF_ROW(6) PNCC_BF_ROW(7) PNCC_BF_ROW(8) PNCC_BF_ROW(9) PNCC_BF_ROW(10) PNCC_BF_ROW(11)
    if constexpr (kPairMajor) {
      a += a_ps;
    } else {
      ++grp0, ++grp1, ++grp2, ++grp3;
    }
  }
  PNCC_BF_STORE(0) PNCC_BF_STORE(1) PNCC_BF_STORE(2) PNCC_BF_STORE(3) PNCC_BF_STORE(4)
  PNCC_BF_STORE(5) PNCC_BF_STORE(6) PNCC_BF_STORE(7) PNCC_BF_STORE(8) PNCC_BF_STORE(9)
  PNCC_BF_STORE(10) PNCC_BF_STORE(11)
}

#undef PNCC_BF_ACC
#undef PNCC_BF_A
#undef PNCC_BF_ROW
#undef PNCC_BF_STORE

}  // namespace

void rows_to_pairs(const float* x, int64_t rows, int64_t cols, int64_t ldx, uint32_t* out,
                   int64_t ld_out) {
  // Output word w of a 16-pair vector is the high half of input lane w, i.e. word 2w + 1 of the
  // two rounded vectors taken together.
  alignas(64) static const int16_t kOdd[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                               23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                               45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  const __m512i idx = _mm512_load_si512(kOdd);
  const int64_t kp = pairs(cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    uint32_t* o = out + r * ld_out;
    for (int64_t p0 = 0; p0 < kp; p0 += 16) {
      const int64_t c0 = 2 * p0;
      const __m512i lo = round16(_mm512_maskz_loadu_ps(tail_mask(cols - c0), xr + c0));
      const __m512i hi = round16(_mm512_maskz_loadu_ps(tail_mask(cols - c0 - 16), xr + c0 + 16));
      _mm512_mask_storeu_epi32(o + p0, tail_mask(kp - p0), _mm512_permutex2var_epi16(lo, idx, hi));
    }
  }
}

void rows_to_pairs(const uint16_t* x, int64_t rows, int64_t cols, int64_t ldx, uint32_t* out,
                   int64_t ld_out) {
  // A row's pairs are its bf16 values as they lie in memory, NaNs quieted, a zero past the end.
  const int64_t kp = pairs(cols);
  const __m512i magnitude = _mm512_set1_epi16(0x7FFF), inf = _mm512_set1_epi16(0x7F80),
                quiet = _mm512_set1_epi16(0x40);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = x + r * ldx;
    uint32_t* o = out + r * ld_out;
    for (int64_t c0 = 0; c0 < cols; c0 += 32) {
      const int64_t n = std::min<int64_t>(32, cols - c0);
      const __m512i w = _mm512_maskz_loadu_epi16(__mmask32(n >= 32 ? ~0u : (1u << n) - 1u), xr + c0);
      const __mmask32 nan = _mm512_cmpgt_epu16_mask(_mm512_and_si512(w, magnitude), inf);
      _mm512_mask_storeu_epi32(o + c0 / 2, tail_mask(kp - c0 / 2),
                               _mm512_mask_mov_epi16(w, nan, _mm512_or_si512(w, quiet)));
    }
  }
}

namespace {

// 16 bf16 values as the low halves of 32-bit lanes (the high halves zero): of fp32 values, rounded;
// of bf16 values (bits), NaNs quieted as round_to_bf16 does.
inline __m512i low_bf16(__mmask16 mask, const float* x) {
  return _mm512_srli_epi32(round16(_mm512_maskz_loadu_ps(mask, x)), 16);
}
inline __m512i low_bf16(__mmask16 mask, const uint16_t* x) {
  const __m512i w = _mm512_cvtepu16_epi32(
      _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(__mmask32(mask), x)));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(w, _mm512_set1_epi32(0x7FFF)),
                                                _mm512_set1_epi32(0x7F80));
  return _mm512_mask_or_epi32(w, nan, w, _mm512_set1_epi32(0x40));
}

template <typename T>
void cols_to_pairs_of(const T* x, int64_t rows, int64_t cols, int64_t ldx, uint32_t* out,
                      int64_t ld_out) {
  const int64_t kp = pairs(rows);
  for (int64_t p = 0; p < kp; ++p) {
    const T* even = x + 2 * p * ldx;
    const bool has_odd = 2 * p + 1 < rows;
    uint32_t* o = out + p * ld_out;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 mask = tail_mask(cols - j);
      const __m512i e = low_bf16(mask, even + j);
      const __m512i od = has_odd ? low_bf16(mask, even + ldx + j) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(o + j, mask, _mm512_or_si512(e, _mm512_slli_epi32(od, 16)));
    }
  }
}

}  // namespace

void cols_to_pairs(const float* x, int64_t rows, int64_t cols, int64_t ldx, uint32_t* out,
                   int64_t ld_out) {
  cols_to_pairs_of(x, rows, cols, ldx, out, ld_out);
}

void cols_to_pairs(const uint16_t* x, int64_t rows, int64_t cols, int64_t ldx, uint32_t* out,
                   int64_t ld_out) {
  cols_to_pairs_of(x, rows, cols, ldx, out, ld_out);
}

namespace {

// 2^t on 16 lanes for t <= 0 (or NaN): t = k + f with k an integer and |f| <= 1/2, a degree-5
// minimax polynomial 1 + f q(f) for 2^f (relative error 8.6e-8; 1.7e-7 evaluated in fp32), scaled
// by 2^k with scalef, which rounds gradual underflow. Its constant term is 1, so 2^0 is exactly 1
// (a row's largest score gives P = 1, as exp does: one key's softmax must be exactly 1). Below
// -151 the result is 0 (the clamp keeps -inf from making a NaN of t - k); max returns its second
// operand on NaN, so NaN propagates.
inline __m512 exp2_nonpositive(__m512 t) {
  t = _mm512_max_ps(_mm512_set1_ps(-151.0f), t);
  const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, k);
  __m512 p = _mm512_set1_ps(1.3255270896479487e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.671489708125591e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507514625787735e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022245407104492e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470036506653e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, k);
}

}  // namespace

float exp_shifted_sum(const float* x, int64_t n, float m, uint16_t* out) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), mv = _mm512_set1_ps(m);
  auto exp_at = [&](__mmask16 mask, int64_t j) {
    return exp2_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + j), mv),
                                          log2e));
  };
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp_at(__mmask16(0xFFFF), j), e1 = exp_at(__mmask16(0xFFFF), j + 16);
    _mm512_storeu_si512(out + j, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
  }
  for (; j < n; j += 16) {  // the tail, 16 at a time
    const __mmask16 mask = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(mask, exp_at(mask, j));
    alignas(32) uint16_t lanes[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), (__m256i)_mm512_cvtneps_pbh(e));
    std::memcpy(out + j, lanes, sizeof(uint16_t) * size_t(std::min<int64_t>(16, n - j)));
    acc0 = _mm512_add_ps(acc0, e);
  }
  if (n % 2 != 0) out[n] = 0;
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

void softmax_grad_pairs(const float* p, const float* dp, int64_t rows, int64_t cols, int64_t ld,
                        const float* d, uint32_t* p_rows, uint32_t* ds_rows, int64_t ld_rows,
                        uint32_t* ds_cols, int64_t ld_cols) {
  alignas(64) static const int16_t kOdd[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21,
                                               23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43,
                                               45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
  const __m512i odd = _mm512_load_si512(kOdd), high = _mm512_set1_epi32(int(0xFFFF0000u));
  const int64_t col_pairs = pairs(cols);
  for (int64_t r0 = 0; r0 < rows; r0 += 2) {
    const bool has_odd = r0 + 1 < rows;
    for (int64_t j = 0; j < cols; j += 32) {
      // Rounded P and dS of rows r0 and r0 + 1 (zero if absent), columns j .. j + 31.
      __m512i rp[2][2], rds[2][2];
      for (int h = 0; h < 2; ++h) {
        const __mmask16 mask = tail_mask(cols - j - 16 * h);
        const __m512 dv = _mm512_maskz_loadu_ps(mask, d + j + 16 * h);
        for (int r = 0; r < 2; ++r) {
          if (r == 1 && !has_odd) {
            rp[r][h] = rds[r][h] = _mm512_setzero_si512();
            continue;
          }
          const int64_t at = (r0 + r) * ld + j + 16 * h;
          const __m512 pv = _mm512_maskz_loadu_ps(mask, p + at);
          const __m512 ds = _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, dp + at), dv));
          rp[r][h] = round16(pv);
          rds[r][h] = round16(ds);
        }
        // Pairs of rows r0, r0 + 1 for these 16 columns: the even row's bf16 in the low half.
        _mm512_mask_storeu_epi32(ds_cols + (r0 / 2) * ld_cols + j + 16 * h, mask,
                                 _mm512_or_si512(_mm512_srli_epi32(rds[0][h], 16),
                                                 _mm512_and_si512(rds[1][h], high)));
      }
      // Pairs of columns of each row: word 2w + 1 of the two rounded vectors taken together.
      const __mmask16 pmask = tail_mask(col_pairs - j / 2);
      for (int r = 0; r < (has_odd ? 2 : 1); ++r) {
        const int64_t at = (r0 + r) * ld_rows + j / 2;
        _mm512_mask_storeu_epi32(p_rows + at, pmask,
                                 _mm512_permutex2var_epi16(rp[r][0], odd, rp[r][1]));
        _mm512_mask_storeu_epi32(ds_rows + at, pmask,
                                 _mm512_permutex2var_epi16(rds[r][0], odd, rds[r][1]));
      }
    }
  }
}

namespace {

template <typename T>
void pack_transposed_of(const T* x, int64_t n, int64_t k, int64_t ldx, uint32_t* out) {
  const int64_t kp = pairs(k);
  thread_local std::vector<uint32_t> rows;
  rows.resize(static_cast<size_t>(kPanel * std::max<int64_t>(kp, 1)));
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t nn = std::min(kPanel, n - j0);
    rows_to_pairs(x + j0 * ldx, nn, k, ldx, rows.data(), kp);
    uint32_t* panel = out + (j0 / kPanel) * kp * kPanel;
    for (int64_t p = 0; p < kp; ++p) {
      uint32_t* dst = panel + p * kPanel;
      for (int64_t j = 0; j < nn; ++j) dst[j] = rows[j * kp + p];
      for (int64_t j = nn; j < kPanel; ++j) dst[j] = 0;
    }
  }
}

}  // namespace

void pack_transposed(const float* x, int64_t n, int64_t k, int64_t ldx, uint32_t* out) {
  pack_transposed_of(x, n, k, ldx, out);
}

void pack_transposed(const uint16_t* x, int64_t n, int64_t k, int64_t ldx, uint32_t* out) {
  pack_transposed_of(x, n, k, ldx, out);
}

void gemm_avx512(int64_t m, int64_t n, int64_t kp, const uint32_t* a, int64_t a_rs, int64_t a_ps,
                 const uint32_t* b, int64_t ldb, int64_t b_panel_stride, float* c, int64_t ldc,
                 bool accumulate) {
  if (m <= 0 || n <= 0) return;
  // A short last block of rows, zero-padded, as pair-major rows of kRows.
  thread_local std::vector<uint32_t> tail;
  const int64_t full = m / kRows * kRows;
  if (full < m) {
    const int rows = static_cast<int>(m - full);
    const uint32_t* block = a + full * a_rs;
    tail.assign(static_cast<size_t>(std::max<int64_t>(kp, 1) * kRows), 0u);
    for (int64_t p = 0; p < kp; ++p)
      for (int r = 0; r < rows; ++r) tail[p * kRows + r] = block[r * a_rs + p * a_ps];
  }
  // Panels outer, row blocks inner, as in corr_cpu_simd.cpp: one panel of B (kp x 32 pairs)
  // stays in L1/L2 while the blocks of A stream past it.
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t nn = std::min(kPanel, n - j0);
    const uint32_t* bp = b + (j0 / kPanel) * b_panel_stride;
    const __mmask16 m0 = tail_mask(nn), m1 = tail_mask(nn - 16);
    for (int64_t i0 = 0; i0 < m; i0 += kRows) {
      float* cp = c + i0 * ldc + j0;
      if (i0 == full)
        micro<true>(kp, tail.data(), 1, kRows, bp, ldb, cp, ldc, static_cast<int>(m - full), m0,
                    m1, accumulate);
      else if (a_ps != 1)
        micro<true>(kp, a + i0 * a_rs, a_rs, a_ps, bp, ldb, cp, ldc, kRows, m0, m1, accumulate);
      else
        micro<false>(kp, a + i0 * a_rs, a_rs, a_ps, bp, ldb, cp, ldc, kRows, m0, m1, accumulate);
    }
  }
}

}  // namespace bf16
}  // namespace corr
}  // namespace pncc

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else  // !PNCC_CORR_BF16_BUILT: never called, since available() is false

namespace pncc {
namespace corr {
namespace bf16 {

void rows_to_pairs(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {}
void cols_to_pairs(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {}
void cols_to_pairs(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {}
void pack_transposed(const float*, int64_t, int64_t, int64_t, uint32_t*) {}
void pack_transposed(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*) {}
void rows_to_pairs(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {}
float exp_shifted_sum(const float*, int64_t, float, uint16_t*) { return 0.0f; }
void softmax_grad_pairs(const float*, const float*, int64_t, int64_t, int64_t, const float*,
                        uint32_t*, uint32_t*, int64_t, uint32_t*, int64_t) {}
void gemm_avx512(int64_t, int64_t, int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*,
                 int64_t, int64_t, float*, int64_t, bool) {}

}  // namespace bf16
}  // namespace corr
}  // namespace pncc

#endif  // PNCC_CORR_BF16_BUILT
