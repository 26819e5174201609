// Unit tests of the AVX-512 kernels of the CPU corr_warp (csrc/corr/corr_cpu_simd.h) against
// double-precision loops: the GEMM in every operand layout the kernels use and at sizes that are
// not multiples of its register tile, the packing, and the softmax row passes. Torch-free, so it
// also runs under AddressSanitizer and UBSan. Skips (passes) on a CPU without AVX-512F.
#include <algorithm>
#include <cmath>
#include <cstdio>
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

TEST_CASE(softmax_row_passes_match_double) {
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
    // Probabilities from a split log-sum-exp, as the backward recomputes them.
    const double lse = double(m) + std::log(exact_sum);
    const SplitLse<float> split = split_lse<float>(lse);
    std::vector<float> p = s;
    simd::probs_from_lse(p.data(), n, split.hi, split.lo);
    double total = 0;
    for (int64_t j = 0; j < n; ++j) {
      // The exponent itself is an fp32 difference (as on the portable path); the exp of it is
      // within about one ulp.
      const double exact = std::exp(double(score_minus_lse(s[j], split)));
      CHECK(std::fabs(p[j] - exact) <= 1.2e-7 * exact + 1e-37);
      total += p[j];
    }
    CHECK(std::fabs(total - 1.0) < 1e-6);
    // softmax_grad_row, row_dot and scale_row.
    const std::vector<float> dp = random_vector(rng, n);
    double d = 0;
    for (int64_t j = 0; j < n; ++j) d += double(p[j]) * dp[j];
    CHECK(std::fabs(simd::row_dot(p.data(), dp.data(), n) - d) <= 1e-6 * (1 + std::fabs(d)));
    std::vector<float> ds = dp;
    simd::softmax_grad_row(p.data(), ds.data(), n, float(d));
    for (int64_t j = 0; j < n; ++j) CHECK(ds[j] == softmax_grad(p[j], dp[j], float(d)));
    simd::scale_row(ds.data(), n, 0.5f);
    for (int64_t j = 0; j < n; ++j) CHECK(ds[j] == softmax_grad(p[j], dp[j], float(d)) * 0.5f);
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

int main() {
  if (!simd::available()) std::printf("no AVX-512F on this CPU: the cases check nothing\n");
  return pncc_test::run_all();
}
