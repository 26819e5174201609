// Unit tests of the correspondence op's shared maths (csrc/corr/corr_math.h): a row-by-row
// corr_warp assembled from those functions alone is checked against a direct double-precision
// computation, and the normalisation backward against finite differences. Torch-free, so it also
// runs under AddressSanitizer and UBSan.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "corr/corr_math.h"

using namespace pncc::corr;

namespace {

// Normalised (and scaled) copy of a row, through row_norm_finish/row_norm_apply.
std::vector<double> normalise(const std::vector<double>& x, double scale, double eps) {
  double mean = 0;
  for (double v : x) mean += v;
  mean /= double(x.size());
  double sum_sq = 0;
  for (double v : x) sum_sq += (v - mean) * (v - mean);
  const RowNorm<double> r = row_norm_finish(sum_sq, mean, scale, true, eps);
  std::vector<double> out;
  for (double v : x) out.push_back(row_norm_apply(r, v));
  return out;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

TEST_CASE(online_softmax_in_tiles_matches_direct_log_sum_exp) {
  std::mt19937 rng(1);
  std::normal_distribution<double> n(0.0, 1.0);
  for (double scale : {1.0, 100.0, 1000.0}) {
    std::vector<double> s(97);
    for (double& v : s) v = scale * n(rng);
    double m = -std::numeric_limits<double>::infinity(), l = 0;
    for (size_t t = 0; t < s.size(); t += 16) {  // tiles of 16, the last one partial
      double tile_max = -std::numeric_limits<double>::infinity();
      for (size_t i = t; i < std::min(s.size(), t + 16); ++i) tile_max = std::max(tile_max, s[i]);
      const OnlineSoftmaxStep<double> st = online_softmax_step(m, tile_max);
      l *= st.alpha;
      for (size_t i = t; i < std::min(s.size(), t + 16); ++i) l += acc_exp(s[i] - st.m_new);
      m = st.m_new;
    }
    const double lse = online_softmax_lse(m, l);
    double direct_max = -std::numeric_limits<double>::infinity(), direct = 0;
    for (double v : s) direct_max = std::max(direct_max, v);
    for (double v : s) direct += std::exp(v - direct_max);
    CHECK(std::fabs(lse - (direct_max + std::log(direct))) < 1e-9 * (1 + std::fabs(lse)));
    // Probabilities recomputed from the split lse sum to one.
    const SplitLse<float> split = split_lse<float>(lse);
    double total = 0;
    for (double v : s) total += softmax_prob(float(v), split);
    CHECK(std::fabs(total - 1.0) < 1e-3);
  }
  CHECK(std::isinf(online_softmax_lse(0.0, 0.0)));  // a row without keys
}

TEST_CASE(zero_and_constant_rows_normalise_to_zero_with_finite_gradients) {
  for (double value : {0.0, 3.5}) {
    const std::vector<double> x(8, value);  // centred, these are all-zero rows
    const std::vector<double> xn = normalise(x, 100.0, 1e-6);
    for (double v : xn) CHECK(v == 0.0);
    const RowNorm<double> r = row_norm_finish(0.0, value, 100.0, true, 1e-6);
    const double coef = row_norm_grad_coef(r, 0.0, 1e-6);
    CHECK(std::isfinite(coef) && std::isfinite(row_norm_grad_c(r, coef, 1.0, value)));
  }
}

TEST_CASE(normalisation_backward_matches_finite_differences) {
  std::mt19937 rng(2);
  std::normal_distribution<double> n(0.0, 1.0);
  const double eps = 1e-6, scale = 10.0;
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<double> x(7), g(7);
    for (double& v : x) v = n(rng) + 2.0;
    for (double& v : g) v = n(rng);
    // Analytic: dL/dx_j = dL/dc_j - mean_k dL/dc_k, for L = g . x^.
    double mean = 0;
    for (double v : x) mean += v;
    mean /= 7;
    double sum_sq = 0, g_dot_c = 0;
    for (size_t j = 0; j < 7; ++j) {
      sum_sq += (x[j] - mean) * (x[j] - mean);
      g_dot_c += g[j] * (x[j] - mean);
    }
    const RowNorm<double> r = row_norm_finish(sum_sq, mean, scale, true, eps);
    const double coef = row_norm_grad_coef(r, g_dot_c, eps);
    std::vector<double> dc(7);
    double dc_mean = 0;
    for (size_t j = 0; j < 7; ++j) dc_mean += (dc[j] = row_norm_grad_c(r, coef, g[j], x[j])) / 7;
    for (size_t j = 0; j < 7; ++j) {
      std::vector<double> up = x, down = x;
      up[j] += 1e-6;
      down[j] -= 1e-6;
      const double numeric = (dot(g, normalise(up, scale, eps)) - dot(g, normalise(down, scale, eps))) / 2e-6;
      CHECK(std::fabs(numeric - (dc[j] - dc_mean)) < 1e-5 * (1 + std::fabs(numeric)));
    }
  }
}

int main() { return pncc_test::run_all(); }
