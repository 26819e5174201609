// Unit tests of the rasterizer's shared maths (csrc/raster/raster_math.h, raster_core.h), built
// without torch so that they also run under AddressSanitizer and UBSan (CMake PNCC_SANITIZE).
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
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
    zbuffer_face(mesh, 0, f, 0, height,
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

TEST_CASE(clamped_rounding_handles_nan_infinities_and_huge_values) {
  CHECK(ceil_clamped(kNaN, 0, 10) >= 0 && ceil_clamped(kNaN, 0, 10) <= 10);
  CHECK(floor_clamped(kNaN, -1, 9) >= -1 && floor_clamped(kNaN, -1, 9) <= 9);
  CHECK(ceil_clamped(1e10f, 0, 10) == 10 && floor_clamped(1e10f, -1, 9) == 9);
  CHECK(ceil_clamped(-1e10f, 0, 10) == 0 && floor_clamped(-1e10f, -1, 9) == -1);
  CHECK(ceil_clamped(kInf, 0, 10) == 10 && floor_clamped(-kInf, -1, 9) == -1);
  CHECK(ceil_clamped(2.2f, 0, 10) == 3 && floor_clamped(2.8f, -1, 9) == 2);
  CHECK(ceil_clamped(2.0f, 0, 10) == 2 && floor_clamped(2.0f, -1, 9) == 2);
  CHECK(floor_clamped(-0.5f, -1, 9) == -1 && ceil_clamped(-0.5f, -1, 9) == 0);
  // Per-vertex bounds merge to the span of the triangle's box.
  const auto bounds = [](float x0, float x1, float x2) {
    return merge_sample_bounds(vertex_sample_bounds(x0, 0.f, 10, 10),
                               vertex_sample_bounds(x1, 0.f, 10, 10),
                               vertex_sample_bounds(x2, 0.f, 10, 10), 0, 10);
  };
  CHECK(is_empty(bounds(2.2f, 2.8f, 2.5f)));  // sub-pixel: no sample inside
  CHECK(!is_empty(bounds(1.5f, 4.5f, 2.0f)) && bounds(1.5f, 4.5f, 2.f).col0 == 2 &&
        bounds(1.5f, 4.5f, 2.f).col1 == 4);
  CHECK(bounds(-1e10f, 1e10f, 0.f).col0 == 0 && bounds(-1e10f, 1e10f, 0.f).col1 == 9);
  CHECK(is_empty(bounds(1e10f, 2e10f, 3e10f)) && is_empty(bounds(-3.f, -2.f, -1e10f)));
  // Band restriction.
  const SampleBounds v = vertex_sample_bounds(3.f, 7.f, 10, 10);
  CHECK(is_empty(merge_sample_bounds(v, v, v, 0, 7)) && !is_empty(merge_sample_bounds(v, v, v, 0, 10)));
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
    const SampleBounds bounds =
        merge_sample_bounds(vertex_sample_bounds(v[0][0], v[0][1], 10, 10),
                            vertex_sample_bounds(v[1][0], v[1][1], 10, 10),
                            vertex_sample_bounds(v[2][0], v[2][1], 10, 10), 0, 10);
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

int main() { return pncc_test::run_all(); }
