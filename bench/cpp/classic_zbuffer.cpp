// The baseline of bench_raster.py: a classic per-triangle z-buffer renderer, in the manner of
// 3DDFA_V2's Sim3DR (written for this benchmark, not taken from it). For every triangle: its
// integer bounding box, clipped to the image; for every pixel in it, barycentric weights from dot
// products, an inside test, a depth test against a float depth buffer, and the winner's
// interpolated colour written at once. One thread. bench_raster.py compiles it with -O2 (as
// Sim3DR's build does) and calls it through ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

struct Point {
  float x, y;
};

// Weights (w0, w1, w2) of p in triangle (p0, p1, p2) from the dot products of the edge vectors
// from p0; a degenerate triangle gives weights that fail the inside test.
inline void point_weights(Point p, Point p0, Point p1, Point p2, float w[3]) {
  const float ax = p2.x - p0.x, ay = p2.y - p0.y;  // edge p0 -> p2
  const float bx = p1.x - p0.x, by = p1.y - p0.y;  // edge p0 -> p1
  const float cx = p.x - p0.x, cy = p.y - p0.y;
  const float aa = ax * ax + ay * ay, ab = ax * bx + ay * by, ac = ax * cx + ay * cy;
  const float bb = bx * bx + by * by, bc = bx * cx + by * cy;
  const float denom = aa * bb - ab * ab;
  const float inv = denom == 0.f ? 0.f : 1.f / denom;
  const float u = (bb * ac - ab * bc) * inv;  // weight of p2
  const float v = (aa * bc - ab * ac) * inv;  // weight of p1
  w[0] = 1.f - u - v;
  w[1] = v;
  w[2] = u;
}

}  // namespace

// Renders `colors` (num_vertices x 3) over the mesh into `image` (height x width x 3), keeping
// the largest z per pixel in `depth` (height x width). Vertices are image-space (x, y, z), x
// right, y down, larger z nearer. Returns the number of covered pixels.
extern "C" int classic_render(const float* vertices, const int32_t* faces, int num_faces,
                              const float* colors, int height, int width, float* depth,
                              float* image) {
  std::fill(depth, depth + int64_t(height) * width, -INFINITY);
  std::fill(image, image + int64_t(height) * width * 3, 0.f);
  for (int f = 0; f < num_faces; ++f) {
    const int32_t i0 = faces[3 * f], i1 = faces[3 * f + 1], i2 = faces[3 * f + 2];
    const float* v0 = vertices + 3 * i0;
    const float* v1 = vertices + 3 * i1;
    const float* v2 = vertices + 3 * i2;
    const int x_min = std::max(int(std::ceil(std::min({v0[0], v1[0], v2[0]}))), 0);
    const int x_max = std::min(int(std::floor(std::max({v0[0], v1[0], v2[0]}))), width - 1);
    const int y_min = std::max(int(std::ceil(std::min({v0[1], v1[1], v2[1]}))), 0);
    const int y_max = std::min(int(std::floor(std::max({v0[1], v1[1], v2[1]}))), height - 1);
    if (x_max < x_min || y_max < y_min) continue;
    const Point p0{v0[0], v0[1]}, p1{v1[0], v1[1]}, p2{v2[0], v2[1]};
    for (int y = y_min; y <= y_max; ++y) {
      for (int x = x_min; x <= x_max; ++x) {
        float w[3];
        point_weights(Point{float(x), float(y)}, p0, p1, p2, w);
        if (!(w[0] >= 0.f && w[1] >= 0.f && w[2] >= 0.f)) continue;
        const float z = w[0] * v0[2] + w[1] * v1[2] + w[2] * v2[2];
        const int64_t pixel = int64_t(y) * width + x;
        if (z <= depth[pixel]) continue;
        depth[pixel] = z;
        const float* c0 = colors + 3 * i0;
        const float* c1 = colors + 3 * i1;
        const float* c2 = colors + 3 * i2;
        for (int k = 0; k < 3; ++k) image[3 * pixel + k] = w[0] * c0[k] + w[1] * c1[k] + w[2] * c2[k];
      }
    }
  }
  int covered = 0;
  for (int64_t p = 0; p < int64_t(height) * width; ++p) covered += depth[p] > -INFINITY;
  return covered;
}
