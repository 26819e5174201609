// The time split of the project's CPU rasterizer for bench_raster.py (called through ctypes):
// the same band z-buffer render_pncc runs (raster_band.h, one band = the whole image, one thread)
// timed in its three parts. bench_raster.py compiles it with the extension's flags.
//   cull:    every vertex's fixed point, then every triangle's bounds and emptiness test
//            (raster_cull.h, in the variant asked for);
//   cover:   the survivors' triangle setup and pixel coverage (full rasterize minus cull; the
//            avx512 variant tests small triangles' samples 16 at a time);
//   resolve: the PNCC image and mask from the z-buffer, as render_pncc_cpu writes them
//            (resolve_pncc_band: 16 pixels at a time in the avx512 variant).
#include <algorithm>
#include <cstring>
#include <ctime>
#include <vector>

#include "raster/raster_band.h"
#include "raster/raster_core.h"
#include "raster/raster_cull.h"

using namespace pncc::raster;

namespace {

// This thread's CPU time: on a shared machine a sub-millisecond phase fits in one time slice and
// a longer one does not, so wall-clock phases would not add up.
double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

// out: [cull s, cover s, resolve s, surviving triangles, covered pixels] (medians of `repeats`,
// thread CPU time).
// Returns 0, or -1 when `variant` is unknown or unsupported on this CPU.
extern "C" int raster_split(const float* vertices, int num_vertices, const int32_t* faces,
                            int num_faces, const float* ncc, int height, int width,
                            const char* variant, int repeats, double* out) {
  bool found = false;
  cull::Variant fn = cull::Variant::kScalar;
  for (cull::Variant v : {cull::Variant::kScalar, cull::Variant::kAvx2, cull::Variant::kAvx512})
    if (std::strcmp(variant, cull::name(v)) == 0 && cull::supported(v)) {
      fn = v;
      found = true;
    }
  if (!found) return -1;
  const MeshView<float> mesh{vertices, faces, 1, num_vertices, num_faces, height, width};
  const int64_t plane = int64_t(height) * width;
  std::vector<float> pncc(3 * plane), mask(plane);
  BandBuffer<float> band;
  std::vector<double> cull_s, raster_s, resolve_s;
  int64_t survivors = 0, covered = 0;
  for (int rep = 0; rep < repeats + 2; ++rep) {  // two warm-up rounds
    double start = thread_seconds();
    survivors = band.count_survivors(mesh, 0, 0, height, fn);
    const double c = thread_seconds() - start;
    start = thread_seconds();
    const RasterizedBand<float> result = band.rasterize(mesh, 0, 0, height, fn);
    const double r = thread_seconds() - start;
    start = thread_seconds();
    resolve_pncc_band(result, plane, ncc, mesh, pncc.data(), plane, mask.data(), fn);
    const double s = thread_seconds() - start;
    covered = 0;
    for (int64_t offset = 0; offset < plane; ++offset) covered += mask[offset] != 0.f;
    if (rep >= 2) {
      cull_s.push_back(c);
      raster_s.push_back(r);
      resolve_s.push_back(s);
    }
  }
  const double cull_median = median(cull_s);
  out[0] = cull_median;
  out[1] = std::max(0.0, median(raster_s) - cull_median);
  out[2] = median(resolve_s);
  out[3] = double(survivors);
  out[4] = double(covered);
  return 0;
}
