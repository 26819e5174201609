// The CPU z-buffer of one band of rows of one image: the serial loop one at::parallel_for work
// item runs. Torch-free, so that the C++ tests and the core microbenchmark run exactly the code
// the CPU kernels run (and AddressSanitizer/UBSan see it).
#pragma once

#include <cstdint>
#include <vector>

#include "raster/raster_core.h"

namespace pncc {
namespace raster {

// The result of BandBuffer::rasterize, as plain pointers that a resolve loop can keep in
// registers (stores to the outputs cannot alias a local copy).
template <typename T>
struct RasterizedBand {
  const uint64_t* keys;
  const T* values;

  // Face index of the pixel at `offset`, -1 on the background; its weights and depth when
  // covered (the background's are never read).
  int32_t face(int64_t offset) const { return key_face(keys[offset]); }
  const T* bary(int64_t offset) const { return values + 4 * offset; }
  T depth(int64_t offset) const { return values[4 * offset + 3]; }
};

// The z-buffer of rows [row_begin, row_end) of one image: a packed key per pixel, plus the
// barycentrics and depth of the current winner, so that resolving needs no second setup.
template <typename T>
struct BandBuffer {
  std::vector<uint64_t> keys;
  std::vector<T> bary_depth;  // 4 per pixel: bary[3], depth
  std::vector<FixedPoint> fixed_points;  // per vertex: a vertex is shared by ~6 triangles

  // One buffer per thread, reused across calls: allocating ~2 MB per call would cost more in
  // page faults than rasterizing a face mesh.
  static BandBuffer& for_this_thread() {
    thread_local BandBuffer buffer;
    return buffer;
  }

  HOST_DEVICE_INLINE RasterizedBand<T> rasterize(const MeshView<T>& mesh_in, int64_t b, int row_begin,
                              int row_end) {
    // A local copy: stores through `slots` and `values` cannot alias it, so the compiler keeps
    // its fields in registers across the triangle loop instead of reloading them per triangle.
    const MeshView<T> mesh = mesh_in;
    const int64_t pixels = int64_t(row_end - row_begin) * mesh.width;
    keys.assign(pixels, kEmptyKey);
    bary_depth.resize(4 * pixels);
    uint64_t* slots = keys.data();
    T* values = bary_depth.data();
    const auto keep_nearest = [slots, values](int64_t offset, uint64_t key, const T* bary,
                                              T depth) {
      if (key < slots[offset]) {
        slots[offset] = key;
        T* v = values + 4 * offset;
        v[0] = bary[0];
        v[1] = bary[1];
        v[2] = bary[2];
        v[3] = depth;
      }
    };
    fixed_points.resize(mesh.num_vertices);
    const T* verts = mesh.image_vertices(b);
    FixedPoint* points = fixed_points.data();
    for (int64_t v = 0; v < mesh.num_vertices; ++v)
      points[v] = vertex_fixed_point(verts[3 * v], verts[3 * v + 1], mesh.height, mesh.width);
    const int width = mesh.width;
    const auto triangle_bounds = [points, row_begin, row_end, width](int32_t i0, int32_t i1,
                                                                     int32_t i2) {
      return triangle_sample_bounds(points[i0], points[i1], points[i2], row_begin, row_end, width);
    };
    for (int64_t f = 0; f < mesh.num_faces; ++f)
      zbuffer_face(mesh, b, f, row_begin, triangle_bounds, keep_nearest);
    return {slots, values};
  }
};


}  // namespace raster
}  // namespace pncc
