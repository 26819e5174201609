// The CPU z-buffer of one band of rows of one image: the serial loop one at::parallel_for work
// item runs. Torch-free, so that the C++ tests and the core microbenchmark run exactly the code
// the CPU kernels run (and AddressSanitizer/UBSan see it).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "raster/raster_core.h"
#include "raster/raster_cull.h"

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

// The variant's float32 vector kernels (raster_cull.h) where they apply to `mesh`: float32, and
// indices whose gathers' int32 offsets (3 * index) cannot overflow; none otherwise.
template <typename T>
cull::VectorKernels vector_kernels_for(const MeshView<T>& mesh, cull::Variant variant) {
  if constexpr (!std::is_same_v<T, float>) return {};
  constexpr int64_t kMaxIndex = int64_t(1) << 30;
  if (mesh.num_vertices * 3 >= kMaxIndex || mesh.num_faces * 3 >= kMaxIndex) return {};
  return cull::vector_kernels(variant);
}

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

  // `variant` picks the culling (and, for float32, vector coverage) functions of raster_cull.h;
  // every variant gives the same result, bit for bit.
  RasterizedBand<T> rasterize(const MeshView<T>& mesh_in, int64_t b, int row_begin, int row_end,
                              cull::Variant variant = cull::selected()) {
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
    const cull::VectorKernels kernels = vector_kernels_for(mesh, variant);
    const Culling cull = culling(mesh, b, variant, kernels.cull);
    const cull::CoverFn cover = kernels.cover;
    const int width = mesh.width;
    for (int64_t f0 = 0; f0 < mesh.num_faces; f0 += Survivors::kBatch) {
      const int count = static_cast<int>(std::min<int64_t>(Survivors::kBatch, mesh.num_faces - f0));
      const int n = cull(mesh.faces, static_cast<int32_t>(f0), count, row_begin, row_end, survivors);
      if (cover == nullptr) {
        for (int k = 0; k < n; ++k)
          zbuffer_face_in_bounds(mesh, b, survivors.face[k], survivors.bounds(k), row_begin,
                                 keep_nearest);
        continue;
      }
      // The vector coverage test of the small survivors, then the scalar depth test of each
      // covered sample (the z-buffer order is total, so the order of the updates does not
      // matter), then the large survivors one at a time.
      const int m = cover(survivors, n, covered, large);
      for (int k = 0; k < m; ++k) {
        const T bary[3] = {T(covered.bary[0][k]), T(covered.bary[1][k]), T(covered.bary[2][k])};
        keep_nearest(int64_t(covered.row[k] - row_begin) * width + covered.col[k],
                     depth_key(covered.depth[k], covered.face[k]), bary, T(covered.depth[k]));
      }
      for (int j = 0; j < large.n; ++j) {
        const int k = large.index[j];
        zbuffer_face_in_bounds(mesh, b, survivors.face[k], survivors.bounds(k), row_begin,
                               keep_nearest);
      }
    }
    return {slots, values};
  }

  // The culling alone (for the benchmark's time split): the number of faces of image b that
  // survive it in rows [row_begin, row_end).
  int64_t count_survivors(const MeshView<T>& mesh, int64_t b, int row_begin, int row_end,
                          cull::Variant variant) {
    const Culling cull = culling(mesh, b, variant, vector_kernels_for(mesh, variant).cull);
    int64_t total = 0;
    for (int64_t f0 = 0; f0 < mesh.num_faces; f0 += Survivors::kBatch)
      total += cull(mesh.faces, static_cast<int32_t>(f0),
                    static_cast<int>(std::min<int64_t>(Survivors::kBatch, mesh.num_faces - f0)),
                    row_begin, row_end, survivors);
    return total;
  }

 private:
  using Survivors = cull::Survivors;

  // Per-thread scratch of the culling and the vector coverage (kept here, not on the stack:
  // about 9 KB).
  Survivors survivors;
  cull::CoveredSamples covered;
  cull::LargeSurvivors large;

  // The culling of one image's faces, batch by batch: from the float32 vertices where the
  // variant's vector kernels apply (the coverage test reads the coordinates that culling keeps),
  // otherwise from every vertex's fixed point, computed once per image.
  struct Culling {
    cull::CullVerticesFn from_vertices;  // or
    cull::CullFn from_points;
    const float* vertices;
    int64_t num_vertices;
    const FixedPoint* points;
    int height, width;

    int operator()(const int32_t* faces, int32_t first, int count, int row_begin, int row_end,
                   Survivors& out) const {
      return from_vertices != nullptr
                 ? from_vertices(vertices, num_vertices, faces, first, count, row_begin,
                                 row_end, height, width, out)
                 : from_points(points, faces, first, count, row_begin, row_end, width, out);
    }
  };

  Culling culling(const MeshView<T>& mesh, int64_t b, cull::Variant variant,
                  cull::CullVerticesFn from_vertices) {
    if (from_vertices != nullptr)
      return {from_vertices, nullptr, reinterpret_cast<const float*>(mesh.image_vertices(b)),
              mesh.num_vertices, nullptr, mesh.height, mesh.width};
    return {nullptr, cull::function(variant), nullptr, mesh.num_vertices,
            vertex_fixed_points(mesh, b), mesh.height, mesh.width};
  }

  // Every vertex's fixed point, once per image: a vertex is shared by about six triangles.
  const FixedPoint* vertex_fixed_points(const MeshView<T>& mesh, int64_t b) {
    fixed_points.resize(mesh.num_vertices);
    const T* verts = mesh.image_vertices(b);
    FixedPoint* points = fixed_points.data();
    for (int64_t v = 0; v < mesh.num_vertices; ++v)
      points[v] = vertex_fixed_point(verts[3 * v], verts[3 * v + 1], mesh.height, mesh.width);
    return points;
  }
};

// render_pncc's resolve of the first `pixels` pixels of a rasterized band: the PNCC image
// (out[c * plane + offset], c < 3) and mask (mask[offset]) from the z-buffer, on the variant's
// vector resolve where its vector kernels apply (vector_kernels_for), otherwise one
// interpolate_pixel at a time; bit-identical either way (raster_cull.h).
template <typename T>
void resolve_pncc_band(const RasterizedBand<T>& band, int64_t pixels, const T* ncc,
                       const MeshView<T>& mesh, T* out, int64_t plane, T* mask,
                       cull::Variant variant) {
  if constexpr (std::is_same_v<T, float>) {
    const cull::ResolveFn resolve = vector_kernels_for(mesh, variant).resolve;
    if (resolve != nullptr) {
      resolve(band.keys, band.values, pixels, ncc, mesh.faces, out, plane, mask);
      return;
    }
  }
  for (int64_t offset = 0; offset < pixels; ++offset) {
    const int32_t face = band.face(offset);
    interpolate_pixel(ncc, 3, mesh.faces, face, band.bary(offset), out + offset, plane);
    mask[offset] = face >= 0 ? T(1) : T(0);
  }
}

}  // namespace raster
}  // namespace pncc
