// Kernel core of the rasterizer ops: the work one CPU loop iteration or one CUDA thread does,
// written once over plain pointers. raster_cpu.cpp owns only the loop structure
// (at::parallel_for), raster_cuda.cu only the thread mapping. Torch-free, so the CMake build can
// compile and sanitise it on its own.
//
// All arrays are contiguous, row-major, and indexed with int64 offsets.
#pragma once

#include <cstdint>

#include "raster/raster_math.h"

namespace pncc {
namespace raster {

// A batch of meshes that share one triangle list.
template <typename T>
struct MeshView {
  const T* vertices;        // (B, V, 3) image-space x, y, z
  const int32_t* faces;     // (F, 3), indices in [0, V): checked on the CPU, guarded on CUDA
  int64_t batch;            // B
  int64_t num_vertices;     // V
  int64_t num_faces;        // F
  int height;               // H
  int width;                // W

  HOST_DEVICE_INLINE const T* image_vertices(int64_t b) const {
    return vertices + b * num_vertices * 3;
  }
};

// Triangle bounds computed from the vertex coordinates on the fly: a callable for zbuffer_face.
// (The CPU's scalar and AVX2 culling instead precompute every vertex's fixed point once per
// image, since a vertex is shared by about six triangles, and its AVX-512 culling of float32
// meshes converts the gathered coordinates in registers; CUDA converts per thread, since a
// per-vertex buffer would cost memory per image.)
template <typename T>
struct BoundsFromVertices {
  const T* verts;
  int height, width, row_begin, row_end;

  HOST_DEVICE_INLINE SampleBounds operator()(int32_t i0, int32_t i1, int32_t i2) const {
    const T* v0 = verts + 3 * int64_t(i0);
    const T* v1 = verts + 3 * int64_t(i1);
    const T* v2 = verts + 3 * int64_t(i2);
    return triangle_sample_bounds(vertex_fixed_point(v0[0], v0[1], height, width),
                                  vertex_fixed_point(v1[0], v1[1], height, width),
                                  vertex_fixed_point(v2[0], v2[1], height, width), row_begin,
                                  row_end, width);
  }
};

// The part of zbuffer_face (below) after the bounds, for a face whose non-empty sample bounds are
// already known: the CPU culls whole batches of faces first (raster_cull.h).
template <typename T, typename Update>
HOST_DEVICE_INLINE void zbuffer_face_in_bounds(const MeshView<T>& mesh, int64_t b, int64_t f,
                                               const SampleBounds& bounds, int row_begin,
                                               Update&& update) {
  const T* verts = mesh.image_vertices(b);
  const int32_t* idx = mesh.faces + 3 * f;
  const int32_t i0 = idx[0], i1 = idx[1], i2 = idx[2];
  Triangle<T> tri;
  if (!setup_triangle(verts + 3 * int64_t(i0), verts + 3 * int64_t(i1), verts + 3 * int64_t(i2),
                      bounds, tri))
    return;
  for (int row = bounds.row0; row <= bounds.row1; ++row) {
    for (int col = bounds.col0; col <= bounds.col1; ++col) {
      T bary[3], depth;
      if (!cover_sample(tri, T(col), T(row), bary, depth)) continue;
      update(int64_t(row - row_begin) * mesh.width + col,
             depth_key(static_cast<float>(depth), static_cast<int32_t>(f)), bary, depth);
    }
  }
}

// Depth-tests face `f` of image `b` against a z-buffer whose first row is `row_begin`.
//
// `triangle_bounds(i0, i1, i2)` returns the sample bounds of the triangle with those vertices,
// restricted to the rows (BoundsFromVertices, or the CPU's precomputed equivalent); they may be
// conservative, since every sample is tested exactly.
// `update(offset, key, bary, depth)` keeps the smaller key for the pixel `offset` pixels after
// (row_begin, 0). The CPU passes a compare-and-store that also keeps the winner's barycentrics,
// CUDA an atomicMin on the key alone (its resolve pass recomputes them, bit-identically);
// everything else, including which samples a triangle covers, is this one function.
template <typename T, typename Bounds, typename Update>
HOST_DEVICE_INLINE void zbuffer_face(const MeshView<T>& mesh, int64_t b, int64_t f, int row_begin,
                                     Bounds&& triangle_bounds, Update&& update) {
  const int32_t* idx = mesh.faces + 3 * f;
  const SampleBounds bounds = triangle_bounds(idx[0], idx[1], idx[2]);
  // Most triangles of a real face mesh at 256x256 are sub-pixel: this test rejects them before
  // any floating-point setup.
  if (is_empty(bounds)) return;
  zbuffer_face_in_bounds(mesh, b, f, bounds, row_begin, update);
}

// Barycentrics and depth of pixel (row, col) of image b under its z-buffer key. Returns the face
// index, or -1 (with bary and depth zeroed) on the background.
template <typename T>
HOST_DEVICE_INLINE int32_t resolve_pixel(const MeshView<T>& mesh, int64_t b, int row, int col,
                                         uint64_t key, T* bary, T& depth) {
  const int32_t face = key_face(key);
  if (face >= 0) {
    const T* verts = mesh.image_vertices(b);
    const int32_t* idx = mesh.faces + 3 * int64_t(face);
    if (resolve_sample(verts + 3 * int64_t(idx[0]), verts + 3 * int64_t(idx[1]),
                       verts + 3 * int64_t(idx[2]), T(col), T(row), bary, depth))
      return face;
  }
  bary[0] = bary[1] = bary[2] = T(0);
  depth = T(0);
  return -1;
}

// Attributes of one pixel: out[c] = sum_i bary[i] * attributes[faces[face][i]][c]; 0 on the
// background. `attributes` points at this image's (V, C) block.
template <typename T>
HOST_DEVICE_INLINE void interpolate_pixel(const T* attributes, int64_t channels,
                                          const int32_t* faces, int32_t face, const T* bary,
                                          T* out, int64_t out_stride) {
  if (face < 0) {
    for (int64_t c = 0; c < channels; ++c) out[c * out_stride] = T(0);
    return;
  }
  const int32_t* idx = faces + 3 * int64_t(face);
  const T* a0 = attributes + int64_t(idx[0]) * channels;
  const T* a1 = attributes + int64_t(idx[1]) * channels;
  const T* a2 = attributes + int64_t(idx[2]) * channels;
  for (int64_t c = 0; c < channels; ++c)
    out[c * out_stride] = (mul_rn(bary[0], a0[c]) + mul_rn(bary[1], a1[c])) + mul_rn(bary[2], a2[c]);
}

// Backward of interpolate_pixel. Writes dL/dbary (3 values) and calls
// `accumulate(vertex, channel, value)` for every contribution to dL/dattributes.
template <typename T, typename Accumulate>
HOST_DEVICE_INLINE void interpolate_pixel_backward(const T* attributes, int64_t channels,
                                                   const int32_t* faces, int32_t face,
                                                   const T* bary, const T* grad_out,
                                                   T* grad_bary, Accumulate&& accumulate) {
  grad_bary[0] = grad_bary[1] = grad_bary[2] = T(0);
  if (face < 0) return;
  const int32_t* idx = faces + 3 * int64_t(face);
  for (int i = 0; i < 3; ++i) {
    const T* a = attributes + int64_t(idx[i]) * channels;
    T acc = T(0);
    for (int64_t c = 0; c < channels; ++c) {
      acc += grad_out[c] * a[c];
      accumulate(int64_t(idx[i]), c, bary[i] * grad_out[c]);
    }
    grad_bary[i] = acc;
  }
}

// Backward of resolve_pixel for one pixel: calls `accumulate(vertex, axis, value)` for the
// gradient of (bary, depth) with respect to the 9 coordinates of its triangle.
template <typename T, typename Accumulate>
HOST_DEVICE_INLINE void rasterize_pixel_backward(const MeshView<T>& mesh, int64_t b,
                                                 int32_t face, const T* bary,
                                                 const T* grad_bary, T grad_depth,
                                                 Accumulate&& accumulate) {
  if (face < 0) return;
  const T* verts = mesh.image_vertices(b);
  const int32_t* idx = mesh.faces + 3 * int64_t(face);
  const T* v[3] = {verts + 3 * int64_t(idx[0]), verts + 3 * int64_t(idx[1]),
                   verts + 3 * int64_t(idx[2])};
  T grad_v[9];
  bary_depth_backward(v, bary, grad_bary, grad_depth, grad_v);
  for (int i = 0; i < 3; ++i)
    for (int axis = 0; axis < 3; ++axis)
      accumulate(int64_t(idx[i]), axis, grad_v[3 * i + axis]);
}

}  // namespace raster
}  // namespace pncc
