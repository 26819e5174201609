// Unit tests of the rasterizer's shared maths (csrc/raster/raster_math.h, raster_core.h), built
// without torch so that they also run under AddressSanitizer and UBSan (CMake PNCC_SANITIZE).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "raster/raster_band.h"
#include "raster/raster_core.h"

using namespace pncc::raster;

namespace {

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

// z-buffer of a whole image through the same zbuffer_face the CPU and CUDA kernels use.
std::vector<uint64_t> zbuffer(const std::vector<float>& vertices, const std::vector<int32_t>& faces,
                              int height, int width) {
  MeshView<float> mesh{vertices.data(), faces.data(), 1, int64_t(vertices.size() / 3),
                       int64_t(faces.size() / 3), height, width};
  std::vector<uint64_t> keys(size_t(height) * width, kEmptyKey);
  for (int64_t f = 0; f < mesh.num_faces; ++f)
    zbuffer_face(mesh, 0, f, 0,
                 BoundsFromVertices<float>{vertices.data(), height, width, 0, height},
                 [&](int64_t offset, uint64_t key, const float*, float) {
      CHECK(offset >= 0 && offset < int64_t(keys.size()));
      if (key < keys[offset]) keys[offset] = key;
    });
  return keys;
}

}  // namespace

TEST_CASE(edge_function_is_exactly_antisymmetric) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-50.f, 50.f);
  for (int i = 0; i < 100000; ++i) {
    const float ax = u(rng), ay = u(rng), bx = u(rng), by = u(rng), px = u(rng), py = u(rng);
    CHECK(Edge<float>(ax, ay, bx, by)(px, py) == -Edge<float>(bx, by, ax, ay)(px, py));
  }
}

// Sample bounds of a triangle with the given x coordinates (y = 0) in a 10x10 image.
SampleBounds x_bounds(float x0, float x1, float x2) {
  return triangle_sample_bounds(vertex_fixed_point(x0, 0.f, 10, 10),
                                vertex_fixed_point(x1, 0.f, 10, 10),
                                vertex_fixed_point(x2, 0.f, 10, 10), 0, 10, 10);
}

TEST_CASE(fixed_point_bounds_handle_nan_infinities_and_huge_values) {
  CHECK(is_empty(x_bounds(2.2f, 2.8f, 2.5f)));  // sub-pixel: no sample inside
  const SampleBounds b = x_bounds(1.5f, 4.5f, 2.0f);
  CHECK(b.col0 == 2 && b.col1 == 4 && b.row0 == 0 && b.row1 == 0);
  CHECK(x_bounds(2.f, 2.f, 2.f).col0 == 2 && x_bounds(2.f, 2.f, 2.f).col1 == 2);
  CHECK(x_bounds(-1e10f, 1e10f, 0.f).col0 == 0 && x_bounds(-1e10f, 1e10f, 0.f).col1 == 9);
  CHECK(x_bounds(-kInf, kInf, 0.f).col0 == 0 && x_bounds(-kInf, kInf, 0.f).col1 == 9);
  CHECK(is_empty(x_bounds(1e10f, 2e10f, 3e10f)) && is_empty(x_bounds(-3.f, -2.f, -1e10f)));
  CHECK(is_empty(x_bounds(9.5f, 1e10f, kInf)) && is_empty(x_bounds(-0.5f, -0.1f, -kInf)));
  const SampleBounds n = x_bounds(kNaN, kNaN, kNaN);  // clamped, never cast out of range
  CHECK(n.col0 >= 0 && n.col1 <= 9);
  // Band restriction.
  const FixedPoint v = vertex_fixed_point(3.f, 7.f, 10, 10);
  CHECK(is_empty(triangle_sample_bounds(v, v, v, 0, 7, 10)));
  CHECK(!is_empty(triangle_sample_bounds(v, v, v, 0, 10, 10)));
}

TEST_CASE(fixed_point_bounds_are_never_narrower_than_exact_ones) {
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> u(-3.f, 260.f);
  int exact = 0;
  for (int trial = 0; trial < 200000; ++trial) {
    const float x[3] = {u(rng), u(rng), u(rng)};
    const float lo = std::min(std::min(x[0], x[1]), x[2]), hi = std::max(std::max(x[0], x[1]), x[2]);
    const int first = std::max(0, int(std::ceil(lo))), last = std::min(255, int(std::floor(hi)));
    const SampleBounds b = triangle_sample_bounds(vertex_fixed_point(x[0], 0.f, 256, 256),
                                                  vertex_fixed_point(x[1], 0.f, 256, 256),
                                                  vertex_fixed_point(x[2], 0.f, 256, 256), 0, 256, 256);
    if (first <= last) CHECK(b.col0 <= first && b.col1 >= last);
    exact += (first <= last) ? (b.col0 == first && b.col1 == last) : (b.col0 > b.col1);
  }
  CHECK(exact > 195000);  // wider only within 1/256 px of a sample
}

TEST_CASE(non_finite_or_degenerate_triangles_are_rejected) {
  Triangle<float> tri;
  const SampleBounds all{0, 9, 0, 9};
  const float good[3][3] = {{1, 1, 0}, {8, 2, 0}, {3, 7, 0}};
  CHECK(setup_triangle(good[0], good[1], good[2], all, tri));
  for (int corner = 0; corner < 3; ++corner) {
    for (int axis = 0; axis < 2; ++axis) {
      for (float bad : {kNaN, kInf, -kInf}) {
        float v[3][3];
        for (int i = 0; i < 9; ++i) v[i / 3][i % 3] = good[i / 3][i % 3];
        v[corner][axis] = bad;
        CHECK(!setup_triangle(v[0], v[1], v[2], all, tri));
      }
    }
  }
  const float line[3][3] = {{1, 1, 0}, {5, 5, 0}, {3, 3, 0}};
  CHECK(!setup_triangle(line[0], line[1], line[2], all, tri));
  // A non-finite z passes setup but covers no sample.
  const float bad_z[3][3] = {{1, 1, kInf}, {8, 2, 0}, {3, 7, 0}};
  const std::vector<float> verts(&bad_z[0][0], &bad_z[0][0] + 9);
  for (uint64_t key : zbuffer(verts, {0, 1, 2}, 10, 10)) CHECK(key == kEmptyKey);
}

TEST_CASE(depth_key_orders_nearer_first_then_lower_face) {
  CHECK(depth_key(2.f, 7) < depth_key(1.f, 0));
  CHECK(depth_key(-1.f, 7) < depth_key(-2.f, 0));
  CHECK(depth_key(0.5f, 3) < depth_key(0.5f, 4));
  CHECK(depth_key(0.f, 3) == depth_key(-0.f, 3));
  CHECK(depth_key(1e30f, 0) < depth_key(-1e30f, 0));
  CHECK(depth_key(-1e30f, 2147483647) < kEmptyKey);
  CHECK(key_face(depth_key(3.f, 12345)) == 12345 && key_face(kEmptyKey) == -1);
}

TEST_CASE(shared_edges_are_watertight) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(0.f, 7.f);
  int edge_samples = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    float p[4][2];
    for (auto& q : p)
      for (float& c : q) c = trial % 2 ? u(rng) : std::round(u(rng) * 2) / 2;
    auto side = [&](const float* q) {
      return (p[1][0] - p[0][0]) * (q[1] - p[0][1]) - (p[1][1] - p[0][1]) * (q[0] - p[0][0]);
    };
    const float sc = side(p[2]), sd = side(p[3]);
    if (sc == 0 || sd == 0 || (sc > 0) == (sd > 0)) continue;  // need C, D on opposite sides
    std::vector<float> verts;
    for (auto& q : p) verts.insert(verts.end(), {q[0], q[1], 0.f});
    const bool cw = trial % 4 >= 2;
    const std::vector<int32_t> t0 = cw ? std::vector<int32_t>{2, 1, 0} : std::vector<int32_t>{0, 1, 2};
    const std::vector<int32_t> t1 = cw ? std::vector<int32_t>{3, 0, 1} : std::vector<int32_t>{1, 0, 3};
    const auto k0 = zbuffer(verts, t0, 8, 8), k1 = zbuffer(verts, t1, 8, 8);
    for (int i = 0; i < 64; ++i) {
      CHECK(!(k0[i] != kEmptyKey && k1[i] != kEmptyKey));  // never covered twice
      const float q[2] = {float(i % 8), float(i / 8)};
      if (side(q) == 0) {
        // On the open shared edge (strictly between A and B): covered exactly once.
        const float t = (std::fabs(p[1][0] - p[0][0]) > std::fabs(p[1][1] - p[0][1]))
                            ? (q[0] - p[0][0]) / (p[1][0] - p[0][0])
                            : (q[1] - p[0][1]) / (p[1][1] - p[0][1]);
        if (t > 0 && t < 1) {
          ++edge_samples;
          CHECK((k0[i] != kEmptyKey) != (k1[i] != kEmptyKey));
        }
      }
    }
  }
  std::printf("  %d samples on shared edges\n", edge_samples);
  CHECK(edge_samples > 500);
}

TEST_CASE(resolve_reproduces_the_coverage_barycentrics_bit_for_bit) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-2.f, 12.f);
  int covered = 0;
  for (int trial = 0; trial < 5000; ++trial) {
    float v[3][3];
    for (auto& q : v)
      for (float& c : q) c = u(rng);
    Triangle<float> tri;
    const SampleBounds bounds = BoundsFromVertices<float>{&v[0][0], 10, 10, 0, 10}(0, 1, 2);
    if (is_empty(bounds) || !setup_triangle(v[0], v[1], v[2], bounds, tri)) continue;
    for (int row = bounds.row0; row <= bounds.row1; ++row)
      for (int col = bounds.col0; col <= bounds.col1; ++col) {
        float b0[3] = {}, b1[3] = {}, d0 = 0, d1 = 0;
        if (!cover_sample(tri, float(col), float(row), b0, d0)) continue;
        ++covered;
        CHECK(resolve_sample(v[0], v[1], v[2], float(col), float(row), b1, d1));
        CHECK(b0[0] == b1[0] && b0[1] == b1[1] && b0[2] == b1[2] && d0 == d1);
        CHECK(std::fabs(b0[0] + b0[1] + b0[2] - 1.f) < 1e-5f);
      }
  }
  CHECK(covered > 10000);
}

TEST_CASE(barycentric_backward_matches_finite_differences) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> u(0.0, 10.0), g(-1.0, 1.0);
  for (int trial = 0; trial < 200; ++trial) {
    double v[3][3];
    for (auto& q : v)
      for (double& c : q) c = u(rng);
    const double px = u(rng), py = u(rng);
    double bary[3], depth;
    if (!resolve_sample(v[0], v[1], v[2], px, py, bary, depth)) continue;
    const double grad_bary[3] = {g(rng), g(rng), g(rng)}, grad_depth = g(rng);
    const double* corners[3] = {v[0], v[1], v[2]};
    double grad[9];
    bary_depth_backward(corners, bary, grad_bary, grad_depth, grad);
    auto loss = [&]() {
      double b[3] = {}, d = 0;
      resolve_sample(v[0], v[1], v[2], px, py, b, d);
      return b[0] * grad_bary[0] + b[1] * grad_bary[1] + b[2] * grad_bary[2] + d * grad_depth;
    };
    for (int i = 0; i < 9; ++i) {
      const double h = 1e-6, saved = v[i / 3][i % 3];
      v[i / 3][i % 3] = saved + h;
      const double up = loss();
      v[i / 3][i % 3] = saved - h;
      const double down = loss();
      v[i / 3][i % 3] = saved;
      const double numeric = (up - down) / (2 * h);
      CHECK(std::fabs(numeric - grad[i]) <= 1e-4 * (1 + std::fabs(numeric)));
    }
  }
}

TEST_CASE(band_buffer_matches_the_per_face_zbuffer_in_any_banding) {
  // Overlapping random triangles, some huge, some with NaN or infinite corners.
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(-4.f, 36.f), z(0.f, 10.f);
  std::vector<float> vertices;
  std::vector<int32_t> faces;
  for (int f = 0; f < 300; ++f) {
    for (int corner = 0; corner < 3; ++corner) vertices.insert(vertices.end(), {u(rng), u(rng), z(rng)});
    faces.insert(faces.end(), {3 * f, 3 * f + 1, 3 * f + 2});
  }
  vertices[3 * 7] = kNaN;
  vertices[3 * 20 + 1] = kInf;
  vertices[3 * 40] = -1e10f;
  vertices[3 * 41] = 1e10f;
  const int height = 32, width = 32;
  const auto whole = zbuffer(vertices, faces, height, width);
  MeshView<float> mesh{vertices.data(), faces.data(), 1, int64_t(vertices.size() / 3),
                       int64_t(faces.size() / 3), height, width};
  BandBuffer<float> band;
  for (int split : {1, 7, 16, 31}) {
    for (const auto& rows : {std::pair<int, int>{0, split}, std::pair<int, int>{split, height}}) {
      const RasterizedBand<float> result = band.rasterize(mesh, 0, rows.first, rows.second);
      for (int row = rows.first; row < rows.second; ++row)
        for (int col = 0; col < width; ++col) {
          const int64_t offset = int64_t(row - rows.first) * width + col;
          const uint64_t key = whole[size_t(row) * width + col];
          CHECK(result.face(offset) == key_face(key));
          if (key_face(key) < 0) continue;
          // The stored weights are what the CUDA resolve pass recomputes.
          const int32_t* idx = faces.data() + 3 * key_face(key);
          float bary[3] = {}, depth = 0;
          CHECK(resolve_sample(&vertices[3 * idx[0]], &vertices[3 * idx[1]], &vertices[3 * idx[2]],
                               float(col), float(row), bary, depth));
          CHECK(result.bary(offset)[0] == bary[0] && result.bary(offset)[1] == bary[1] &&
                result.bary(offset)[2] == bary[2] && result.depth(offset) == depth);
        }
    }
  }
}

int main() { return pncc_test::run_all(); }
