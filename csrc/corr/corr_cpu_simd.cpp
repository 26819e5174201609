// AVX-512 kernels of corr_cpu_simd.h. This file alone is compiled for AVX-512F (the pragma
// below); nothing in it runs unless simd::available() said the CPU supports it. It includes no
// torch header and instantiates corr_math.h only with its own vector type, so no inline function
// compiled here can be shared with (and picked by the linker for) the baseline-ISA files.
#include "corr/corr_cpu_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

// The kernels need GCC's `#pragma GCC target` on x86-64. Elsewhere this file only says that they
// are unavailable, and corr_cpu.cpp takes its portable path.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PNCC_CORR_SIMD_BUILT 1
#else
#define PNCC_CORR_SIMD_BUILT 0
#endif

#if PNCC_CORR_SIMD_BUILT
#include <immintrin.h>
#endif

namespace pncc {
namespace corr {
namespace simd {

bool available() {
  static const bool ok = [] {
#if PNCC_CORR_SIMD_BUILT
    __builtin_cpu_init();  // (GCC's check includes the OS's support for the zmm state)
    return __builtin_cpu_supports("avx512f") != 0;
#else
    return false;
#endif
  }();
  return ok;
}

}  // namespace simd
}  // namespace corr
}  // namespace pncc

#if PNCC_CORR_SIMD_BUILT

#pragma GCC push_options
#pragma GCC target("avx512f,fma,prfchw")
// GCC 12's _mm512_undefined_ps (behind _mm512_max_ps, _mm512_set1_ps, ...) initialises a variable
// from itself on purpose, which -Wall reports at every use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "corr/corr_cpu_avx512.h"
#include "corr/corr_math.h"

namespace pncc {
namespace corr {
namespace simd {
namespace {

// 16 fp32 lanes with the arithmetic corr_math.h's templates use.
struct F16 {
  __m512 v;
};
inline F16 operator+(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 operator-(F16 a, F16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F16 operator*(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }

// exp on 16 lanes: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for
// e^r (Cephes' expf coefficients; measured at most 1.0 ulp from the correctly rounded value over
// [-20, 0]), and 2^n applied by scalef, which rounds gradual underflow correctly. NaN propagates
// (min/max return their second operand on NaN); -inf gives 0.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x);
  x = _mm512_max_ps(_mm512_set1_ps(-103.972084045410f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Sum of the 16 lanes in a fixed order (pairwise halves).
inline float hsum(__m512 v) {
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// The register tile: kRows rows x 32 columns (two vectors a row), with kSplit = 2 independent
// partial sums per element, one over the even and one over the odd kk, added at the end. Splitting
// the sum keeps the partial sums smaller: measured against float64 on normalised features at
// 1/temperature = 100, the scores' rms error is 1.30e-6 at C = 256 (one fused multiply-add chain:
// 1.81e-6; MKL: 1.30e-6) and 2.19e-6 at C = 8 (chain and MKL: 2.37e-6). On one Zen 4 core (EPYC,
// family 25 model 17) whose FMA peak measures 116 GFLOP/s, this tile reaches 115 on full panels
// in cache, as fast as a 12-row single chain or 8 rows x 3 vectors; 3 rows x 4 sums was slower
// (each B vector then serves only 3 rows).
// kRows * 2 * kSplit = 24 accumulators, plus two B vectors and one broadcast in 32 registers.
constexpr int kRows = 6;
constexpr int kSplit = 2;

// C[0:rows, 0:32] (+)= A B, A read in place: A(r, kk) = a[r * a_rs + kk * a_cs]. Rows past `rows`
// read the last valid row again (their sums are never stored), so nothing outside A is read and
// A needs no packed, zero-padded copy (packing cost 6% of the product at k = 512). B rows are ldb
// apart; m0, m1 mask the two column vectors. The old C is added last. The accumulators are named
// variables (acc_U_R_H: partial sum U, row R, half H), which GCC keeps in registers, where arrays
// of them were spilled to the stack; the macros only spell out the unrolled rows.
#define PNCC_ACC_ROW(U, R) \
  __m512 acc_##U##_##R##_0 = _mm512_setzero_ps(), acc_##U##_##R##_1 = _mm512_setzero_ps();
#define PNCC_ACC(U)                                                                           \
  PNCC_ACC_ROW(U, 0) PNCC_ACC_ROW(U, 1) PNCC_ACC_ROW(U, 2) PNCC_ACC_ROW(U, 3) PNCC_ACC_ROW(U, 4) \
  PNCC_ACC_ROW(U, 5)
#define PNCC_ROW_POINTER(R) const float* a_##R = a + std::min(R, rows - 1) * a_rs;
// Row R of A times the B row in (b0, b1), into partial sum U.
#define PNCC_FMA_ROW(U, R)                                                \
  {                                                                       \
    const __m512 av = _mm512_set1_ps(*a_##R);                              \
    acc_##U##_##R##_0 = _mm512_fmadd_ps(av, b0, acc_##U##_##R##_0);       \
    acc_##U##_##R##_1 = _mm512_fmadd_ps(av, b1, acc_##U##_##R##_1);       \
  }
// One kk into partial sum U: load the B row, then all kRows rows of A.
#define PNCC_STEP(U)                                                                   \
  {                                                                                    \
    const __m512 b0 = load_b<kMasked>(m0, b), b1 = load_b<kMasked>(m1, b + 16);       \
    b += ldb;                                                                          \
    PNCC_FMA_ROW(U, 0) PNCC_FMA_ROW(U, 1) PNCC_FMA_ROW(U, 2) PNCC_FMA_ROW(U, 3)        \
    PNCC_FMA_ROW(U, 4) PNCC_FMA_ROW(U, 5)                                              \
    a_0 += a_cs, a_1 += a_cs, a_2 += a_cs, a_3 += a_cs, a_4 += a_cs, a_5 += a_cs;         \
  }
#define PNCC_SUM(R, H) _mm512_add_ps(acc_0_##R##_##H, acc_1_##R##_##H)
static_assert(kRows == 6 && kSplit == 2, "the macros above spell out 6 rows and 2 partial sums");

// A B row of the register tile. Masked loads cost about 12% of the kernel's speed on Zen 4
// (measured: 102 against 115 GFLOP/s on one core, the same values), so only the last, partial
// panel of a product takes them.
template <bool kMasked>
inline __m512 load_b(__mmask16 mask, const float* b) {
  return kMasked ? _mm512_maskz_loadu_ps(mask, b) : _mm512_loadu_ps(b);
}

// C is read (accumulate) and written only after the product loop: ask for the tile's lines
// first, so that a tile in L3 or memory (the backward's dK and dV, a fresh score tile) arrives
// while the products run instead of stalling the stores. With the order of gemm's loops this
// took 15-25% off the backward (bench/RESULTS.md, issue 11).
inline void prefetch_c_tile(float* c, int64_t ldc, int rows) {
  for (int r = 0; r < rows; ++r) {
    __builtin_prefetch(c + r * ldc, 1, 3);
    __builtin_prefetch(c + r * ldc + 16, 1, 3);
  }
}

template <bool kMasked>
void micro(int64_t k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
           float* c, int64_t ldc, int rows, __mmask16 m0, __mmask16 m1, bool accumulate) {
  PNCC_ACC(0)
  PNCC_ACC(1)
  PNCC_ROW_POINTER(0) PNCC_ROW_POINTER(1) PNCC_ROW_POINTER(2)
  PNCC_ROW_POINTER(3) PNCC_ROW_POINTER(4) PNCC_ROW_POINTER(5)
  prefetch_c_tile(c, ldc, rows);
  int64_t kk = 0;
  for (; kk + kSplit <= k; kk += kSplit) {
    PNCC_STEP(0)
    PNCC_STEP(1)
  }
  if (kk < k) PNCC_STEP(0)  // an odd k's last product
  const __m512 lo[kRows] = {PNCC_SUM(0, 0), PNCC_SUM(1, 0), PNCC_SUM(2, 0),
                            PNCC_SUM(3, 0), PNCC_SUM(4, 0), PNCC_SUM(5, 0)};
  const __m512 hi[kRows] = {PNCC_SUM(0, 1), PNCC_SUM(1, 1), PNCC_SUM(2, 1),
                            PNCC_SUM(3, 1), PNCC_SUM(4, 1), PNCC_SUM(5, 1)};
  for (int r = 0; r < rows; ++r) {
    float* cr = c + r * ldc;
    __m512 u = lo[r], v = hi[r];
    if (accumulate) {
      u = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, cr), u);
      v = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, cr + 16), v);
    }
    _mm512_mask_storeu_ps(cr, m0, u);
    _mm512_mask_storeu_ps(cr + 16, m1, v);
  }
}

#undef PNCC_ACC_ROW
#undef PNCC_ACC
#undef PNCC_ROW_POINTER
#undef PNCC_FMA_ROW
#undef PNCC_STEP
#undef PNCC_SUM

}  // namespace

void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t a_rs, int64_t a_cs,
          const float* b, int64_t ldb, int64_t b_panel_stride, float* c, int64_t ldc,
          bool accumulate) {
  if (m <= 0 || n <= 0) return;
  // One column panel of B at a time meets every block of kRows rows of A: the panel stays in
  // L1/L2 while A streams past it. (Blocks outer, the other order, streamed all of B once per
  // block of rows, from L3 in the backward, whose operands do not stay in L2 between products.)
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t nn = std::min(kPanel, n - j0);
    const float* panel = b + (j0 / kPanel) * b_panel_stride;
    for (int64_t i0 = 0; i0 < m; i0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, m - i0));
      const float* a_block = a + i0 * a_rs;
      float* c_block = c + i0 * ldc + j0;
      if (nn == kPanel)
        micro<false>(k, a_block, a_rs, a_cs, panel, ldb, c_block, ldc, rows, tail_mask(16),
                     tail_mask(16), accumulate);
      else
        micro<true>(k, a_block, a_rs, a_cs, panel, ldb, c_block, ldc, rows, tail_mask(nn),
                    tail_mask(std::max<int64_t>(nn - 16, 0)), accumulate);
    }
  }
}

void pack_transposed(const float* x, int64_t n, int64_t k, int64_t ldx, float* out) {
  for (int64_t j0 = 0; j0 < n; j0 += kPanel) {
    const int64_t nn = std::min(kPanel, n - j0);
    float* panel = out + (j0 / kPanel) * k * kPanel;
    for (int64_t kk = 0; kk < k; ++kk) {
      float* dst = panel + kk * kPanel;
      for (int64_t j = 0; j < nn; ++j) dst[j] = x[(j0 + j) * ldx + kk];
      for (int64_t j = nn; j < kPanel; ++j) dst[j] = 0.0f;
    }
  }
}

float row_max(const float* x, int64_t n) {
  const __m512 lowest = _mm512_set1_ps(-INFINITY);
  __m512 acc[4] = {lowest, lowest, lowest, lowest};
  int64_t j = 0;
  for (; j + 64 <= n; j += 64)
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_max_ps(_mm512_loadu_ps(x + j + 16 * u), acc[u]);
  for (; j < n; j += 16)
    acc[0] = _mm512_max_ps(_mm512_mask_loadu_ps(lowest, tail_mask(n - j), x + j), acc[0]);
  const __m512 m = _mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3]));
  return _mm512_reduce_max_ps(m);
}

float exp_shifted_sum(float* x, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  int64_t j = 0;
  for (; j + 64 <= n; j += 64)
    for (int u = 0; u < 4; ++u) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j + 16 * u), mv));
      _mm512_storeu_ps(x + j + 16 * u, e);
      acc[u] = _mm512_add_ps(acc[u], e);
    }
  for (; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + j), mv));
    _mm512_mask_storeu_ps(x + j, mask, e);
    acc[0] = _mm512_add_ps(acc[0], _mm512_maskz_mov_ps(mask, e));
  }
  return hsum(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

namespace {

// The first popcount(mask) of 16 bf16 values (the high halves of `rounded`'s lanes) to out.
inline void store_bf16(uint16_t* out, __mmask16 mask, __m512i rounded) {
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
  if (mask == __mmask16(0xFFFF)) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), h);
  } else {  // the tail (AVX-512F has no 16-bit masked store)
    alignas(32) uint16_t lanes[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), h);
    std::memcpy(out, lanes, sizeof(uint16_t) * size_t(__builtin_popcount(mask)));
  }
}

}  // namespace

void to_bf16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    const __m512 v = _mm512_maskz_loadu_ps(mask, x + j);
    // c10::BFloat16's NaN, where round16 would keep the payload.
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    store_bf16(out + j, mask, _mm512_mask_mov_epi32(round16(v), nan, _mm512_set1_epi32(0x7FC00000)));
  }
}

void scale_row(float* x, int64_t n, float s) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = tail_mask(n - j);
    _mm512_mask_storeu_ps(x + j, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + j), sv));
  }
}

namespace {

// Eight values from x[j] as doubles, and one.
inline __m512d load8_pd(const float* x) { return _mm512_cvtps_pd(_mm256_loadu_ps(x)); }
inline __m512d load8_pd(const uint16_t* x) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
}
inline double value_of(const float* x) { return double(*x); }
inline double value_of(const uint16_t* x) {
  const uint32_t u = uint32_t(*x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return double(f);
}

// corr_cpu.cpp's fold_of sum of term(j), j < n, with lane r of `acc` as partial r: vec(j) gives
// the terms j .. j + 7, one(j) a single term (of the tail, which partial 0 takes in order).
template <typename Vec, typename One>
double fold_sum(int64_t n, const Vec& vec, const One& one) {
  __m512d acc = _mm512_setzero_pd();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc = _mm512_add_pd(acc, vec(j));
  alignas(64) double p[8];
  _mm512_store_pd(p, acc);
  for (; j < n; ++j) p[0] = p[0] + one(j);
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

template <typename T>
RowMoments moments(const T* x, int64_t n) {
  RowMoments r;
  r.mean = fold_sum(n, [x](int64_t j) { return load8_pd(x + j); },
                    [x](int64_t j) { return value_of(x + j); }) /
           double(n);
  const __m512d mv = _mm512_set1_pd(r.mean);
  r.sum_sq = fold_sum(
      n,
      [&](int64_t j) {
        const __m512d d = _mm512_sub_pd(load8_pd(x + j), mv);
        return _mm512_mul_pd(d, d);
      },
      [&](int64_t j) {
        const double d = value_of(x + j) - r.mean;
        return d * d;
      });
  return r;
}

// The terms of the normalisation's backward (corr_cpu.cpp's normalized_rows_backward): g . c, and
// dL/dc_j = inv * g_j - coef * c_j (corr_math.h's row_norm_grad_c), with c_j = x_j - mean.
template <typename T>
double centred_dot(const float* g, const T* x, int64_t n, double mean) {
  const __m512d mv = _mm512_set1_pd(mean);
  return fold_sum(
      n, [&](int64_t j) { return _mm512_mul_pd(load8_pd(g + j), _mm512_sub_pd(load8_pd(x + j), mv)); },
      [&](int64_t j) { return double(g[j]) * (value_of(x + j) - mean); });
}

template <typename T>
void grad_through_norm(float* g, const T* x, int64_t n, double mean, double inv, double coef,
                       bool centred) {
  const __m512d mv = _mm512_set1_pd(mean), iv = _mm512_set1_pd(inv), cv = _mm512_set1_pd(coef);
  const auto dc8 = [&](int64_t j) {
    return _mm512_sub_pd(_mm512_mul_pd(iv, load8_pd(g + j)),
                         _mm512_mul_pd(cv, _mm512_sub_pd(load8_pd(x + j), mv)));
  };
  const auto dc1 = [&](int64_t j) { return inv * double(g[j]) - coef * (value_of(x + j) - mean); };
  const double dc_mean = centred ? fold_sum(n, dc8, dc1) / double(n) : 0.0;
  const __m512d dm = _mm512_set1_pd(dc_mean);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(g + j, _mm512_cvtpd_ps(_mm512_sub_pd(dc8(j), dm)));
  for (; j < n; ++j) g[j] = float(dc1(j) - dc_mean);
}

template <typename T>
void normalize(const T* x, int64_t n, double mean, double inv, float* out) {
  const __m512d mv = _mm512_set1_pd(mean), iv = _mm512_set1_pd(inv);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(out + j, _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_sub_pd(load8_pd(x + j), mv), iv)));
  for (; j < n; ++j) out[j] = float((value_of(x + j) - mean) * inv);
}

}  // namespace

RowMoments row_moments(const float* x, int64_t n) { return moments(x, n); }
RowMoments row_moments(const uint16_t* x, int64_t n) { return moments(x, n); }
void normalize_row(const float* x, int64_t n, double mean, double inv, float* out) {
  normalize(x, n, mean, inv, out);
}
void normalize_row(const uint16_t* x, int64_t n, double mean, double inv, float* out) {
  normalize(x, n, mean, inv, out);
}
double centred_dot(const float* g, const float* x, int64_t n, double mean) {
  return centred_dot<float>(g, x, n, mean);
}
double centred_dot(const float* g, const uint16_t* x, int64_t n, double mean) {
  return centred_dot<uint16_t>(g, x, n, mean);
}
void grad_through_norm(float* g, const float* x, int64_t n, double mean, double inv, double coef,
                       bool centred) {
  grad_through_norm<float>(g, x, n, mean, inv, coef, centred);
}
void grad_through_norm(float* g, const uint16_t* x, int64_t n, double mean, double inv,
                       double coef, bool centred) {
  grad_through_norm<uint16_t>(g, x, n, mean, inv, coef, centred);
}

void probs_from_lse_cols(float* s, int64_t rows, int64_t cols, int64_t ld, const float* lse_hi,
                         const float* lse_lo) {
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 mask = tail_mask(cols - j);
    const SplitLse<F16> lse{{_mm512_maskz_loadu_ps(mask, lse_hi + j)},
                            {_mm512_maskz_loadu_ps(mask, lse_lo + j)}};
    for (int64_t i = 0; i < rows; ++i) {
      float* x = s + i * ld + j;
      const F16 t = score_minus_lse(F16{_mm512_maskz_loadu_ps(mask, x)}, lse);
      _mm512_mask_storeu_ps(x, mask, exp16(t.v));
    }
  }
}

void col_dots(const float* p, const float* dp, int64_t rows, int64_t cols, int64_t ld, float* d) {
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 mask = tail_mask(cols - j);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int64_t i = 0; i < rows; ++i)
      acc[i % 4] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, p + i * ld + j),
                                   _mm512_maskz_loadu_ps(mask, dp + i * ld + j), acc[i % 4]);
    _mm512_mask_storeu_ps(
        d + j, mask,
        _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
}

void softmax_grad_cols(const float* p, float* dp, int64_t rows, int64_t cols, int64_t ld,
                       const float* d) {
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 mask = tail_mask(cols - j);
    const F16 dv{_mm512_maskz_loadu_ps(mask, d + j)};
    for (int64_t i = 0; i < rows; ++i) {
      float* x = dp + i * ld + j;
      const F16 g = softmax_grad(F16{_mm512_maskz_loadu_ps(mask, p + i * ld + j)},
                                 F16{_mm512_maskz_loadu_ps(mask, x)}, dv);
      _mm512_mask_storeu_ps(x, mask, g.v);
    }
  }
}

}  // namespace simd
}  // namespace corr
}  // namespace pncc

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else  // !PNCC_CORR_SIMD_BUILT: never called, since available() is false

namespace pncc {
namespace corr {
namespace simd {

void gemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t,
          float*, int64_t, bool) {}
void pack_transposed(const float*, int64_t, int64_t, int64_t, float*) {}
float row_max(const float*, int64_t) { return 0.0f; }
float exp_shifted_sum(float*, int64_t, float) { return 0.0f; }
void to_bf16(const float*, int64_t, uint16_t*) {}
RowMoments row_moments(const float*, int64_t) { return {}; }
RowMoments row_moments(const uint16_t*, int64_t) { return {}; }
void normalize_row(const float*, int64_t, double, double, float*) {}
void normalize_row(const uint16_t*, int64_t, double, double, float*) {}
double centred_dot(const float*, const float*, int64_t, double) { return 0.0; }
double centred_dot(const float*, const uint16_t*, int64_t, double) { return 0.0; }
void grad_through_norm(float*, const float*, int64_t, double, double, double, bool) {}
void grad_through_norm(float*, const uint16_t*, int64_t, double, double, double, bool) {}
void scale_row(float*, int64_t, float) {}
void probs_from_lse_cols(float*, int64_t, int64_t, int64_t, const float*, const float*) {}
void col_dots(const float*, const float*, int64_t, int64_t, int64_t, float*) {}
void softmax_grad_cols(const float*, float*, int64_t, int64_t, int64_t, const float*) {}

}  // namespace simd
}  // namespace corr
}  // namespace pncc

#endif  // PNCC_CORR_SIMD_BUILT
