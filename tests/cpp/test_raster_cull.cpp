// The culling variants of csrc/raster/raster_cull.h against the scalar one and against the
// per-triangle bounds of raster_math.h: same survivors, same order and same bounds, on every
// batch size (vector tails included), for vertices inside, outside and far outside the image;
// the culling from float32 vertices with its gathers and with its two-window permutes.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "raster/raster_band.h"
#include "raster/raster_cull.h"
#include "raster/raster_math.h"

using namespace pncc::raster;

namespace {

struct Workload {
  std::vector<float> vertices;  // (V, 3) image space
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
      const float x = cx + size * unit(rng), y = cy + size * unit(rng);
      w.vertices.insert(w.vertices.end(), {x, y, 1.f});
      w.points.push_back(vertex_fixed_point(x, y, height, width));
      w.faces.push_back(3 * f + v);
    }
    // Clamped and non-finite coordinates: the culling from vertices must form the same points.
    if (f % 23 == 0) w.vertices[w.vertices.size() - 3] = std::numeric_limits<float>::quiet_NaN();
    if (f % 29 == 0) w.vertices[w.vertices.size() - 2] = -std::numeric_limits<float>::infinity();
    if (f % 23 == 0 || f % 29 == 0) {
      const size_t last = w.points.size() - 1;
      w.points[last] = vertex_fixed_point(w.vertices[3 * last], w.vertices[3 * last + 1], height,
                                          width);
    }
  }
  return w;
}

// A jittered grid over and around the image, its faces stored row by row like a scanned face
// mesh's: a batch of 16 faces then references two rows of 16 consecutive vertices or fewer, the
// culling's gather-free path (see grid_batches_fit_two_windows).
Workload grid_workload(int grid_cols, int grid_rows, int height, int width, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> jitter(-0.3f, 0.3f), depth(0.f, 2.f);
  Workload w;
  for (int r = 0; r <= grid_rows; ++r)
    for (int c = 0; c <= grid_cols; ++c) {
      const float x = -3.f + (width + 6.f) * c / grid_cols + jitter(rng);
      const float y = -3.f + (height + 6.f) * r / grid_rows + jitter(rng);
      w.vertices.insert(w.vertices.end(), {x, y, depth(rng)});
      w.points.push_back(vertex_fixed_point(x, y, height, width));
    }
  for (int r = 0; r < grid_rows; ++r)
    for (int c = 0; c < grid_cols; ++c) {
      const int32_t a = r * (grid_cols + 1) + c, b = a + 1, d = a + grid_cols + 1, e = d + 1;
      w.faces.insert(w.faces.end(), {a, b, d, b, e, d});
    }
  return w;
}

// Whether every batch of 16 faces starting at `first` references at most two windows of 16
// consecutive vertices (the condition of the culling's gather-free path).
bool fits_two_windows(const Workload& w, int first, int count) {
  int lo = 1 << 30, hi = -1;
  for (int i = 3 * first; i < 3 * (first + count); ++i)
    lo = std::min(lo, w.faces[i]), hi = std::max(hi, w.faces[i]);
  const int base_b = std::max(lo + 16, hi - 15);
  for (int i = 3 * first; i < 3 * (first + count); ++i)
    if (!(w.faces[i] < lo + 16 || (w.faces[i] >= base_b && w.faces[i] < base_b + 16))) return false;
  return true;
}

}  // namespace

TEST_CASE(grid_batches_fit_two_windows) {
  // The grid workloads take the gather-free path, the random one the gathers.
  for (const Workload& w : {grid_workload(60, 40, 96, 128, 3), grid_workload(6, 400, 96, 128, 4)}) {
    int fit = 0, batches = 0;
    for (int f = 0; f + 16 <= int(w.faces.size() / 3); f += 16, ++batches)
      fit += fits_two_windows(w, f, 16);
    std::printf("  %d of %d grid batches fit two windows\n", fit, batches);
    CHECK(fit > batches / 2);
  }
  const Workload random = random_workload(1000, 96, 128, 9);
  for (int f = 0; f + 16 <= 1000; f += 16) CHECK(!fits_two_windows(random, f, 16));
}

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

// The culling from float32 vertices forms the fixed points itself: the same survivors and bounds
// as the culling from the table, and every survivor's corner coordinates.
TEST_CASE(culling_from_vertices_keeps_the_table_culling_survivors_and_coordinates) {
  const int height = 96, width = 128;
  int tested = 0;
  // Random triangles (every batch gathers) and grids (most batches permute two windows of
  // vertices; on the narrow grid the second window of the last batches runs past the last
  // vertex).
  for (const Workload& w : {random_workload(1000, height, width, 9),
                            grid_workload(60, 40, height, width, 3),
                            grid_workload(6, 400, height, width, 4)})
  for (cull::Variant variant : {cull::Variant::kScalar, cull::Variant::kAvx2,
                                cull::Variant::kAvx512}) {
    const cull::VectorKernels kernels = cull::vector_kernels(variant);
    const cull::CullVerticesFn fn = kernels.cull;
    CHECK((fn != nullptr) == (kernels.cover != nullptr));
    if (fn == nullptr || !cull::supported(variant)) continue;
    ++tested;
    // Batches of every size from 1 up, then the last faces (whose windows reach the last vertex).
    const int num_faces = int(w.faces.size() / 3);
    std::vector<std::pair<int, int>> batches;  // (first, count)
    for (int first = 0, count = 1; first + count <= num_faces && count <= cull::Survivors::kBatch;
         first += count, ++count)
      batches.push_back({first, count});
    for (int count : {cull::Survivors::kBatch, 37, 1}) batches.push_back({num_faces - count, count});
    for (const auto& [row_begin, row_end] : {std::pair{0, height}, std::pair{40, 96}}) {
      for (const auto& [first, count] : batches) {
        cull::Survivors want, got;
        const int m = cull::function(cull::Variant::kScalar)(w.points.data(), w.faces.data(), first,
                                                            count, row_begin, row_end, width, want);
        const int n = fn(w.vertices.data(), int64_t(w.vertices.size() / 3), w.faces.data(), first,
                         count, row_begin, row_end, height, width, got);
        CHECK(n == m);
        for (int k = 0; k < std::min(n, m); ++k) {
          CHECK(got.face[k] == want.face[k]);
          const SampleBounds g = got.bounds(k), s = want.bounds(k);
          CHECK(g.col0 == s.col0 && g.col1 == s.col1 && g.row0 == s.row0 && g.row1 == s.row1);
          for (int v = 0; v < 3; ++v) {
            const int32_t vertex = w.faces[3 * want.face[k] + v];
            CHECK(std::memcmp(&got.x[v][k], &w.vertices[3 * vertex], sizeof(float)) == 0);
            CHECK(std::memcmp(&got.y[v][k], &w.vertices[3 * vertex + 1], sizeof(float)) == 0);
            CHECK(std::memcmp(&got.z[v][k], &w.vertices[3 * vertex + 2], sizeof(float)) == 0);
          }
        }
      }
    }
  }
  std::printf("  %d variants cull from vertices\n", tested);
}

TEST_CASE(variant_names_round_trip) {
  CHECK(std::string(cull::name(cull::Variant::kAvx512)) == "avx512");
  CHECK(std::string(cull::name(cull::Variant::kAvx2)) == "avx2");
  CHECK(std::string(cull::name(cull::Variant::kScalar)) == "scalar");
  CHECK(cull::supported(cull::Variant::kScalar));
}

// Small triangles (one to a few samples: the vector coverage test's jobs) and larger ones,
// with exact ties, degenerate, sliver and non-finite triangles among them, in a 64 x 48 image.
struct HostileMesh {
  static constexpr int height = 48, width = 64;
  std::vector<float> vertices;
  std::vector<int32_t> faces;

  HostileMesh() {
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> centre(-4.f, 68.f), unit(-1.f, 1.f), depth(0.f, 4.f);
    const float kNaN = std::numeric_limits<float>::quiet_NaN();
    for (int f = 0; f < 3000; ++f) {
      const float cx = centre(rng), cy = centre(rng) * height / width;
      const float size = f % 9 == 0 ? 6.f : f % 3 == 0 ? 1.5f : 0.7f;
      for (int v = 0; v < 3; ++v) {
        float x = cx + size * unit(rng), y = cy + size * unit(rng);
        if (f % 13 == 0) x = std::round(x), y = std::round(y);  // samples exactly on edges
        vertices.insert(vertices.end(), {x, y, f % 7 == 0 ? 1.f : depth(rng)});  // depth ties
        faces.push_back(3 * f + v);
      }
      if (f % 31 == 0) vertices[vertices.size() - 3] = vertices[vertices.size() - 6];  // sliver
      if (f % 37 == 0) {  // degenerate: the third vertex on the first
        vertices[vertices.size() - 3] = vertices[vertices.size() - 9];
        vertices[vertices.size() - 2] = vertices[vertices.size() - 8];
      }
      if (f % 41 == 0) vertices[vertices.size() - 1] = kNaN;
      if (f % 43 == 0) vertices[vertices.size() - 2] = kNaN;
    }
  }

  MeshView<float> view() const {
    return {vertices.data(), faces.data(), 1, int64_t(vertices.size() / 3),
            int64_t(faces.size() / 3), height, width};
  }
};

TEST_CASE(every_variant_rasterizes_bit_identically) {
  const HostileMesh hostile;
  const MeshView<float> mesh = hostile.view();
  const int height = HostileMesh::height, width = HostileMesh::width;
  BandBuffer<float> scalar_band, band;
  for (const auto& [row_begin, row_end] : {std::pair{0, height}, std::pair{7, 30}}) {
    const RasterizedBand<float> want =
        scalar_band.rasterize(mesh, 0, row_begin, row_end, cull::Variant::kScalar);
    int covered = 0;
    for (int64_t p = 0; p < int64_t(row_end - row_begin) * width; ++p) covered += want.face(p) >= 0;
    CHECK(covered > width);
    for (cull::Variant variant : {cull::Variant::kAvx2, cull::Variant::kAvx512}) {
      if (!cull::supported(variant)) continue;
      const RasterizedBand<float> got = band.rasterize(mesh, 0, row_begin, row_end, variant);
      for (int64_t p = 0; p < int64_t(row_end - row_begin) * width; ++p) {
        CHECK(got.keys[p] == want.keys[p]);
        if (want.face(p) >= 0)
          CHECK(std::memcmp(got.values + 4 * p, want.values + 4 * p, 4 * sizeof(float)) == 0);
      }
    }
  }
}

int main() { return pncc_test::run_all(); }
