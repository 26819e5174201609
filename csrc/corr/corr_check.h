// Input validation of corr_warp and its backward, and the host-side pieces shared by the CPU
// and CUDA kernels.
//
// Every precondition raises ValueError (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE) with a
// message that names the argument. pncc_cuda/corr.py states the same preconditions, with the same
// messages, for the fake kernels; keep the two in step.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace pncc {
namespace corr {

// Validates the forward arguments.
//
// Args:
//   query:       (B, Nq, C) float32 | float16 | bfloat16 (float64 on CPU only), C >= 1.
//   key:         (B, Nk, C), same dtype and device as query.
//   value:       (B, Nk, Cv), same dtype and device as query; Cv may be 0.
//   temperature: finite, > 0.
//   eps:         finite, > 0 (it keeps zero rows finite).
// Sizes are not limited beyond what fits an int64: both kernels index with int64.
void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  double temperature, double eps);

// Validates the backward arguments: the forward ones, plus
//   grad_out, out: (B, Nq, Cv), dtype of query;
//   lse:           (B, Nq), float64 (kLseDtype).
void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& query,
                           const at::Tensor& key, const at::Tensor& value, const at::Tensor& out,
                           const at::Tensor& lse, double temperature, double eps);

// Host-side pieces both backends share.
//
// forward_outputs: allocates out (B, Nq, Cv) and lse (B, Nq) float64 on the device of query; when
// forward_is_trivial (no query rows or no keys) they are already final: out = 0, lse = -inf.
// zero_grads: the gradients of a trivial forward, all zero.
std::tuple<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& query, const at::Tensor& key,
                                                   const at::Tensor& value);
bool forward_is_trivial(const at::Tensor& query, const at::Tensor& key);
std::tuple<at::Tensor, at::Tensor, at::Tensor> zero_grads(const at::Tensor& query,
                                                          const at::Tensor& key,
                                                          const at::Tensor& value);

// dtype of the saved log-sum-exp, for every input dtype: float64, so that probabilities
// recomputed from it keep fp32 accuracy at large 1/temperature (online_softmax_lse, corr_math.h).
constexpr at::ScalarType kLseDtype = at::kDouble;

}  // namespace corr
}  // namespace pncc
