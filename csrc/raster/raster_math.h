// Per-triangle and per-pixel maths of the PNCC z-buffer rasterizer, shared by the CPU and CUDA
// kernels (and compiled on its own by the CMake unit tests). Torch-free.
//
// Conventions (DESIGN.md): image-space vertices, x right and y down in pixels, larger z nearer.
// The pixel at (row i, column j) samples the point (x = j, y = i). Barycentrics are linear in
// screen space.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace pncc {
namespace raster {

// Background key of the packed z-buffer: larger than every key a covered pixel can produce.
constexpr uint64_t kEmptyKey = ~uint64_t(0);

// ---------------------------------------------------------------------------------------------
// Edge functions
// ---------------------------------------------------------------------------------------------

// One triangle edge from a to b, evaluated from a canonically chosen endpoint.
//
// The two triangles that share an edge traverse it in opposite directions. Evaluating
// `cross(b - a, p - a)` in each triangle's own order would round differently, and a pixel
// within one rounding error of the edge could then be covered twice or not at all. Measuring
// p from the endpoint that comes first in (y, x) order, whichever order the caller gave, makes
// the two triangles' values exact negatives of each other (b - a is exactly -(a - b) in floating
// point), which is what makes shared edges watertight. This equals evaluating the edge with both
// endpoints sorted and flipping the sign afterwards, bit for bit, which is how
// pncc_cuda.reference states it.
template <typename T>
struct Edge {
  T dx, dy;  // b - a, in the caller's order
  T rx, ry;  // the canonical endpoint: a or b, whichever is first in (y, x) order

  Edge() = default;

  // The edge from (x0, y0) to (x1, y1) as the caller orders it.
  HOST_DEVICE_INLINE Edge(T x0, T y0, T x1, T y1) {
    const bool second_first = (y1 < y0) || (y1 == y0 && x1 < x0);
    dx = x1 - x0;
    dy = y1 - y0;
    rx = second_first ? x1 : x0;
    ry = second_first ? y1 : y0;
  }

  // cross(b - a, p - a) for the caller's (a, b). Products are rounded separately (mul_rn) so
  // that every backend, and the PyTorch reference, computes the same bits.
  HOST_DEVICE_INLINE T operator()(T px, T py) const {
    return mul_rn(dx, py - ry) - mul_rn(dy, px - rx);
  }
};

// Barycentric weights of (px, py) from the three edge functions. Returns false when they sum to
// zero (degenerate triangle) or overflow. Dividing by the sum, not by a separately computed area, keeps the
// result independent of orientation: negating all three w gives bit-identical weights.
// The weights are always written (non-finite when the sum is 0).
template <typename T>
HOST_DEVICE_INLINE bool bary_from_edges(T w0, T w1, T w2, T* bary) {
  const T sum = (w0 + w1) + w2;
  const T inv = T(1) / sum;
  bary[0] = w0 * inv;
  bary[1] = w1 * inv;
  bary[2] = w2 * inv;
  return (sum != T(0)) & is_finite_value(sum);
}

template <typename T>
HOST_DEVICE_INLINE T interpolate_depth(const T* bary, T z0, T z1, T z2) {
  return (mul_rn(bary[0], z0) + mul_rn(bary[1], z1)) + mul_rn(bary[2], z2);
}

// ---------------------------------------------------------------------------------------------
// Bounding boxes
// ---------------------------------------------------------------------------------------------

// Bounding boxes are computed in fixed point: each vertex coordinate is clamped to [-1, size]
// (so a 1e10, infinite or NaN coordinate is clamped, never cast out of range), shifted by +1 so it
// is non-negative, and truncated to 1/256 pixel. The sample bounds derived from three such
// vertices are conservative (never narrower than the exact ones, at most 1/256 px wider), which
// is all they need to be: every sample inside them is then tested exactly by cover_sample.
// Integer bounds cost a few integer min/max per triangle, and the per-vertex conversion
// vectorises, which matters because most triangles of a real face mesh at 256x256 are sub-pixel
// and are rejected by their bounds alone.
constexpr int kFixedPointShift = 8;  // 1/256 pixel; (32768 + 1) * 256 < 2^24 stays exact

struct FixedPoint {
  int32_t x, y;  // (clamp(coordinate, -1, size) + 1) * 256, truncated
};

template <typename T>
HOST_DEVICE_INLINE int32_t to_fixed_point(T v, int size) {
  T c = v > T(-1) ? v : T(-1);  // NaN -> -1
  c = c < T(size) ? c : T(size);
  return static_cast<int32_t>((c + T(1)) * T(1 << kFixedPointShift));
}

template <typename T>
HOST_DEVICE_INLINE FixedPoint vertex_fixed_point(T x, T y, int height, int width) {
  return {to_fixed_point(x, width), to_fixed_point(y, height)};
}

// The pixel samples a triangle's bounding box may hold: columns [col0, col1] and rows
// [row0, row1], empty when first > last.
struct SampleBounds {
  int col0, col1, row0, row1;
};

// First and last sample in a fixed-point interval [lo, hi], clamped to [first, last].
HOST_DEVICE_INLINE void fixed_point_span(int32_t lo, int32_t hi, int first, int last, int& begin,
                                         int& end) {
  constexpr int32_t one = 1 << kFixedPointShift;
  const int b = ((lo + one - 1) >> kFixedPointShift) - 1;  // ceil(lo) in pixels
  const int e = (hi >> kFixedPointShift) - 1;              // floor(hi) in pixels
  begin = b > first ? b : first;
  end = e < last ? e : last;
}

// Conservative sample bounds of the triangle (a, b, c) within rows [row_begin, row_end) of a
// `width`-wide image.
HOST_DEVICE_INLINE SampleBounds triangle_sample_bounds(FixedPoint a, FixedPoint b, FixedPoint c,
                                                       int row_begin, int row_end, int width) {
  SampleBounds s;
  fixed_point_span(min3(a.x, b.x, c.x), max3(a.x, b.x, c.x), 0, width - 1, s.col0, s.col1);
  fixed_point_span(min3(a.y, b.y, c.y), max3(a.y, b.y, c.y), row_begin, row_end - 1, s.row0,
                   s.row1);
  return s;
}

HOST_DEVICE_INLINE bool is_empty(const SampleBounds& s) {
  return (s.col0 > s.col1) | (s.row0 > s.row1);
}

// ---------------------------------------------------------------------------------------------
// Triangle setup and coverage
// ---------------------------------------------------------------------------------------------

// A triangle prepared for coverage tests. Edge i is the edge opposite vertex i, so its edge
// function is the (unnormalised) barycentric weight of vertex i.
template <typename T>
struct Triangle {
  Edge<T> edge[3];
  T z[3];
  T orient;             // +1 or -1: makes the edge functions positive inside, whatever the winding
  SampleBounds bounds;  // the samples to test, clamped to the image and the caller's band
};

// Prepares triangle (v0, v1, v2), whose samples lie within `bounds` (non-empty), for coverage
// tests.
//
// Args:
//   v0, v1, v2: pointers to 3 coordinates (x, y, z) each, image space.
// Returns false when the triangle covers nothing: its area is zero, or an x or y coordinate is
// non-finite (that makes the doubled area non-finite: an infinite or NaN coordinate reaches it
// through a difference, and 0 * inf is NaN). A non-finite z is caught by cover_sample's depth
// test.
template <typename T>
HOST_DEVICE_INLINE bool setup_triangle(const T* v0, const T* v1, const T* v2,
                                       const SampleBounds& bounds, Triangle<T>& tri) {
  const T x0 = v0[0], y0 = v0[1], x1 = v1[0], y1 = v1[1], x2 = v2[0], y2 = v2[1];
  tri.edge[0] = Edge<T>(x1, y1, x2, y2);
  tri.edge[1] = Edge<T>(x2, y2, x0, y0);
  tri.edge[2] = Edge<T>(x0, y0, x1, y1);
  const T area = tri.edge[0](x0, y0);
  if (!(area != T(0)) || !is_finite_value(area)) return false;
  tri.orient = area > T(0) ? T(1) : T(-1);
  tri.z[0] = v0[2];
  tri.z[1] = v1[2];
  tri.z[2] = v2[2];
  tri.bounds = bounds;
  return true;
}

// Top-left fill rule: does edge i of `tri` own the samples lying exactly on it?
//
// With the edge functions made positive inside, the positively oriented traversal direction d
// of the edge decides: "top" edges (d.y == 0, d.x > 0) and "left" edges (d.y < 0) own their
// samples. Two triangles sharing an edge traverse it in opposite directions, so exactly one of
// them owns it.
template <typename T>
HOST_DEVICE_INLINE bool owns_edge(const Triangle<T>& tri, int i) {
  const Edge<T>& e = tri.edge[i];
  const T dx = tri.orient * e.dx, dy = tri.orient * e.dy;  // flipped to positive orientation
  return (dy < T(0)) | ((dy == T(0)) & (dx > T(0)));
}

// Coverage of the sample (px, py). When covered, fills the barycentric weights and the depth.
//
// The three edge tests are combined without early exits (one unpredictable branch instead of
// three); the weights are only computed for covered samples.
template <typename T>
HOST_DEVICE_INLINE bool cover_sample(const Triangle<T>& tri, T px, T py, T* bary, T& depth) {
  bool inside = true;
  T w[3];
  for (int i = 0; i < 3; ++i) {
    w[i] = tri.orient * tri.edge[i](px, py);
    // Written so that a NaN edge value is outside.
    inside &= (w[i] > T(0)) || (w[i] == T(0) && owns_edge(tri, i));
  }
  if (!inside || !bary_from_edges(w[0], w[1], w[2], bary)) return false;
  depth = interpolate_depth(bary, tri.z[0], tri.z[1], tri.z[2]);
  return is_finite_value(depth);  // a non-finite z cannot be ordered: not covered
}

// Barycentrics and depth of (px, py) in triangle (v0, v1, v2), for a sample already known to be
// covered by it (the resolve pass). Bit-identical to what cover_sample computed for the same
// sample, because the edge values differ from cover_sample's only by an exact sign flip.
template <typename T>
HOST_DEVICE_INLINE bool resolve_sample(const T* v0, const T* v1, const T* v2, T px, T py,
                                       T* bary, T& depth) {
  const T w0 = Edge<T>(v1[0], v1[1], v2[0], v2[1])(px, py);
  const T w1 = Edge<T>(v2[0], v2[1], v0[0], v0[1])(px, py);
  const T w2 = Edge<T>(v0[0], v0[1], v1[0], v1[1])(px, py);
  if (!bary_from_edges(w0, w1, w2, bary)) return false;
  depth = interpolate_depth(bary, v0[2], v1[2], v2[2]);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Packed depth keys
// ---------------------------------------------------------------------------------------------

HOST_DEVICE_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// A 64-bit key whose unsigned order is the z-buffer order: nearer (larger depth) first, then the
// lower face index on an exact tie. The high word maps the float32 depth to an unsigned integer
// that decreases as depth increases; the low word is the face index. One atomicMin per candidate
// therefore implements the whole depth test. Float64 depths are compared at float32 precision
// (by every backend alike).
HOST_DEVICE_INLINE uint64_t depth_key(float depth, int32_t face) {
  const uint32_t bits = float_bits(depth + 0.0f);  // + 0.0f turns -0 into +0
  // Order-preserving float -> uint32 map, then complemented so that nearer sorts first.
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(face);
}

HOST_DEVICE_INLINE int32_t key_face(uint64_t key) {
  return key == kEmptyKey ? -1 : static_cast<int32_t>(key & 0xffffffffu);
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Gradient of one pixel's (bary, depth) with respect to its triangle's vertices.
//
// With M = [[x0 x1 x2], [y0 y1 y2], [1 1 1]] the weights are b = M^-1 (px, py, 1), so
// dL/dM = -(M^-T g) b^T, where g = dL/db. Rows of M^-1 are (a_i, c_i, .) / A with
// a_i = y_{i+1} - y_{i+2}, c_i = x_{i+2} - x_{i+1} and A = sum_i a_i x_i. Depth adds
// dL/dz_i = gd * b_i and, through b, g_i += gd * z_i.
//
// Args:
//   v: 3 vertex pointers (x, y, z); bary: the pixel's weights; grad_bary: dL/dbary (3 values);
//   grad_depth: dL/ddepth. Writes 9 values to grad_v: (dx, dy, dz) of v0, v1, v2.
template <typename T>
HOST_DEVICE_INLINE void bary_depth_backward(const T* const v[3], const T* bary,
                                            const T* grad_bary, T grad_depth, T* grad_v) {
  T g[3];
  for (int i = 0; i < 3; ++i) g[i] = grad_bary[i] + grad_depth * v[i][2];
  T a[3], c[3];
  for (int i = 0; i < 3; ++i) {
    const int j = (i + 1) % 3, k = (i + 2) % 3;
    a[i] = v[j][1] - v[k][1];
    c[i] = v[k][0] - v[j][0];
  }
  const T area = a[0] * v[0][0] + a[1] * v[1][0] + a[2] * v[2][0];
  if (!(area != T(0))) {
    for (int i = 0; i < 9; ++i) grad_v[i] = T(0);
    return;
  }
  const T u0 = (a[0] * g[0] + a[1] * g[1] + a[2] * g[2]) / area;
  const T u1 = (c[0] * g[0] + c[1] * g[1] + c[2] * g[2]) / area;
  for (int i = 0; i < 3; ++i) {
    grad_v[3 * i + 0] = -u0 * bary[i];
    grad_v[3 * i + 1] = -u1 * bary[i];
    grad_v[3 * i + 2] = grad_depth * bary[i];
  }
}

}  // namespace raster
}  // namespace pncc
