// Input validation of corr_warp (see corr_check.h). Messages match pncc_cuda/_corr_checks.py word
// for word; shapes and dtypes are spelled by common/checks.h, as Python prints them.
#include "corr/corr_check.h"

#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/checks.h"

namespace pncc {
namespace corr {
namespace {

void check_rank3(const at::Tensor& t, const char* name, const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must have shape ", dims, ", got ", shape_str(t));
}

void check_dtype(const at::Tensor& t, const char* name, const at::Tensor& query) {
  const auto st = t.scalar_type();
  const bool floating = st == at::kFloat || st == at::kHalf || st == at::kBFloat16 ||
                        st == at::kDouble;
  TORCH_CHECK_TYPE(floating, name,
                   " must be a floating-point tensor (float32, float16 or bfloat16; float64 on "
                   "CPU), got ",
                   dtype_str(t));
  TORCH_CHECK_TYPE(st == query.scalar_type(), name, " must have the dtype of query (",
                   dtype_str(query), "), got ", dtype_str(t));
  // float64 exists for gradcheck; the CUDA kernel's tensor-core and fp32 paths have no fp64 twin.
  TORCH_CHECK_TYPE(st != at::kDouble || t.device().type() != at::kCUDA, name,
                   " must not be float64 on CUDA (float64 is supported on CPU only)");
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& query) {
  TORCH_CHECK_VALUE(t.device() == query.device(), name, " must be on the device of query (",
                    device_str(query), "), got ", device_str(t));
}

}  // namespace

void check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  double temperature, double eps) {
  check_rank3(query, "query", "(B, Nq, C)");
  check_rank3(key, "key", "(B, Nk, C)");
  check_rank3(value, "value", "(B, Nk, Cv)");
  check_dtype(query, "query", query);
  check_dtype(key, "key", query);
  check_dtype(value, "value", query);
  check_device(key, "key", query);
  check_device(value, "value", query);
  const int64_t B = query.size(0), C = query.size(2), Nk = key.size(1);
  TORCH_CHECK_VALUE(C >= 1, "query must have at least one channel (C >= 1), got shape ",
                    shape_str(query));
  TORCH_CHECK_VALUE(key.size(0) == B && key.size(2) == C, "key must have shape (B, Nk, C) = (",
                    B, ", Nk, ", C, ") to match query, got ", shape_str(key));
  TORCH_CHECK_VALUE(value.size(0) == B && value.size(1) == Nk,
                    "value must have shape (B, Nk, Cv) = (", B, ", ", Nk,
                    ", Cv) to match query and key, got ", shape_str(value));
  // Written as !(x > 0) so that NaN fails too.
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, "eps must be a finite number > 0, got ", eps);
}

void check_backward_inputs(const at::Tensor& grad_out, const at::Tensor& query,
                           const at::Tensor& key, const at::Tensor& value, const at::Tensor& out,
                           const at::Tensor& lse, double temperature, double eps) {
  check_inputs(query, key, value, temperature, eps);
  const int64_t B = query.size(0), Nq = query.size(1), Cv = value.size(2);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"},
                                std::pair<const at::Tensor&, const char*>{out, "out"}}) {
    TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == B && t.size(1) == Nq && t.size(2) == Cv, name,
                      " must have shape (B, Nq, Cv) = (", B, ", ", Nq, ", ", Cv, "), got ",
                      shape_str(t));
    check_dtype(t, name, query);
    check_device(t, name, query);
  }
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == Nq,
                    "lse must have shape (B, Nq) = (", B, ", ", Nq, "), got ", shape_str(lse));
  TORCH_CHECK_TYPE(lse.scalar_type() == kLseDtype, "lse must have dtype torch.float64, got ",
                   dtype_str(lse));
  check_device(lse, "lse", query);
}

std::tuple<at::Tensor, at::Tensor> forward_outputs(const at::Tensor& query, const at::Tensor& key,
                                                   const at::Tensor& value) {
  const int64_t B = query.size(0), Nq = query.size(1), Cv = value.size(2);
  at::Tensor out = at::empty({B, Nq, Cv}, query.options());
  at::Tensor lse = at::empty({B, Nq}, query.options().dtype(kLseDtype));
  if (key.size(1) == 0) {  // softmax over no keys: an empty sum
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
  }
  return {out, lse};
}

bool forward_is_trivial(const at::Tensor& query, const at::Tensor& key) {
  return query.size(0) * query.size(1) == 0 || key.size(1) == 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> zero_grads(const at::Tensor& query,
                                                          const at::Tensor& key,
                                                          const at::Tensor& value) {
  return {at::zeros(query.sizes(), query.options()), at::zeros(key.sizes(), key.options()),
          at::zeros(value.sizes(), value.options())};
}

}  // namespace corr
}  // namespace pncc
