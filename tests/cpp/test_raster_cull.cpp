// The culling variants of csrc/raster/raster_cull.h against the scalar one and against the
// per-triangle bounds of raster_math.h: same survivors, same order, same bounds, on every batch
// size (vector tails included), for vertices inside, outside and far outside the image.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "raster/raster_cull.h"
#include "raster/raster_math.h"

using namespace pncc::raster;

namespace {

struct Workload {
  std::vector<FixedPoint> points;
  std::vector<int32_t> faces;
};

// Small triangles scattered over and around a width x height image (most sub-pixel, as on a
// real face mesh), plus some huge and some far-off ones; fixed points as raster_band.h makes them.
Workload random_workload(int num_faces, int height, int width, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> centre(-20.f, float(width) + 20.f), unit(-1.f, 1.f);
  Workload w;
  for (int f = 0; f < num_faces; ++f) {
    const float cx = centre(rng), cy = centre(rng) * height / width;
    const float size = f % 17 == 0 ? 400.f : f % 5 == 0 ? 3.f : 0.6f;
    for (int v = 0; v < 3; ++v) {
      w.points.push_back(vertex_fixed_point(cx + size * unit(rng), cy + size * unit(rng), height,
                                            width));
      w.faces.push_back(3 * f + v);
    }
  }
  return w;
}

}  // namespace

TEST_CASE(every_variant_keeps_the_scalar_survivors_and_bounds) {
  const int height = 96, width = 128;
  const Workload w = random_workload(1000, height, width, 7);
  int tested = 0;
  for (cull::Variant variant : {cull::Variant::kScalar, cull::Variant::kAvx2,
                                cull::Variant::kAvx512}) {
    if (!cull::supported(variant)) continue;
    ++tested;
    const cull::CullFn fn = cull::function(variant);
    // Bands of rows, and every batch size from 1 to kBatch, so that vector tails are exercised.
    for (const auto& [row_begin, row_end] : {std::pair{0, height}, std::pair{10, 11},
                                            std::pair{40, 96}}) {
      int first = 0;
      for (int count = 1; first + count <= int(w.faces.size() / 3) &&
                          count <= cull::Survivors::kBatch; first += count, ++count) {
        cull::Survivors got;
        const int n = fn(w.points.data(), w.faces.data(), first, count, row_begin, row_end, width,
                         got);
        int expected = 0;
        for (int f = first; f < first + count; ++f) {
          const SampleBounds s = triangle_sample_bounds(
              w.points[w.faces[3 * f]], w.points[w.faces[3 * f + 1]],
              w.points[w.faces[3 * f + 2]], row_begin, row_end, width);
          if (is_empty(s)) continue;
          CHECK(expected < n);
          if (expected >= n) break;
          const SampleBounds g = got.bounds(expected);
          CHECK(got.face[expected] == f);
          CHECK(g.col0 == s.col0 && g.col1 == s.col1 && g.row0 == s.row0 && g.row1 == s.row1);
          ++expected;
        }
        CHECK(n == expected);
      }
    }
  }
  std::printf("  %d culling variants supported and tested\n", tested);
  CHECK(tested >= 1);
}

TEST_CASE(variant_names_round_trip) {
  CHECK(std::string(cull::name(cull::Variant::kAvx512)) == "avx512");
  CHECK(std::string(cull::name(cull::Variant::kAvx2)) == "avx2");
  CHECK(std::string(cull::name(cull::Variant::kScalar)) == "scalar");
  CHECK(cull::supported(cull::Variant::kScalar));
}

int main() { return pncc_test::run_all(); }
