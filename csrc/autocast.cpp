// Autocast kernels of corr_warp and render_pncc, for CUDA (Autocast) and the CPU (AutocastCPU).
//
// Under torch.autocast the inputs of one call often arrive in different floating dtypes (a conv's
// bf16 features beside fp32 coordinate channels), which the ops refuse outside autocast. As
// torchvision does for its ops, the autocast kernel casts the floating inputs to one dtype, then
// calls the op again below autocast (so autograd and the backend kernels see consistent inputs and
// the casts are differentiated like any other):
//   corr_warp:   the widest floating input dtype (its kernels run fp32, fp16 and bf16; fp64 on CPU);
//   render_pncc: the widest floating input, at least float32 (its kernels are fp32/fp64 only).
// Outputs stay in that dtype, as aten's "promote" autocast policy leaves them. Integer inputs
// (faces) and non-tensor arguments pass through unchanged; bad dtypes are still refused by the
// ops' own checks.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>

namespace pncc {
namespace {

// The widest floating dtype among `tensors` (`floor` when none is wider), by torch's promotion.
at::ScalarType widest_floating(std::initializer_list<const at::Tensor*> tensors,
                               at::ScalarType floor) {
  at::ScalarType widest = floor;
  bool any = floor != at::ScalarType::Undefined;
  for (const at::Tensor* t : tensors) {
    if (!at::isFloatingType(t->scalar_type())) continue;
    widest = any ? at::promote_types(widest, t->scalar_type()) : t->scalar_type();
    any = true;
  }
  return widest;
}

at::Tensor cast_floating(const at::Tensor& t, at::ScalarType dtype) {
  return at::isFloatingType(t.scalar_type()) && dtype != at::ScalarType::Undefined ? t.to(dtype) : t;
}

template <c10::DispatchKey kAutocastKey>
std::tuple<at::Tensor, at::Tensor> corr_warp_autocast(const at::Tensor& query,
                                                      const at::Tensor& key,
                                                      const at::Tensor& value, double temperature,
                                                      bool normalize, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  const auto dtype = widest_floating({&query, &key, &value}, at::ScalarType::Undefined);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pncc::corr_warp", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double, bool,
                           double)>();
  return op.call(cast_floating(query, dtype), cast_floating(key, dtype),
                 cast_floating(value, dtype), temperature, normalize, eps);
}

template <c10::DispatchKey kAutocastKey>
std::tuple<at::Tensor, at::Tensor> render_pncc_autocast(const at::Tensor& vertices,
                                                        const at::Tensor& faces,
                                                        const at::Tensor& ncc, int64_t height,
                                                        int64_t width) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  const auto dtype = widest_floating({&vertices, &ncc}, at::kFloat);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pncc::render_pncc", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           int64_t)>();
  return op.call(cast_floating(vertices, dtype), faces, cast_floating(ncc, dtype), height, width);
}

}  // namespace
}  // namespace pncc

TORCH_LIBRARY_IMPL(pncc, Autocast, m) {
  m.impl("corr_warp", &pncc::corr_warp_autocast<c10::DispatchKey::Autocast>);
  m.impl("render_pncc", &pncc::render_pncc_autocast<c10::DispatchKey::Autocast>);
}

TORCH_LIBRARY_IMPL(pncc, AutocastCPU, m) {
  m.impl("corr_warp", &pncc::corr_warp_autocast<c10::DispatchKey::AutocastCPU>);
  m.impl("render_pncc", &pncc::render_pncc_autocast<c10::DispatchKey::AutocastCPU>);
}
