// CPU kernels of corr_warp and _corr_warp_backward.
//
// Flash-style on tiles: the matrix products of a (query tile x key tile) block run as ATen GEMMs
// (MKL) on views, the softmax bookkeeping runs on the tile in place, so no (Nq x Nk) tensor is
// ever allocated. The per-element maths comes from corr_math.h.
//
// Determinism: the work partition depends on the sizes only, never on the thread count, and
// every floating-point sum has a fixed order. The forward owns one (batch, query tile) per task.
// The backward owns one key tile per task (its dK and dV rows), and writes its contributions to
// D and dQ into partial buffers per key tile, which are summed in key-tile order afterwards.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "corr/corr_check.h"
#include "corr/corr_math.h"

namespace pncc {
namespace corr {
namespace {

// Query rows and keys per tile. A 256 x 512 fp32 score tile is 512 KiB: it stays in L2 between
// the GEMM that writes it, the softmax passes and the GEMM that reads it; 256 rows measured ~5%
// faster than 128 in the forward. The backward's tiles keep 128 rows: its chunk buffers hold
// whole tiles and must stay small (see kChunkBudget).
constexpr int64_t kFwdTileQ = 256;
constexpr int64_t kTileQ = 128;
constexpr int64_t kTileK = 512;
// Upper bound, in elements, of the backward's per-chunk buffers: the chunk's P and dP and the
// per-key-tile partials of D and dQ (4 MiB in fp32; a chunk is never less than one query tile).
constexpr int64_t kChunkBudget = int64_t(1) << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row statistics and the normalisation itself run in double whatever the input dtype: they are
// O(N * C) work next to the O(Nq * Nk * C) products, and rounding q^ and k^ only once keeps the
// scores (up to 1/temperature = 1000 in magnitude) as accurate as an unfused fp32 implementation.
using stat_t = double;

// Statistics of one contiguous row of C elements (two passes; see row_norm_finish).
template <typename scalar_t>
RowNorm<stat_t> row_stats(const scalar_t* x, int64_t C, stat_t scale, bool normalize,
                          stat_t eps) {
  stat_t sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += static_cast<stat_t>(x[c]);
  const stat_t mean = sum / static_cast<stat_t>(C);
  stat_t sum_sq = 0;
  for (int64_t c = 0; c < C; ++c) {
    const stat_t d = static_cast<stat_t>(x[c]) - mean;
    sum_sq += d * d;
  }
  return row_norm_finish<stat_t>(sum_sq, mean, scale, normalize, eps);
}

// x^ of every row of a contiguous (R, C) tensor, as a new contiguous acc_t tensor. `serial` runs
// it on the calling thread (a few rows are not worth a parallel region and its barrier).
template <typename scalar_t, typename acc_t>
at::Tensor normalized_rows(const at::Tensor& x, stat_t scale, bool normalize, stat_t eps,
                           bool serial = false) {
  const int64_t C = x.size(-1), R = x.numel() / C;
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* op = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, R, serial ? std::max<int64_t>(R, 1) : 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowNorm<stat_t> st = row_stats(xp + r * C, C, scale, normalize, eps);
      for (int64_t c = 0; c < C; ++c)
        op[r * C + c] = static_cast<acc_t>(row_norm_apply(st, static_cast<stat_t>(xp[r * C + c])));
    }
  });
  return out;
}

// In place: turns g = dL/dx^ (rows of a contiguous acc_t tensor) into dL/dx, for the rows of the
// contiguous input x they were computed from.
template <typename scalar_t, typename acc_t>
void normalized_rows_backward(at::Tensor& g, const at::Tensor& x, stat_t scale, bool normalize,
                              stat_t eps) {
  const int64_t C = x.size(-1), R = x.numel() / C;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  acc_t* gp = g.mutable_data_ptr<acc_t>();
  at::parallel_for(0, R, 64, [&](int64_t begin, int64_t end) {
    std::vector<stat_t> dc(C);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * C;
      acc_t* gr = gp + r * C;
      const RowNorm<stat_t> st = row_stats(xr, C, scale, normalize, eps);
      stat_t g_dot_c = 0;
      for (int64_t c = 0; c < C; ++c)
        g_dot_c += static_cast<stat_t>(gr[c]) * (static_cast<stat_t>(xr[c]) - st.mean);
      const stat_t coef = row_norm_grad_coef(st, g_dot_c, eps);
      stat_t sum = 0;
      for (int64_t c = 0; c < C; ++c) {
        dc[c] = row_norm_grad_c(st, coef, static_cast<stat_t>(gr[c]), static_cast<stat_t>(xr[c]));
        sum += dc[c];
      }
      const stat_t mean = st.centred ? sum / static_cast<stat_t>(C) : stat_t(0);
      for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<acc_t>(dc[c] - mean);
    }
  });
}

// Max and sum of a row with eight independent partial results: a single running value would chain
// every element to the previous one through the add latency. The combination order is fixed, so
// the result is as reproducible as a sequential loop.
template <typename acc_t>
acc_t row_max(const acc_t* x, int64_t n) {
  acc_t part[8];
  for (int r = 0; r < 8; ++r) part[r] = x[0];
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int r = 0; r < 8; ++r) part[r] = x[j + r] > part[r] ? x[j + r] : part[r];
  for (; j < n; ++j) part[0] = x[j] > part[0] ? x[j] : part[0];
  acc_t m = part[0];
  for (int r = 1; r < 8; ++r) m = part[r] > m ? part[r] : m;
  return m;
}

// sum_j x[j] * y[j]; row_sum is the case y = nullptr (all ones).
template <typename acc_t>
acc_t row_dot(const acc_t* x, const acc_t* y, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int r = 0; r < 8; ++r) part[r] += y ? x[j + r] * y[j + r] : x[j + r];
  for (; j < n; ++j) part[0] += y ? x[j] * y[j] : x[j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <typename acc_t>
acc_t row_sum(const acc_t* x, int64_t n) {
  return row_dot<acc_t>(x, nullptr, n);
}

// A contiguous (rows, cols) view at the start of a scratch buffer, for tiles at the matrix edge.
at::Tensor tile_view(const at::Tensor& scratch, int64_t rows, int64_t cols) {
  return scratch.narrow(0, 0, rows * cols).view({rows, cols});
}

template <typename scalar_t>
void corr_warp_forward_impl(const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, double temperature, bool normalize,
                            double eps, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = query.size(0), Nq = query.size(1), Nk = key.size(1), Cv = value.size(2);
  const auto acc_opts = query.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor qs = normalized_rows<scalar_t, acc_t>(query, 1.0 / temperature, normalize, eps);
  const at::Tensor kn = normalized_rows<scalar_t, acc_t>(key, 1.0, normalize, eps);
  const at::Tensor v = value.to(acc_opts.dtype());
  at::Tensor out_acc =
      out.scalar_type() == acc_opts.dtype() ? out : at::empty(out.sizes(), acc_opts);
  double* lse_p = lse.mutable_data_ptr<double>();
  const int64_t n_qt = ceil_div(Nq, kFwdTileQ), n_kt = ceil_div(Nk, kTileK);

  at::parallel_for(0, B * n_qt, 1, [&](int64_t begin, int64_t end) {
    at::Tensor s_buf = at::empty({kFwdTileQ * kTileK}, acc_opts);
    std::vector<acc_t> m(kFwdTileQ), l(kFwdTileQ), alpha(kFwdTileQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_qt, q0 = (task % n_qt) * kFwdTileQ;
      const int64_t nq = std::min(kFwdTileQ, Nq - q0);
      const at::Tensor q_tile = qs[b].narrow(0, q0, nq);
      // The output rows are the accumulator: they are owned by this task alone.
      at::Tensor acc = out_acc[b].narrow(0, q0, nq);
      acc.zero_();
      std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int64_t kt = 0; kt < n_kt; ++kt) {
        const int64_t k0 = kt * kTileK, nk = std::min(kTileK, Nk - k0);
        at::Tensor s = tile_view(s_buf, nq, nk);
        at::mm_out(s, q_tile, kn[b].narrow(0, k0, nk).t());
        acc_t* sp = s.mutable_data_ptr<acc_t>();
        for (int64_t i = 0; i < nq; ++i) {
          acc_t* row = sp + i * nk;
          const OnlineSoftmaxStep<acc_t> st = online_softmax_step(m[i], row_max(row, nk));
          m[i] = st.m_new;
          alpha[i] = st.alpha;
          for (int64_t j = 0; j < nk; ++j) row[j] -= st.m_new;
        }
        // ATen's vectorised exp; the tile is contiguous and its shape fixed by the partition, so
        // the result does not depend on the thread count.
        s.exp_();
        acc_t* ap = acc.mutable_data_ptr<acc_t>();
        for (int64_t i = 0; i < nq; ++i) {
          l[i] = l[i] * alpha[i] + row_sum(sp + i * nk, nk);
          if (alpha[i] != acc_t(1))
            for (int64_t c = 0; c < Cv; ++c) ap[i * Cv + c] *= alpha[i];
        }
        acc.addmm_(s, v[b].narrow(0, k0, nk));
      }
      acc_t* ap = acc.mutable_data_ptr<acc_t>();
      for (int64_t i = 0; i < nq; ++i) {
        const acc_t inv_l = acc_t(1) / l[i];
        for (int64_t c = 0; c < Cv; ++c) ap[i * Cv + c] *= inv_l;
        lse_p[b * Nq + q0 + i] = online_softmax_lse(m[i], l[i]);
      }
    }
  });
  if (!out_acc.is_same(out)) out.copy_(out_acc);
}

// dst[r] = parts[0][r] + parts[1][r] + ... (in index order) for rows r in [r_begin, r_end), where
// parts holds n_parts blocks of rows x cols values, part_stride apart.
template <typename acc_t>
void sum_parts_in_order(const acc_t* parts, int64_t n_parts, int64_t part_stride, int64_t cols,
                        int64_t r_begin, int64_t r_end, acc_t* dst) {
  for (int64_t r = r_begin; r < r_end; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = parts[r * cols + c];
    for (int64_t p = 1; p < n_parts; ++p) {
      const acc_t* src = parts + p * part_stride + r * cols;
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] += src[c];
    }
  }
}

// The backward, one chunk of query rows at a time, in two phases parallel over key tiles:
//   1. recompute P = exp(S - lse) and dP = dO V^T for the chunk's rows and every key, keep both,
//      and sum D = rowsum(P * dP) (per key tile, then in key-tile order);
//   2. dS = P * (dP - D); dV += P^T dO and dK += dS^T q^ into the tile's own rows; dS k^ into the
//      tile's dQ partial, summed in key-tile order afterwards.
// D comes from the very P and dP that dS uses, as in an unfused softmax backward, rather than from
// rowsum(dO * out): on a saturated row dP - D cancels to a few ulps, and the rounding of `out`
// would otherwise reach dS (and, times 1/temperature, dQ and dK) unattenuated. Keeping P and dP of
// one chunk costs 2 * chunk * Nk values, bounded by kChunkBudget; it saves recomputing them.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> corr_warp_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& lse, double temperature, bool normalize,
    double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = query.size(0), Nq = query.size(1), Nk = key.size(1);
  const int64_t C = query.size(2), Cv = value.size(2);
  const auto acc_opts = query.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor v = value.to(acc_opts.dtype());
  const at::Tensor d_out = grad_out.to(acc_opts.dtype());

  at::Tensor grad_qs = at::empty({B, Nq, C}, acc_opts);
  at::Tensor grad_kn = at::zeros({B, Nk, C}, acc_opts);
  at::Tensor grad_v = at::zeros({B, Nk, Cv}, acc_opts);
  const int64_t n_kt = ceil_div(Nk, kTileK);
  // Query rows per chunk: whole tiles, as many as the budget allows (from the sizes only).
  const int64_t per_row = 2 * Nk + n_kt * (C + 1);
  const int64_t chunk = std::min(ceil_div(Nq, kTileQ) * kTileQ,
                                 std::max<int64_t>(1, kChunkBudget / (per_row * kTileQ)) * kTileQ);
  // Per key tile: its P and dP for the chunk (chunk x kTileK each), its D and dQ partials.
  at::Tensor p_store = at::empty({n_kt, chunk * kTileK}, acc_opts);
  at::Tensor dp_store = at::empty({n_kt, chunk * kTileK}, acc_opts);
  at::Tensor d_part = at::empty({n_kt, chunk}, acc_opts);
  at::Tensor dq_part = at::empty({n_kt, chunk, C}, acc_opts);
  const double* lse_p = lse.const_data_ptr<double>();

  // The dQ partials of a finished chunk are summed inside the next parallel region (each task
  // takes a fixed share of the rows), so a chunk costs two parallel regions, not four: every
  // region ends in a barrier, and on a busy machine each barrier waits for a descheduled thread.
  struct Chunk {
    int64_t b = -1, c0 = 0, n = 0;
  } pending;
  const auto reduce_dq_share = [&](int64_t task) {
    if (pending.b < 0) return;
    acc_t* dst = grad_qs.mutable_data_ptr<acc_t>() + (pending.b * Nq + pending.c0) * C;
    sum_parts_in_order(dq_part.const_data_ptr<acc_t>(), n_kt, chunk * C, C,
                       pending.n * task / n_kt, pending.n * (task + 1) / n_kt, dst);
  };
  for (int64_t b = 0; b < B; ++b) {
    // k^ of one batch entry and q^ of one chunk at a time: the backward's peak memory stays close
    // to its outputs.
    const at::Tensor kn = normalized_rows<scalar_t, acc_t>(key[b], 1.0, normalize, eps);
    for (int64_t c0 = 0; c0 < Nq; c0 += chunk) {
      const int64_t n_chunk = std::min(chunk, Nq - c0);
      const at::Tensor qs = normalized_rows<scalar_t, acc_t>(
          query[b].narrow(0, c0, n_chunk), 1.0 / temperature, normalize, eps, /*serial=*/true);
      // The (nq x nk) tile of key tile kt and the chunk's rows [r0, r0 + nq), contiguous.
      const auto tile = [&](const at::Tensor& store, int64_t kt, int64_t r0, int64_t nq) {
        const int64_t nk = std::min(kTileK, Nk - kt * kTileK);
        return store[kt].narrow(0, r0 * nk, nq * nk).view({nq, nk});
      };
      at::parallel_for(0, n_kt, 1, [&](int64_t begin, int64_t end) {  // phase 1
        for (int64_t kt = begin; kt < end; ++kt) {
          reduce_dq_share(kt);
          const int64_t k0 = kt * kTileK, nk = std::min(kTileK, Nk - k0);
          for (int64_t r0 = 0; r0 < n_chunk; r0 += kTileQ) {
            const int64_t nq = std::min(kTileQ, n_chunk - r0), q0 = c0 + r0;
            at::Tensor p = tile(p_store, kt, r0, nq);
            at::Tensor dp = tile(dp_store, kt, r0, nq);
            at::mm_out(p, qs.narrow(0, r0, nq), kn.narrow(0, k0, nk).t());
            acc_t* pp = p.mutable_data_ptr<acc_t>();
            for (int64_t i = 0; i < nq; ++i) {
              const SplitLse<acc_t> lse_i = split_lse<acc_t>(lse_p[b * Nq + q0 + i]);
              for (int64_t j = 0; j < nk; ++j)
                pp[i * nk + j] = score_minus_lse(pp[i * nk + j], lse_i);
            }
            p.exp_();  // softmax_prob, with ATen's vectorised exp
            at::mm_out(dp, d_out[b].narrow(0, q0, nq), v[b].narrow(0, k0, nk).t());
            const acc_t* dpp = dp.const_data_ptr<acc_t>();
            acc_t* dd = d_part[kt].mutable_data_ptr<acc_t>() + r0;
            for (int64_t i = 0; i < nq; ++i) dd[i] = row_dot(pp + i * nk, dpp + i * nk, nk);
          }
        }
      });
      at::parallel_for(0, n_kt, 1, [&](int64_t begin, int64_t end) {  // phase 2
        // D of the chunk's rows, summed by every task alike (n_kt values a row: cheaper than a
        // parallel region of its own).
        std::vector<acc_t> d_row(n_chunk);
        sum_parts_in_order(d_part.const_data_ptr<acc_t>(), n_kt, chunk, 1, 0, n_chunk,
                           d_row.data());
        for (int64_t kt = begin; kt < end; ++kt) {
          const int64_t k0 = kt * kTileK, nk = std::min(kTileK, Nk - k0);
          const at::Tensor k_tile = kn.narrow(0, k0, nk);
          at::Tensor gk_tile = grad_kn[b].narrow(0, k0, nk);
          at::Tensor gv_tile = grad_v[b].narrow(0, k0, nk);
          for (int64_t r0 = 0; r0 < n_chunk; r0 += kTileQ) {
            const int64_t nq = std::min(kTileQ, n_chunk - r0), q0 = c0 + r0;
            const at::Tensor p = tile(p_store, kt, r0, nq);
            at::Tensor ds = tile(dp_store, kt, r0, nq);
            const acc_t* pp = p.const_data_ptr<acc_t>();
            acc_t* dsp = ds.mutable_data_ptr<acc_t>();
            for (int64_t i = 0; i < nq; ++i)
              for (int64_t j = 0; j < nk; ++j)
                dsp[i * nk + j] = softmax_grad(pp[i * nk + j], dsp[i * nk + j], d_row[r0 + i]);
            gv_tile.addmm_(p.t(), d_out[b].narrow(0, q0, nq));
            gk_tile.addmm_(ds.t(), qs.narrow(0, r0, nq));
            at::Tensor part = dq_part[kt].narrow(0, r0, nq);
            at::mm_out(part, ds, k_tile);
          }
        }
      });
      pending = Chunk{b, c0, n_chunk};
    }
  }
  at::parallel_for(0, n_kt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kt = begin; kt < end; ++kt) reduce_dq_share(kt);
  });
  // Through the normalisation (and the 1/temperature folded into q^), row by row, in place.
  normalized_rows_backward<scalar_t, acc_t>(grad_qs, query, 1.0 / temperature, normalize, eps);
  normalized_rows_backward<scalar_t, acc_t>(grad_kn, key, 1.0, normalize, eps);
  const auto dtype = query.scalar_type();
  return {grad_qs.to(dtype), grad_kn.to(dtype), grad_v.to(dtype)};
}

// corr_warp on CPU.
//
// Args:
//   query:       (B, Nq, C) float32 | float16 | bfloat16 | float64, any strides.
//   key:         (B, Nk, C), dtype of query.
//   value:       (B, Nk, Cv), dtype of query.
//   temperature: softmax temperature, finite and > 0.
//   normalize:   centre and L2-normalise query and key rows over C first.
//   eps:         added to the row norms, > 0.
// Returns:
//   out: (B, Nq, Cv), dtype of query: softmax(q^ k^T / temperature) @ value; 0 when Nk == 0.
//   lse: (B, Nq), float64: per-row log-sum-exp of the scores q^ k^T / temperature, -inf when
//        Nk == 0. Saved for the backward.
std::tuple<at::Tensor, at::Tensor> corr_warp_cpu(const at::Tensor& query, const at::Tensor& key,
                                                 const at::Tensor& value, double temperature,
                                                 bool normalize, double eps) {
  check_inputs(query, key, value, temperature, eps);
  // The tile GEMMs below are ATen calls on views of the inputs, which may require grad; the
  // autograd formula of this op is registered in Python, so they must not record a graph. The
  // guard covers this thread; the inputs are detached because OpenMP workers do not inherit it.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [out, lse] = forward_outputs(query, key, value);
  if (forward_is_trivial(query, key)) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "corr_warp_cpu",
                                  [&] {
                                    corr_warp_forward_impl<scalar_t>(
                                        query.detach().contiguous(), key.detach().contiguous(),
                                        value.detach().contiguous(),
                                        temperature, normalize, eps, out, lse);
                                  });
  return {out, lse};
}

// _corr_warp_backward on CPU.
//
// Args:
//   grad_out:    (B, Nq, Cv), dtype of query: dL/dout.
//   query, key, value, temperature, normalize, eps: as given to corr_warp.
//   out, lse:    the two outputs of corr_warp for these inputs (this kernel only needs lse:
//                it sums D = rowsum(P * dP) itself, see corr_warp_backward_impl).
// Returns:
//   grad_query (B, Nq, C), grad_key (B, Nk, C), grad_value (B, Nk, Cv), dtype of query,
//   contiguous. Bitwise reproducible for any thread count.
std::tuple<at::Tensor, at::Tensor, at::Tensor> corr_warp_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse, double temperature,
    bool normalize, double eps) {
  check_backward_inputs(grad_out, query, key, value, out, lse, temperature, eps);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in corr_warp_cpu
  if (forward_is_trivial(query, key)) return zero_grads(query, key, value);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, query.scalar_type(), "corr_warp_backward_cpu", [&] {
        grads = corr_warp_backward_impl<scalar_t>(
            grad_out.detach().contiguous(), query.detach().contiguous(),
            key.detach().contiguous(), value.detach().contiguous(), lse.detach().contiguous(),
            temperature, normalize, eps);
      });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(pncc, CPU, m) {
  m.impl("corr_warp", &corr_warp_cpu);
  m.impl("_corr_warp_backward", &corr_warp_backward_cpu);
}

}  // namespace corr
}  // namespace pncc
