// corr_warp and _corr_warp_backward on CUDA: validation, allocation, dispatch and registration.
// The kernels and their launchers are in corr_kernels.cuh (torch-free, so tools/cuda_emu compiles
// them as they are); this file owns only the tensors around them.
//
// Dispatch:
//   - float16 / bfloat16: the FlashAttention-2 style tensor-core kernels, when their shared
//     memory fits the device (C up to about 700 forward) and, for the backward, C <= 256 and
//     Cv <= 264; otherwise the SIMT kernel;
//   - float32: the register-tiled SIMT kernel (fp32 FMAs, never TF32).
// Nothing on these paths waits for the device: sizes come from the tensors' shapes, and a launch
// error is raised from cudaGetLastError right after the launch.
//
// UNTESTED ON HARDWARE: written and compiled for sm_80/sm_90 on a machine without a GPU. The CUDA
// tests in tests/test_corr.py (marked `cuda`) check it against the float64 reference, on a GPU or
// on tools/cuda_emu.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "corr/corr_check.h"
#include "corr/corr_kernels.cuh"

namespace pncc {
namespace corr {
namespace {

// c10 element types to their CUDA twins (same bits).
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

int64_t round_up64(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// q^ and k^ as the kernels read them (SplitRows, corr_kernels.cuh): split into hi + lo where
// rounds_normalised_rows (corr_math.h) says the dtype's rounding is not the contract, whole
// otherwise. Worked out once per call by forward_impl / backward_impl, which pick the kernel by it.
struct ScoreRows {
  SplitRows q, k;
  int64_t channels;  // of a row, before padding: 3C when split
};

template <typename T>
ScoreRows score_rows(int64_t C, bool normalize) {
  ScoreRows r{};
  // Unnormalised 16-bit rows are copied exactly: nothing to split.
  if (sizeof(T) == 2 && normalize &&
      !rounds_normalised_rows(std::is_same_v<T, __nv_bfloat16>, C)) {
    r.q.blocks = r.k.blocks = 3;
    r.q.lo_block = 2;
    r.k.lo_block = 1;
  }
  r.channels = C * r.q.blocks;
  return r;
}

// The rows of x (B, N, C) normalised (or, with normalize false, copied) into a new (B, N, ld)
// tensor whose channels past C are zero; the rows' statistics go to *stats when given. Never scaled
// by 1/temperature: the kernels apply it to the fp32 scores (DESIGN-NOTES, issue 10).
template <typename T>
at::Tensor padded_rows(const at::Tensor& x, int64_t ld, bool normalize, double eps,
                       at::Tensor* stats, cudaStream_t stream, SplitRows split = SplitRows{}) {
  at::Tensor out = at::empty({x.size(0), x.size(1), ld}, x.options());
  NormalizeParams p{};
  p.x = x.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.n_rows = x.size(0) * x.size(1);
  p.C = x.size(2);
  p.ld_out = ld;
  p.eps = eps;
  p.normalize = normalize;
  p.split = split;
  if (stats != nullptr) {
    *stats = at::empty({p.n_rows * int64_t(sizeof(RowNorm<double>))},
                       x.options().dtype(at::kByte));
    p.stats = reinterpret_cast<RowNorm<double>*>(stats->mutable_data_ptr());
  }
  C10_CUDA_CHECK(launch_normalize<T>(p, stream));
  return out;
}

// V as the flash kernels read it: rows of a multiple of 8 elements on 16-byte boundaries, for the
// 16-byte asynchronous copies. The tensor itself when it already is; a padded copy otherwise.
template <typename T>
at::Tensor copy_ready_rows(const at::Tensor& v, cudaStream_t stream) {
  const int64_t ld = round_up64(v.size(2) == 0 ? 8 : v.size(2), 8);
  const bool aligned = reinterpret_cast<uintptr_t>(v.const_data_ptr()) % 16 == 0;
  if (ld == v.size(2) && aligned) return v;
  return padded_rows<T>(v, ld, false, 1.0, nullptr, stream);
}

int max_dynamic_smem_bytes() {
  int bytes = 0;
  C10_CUDA_CHECK(max_dynamic_smem(&bytes));
  return bytes;
}

// ---- forward ----

template <typename T>
void forward_flash(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                   double temperature, bool normalize, double eps, const ScoreRows& score,
                   at::Tensor& out, at::Tensor& lse, cudaStream_t stream) {
  const int64_t ld_qk = round_up64(score.channels, 16);
  const at::Tensor qs = padded_rows<T>(query, ld_qk, normalize, eps, nullptr, stream, score.q);
  const at::Tensor kn = padded_rows<T>(key, ld_qk, normalize, eps, nullptr, stream, score.k);
  const at::Tensor v = copy_ready_rows<T>(value, stream);
  // Without value channels lse is still an output: run 8 channels of zeros into scratch.
  const bool no_channels = value.size(2) == 0;
  at::Tensor o = no_channels ? at::empty({query.size(0), query.size(1), 8}, value.options()) : out;
  FlashForwardParams p{};
  p.q = qs.const_data_ptr();
  p.k = kn.const_data_ptr();
  p.v = v.const_data_ptr();
  p.out = o.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<double>();
  p.inv_t = 1.0 / temperature;
  p.Nq = query.size(1);
  p.Nk = key.size(1);
  p.Cv = o.size(2);
  p.ld_qk = static_cast<int>(ld_qk);
  p.ld_v = static_cast<int>(v.size(2));
  C10_CUDA_CHECK(launch_flash_forward<T>(p, query.size(0), stream));
}

// The SIMT kernel's windows over the output channels must fit gridDim.y (checked before launching).
void check_tile_windows(int64_t n_out, int64_t n_rows) {
  TORCH_CHECK_VALUE(simt_windows(n_out, kSimtWide) <= kSimtMaxWindows &&
                        ceil_div(n_rows, kSimtRows) <= 2147483647,
                    "corr_warp: too many channels or rows for one CUDA launch (", n_out,
                    " channels, ", n_rows, " rows)");
}

template <typename T>
void forward_simt(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  double temperature, bool normalize, double eps, const ScoreRows& score,
                  at::Tensor& out, at::Tensor& lse, cudaStream_t stream) {
  const int64_t C = score.channels;
  const at::Tensor qs = padded_rows<T>(query, C, normalize, eps, nullptr, stream, score.q);
  const at::Tensor kn = padded_rows<T>(key, C, normalize, eps, nullptr, stream, score.k);
  // Without value channels lse is still an output: take the product with 16 channels of zeros.
  const bool no_channels = value.size(2) == 0;
  const at::Tensor v = no_channels ? at::zeros({key.size(0), key.size(1), 16}, value.options())
                                   : value;
  at::Tensor o = no_channels ? at::empty({query.size(0), query.size(1), 16}, value.options()) : out;
  check_tile_windows(v.size(2), query.size(1));
  TileParams prm{};
  prm.rows = qs.const_data_ptr();
  prm.cols = kn.const_data_ptr();
  prm.x = v.const_data_ptr();
  prm.n_rows = query.size(1);
  prm.n_cols = key.size(1);
  prm.C = C;
  prm.Cv = value.size(2);
  prm.n_out = v.size(2);
  prm.out = o.mutable_data_ptr();
  prm.lse_out = lse.mutable_data_ptr<double>();
  prm.inv_t = 1.0 / temperature;
  C10_CUDA_CHECK((launch_simt<T, Mode::kFwd>(prm, query.size(0), stream)));
}

template <typename scalar_t>
void forward_impl(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                  double temperature, bool normalize, double eps, at::Tensor& out,
                  at::Tensor& lse, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const ScoreRows score = score_rows<T>(query.size(2), normalize);
  if constexpr (sizeof(T) == 2) {
    const size_t smem =
        flash_forward_smem(round_up64(score.channels, 16), value.size(2), sizeof(T));
    if (smem <= static_cast<size_t>(max_dynamic_smem_bytes())) {
      forward_flash<T>(query, key, value, temperature, normalize, eps, score, out, lse, stream);
      return;
    }
  }
  forward_simt<T>(query, key, value, temperature, normalize, eps, score, out, lse, stream);
}

// ---- backward ----

// The normalisation's backward: dL/dx from g = T dL/dx^ (fp32, row stride ld_g; the kernels leave
// 1/T to this pass, which applies it in double) and the rows' statistics.
template <typename T>
at::Tensor normalize_backward(const at::Tensor& g, int64_t ld_g, const at::Tensor& x,
                              const at::Tensor& stats, double eps, double temperature,
                              SplitRows split, cudaStream_t stream) {
  at::Tensor grad_x = at::empty_like(x);
  NormalizeBackwardParams p{};
  p.g = g.const_data_ptr<float>();
  p.x = x.const_data_ptr();
  p.stats = reinterpret_cast<const RowNorm<double>*>(stats.const_data_ptr());
  p.grad_x = grad_x.mutable_data_ptr();
  p.n_rows = x.size(0) * x.size(1);
  p.C = x.size(2);
  p.ld_g = ld_g;
  p.eps = eps;
  p.g_scale = 1.0 / temperature;
  p.split = split;
  C10_CUDA_CHECK(launch_normalize_backward<T>(p, stream));
  return grad_x;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_flash(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse, double temperature,
    bool normalize, double eps, const ScoreRows& score, cudaStream_t stream) {
  const int64_t B = query.size(0), Nq = query.size(1), Nk = key.size(1), Cv = value.size(2);
  const int64_t ld_qk = 8 * backward_ntk(score.channels);
  const int64_t ld_v = round_up64(Cv == 0 ? 8 : Cv, 8);
  at::Tensor q_stats, k_stats;
  const at::Tensor qs = padded_rows<T>(query, ld_qk, normalize, eps, &q_stats, stream, score.q);
  const at::Tensor kn = padded_rows<T>(key, ld_qk, normalize, eps, &k_stats, stream, score.k);
  const at::Tensor v = copy_ready_rows<T>(value, stream);
  // D = rowsum(dO * O), and dO padded like V.
  at::Tensor d = at::empty({B, Nq}, query.options().dtype(at::kFloat));
  at::Tensor dout = at::empty({B, Nq, ld_v}, query.options());
  BackwardDParams dp{};
  dp.grad_out = grad_out.const_data_ptr();
  dp.out = out.const_data_ptr();
  dp.grad_out_padded = dout.mutable_data_ptr();
  dp.d = d.mutable_data_ptr<float>();
  dp.n_rows = B * Nq;
  dp.Cv = Cv;
  dp.ld_padded = ld_v;
  C10_CUDA_CHECK(launch_backward_d<T>(dp, stream));

  // Deterministic mode takes the dQ pass instead of atomics; it is not an error.
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const auto f32 = query.options().dtype(at::kFloat);
  at::Tensor grad_qs = deterministic ? at::empty({B, Nq, ld_qk}, f32) : at::zeros({B, Nq, ld_qk}, f32);
  at::Tensor grad_kn = at::empty({B, Nk, ld_qk}, f32);
  at::Tensor grad_v = at::empty({B, Nk, Cv}, value.options());
  FlashBackwardParams p{};
  p.q = qs.const_data_ptr();
  p.k = kn.const_data_ptr();
  p.v = v.const_data_ptr();
  p.dout = dout.const_data_ptr();
  p.lse = lse.const_data_ptr<double>();
  p.d = d.const_data_ptr<float>();
  p.dq = grad_qs.mutable_data_ptr<float>();
  p.dk = grad_kn.mutable_data_ptr<float>();
  p.dv = grad_v.mutable_data_ptr();
  p.inv_t = 1.0 / temperature;
  p.Nq = Nq;
  p.Nk = Nk;
  p.Cv = Cv;
  p.ld_qk = static_cast<int>(ld_qk);
  p.ld_v = static_cast<int>(v.size(2));
  p.single_key = Nk == 1;
  C10_CUDA_CHECK(launch_flash_backward<T>(p, B, deterministic, stream));
  return {normalize_backward<T>(grad_qs, ld_qk, query, q_stats, eps, temperature, score.q, stream),
          normalize_backward<T>(grad_kn, ld_qk, key, k_stats, eps, temperature, score.k, stream),
          grad_v};
}

// The SIMT backward: four passes without atomics (deterministic); D = rowsum(P * dP) from the
// recomputed scores (the kD pass), so it does not read `out`.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_simt(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& lse, double temperature, bool normalize,
    double eps, const ScoreRows& score, cudaStream_t stream) {
  const int64_t B = query.size(0), Nq = query.size(1), Nk = key.size(1);
  const int64_t C = score.channels, Cv = value.size(2);
  at::Tensor q_stats, k_stats;
  const at::Tensor qs = padded_rows<T>(query, C, normalize, eps, &q_stats, stream, score.q);
  const at::Tensor kn = padded_rows<T>(key, C, normalize, eps, &k_stats, stream, score.k);
  const auto f32 = query.options().dtype(at::kFloat);
  at::Tensor d = at::empty({B, Nq}, f32);
  check_tile_windows(std::max<int64_t>(C, Cv), std::max(Nq, Nk));
  auto tile = [&](const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& x) {
    TileParams prm{};
    prm.rows = rows.const_data_ptr();
    prm.cols = cols.const_data_ptr();
    prm.x = x.const_data_ptr();
    prm.n_rows = rows.size(1);
    prm.n_cols = cols.size(1);
    prm.C = rows.size(2);
    prm.Cv = Cv;
    prm.n_out = x.size(2);
    prm.lse = lse.const_data_ptr<double>();
    prm.d = d.const_data_ptr<float>();
    prm.inv_t = 1.0 / temperature;
    return prm;
  };
  if (Cv > 0) {
    // D = rowsum(P * dP): rows are queries, no output product.
    TileParams dd = tile(qs, kn, kn);
    dd.n_out = 0;
    dd.rows2 = grad_out.const_data_ptr();
    dd.cols2 = value.const_data_ptr();
    dd.d_out = d.mutable_data_ptr<float>();
    C10_CUDA_CHECK((launch_simt<T, Mode::kD>(dd, B, stream)));
  } else {
    d.zero_();  // dP = 0
  }
  at::Tensor grad_qs = at::empty({B, Nq, C}, f32);
  at::Tensor grad_kn = at::empty({B, Nk, C}, f32);
  at::Tensor grad_v = at::empty({B, Nk, Cv}, value.options());
  TileParams dq = tile(qs, kn, kn);  // dL/dq^: rows are queries
  dq.rows2 = grad_out.const_data_ptr();
  dq.cols2 = value.const_data_ptr();
  dq.out_f32 = grad_qs.mutable_data_ptr<float>();
  TileParams dk = tile(kn, qs, qs);  // dL/dk^ and dL/dV: rows are keys
  dk.rows2 = value.const_data_ptr();
  dk.cols2 = grad_out.const_data_ptr();
  dk.out_f32 = grad_kn.mutable_data_ptr<float>();
  TileParams dv = tile(kn, qs, grad_out);
  dv.out = grad_v.mutable_data_ptr();
  C10_CUDA_CHECK((launch_simt<T, Mode::kDq>(dq, B, stream)));
  C10_CUDA_CHECK((launch_simt<T, Mode::kDk>(dk, B, stream)));
  C10_CUDA_CHECK((launch_simt<T, Mode::kDv>(dv, B, stream)));
  return {normalize_backward<T>(grad_qs, C, query, q_stats, eps, temperature, score.q, stream),
          normalize_backward<T>(grad_kn, C, key, k_stats, eps, temperature, score.k, stream),
          grad_v};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse, double temperature,
    bool normalize, double eps, cudaStream_t stream) {
  using T = typename CudaType<scalar_t>::type;
  const ScoreRows score = score_rows<T>(query.size(2), normalize);
  if constexpr (sizeof(T) == 2) {
    const int64_t C = score.channels;
    if (C <= kBackwardMaxC && value.size(2) <= kBackwardMaxCv &&
        flash_backward_smem(C, value.size(2), sizeof(T)) <=
            static_cast<size_t>(max_dynamic_smem_bytes())) {
      return backward_flash<T>(grad_out, query, key, value, out, lse, temperature, normalize,
                               eps, score, stream);
    }
  }
  return backward_simt<T>(grad_out, query, key, value, lse, temperature, normalize, eps, score,
                          stream);
}

// corr_warp on CUDA.
//
// Args:
//   query:       (B, Nq, C) float32 | float16 | bfloat16, any strides (copied when not
//                contiguous).
//   key:         (B, Nk, C), value: (B, Nk, Cv); same dtype and device.
//   temperature: finite, > 0. normalize, eps: as in corr_math.h.
// Returns:
//   out, lse: as corr_warp_cpu (corr_cpu.cpp).
std::tuple<at::Tensor, at::Tensor> corr_warp_cuda(const at::Tensor& query, const at::Tensor& key,
                                                  const at::Tensor& value, double temperature,
                                                  bool normalize, double eps) {
  check_inputs(query, key, value, temperature, eps);
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto [out, lse] = forward_outputs(query, key, value);
  if (forward_is_trivial(query, key)) return {out, lse};
  const at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  switch (query.scalar_type()) {
    case at::kFloat:
      forward_impl<float>(q, k, v, temperature, normalize, eps, out, lse, stream);
      break;
    case at::kHalf:
      forward_impl<c10::Half>(q, k, v, temperature, normalize, eps, out, lse, stream);
      break;
    case at::kBFloat16:
      forward_impl<c10::BFloat16>(q, k, v, temperature, normalize, eps, out, lse, stream);
      break;
    default:  // check_inputs admits no other dtype on CUDA
      C10_THROW_ERROR(TypeError, "corr_warp: unsupported dtype on CUDA");
  }
  return {out, lse};
}

// _corr_warp_backward on CUDA.
//
// Args and Returns: as corr_warp_backward_cpu (corr_cpu.cpp). The float16/bfloat16 kernels read
// `out` for D = rowsum(dO * out) and add dL/dq with fp32 atomics, so their dL/dq can differ in
// the last bits run to run; under torch.use_deterministic_algorithms(True) a separate dQ pass
// replaces the atomics. The float32 (SIMT) backward has no atomics and is always deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> corr_warp_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse, double temperature,
    bool normalize, double eps) {
  check_backward_inputs(grad_out, query, key, value, out, lse, temperature, eps);
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (forward_is_trivial(query, key)) return zero_grads(query, key, value);
  const at::Tensor go = grad_out.contiguous(), q = query.contiguous(), k = key.contiguous();
  const at::Tensor v = value.contiguous(), o = out.contiguous(), l = lse.contiguous();
  switch (query.scalar_type()) {
    case at::kFloat:
      return backward_impl<float>(go, q, k, v, o, l, temperature, normalize, eps, stream);
    case at::kHalf:
      return backward_impl<c10::Half>(go, q, k, v, o, l, temperature, normalize, eps, stream);
    case at::kBFloat16:
      return backward_impl<c10::BFloat16>(go, q, k, v, o, l, temperature, normalize, eps,
                                          stream);
    default:  // check_inputs admits no other dtype on CUDA
      C10_THROW_ERROR(TypeError, "corr_warp: unsupported dtype on CUDA");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pncc, CUDA, m) {
  m.impl("corr_warp", &corr_warp_cuda);
  m.impl("_corr_warp_backward", &corr_warp_backward_cuda);
}

}  // namespace corr
}  // namespace pncc
