// Per-element maths of the correspondence softmax-warp, shared by the CPU and CUDA kernels.
//
// Every formula of corr_warp that is not a matrix product lives here, once:
//   - the cosine normalisation of one feature row (forward and backward),
//   - the online-softmax update of one row's running statistics and its log-sum-exp,
//   - the probability recomputed from that log-sum-exp, and the softmax-gradient of one score.
// Torch-free on purpose (see csrc/common/host_device.h): the kernel cores compile on their own.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace pncc {
namespace corr {

// exp/log/sqrt overloaded on the accumulation type, so float rows never round-trip through the
// double versions of the C library on the host.
HOST_DEVICE_INLINE float acc_exp(float x) { return expf(x); }
HOST_DEVICE_INLINE double acc_exp(double x) { return ::exp(x); }
HOST_DEVICE_INLINE float acc_log(float x) { return logf(x); }
HOST_DEVICE_INLINE double acc_log(double x) { return ::log(x); }
HOST_DEVICE_INLINE float acc_sqrt(float x) { return sqrtf(x); }
HOST_DEVICE_INLINE double acc_sqrt(double x) { return ::sqrt(x); }

// Statistics of one feature row c = x - mean(x), needed by both directions of the normalisation.
//
// `mean` is the channel mean (0 when normalisation is off), `norm` the L2 norm of the centred
// row, and `inv` the factor that maps x to its normalised, temperature-scaled value:
// x^ = (x - mean) * inv with inv = scale / (norm + eps), or inv = scale when normalisation is off.
template <typename acc_t>
struct RowNorm {
  acc_t mean;
  acc_t norm;
  acc_t inv;
  bool centred;  // false when normalisation is off: the backward then removes no mean either
};

// Builds the row statistics from the two channel sums of the row.
//
// Args:
//   sum_sq_c:   sum over the channels of (x - mean)^2, accumulated by the caller in a second
//               pass (two passes, not sum(x^2) - C*mean^2, so that rows with a large common offset
//               such as x1e3 features do not lose their variation to cancellation).
//   mean:       channel mean of x.
//   scale:      1 / temperature for queries, 1 for keys.
//   normalize:  false leaves the row as it is (apart from the scale).
//   eps:        added to the norm, so all-zero rows map to 0 rather than to NaN.
template <typename acc_t>
HOST_DEVICE_INLINE RowNorm<acc_t> row_norm_finish(acc_t sum_sq_c, acc_t mean, acc_t scale,
                                                  bool normalize, acc_t eps) {
  RowNorm<acc_t> r;
  if (!normalize) {
    r.mean = acc_t(0);
    r.norm = acc_t(0);
    r.inv = scale;
    r.centred = false;
    return r;
  }
  r.mean = mean;
  r.norm = acc_sqrt(sum_sq_c);
  r.inv = scale / (r.norm + eps);
  r.centred = true;
  return r;
}

// Whether the kernels round q^ and k^ of 16-bit inputs to the input dtype before the score
// product (the contract both backends keep, and the tests' plain baseline with them). They do, as a
// GPU's unfused implementation does, except for bfloat16 rows of fewer than 16 channels: there the
// scores come from q^ and k^ at fp32 precision (CUDA: each row split into hi + lo, see
// corr_kernels.cuh; CPU: the fp32 products). At C = 7 and temperature 0.01 bf16 rounding alone put
// the error of grad_query at 11% of its largest value, and such a padded score product is one mma
// k-step, so the split costs at most two more. float16 keeps its rounding: 3 more bits make it 8x
// smaller, and the rounded dS of the backward (FlashAttention's) then dominates (DESIGN-NOTES,
// issue 10).
HOST_DEVICE_INLINE constexpr bool rounds_normalised_rows(bool bf16, long long channels) {
  return !bf16 || channels >= 16;
}

// Normalised value of one element: x^ = (x - mean) * inv.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t row_norm_apply(const RowNorm<acc_t>& r, acc_t x) {
  return (x - r.mean) * r.inv;
}

// Backward of the normalisation, per row.
//
// With c = x - mean(x), n = ||c|| and x^ = s * c / (n + eps):
//   dL/dc_j = inv * g_j - inv * (g . c) * c_j / ((n + eps) * n)
//   dL/dx_j = dL/dc_j - mean_k(dL/dc_k)
// where g = dL/dx^ and inv = s / (n + eps). The second term is the projection along c; it is 0 for
// a zero row (c = 0), which is the limit autograd's norm backward also takes, so zero vectors give
// finite gradients.
//
// `coef` returns the per-row factor of c_j in dL/dc_j; `row_norm_grad_c` combines it.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t row_norm_grad_coef(const RowNorm<acc_t>& r, acc_t g_dot_c, acc_t eps) {
  // `!(n > 0)` rather than `n == 0`: a NaN norm must not divide either.
  if (!(r.norm > acc_t(0))) return acc_t(0);
  return r.inv * g_dot_c / ((r.norm + eps) * r.norm);
}

// dL/dc_j of one element (before the mean is removed). Without normalisation it is inv * g.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t row_norm_grad_c(const RowNorm<acc_t>& r, acc_t coef, acc_t g, acc_t x) {
  return r.inv * g - coef * (x - r.mean);
}

// Online-softmax state of one row: running max `m` and running sum `l` of exp(s - m).
//
// Merging a tile whose maximum is `tile_max` gives the new maximum and the factor `alpha` by
// which the old sum and the old output accumulator must be rescaled. The very first merge starts
// from m = -inf, where alpha = exp(-inf) = 0 without a NaN as long as tile_max is finite or
// -inf is handled by the caller (a tile always holds at least one valid key).
template <typename acc_t>
struct OnlineSoftmaxStep {
  acc_t m_new;
  acc_t alpha;
};

template <typename acc_t>
HOST_DEVICE_INLINE OnlineSoftmaxStep<acc_t> online_softmax_step(acc_t m_old, acc_t tile_max) {
  OnlineSoftmaxStep<acc_t> st;
  st.m_new = m_old > tile_max ? m_old : tile_max;
  // Both -inf (no valid score yet): keep alpha finite; the sums are 0 anyway.
  st.alpha = (m_old == st.m_new) ? acc_t(1) : acc_exp(m_old - st.m_new);
  return st;
}

// Log-sum-exp of a finished row, in double; -inf for a row without keys (Nk == 0).
//
// Double, because the backward recomputes P = exp(s - lse) from it: at temperature 0.001 the
// scores reach 1000, where one fp32 ulp is 6e-5, and an fp32 lse would put that much relative
// error on every probability (30x the error of an unfused fp32 softmax).
template <typename acc_t>
HOST_DEVICE_INLINE double online_softmax_lse(acc_t m, acc_t l) {
  return l > acc_t(0) ? static_cast<double>(m) + ::log(static_cast<double>(l)) : -double(INFINITY);
}

// The double lse as an unevaluated sum hi + lo of two acc_t values, split once per row so the
// per-score work stays in acc_t: s - hi is exact near the row maximum (Sterbenz), and lo carries
// the bits an acc_t lse would lose.
template <typename acc_t>
struct SplitLse {
  acc_t hi;
  acc_t lo;
};

template <typename acc_t>
HOST_DEVICE_INLINE SplitLse<acc_t> split_lse(double lse) {
  SplitLse<acc_t> r;
  r.hi = static_cast<acc_t>(lse);
  r.lo = static_cast<acc_t>(lse - static_cast<double>(r.hi));
  return r;
}

// The exponent of one recomputed probability: s - lse.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t score_minus_lse(acc_t s, const SplitLse<acc_t>& lse) {
  return (s - lse.hi) - lse.lo;
}

// Probability of one score recomputed from the saved log-sum-exp.
template <typename acc_t>
HOST_DEVICE_INLINE acc_t softmax_prob(acc_t s, const SplitLse<acc_t>& lse) {
  return acc_exp(score_minus_lse(s, lse));
}

// Gradient of the loss with respect to one score: dS = P * (dP - D), D = rowsum(dO * O).
template <typename acc_t>
HOST_DEVICE_INLINE acc_t softmax_grad(acc_t p, acc_t dp, acc_t d) {
  return p * (dp - d);
}

}  // namespace corr
}  // namespace pncc
