// Unit tests of the AVX512-BF16 tile products of the CPU corr_warp (csrc/corr/corr_cpu_bf16.h):
// the bf16 rounding bit for bit against the header's portable statement (ties, NaN, infinities,
// denormals), the three operand layouts, and the GEMM against double sums of the rounded operands
// in every A layout, at sizes that are not multiples of its register tile, exactly where the sums
// are exact, on each engine this CPU has (vdpbf16ps; AMX tiles). Torch-free; skips (passes) on a
// CPU without AVX512-BF16.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "corr/corr_cpu_bf16.h"
#include "corr/corr_cpu_simd.h"

using namespace pncc::corr;

namespace {

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

float float_of(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

uint16_t rounded(float x) { return bf16::round_to_bf16(bits_of(x)); }

uint32_t pair_of(float even, float odd) {
  return uint32_t(rounded(even)) | (uint32_t(rounded(odd)) << 16);
}

// Random values, with the special cases the rounding must get right mixed in.
std::vector<float> values(std::mt19937& rng, size_t n, bool specials) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> v(n);
  const float special[] = {0.0f, -0.0f, std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(),
                           -std::numeric_limits<float>::quiet_NaN(), 1e-40f, -3e-39f,
                           1.0f + 1.0f / 256, 1.0f + 3.0f / 256,  // ties: to even, both ways
                           3.4e38f, 1.00390625f};
  for (size_t i = 0; i < n; ++i)
    v[i] = specials && i % 7 == 3 ? special[(i / 7) % (sizeof(special) / sizeof(float))] : nd(rng);
  return v;
}

}  // namespace

TEST_CASE(portable_rounding_is_round_to_nearest_even) {
  CHECK(rounded(1.0f) == 0x3F80);
  CHECK(rounded(1.0f + 1.0f / 256) == 0x3F80);         // tie, even below
  CHECK(rounded(1.0f + 3.0f / 256) == 0x3F82);         // tie, even above
  CHECK(rounded(1.0f + 1.0f / 256 + 1e-7f) == 0x3F81);  // just above the tie
  CHECK(rounded(std::numeric_limits<float>::infinity()) == 0x7F80);
  CHECK(std::isnan(float_of(rounded(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isnan(float_of(rounded(-std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload would carry into the exponent stays a NaN (and keeps its sign).
  float nan_ff;
  const uint32_t all_ones = 0xFFFFFFFFu;
  std::memcpy(&nan_ff, &all_ones, 4);
  CHECK(std::isnan(float_of(rounded(nan_ff))) && (rounded(nan_ff) & 0x8000));
  CHECK(rounded(3.4e38f) == 0x7F80);  // rounds up to infinity, as IEEE does
}

TEST_CASE(conversions_match_the_portable_rounding_bit_for_bit) {
  if (!bf16::available()) return;
  std::mt19937 rng(1);
  for (int64_t rows : {1, 2, 3, 17})
    for (int64_t cols : {1, 2, 15, 31, 32, 33, 65}) {
      const int64_t ldx = cols + 3;
      const std::vector<float> x = values(rng, rows * ldx, true);
      const auto at = [&](int64_t r, int64_t c) {
        return r < rows && c < cols ? x[r * ldx + c] : 0.0f;
      };
      // rows_to_pairs, with a wider output stride whose padding must stay untouched.
      const int64_t kp = bf16::pairs(cols), ld_r = kp + 2;
      std::vector<uint32_t> out(rows * ld_r, 0xDEADBEEFu);
      bf16::rows_to_pairs(x.data(), rows, cols, ldx, out.data(), ld_r);
      int bad = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t p = 0; p < ld_r; ++p)
          bad += out[r * ld_r + p] != (p < kp ? pair_of(at(r, 2 * p), at(r, 2 * p + 1))
                                              : 0xDEADBEEFu);
      // cols_to_pairs.
      const int64_t rp = bf16::pairs(rows), ld_c = cols + 1;
      std::vector<uint32_t> outc(rp * ld_c, 0xDEADBEEFu);
      bf16::cols_to_pairs(x.data(), rows, cols, ldx, outc.data(), ld_c);
      for (int64_t p = 0; p < rp; ++p)
        for (int64_t j = 0; j < ld_c; ++j)
          bad += outc[p * ld_c + j] != (j < cols ? pair_of(at(2 * p, j), at(2 * p + 1, j))
                                                 : 0xDEADBEEFu);
      // cols_to_pairs of bf16 bits (x rounded first): the same pairs, NaNs included.
      std::vector<uint16_t> xh(x.size());
      for (size_t i = 0; i < x.size(); ++i) xh[i] = rounded(x[i]);
      std::vector<uint32_t> outh(rp * ld_c, 0xDEADBEEFu);
      bf16::cols_to_pairs(xh.data(), rows, cols, ldx, outh.data(), ld_c);
      bad += outh != outc;
      if (rows >= 2) {  // a signalling NaN becomes quiet, as round_to_bf16 makes it
        xh[0] = 0x7F81;
        xh[ldx] = 0xFF82;
        bf16::cols_to_pairs(xh.data(), rows, cols, ldx, outh.data(), ld_c);
        bad += outh[0] != (0x7FC1u | (0xFFC2u << 16));
      }
      // pack_transposed of the (rows x cols) matrix: B = X^T, panels of kPanel rows of X.
      std::vector<uint32_t> packed(bf16::packed_size(rows, cols), 0xDEADBEEFu);
      bf16::pack_transposed(x.data(), rows, cols, ldx, packed.data());
      for (int64_t j = 0; j < (rows + 31) / 32 * 32; ++j)
        for (int64_t p = 0; p < kp; ++p)
          bad += packed[(j / 32) * kp * 32 + p * 32 + j % 32] !=
                 pair_of(at(j, 2 * p), at(j, 2 * p + 1));
      // rows_to_pairs and pack_transposed of the bf16 bits: the same pairs, NaNs included, and a
      // signalling NaN quieted.
      for (size_t i = 0; i < x.size(); ++i) xh[i] = rounded(x[i]);  // undo the NaNs set above
      std::vector<uint32_t> outr(rows * ld_r, 0xDEADBEEFu), packed_h(packed.size(), 0xDEADBEEFu);
      bf16::rows_to_pairs(xh.data(), rows, cols, ldx, outr.data(), ld_r);
      bad += outr != out;
      bf16::pack_transposed(xh.data(), rows, cols, ldx, packed_h.data());
      bad += packed_h != packed;
      xh[0] = 0x7F81;
      bf16::rows_to_pairs(xh.data(), rows, cols, ldx, outr.data(), ld_r);
      bad += (outr[0] & 0xFFFFu) != 0x7FC1u;
      if (bad) std::printf("  rows=%ld cols=%ld: %d bad\n", long(rows), long(cols), bad);
      CHECK(bad == 0);
    }
}

namespace {

using Gemm = void (*)(int64_t, int64_t, int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*,
                      int64_t, int64_t, float*, int64_t, bool);

struct Engine {
  const char* name;
  Gemm gemm;
};

// The engines of bf16::gemm that this CPU can run.
std::vector<Engine> engines() {
  std::vector<Engine> out;
  if (bf16::available()) out.push_back({"avx512bf16", bf16::gemm_avx512});
  if (bf16::amx_available()) out.push_back({"amx", bf16::gemm_amx});
  return out;
}

// One GEMM: A (m x k) and B (k x n) as floats, rounded to bf16 by the conversions. a_layout:
// 0 row-major pairs (rows_to_pairs), 1 pair-major (cols_to_pairs of A^T). b_packed: B given as
// the transpose of an (n x k) matrix, packed; otherwise B's pairs by cols_to_pairs (row-major).
// `integers`: small integer values, whose sums are exact in fp32, checked for equality.
void check_gemm(const Engine& engine, std::mt19937& rng, int64_t m, int64_t n, int64_t k, int a_layout, bool b_packed,
                bool accumulate, bool integers) {
  std::uniform_int_distribution<int> small(-3, 3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const auto draw = [&] { return integers ? float(small(rng)) : nd(rng); };
  std::vector<float> a(m * k), bm(k * n);  // A(i, kk) = a[i * k + kk], B(kk, j) = bm[kk * n + j]
  for (float& v : a) v = draw();
  for (float& v : bm) v = draw();
  const int64_t kp = bf16::pairs(k);
  // A's operand.
  std::vector<uint32_t> ap;
  int64_t a_rs, a_ps;
  if (a_layout == 0) {
    a_rs = kp + 1;
    a_ps = 1;
    ap.assign(m * a_rs, 0u);
    bf16::rows_to_pairs(a.data(), m, k, k, ap.data(), a_rs);
  } else {
    std::vector<float> at(k * m);  // A^T, row-major
    for (int64_t i = 0; i < m; ++i)
      for (int64_t kk = 0; kk < k; ++kk) at[kk * m + i] = a[i * k + kk];
    a_rs = 1;
    a_ps = m + 2;
    ap.assign(std::max<int64_t>(kp, 1) * a_ps, 0u);
    bf16::cols_to_pairs(at.data(), k, m, m, ap.data(), a_ps);
  }
  // B's operand.
  std::vector<uint32_t> bp;
  int64_t ldb, panel_stride;
  if (b_packed) {
    std::vector<float> bt(n * k);  // B^T, row-major
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t j = 0; j < n; ++j) bt[j * k + kk] = bm[kk * n + j];
    bp.assign(std::max<int64_t>(bf16::packed_size(n, k), 1), 0u);
    bf16::pack_transposed(bt.data(), n, k, k, bp.data());
    ldb = bf16::kPanel;
    panel_stride = kp * bf16::kPanel;
  } else {
    ldb = n + 3;
    bp.assign(std::max<int64_t>(kp, 1) * ldb, 0u);
    bf16::cols_to_pairs(bm.data(), k, n, n, bp.data(), ldb);
    panel_stride = bf16::kPanel;
  }
  const int64_t ldc = n + 4;
  std::vector<float> c(m * ldc);
  for (float& v : c) v = integers ? float(small(rng)) : nd(rng);
  const std::vector<float> c_old = c;
  engine.gemm(m, n, kp, ap.data(), a_rs, a_ps, bp.data(), ldb, panel_stride, c.data(), ldc,
              accumulate);
  int bad = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < ldc; ++j) {
      if (j >= n) {
        bad += c[i * ldc + j] != c_old[i * ldc + j];
        continue;
      }
      double exact = accumulate ? c_old[i * ldc + j] : 0.0, magnitude = std::fabs(exact);
      for (int64_t kk = 0; kk < k; ++kk) {
        const double prod = double(float_of(rounded(a[i * k + kk]))) *
                            double(float_of(rounded(bm[kk * n + j])));
        exact += prod;
        magnitude += std::fabs(prod);
      }
      const double err = std::fabs(c[i * ldc + j] - exact);
      bad += integers ? err != 0.0 : !(err <= 1e-6 * (1.0 + magnitude));
    }
  if (bad)
    std::printf("  %s gemm m=%ld n=%ld k=%ld a_layout=%d b_packed=%d acc=%d int=%d: %d bad\n",
                engine.name, long(m), long(n), long(k), a_layout, b_packed, accumulate, integers,
                bad);
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE(gemm_matches_double_in_every_layout_and_at_ragged_sizes) {
  // 32, 64 and k = 64 make whole AMX blocks (read in place); the others ragged ones.
  std::mt19937 rng(2);
  for (const Engine& engine : engines())
    for (int64_t m : {1, 5, 11, 12, 13, 24, 30, 32, 47, 64})
      for (int64_t n : {1, 16, 17, 32, 33, 64, 70})
        for (int64_t k : {0, 1, 2, 3, 8, 37, 64})
          for (int layout = 0; layout < 16; ++layout)
            check_gemm(engine, rng, m, n, k, layout & 1, layout & 2, layout & 4, layout & 8);
}

TEST_CASE(gemm_result_does_not_depend_on_the_rows_around_it) {
  // As for the fp32 kernels: a row's values must not depend on which rows share its call (the
  // partition into tasks and the short last block of rows change that).
  // On AMX, k = 64 reads whole blocks of rows in place and single rows through a padded copy.
  std::mt19937 rng(3);
  for (const Engine& engine : engines())
  for (const int64_t k : {77, 64}) {
    const int64_t m = 69, n = 45, kp = bf16::pairs(k);
    const std::vector<float> a = values(rng, m * k, false), b = values(rng, k * n, false);
    std::vector<uint32_t> ap(m * kp), bp(kp * n);
    bf16::rows_to_pairs(a.data(), m, k, k, ap.data(), kp);
    bf16::cols_to_pairs(b.data(), k, n, n, bp.data(), n);
    std::vector<float> whole(m * n), part(n);
    engine.gemm(m, n, kp, ap.data(), kp, 1, bp.data(), n, bf16::kPanel, whole.data(), n, false);
    for (int64_t i = 0; i < m; ++i) {
      engine.gemm(1, n, kp, ap.data() + i * kp, kp, 1, bp.data(), n, bf16::kPanel, part.data(), n,
                  false);
      CHECK(std::memcmp(part.data(), whole.data() + i * n, n * sizeof(float)) == 0);
    }
  }
}

TEST_CASE(exp_pass_is_within_its_bound_of_exp_and_rounds_each_value_to_bf16) {
  // bf16::exp_shifted_sum, the bf16 forward's exp pass: each e_j within kRel of exp(x_j - m) in
  // double, out[j] the bf16 rounding of a value within that bound (so one of the two roundings
  // of the bound's ends), values below 2^-126 flushed to zero, the sum that of the e_j, the pad,
  // nothing written past it, x untouched.
  if (!bf16::available()) return;
  // 1.7e-7 of the polynomial in fp32, plus the rounding of t = (x - m) log2(e) (half an ulp of t
  // is |x - m| 3e-8 of it, times ln 2): 5.5e-7 at x - m = -5, where e is 7e-3 of the row's largest.
  auto bound = [](double d) { return 2e-7 + std::fabs(d) * 7e-8; };
  constexpr double kRel = 2e-7 + 88 * 7e-8;  // the bound at the end of fp32's normal range
  const double kMinNormal = std::ldexp(1.0, -126);
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.0f, 8.0f);
  int bad_value = 0, bad_bf16 = 0, bad_sum = 0, bad_bounds = 0;
  for (int64_t n : {1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 512}) {
    std::vector<float> x(n);
    for (float& v : x) v = nd(rng);
    if (n > 1) x[n / 2] = -std::numeric_limits<float>::infinity();  // a masked-out score: 0
    if (n > 4) x[n - 2] = x[0] - 95.0f;  // a probability below fp32's normal range
    const float m = *std::max_element(x.begin(), x.end());
    const std::vector<float> x_before = x;
    std::vector<uint16_t> out(n + 3, 0xBEEF);
    const float sum = bf16::exp_shifted_sum(x.data(), n, m, out.data());
    double expected_sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double e = std::exp(double(x[j]) - double(m));
      expected_sum += e;
      const float lo = float(e * (1 - kRel)), hi = float(e * (1 + kRel));
      const bool tiny = e * (1 + kRel) < kMinNormal;
      bad_bf16 += tiny ? out[j] != 0 : out[j] != rounded(lo) && out[j] != rounded(hi);
      bad_value += !tiny && !(std::fabs(double(float_of(out[j])) - e) <= e * (1.0 / 256 + kRel));
    }
    bad_sum += !(std::fabs(double(sum) - expected_sum) <= expected_sum * 1e-6);
    const int64_t pad = n % 2 != 0 ? 1 : 0;
    bad_bounds += pad && out[n] != 0;
    for (int64_t j = n + pad; j < n + 3; ++j) bad_bounds += out[j] != 0xBEEF;
    bad_bounds += std::memcmp(x.data(), x_before.data(), n * sizeof(float)) != 0;
  }
  // Each value in fp32: a row of one returns its e_0 as the sum, exactly.
  for (int i = 0; i <= 40000; ++i) {
    const float x0 = -87.0f * float(i) / 40000.0f;  // down to fp32's normal range
    uint16_t pair[2];
    const double e = std::exp(double(x0)), got = bf16::exp_shifted_sum(&x0, 1, 0.0f, pair);
    bad_value += !(std::fabs(got - e) <= e * bound(x0));
  }
  CHECK(bad_value == 0);
  CHECK(bad_bf16 == 0);
  const float zero = 0.0f;  // the row's largest score: exactly 1, as exp gives
  uint16_t one[2];
  CHECK(bf16::exp_shifted_sum(&zero, 1, 0.0f, one) == 1.0f);
  CHECK(bad_sum == 0);
  CHECK(bad_bounds == 0);
  // NaN propagates to its probability and to the sum.
  std::vector<float> x = {0.0f, std::numeric_limits<float>::quiet_NaN(), -1.0f};
  std::vector<uint16_t> out(4);
  CHECK(std::isnan(bf16::exp_shifted_sum(x.data(), 3, 0.0f, out.data())));
  CHECK(std::isnan(float_of(out[1])) && out[0] == rounded(1.0f));
}

TEST_CASE(fused_softmax_grad_pairs_equal_the_four_passes_bit_for_bit) {
  // bf16::softmax_grad_pairs against what it replaced in the bf16 backward: dS by
  // simd::softmax_grad_cols, then rows_to_pairs of P and dS and cols_to_pairs of dS; odd and
  // ragged sizes, a row stride wider than the tile, special values in P and dP.
  if (!bf16::available()) return;
  std::mt19937 rng(6);
  for (const int64_t rows : {1, 2, 7, 33}) {
    for (const int64_t cols : {1, 16, 31, 33, 77}) {
      const int64_t ld = cols + 3, pc = bf16::pairs(cols), pr = bf16::pairs(rows);
      const std::vector<float> p = values(rng, size_t(rows * ld), true);
      const std::vector<float> dp = values(rng, size_t(rows * ld), true);
      const std::vector<float> d = values(rng, size_t(cols), false);
      std::vector<float> ds = dp;
      simd::softmax_grad_cols(p.data(), ds.data(), rows, cols, ld, d.data());
      std::vector<uint32_t> p_rows(rows * pc), ds_rows(rows * pc), ds_cols(pr * cols);
      bf16::rows_to_pairs(p.data(), rows, cols, ld, p_rows.data(), pc);
      bf16::rows_to_pairs(ds.data(), rows, cols, ld, ds_rows.data(), pc);
      bf16::cols_to_pairs(ds.data(), rows, cols, ld, ds_cols.data(), cols);
      // Outputs with a guard word past each one's end: nothing may be written there.
      std::vector<uint32_t> gp(rows * pc + 1, 0xDEADBEEFu), gds(rows * pc + 1, 0xDEADBEEFu),
          gcols(pr * cols + 1, 0xDEADBEEFu);
      bf16::softmax_grad_pairs(p.data(), dp.data(), rows, cols, ld, d.data(), gp.data(),
                               gds.data(), pc, gcols.data(), cols);
      CHECK(gp.back() == 0xDEADBEEFu && gds.back() == 0xDEADBEEFu && gcols.back() == 0xDEADBEEFu);
      gp.pop_back(), gds.pop_back(), gcols.pop_back();
      CHECK(gp == p_rows);
      CHECK(gds == ds_rows);
      CHECK(gcols == ds_cols);
    }
  }
}

TEST_CASE(output_conversion_is_c10s_bfloat16_rounding) {
  // simd::to_bf16 stores the bf16 forward's output rows: round to nearest even like
  // round_to_bf16, but every NaN as c10::BFloat16's 0x7FC0.
  if (!bf16::available()) return;
  std::mt19937 rng(5);
  for (int64_t n : {1, 15, 16, 17, 100}) {
    const std::vector<float> x = values(rng, n, true);
    std::vector<uint16_t> got(n + 1, 0xBEEF);
    simd::to_bf16(x.data(), n, got.data());
    int bad = got[n] != 0xBEEF;  // nothing past the end
    for (int64_t i = 0; i < n; ++i)
      bad += got[i] != (std::isnan(x[i]) ? uint16_t(0x7FC0) : rounded(x[i]));
    CHECK(bad == 0);
  }
}

int main() {
  std::printf("AVX512-BF16 kernels %s, AMX-BF16 %s\n",
              bf16::available() ? "available" : "unavailable: skipped",
              bf16::amx_available() ? "available" : "unavailable: skipped");
  return pncc_test::run_all();
}
