// Unit tests of the AVX-512 kernels of the CPU corr_warp (csrc/corr/corr_cpu_simd.h) against
// double-precision loops: the GEMM in every operand layout the kernels use and at sizes that are
// not multiples of its register tile, the packing, the softmax row passes, and the normalisation
// rows (forward and backward) bit for bit against the portable fold. Torch-free, so it
// also runs under AddressSanitizer and UBSan. Skips (passes) on a CPU without AVX-512F.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "corr/corr_cpu_simd.h"
#include "corr/corr_math.h"

using namespace pncc::corr;

namespace {

std::vector<float> random_vector(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = nd(rng);
  return v;
}

// One GEMM of gemm's contract checked element by element. a_trans: A stored as the transpose of
// a row-major (k x m) matrix; b_trans: B given as the transpose of a row-major (n x k) matrix,
// packed by pack_transposed.
void check_gemm(std::mt19937& rng, int64_t m, int64_t n, int64_t k, bool a_trans, bool b_trans,
                bool accumulate) {
  const int64_t lda = a_trans ? m + 3 : k + 2, ldx = b_trans ? k + 1 : n + 5, ldc = n + 4;
  const std::vector<float> a = random_vector(rng, (a_trans ? k : m) * lda);
  const std::vector<float> x = random_vector(rng, (b_trans ? n : k) * ldx);
  std::vector<float> c = random_vector(rng, m * ldc);
  const std::vector<float> c_old = c;
  std::vector<float> packed;
  if (b_trans) {
    packed.assign(simd::packed_size(n, k), std::numeric_limits<float>::quiet_NaN());
    simd::pack_transposed(x.data(), n, k, ldx, packed.data());
    simd::gemm(m, n, k, a.data(), a_trans ? 1 : lda, a_trans ? lda : 1, packed.data(),
               simd::kPanel, k * simd::kPanel, c.data(), ldc, accumulate);
  } else {
    simd::gemm(m, n, k, a.data(), a_trans ? 1 : lda, a_trans ? lda : 1, x.data(), ldx,
               simd::kPanel, c.data(), ldc, accumulate);
  }
  int bad = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < ldc; ++j) {
      if (j >= n) {  // padding columns of C are never written
        bad += c[i * ldc + j] != c_old[i * ldc + j];
        continue;
      }
      double exact = accumulate ? c_old[i * ldc + j] : 0.0, magnitude = std::fabs(exact);
      for (int64_t kk = 0; kk < k; ++kk) {
        const double av = a_trans ? a[kk * lda + i] : a[i * lda + kk];
        const double bv = b_trans ? x[j * ldx + kk] : x[kk * ldx + j];
        exact += av * bv;
        magnitude += std::fabs(av * bv);
      }
      bad += !(std::fabs(c[i * ldc + j] - exact) <= 1e-6 * (1.0 + magnitude));
    }
  }
  if (bad) std::printf("  gemm m=%ld n=%ld k=%ld a_trans=%d b_trans=%d acc=%d: %d bad\n", long(m),
                       long(n), long(k), a_trans, b_trans, accumulate, bad);
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE(gemm_matches_double_in_every_layout_and_at_ragged_sizes) {
  if (!simd::available()) return;
  std::mt19937 rng(1);
  const int64_t sizes[] = {1, 2, 5, 6, 7, 13, 16, 17, 31, 32, 33, 70};
  for (int64_t m : sizes)
    for (int64_t n : {int64_t(1), int64_t(15), int64_t(16), int64_t(31), int64_t(33),
                      int64_t(64), int64_t(70)})
      for (int64_t k : {int64_t(0), int64_t(1), int64_t(2), int64_t(3), int64_t(8), int64_t(37)})
        for (int layout = 0; layout < 8; ++layout)
          check_gemm(rng, m, n, k, layout & 1, layout & 2, layout & 4);
}

TEST_CASE(gemm_result_does_not_depend_on_the_rows_around_it) {
  // The partition of the CPU kernels into tasks changes which rows share a call; the value of
  // each element must not (it is what makes results independent of the thread count).
  if (!simd::available()) return;
  std::mt19937 rng(2);
  const int64_t m = 29, n = 45, k = 77;
  const std::vector<float> a = random_vector(rng, m * k), b = random_vector(rng, k * n);
  std::vector<float> whole(m * n), part(n);
  simd::gemm(m, n, k, a.data(), k, 1, b.data(), n, simd::kPanel, whole.data(), n, false);
  for (int64_t i = 0; i < m; ++i) {
    simd::gemm(1, n, k, a.data() + i * k, k, 1, b.data(), n, simd::kPanel, part.data(), n, false);
    CHECK(std::equal(part.begin(), part.end(), whole.begin() + i * n));
  }
}

TEST_CASE(forward_row_passes_match_double) {
  if (!simd::available()) return;
  std::mt19937 rng(3);
  for (int64_t n : {1, 5, 16, 17, 63, 64, 65, 200}) {
    std::vector<float> s = random_vector(rng, n);
    for (float& v : s) v *= 30.0f;
    const float m = simd::row_max(s.data(), n);
    CHECK(m == *std::max_element(s.begin(), s.end()));
    std::vector<float> e = s;
    const float sum = simd::exp_shifted_sum(e.data(), n, m);
    double exact_sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double exact = std::exp(double(s[j] - m));  // of the fp32 difference, as computed
      exact_sum += exact;
      CHECK(std::fabs(e[j] - exact) <= 1.2e-7 * exact + 1e-37);  // about one ulp
    }
    CHECK(std::fabs(sum - exact_sum) <= 1e-6 * exact_sum);
    std::vector<float> scaled = e;
    simd::scale_row(scaled.data(), n, 0.25f);
    for (int64_t j = 0; j < n; ++j) CHECK(scaled[j] == e[j] * 0.25f);
  }
}

TEST_CASE(backward_column_passes_match_double) {
  // Tiles of `rows` keys x `cols` queries with row stride ld > cols: the padding must stay as is.
  if (!simd::available()) return;
  std::mt19937 rng(4);
  for (int64_t rows : {1, 3, 4, 5, 70})
    for (int64_t cols : {1, 15, 16, 17, 40}) {
      const int64_t ld = cols + 3;
      std::vector<float> s = random_vector(rng, rows * ld);
      for (float& v : s) v *= 30.0f;
      // The exact log-sum-exp of every column, split as the backward splits it.
      std::vector<float> hi(cols), lo(cols);
      for (int64_t j = 0; j < cols; ++j) {
        double m = -INFINITY, sum = 0;
        for (int64_t i = 0; i < rows; ++i) m = std::max(m, double(s[i * ld + j]));
        for (int64_t i = 0; i < rows; ++i) sum += std::exp(double(s[i * ld + j]) - m);
        const SplitLse<float> split = split_lse<float>(m + std::log(sum));
        hi[j] = split.hi;
        lo[j] = split.lo;
      }
      std::vector<float> p = s;
      simd::probs_from_lse_cols(p.data(), rows, cols, ld, hi.data(), lo.data());
      for (int64_t j = 0; j < cols; ++j) {
        double total = 0;
        for (int64_t i = 0; i < rows; ++i) {
          // The exponent itself is an fp32 difference (as on the portable path); the exp of it
          // is within about one ulp.
          const double exact = std::exp(double(score_minus_lse(s[i * ld + j], {hi[j], lo[j]})));
          CHECK(std::fabs(p[i * ld + j] - exact) <= 1.2e-7 * exact + 1e-37);
          total += p[i * ld + j];
        }
        CHECK(std::fabs(total - 1.0) < 1e-6);
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = cols; j < ld; ++j) CHECK(p[i * ld + j] == s[i * ld + j]);
      const std::vector<float> dp = random_vector(rng, rows * ld);
      std::vector<float> d(cols);
      simd::col_dots(p.data(), dp.data(), rows, cols, ld, d.data());
      for (int64_t j = 0; j < cols; ++j) {
        double exact = 0, magnitude = 0;
        for (int64_t i = 0; i < rows; ++i) {
          exact += double(p[i * ld + j]) * dp[i * ld + j];
          magnitude += std::fabs(double(p[i * ld + j]) * dp[i * ld + j]);
        }
        CHECK(std::fabs(d[j] - exact) <= 1e-6 * (1e-30 + magnitude));
      }
      std::vector<float> ds = dp;
      simd::softmax_grad_cols(p.data(), ds.data(), rows, cols, ld, d.data());
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < ld; ++j)
          CHECK(ds[i * ld + j] ==
                (j < cols ? softmax_grad(p[i * ld + j], dp[i * ld + j], d[j]) : dp[i * ld + j]));
    }
}

TEST_CASE(exp_handles_the_ends_of_the_range) {
  if (!simd::available()) return;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> x = {-inf, -1000.0f, -103.0f, -88.0f, 0.0f, -0.0f, 1e-30f};
  simd::exp_shifted_sum(x.data(), int64_t(x.size()), 0.0f);
  CHECK(x[0] == 0.0f && x[1] == 0.0f);
  CHECK(x[2] >= 0.0f && x[2] < 1e-44f);
  CHECK(std::fabs(x[3] - std::exp(-88.0)) <= 1e-6 * std::exp(-88.0));
  CHECK(x[4] == 1.0f && x[5] == 1.0f && x[6] == 1.0f);
  std::vector<float> nan = {std::numeric_limits<float>::quiet_NaN()};
  simd::exp_shifted_sum(nan.data(), 1, 0.0f);
  CHECK(std::isnan(nan[0]));
}

namespace {

// The fold the row statistics and the normalisation's backward are defined by (corr_cpu.cpp's
// fold_of): eight partial sums, partial r taking the j = r (mod 8) below the last multiple of 8,
// partial 0 the rest in order, combined ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)).
template <typename Term>
double fold8(int64_t n, const Term& term) {
  double p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int r = 0; r < 8; ++r) p[r] = p[r] + term(j + r);
  for (; j < n; ++j) p[0] = p[0] + term(j);
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

uint64_t bits(double x) {
  uint64_t u;
  std::memcpy(&u, &x, 8);
  return u;
}

}  // namespace

TEST_CASE(normalisation_forward_and_backward_are_the_portable_fold_bit_for_bit) {
  // row_moments, normalize_row, centred_dot and grad_through_norm against the portable fold and
  // corr_math.h's formulas, in double, bit for bit: the AVX-512 rows must give the results the
  // portable path gives (a change of summation order shows here as a differing last bit). Rows of
  // fp32 values and of bf16 bits, lengths around the 8-lane width, a large common offset.
  if (!simd::available()) return;
  std::mt19937 rng(11);
  int bad = 0;
  for (const int64_t n : {1, 7, 8, 9, 40, 43, 256, 259}) {
    std::vector<float> x = random_vector(rng, n), g = random_vector(rng, n);
    for (float& v : x) v = v * 3.0f + 100.0f;
    std::vector<uint16_t> xb(n);  // x rounded towards zero to bf16, as bits
    for (int64_t j = 0; j < n; ++j) {
      uint32_t u;
      std::memcpy(&u, &x[j], 4);
      xb[j] = uint16_t(u >> 16);
    }
    for (const bool as_bf16 : {false, true}) {
      const auto value = [&](int64_t j) {
        if (!as_bf16) return double(x[j]);
        const uint32_t u = uint32_t(xb[j]) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return double(f);
      };
      const double mean = fold8(n, value) / double(n);
      const double sum_sq = fold8(n, [&](int64_t j) {
        const double d = value(j) - mean;
        return d * d;
      });
      const simd::RowMoments mo = as_bf16 ? simd::row_moments(xb.data(), n)
                                          : simd::row_moments(x.data(), n);
      bad += bits(mo.mean) != bits(mean) || bits(mo.sum_sq) != bits(sum_sq);
      const double inv = 0.37 / (std::sqrt(sum_sq) + 1e-6), coef = -0.0123;
      std::vector<float> out(n);
      if (as_bf16)
        simd::normalize_row(xb.data(), n, mean, inv, out.data());
      else
        simd::normalize_row(x.data(), n, mean, inv, out.data());
      for (int64_t j = 0; j < n; ++j) bad += out[j] != float((value(j) - mean) * inv);
      const double dot = fold8(n, [&](int64_t j) { return double(g[j]) * (value(j) - mean); });
      bad += bits(as_bf16 ? simd::centred_dot(g.data(), xb.data(), n, mean)
                          : simd::centred_dot(g.data(), x.data(), n, mean)) != bits(dot);
      // g as drawn, and g nearly along c (its two terms then cancel to a few float ulps of g, so
      // a change in their double rounding reaches the float result).
      std::vector<float> g_along(n);
      for (int64_t j = 0; j < n; ++j) g_along[j] = float(coef / inv * (value(j) - mean));
      for (const std::vector<float>* gv : {&g, &g_along}) {
        for (const bool centred : {false, true}) {
          const RowNorm<double> st{mean, 1.0, inv, centred};
          const auto dc = [&](int64_t j) {
            return row_norm_grad_c(st, coef, double((*gv)[j]), value(j));
          };
          const double dc_mean = centred ? fold8(n, dc) / double(n) : 0.0;
          std::vector<float> got = *gv;
          if (as_bf16)
            simd::grad_through_norm(got.data(), xb.data(), n, mean, inv, coef, centred);
          else
            simd::grad_through_norm(got.data(), x.data(), n, mean, inv, coef, centred);
          for (int64_t j = 0; j < n; ++j) bad += got[j] != float(dc(j) - dc_mean);
        }
      }
    }
  }
  CHECK(bad == 0);
}

int main() {
  if (!simd::available()) std::printf("no AVX-512F on this CPU: the cases check nothing\n");
  return pncc_test::run_all();
}
