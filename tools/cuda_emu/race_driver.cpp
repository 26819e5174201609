// Runs every emulated CUDA kernel on small ragged sizes, for ThreadSanitizer (a missing barrier
// between shared-memory writes and reads is a data race between two emulated threads) and
// AddressSanitizer (out-of-bounds global or shared-memory accesses). Built and run by
// run_sanitizers.sh; the emulated sources (build.py --sources) are included so the
// anonymous-namespace entry points are callable.
#define EMU_NO_REGISTER
#include "corr_cuda_emu.cpp"
#include "raster_cuda_emu.cpp"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

at::Tensor randn(std::vector<int64_t> shape, at::ScalarType dtype, double scale = 1.0) {
  return (at::randn(shape, at::kDouble) * scale).to(dtype);
}

void corr_case(int64_t B, int64_t Nq, int64_t Nk, int64_t C, int64_t Cv, at::ScalarType dtype,
               double temperature, bool normalize) {
  const at::Tensor q = randn({B, Nq, C}, dtype), k = randn({B, Nk, C}, dtype),
                   v = randn({B, Nk, Cv}, dtype), go = randn({B, Nq, Cv}, dtype);
  auto [out, lse] = pncc::corr::corr_warp_cuda(q, k, v, temperature, normalize, 1e-6);
  auto [gq, gk, gv] =
      pncc::corr::corr_warp_backward_cuda(go, q, k, v, out, lse, temperature, normalize, 1e-6);
  const bool finite = at::isfinite(out).all().item<bool>() && at::isfinite(gq).all().item<bool>() &&
                      at::isfinite(gk).all().item<bool>() && at::isfinite(gv).all().item<bool>();
  std::printf("corr_warp B=%ld Nq=%ld Nk=%ld C=%ld Cv=%ld %s: %s\n", long(B), long(Nq), long(Nk),
              long(C), long(Cv), c10::toString(dtype), finite ? "finite" : "NOT FINITE");
  // A read of a buffer that a copy has poisoned (cp.async before the barrier that frees it) shows
  // up here as NaN when the OS threads happen to interleave so; it fails the run.
  if (!finite) std::exit(1);
}

void raster_case(int64_t B, int64_t V, int64_t F, int64_t H, int64_t W, at::ScalarType dtype) {
  at::Tensor verts = at::rand({B, V, 3}, at::kDouble);
  verts.select(2, 0).mul_(W * 1.2).sub_(W * 0.1);
  verts.select(2, 1).mul_(H * 1.2).sub_(H * 0.1);
  verts = verts.to(dtype);
  const at::Tensor faces = at::randint(0, V, {F, 3}, at::kInt);
  auto [face_index, bary, depth] = pncc::raster::rasterize_cuda(verts, faces, H, W);
  const at::Tensor gv = pncc::raster::rasterize_backward_cuda(at::randn_like(bary),
                                                              at::randn_like(depth), verts, faces,
                                                              face_index, bary);
  const at::Tensor attrs = at::rand({1, V, 5}, dtype);
  const at::Tensor img = pncc::raster::interpolate_cuda(attrs, faces, face_index, bary);
  auto [ga, gb] = pncc::raster::interpolate_backward_cuda(at::randn_like(img), attrs, faces,
                                                          face_index, bary);
  auto [pncc_img, mask] =
      pncc::raster::render_pncc_cuda(verts, faces, at::rand({V, 3}, dtype), H, W);
  std::printf("raster B=%ld V=%ld F=%ld %ldx%ld %s: %ld covered\n", long(B), long(V), long(F),
              long(H), long(W), c10::toString(dtype), long(mask.sum().item<double>()));
}

// The CUDA path does not range-check index values (that would need a host sync): the kernels
// must guard. Calls the launchers directly with out-of-range faces and face_index values, so
// AddressSanitizer sees any read they let through, and checks the guarded results.
void raster_bad_index_case() {
  using namespace pncc::raster;
  using namespace pncc::raster::kernels;
  const int64_t V = 4, H = 6, W = 6;
  std::vector<float> verts = {0, 0, 1, 6, 0, 1, 0, 6, 1, 6, 6, 1};
  // Face 0 is valid; faces 1 and 2 index past the vertices and below zero.
  std::vector<int32_t> faces = {0, 1, 2, 1, 3, int32_t(V + 5), -3, 2, 3};
  MeshView<float> mesh{verts.data(), faces.data(), 1, V, 3, int(H), int(W)};
  std::vector<unsigned long long> keys(H * W, ~0ull);
  launch_zbuffer(ZbufferParams<float>{mesh, keys.data()}, nullptr);
  std::vector<int32_t> face_index(H * W);
  std::vector<float> bary(3 * H * W), depth(H * W);
  launch_resolve_raster(ResolveRasterParams<float>{mesh, keys.data(), face_index.data(), bary.data(),
                                                   depth.data()},
                        nullptr);
  long covered = 0;
  for (const int32_t f : face_index) {
    if (f > 0) {
      std::printf("raster bad indices: a face with an out-of-range vertex was drawn\n");
      std::exit(1);
    }
    covered += f == 0;
  }
  // interpolate: out-of-range face_index values read as background.
  std::vector<int32_t> index = {0, -1, 3, -7, 1, 0};
  std::vector<float> attrs = {1, 2, 3, 4}, b(3 * index.size(), 1.f / 3), out(index.size(), -1.f);
  InterpolateParams<float> p{};
  p.attributes = attrs.data();
  p.num_vertices = V;
  p.channels = 1;
  p.faces = faces.data();
  p.num_faces = 3;
  p.face_index = index.data();
  p.bary = b.data();
  p.pixels = int64_t(index.size());
  p.total = int64_t(index.size());
  p.out = out.data();
  launch_interpolate(p, nullptr);
  // Pixel 4 names face 1, whose third vertex is out of range: background too.
  const float want[] = {2, 0, 0, 0, 0, 2};
  for (size_t i = 0; i < index.size(); ++i)
    if (std::fabs(out[i] - want[i]) > 1e-6f) {
      std::printf("interpolate bad indices: pixel %zu = %g, want %g\n", i, out[i], want[i]);
      std::exit(1);
    }
  std::printf("raster bad indices: guarded (%ld pixels of the valid face)\n", covered);
}

}  // namespace

int main() {
  at::set_num_threads(1);
  at::manual_seed(0);
  for (const auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    corr_case(2, 37, 53, 16, 5, dtype, 0.01, true);   // ragged everything, one tile
    corr_case(1, 70, 130, 40, 1, dtype, 0.05, true);  // two row blocks, three key tiles, Cv = 1
    corr_case(1, 1, 1, 1, 1, dtype, 0.1, true);       // N = 1, C = 1
    corr_case(1, 64, 64, 32, 16, dtype, 0.1, false);  // exact tiles, no normalisation
    corr_case(1, 20, 30, 8, 0, dtype, 0.1, true);     // no value channels
  }
  // The SIMT kernel's wide output window (fp32 Cv > 64: NB = 9) and its 16-bit fallback (C > 256
  // backward): ragged rows, two key tiles, two channel chunks.
  corr_case(1, 37, 70, 40, 80, at::kFloat, 0.05, true);
  corr_case(1, 20, 30, 264, 8, at::kBFloat16, 0.05, true);
  // Deterministic mode: the dQ pass (corr_flash_dq_kernel) instead of atomics, over two key tiles
  // (its V prefetch rides on a barrier of its own).
  at::globalContext().setDeterministicAlgorithms(true, false);
  corr_case(1, 37, 70, 16, 5, at::kHalf, 0.05, true);
  at::globalContext().setDeterministicAlgorithms(false, false);
  for (const auto dtype : {at::kFloat, at::kDouble}) {
    raster_case(2, 40, 60, 17, 23, dtype);
    raster_case(1, 3, 0, 5, 5, dtype);  // empty mesh
  }
  raster_bad_index_case();
  std::printf("done: %ld launches, %ld blocks\n", long(emu::stats().launches.load()),
              long(emu::stats().blocks.load()));
  return 0;
}
