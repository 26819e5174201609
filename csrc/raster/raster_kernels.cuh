// CUDA kernels of the rasterizer ops and their launchers. Kernels take one plain-data params
// struct; launchers take the same struct and a stream and launch through launch_per_item (one
// thread per triangle or pixel), which checks the launch. Nothing here touches a tensor:
// raster_cuda.cu validates, allocates and registers. The per-triangle and per-pixel work is in
// raster_core.h, shared with the CPU; this file owns only the thread mapping. tools/cuda_emu
// compiles this header unchanged on the host.
//
//   z-buffer pass: one thread per (image, triangle). Setup, bounding box, coverage, and one
//                  64-bit atomicMin per covered sample on a key that packs the depth above the
//                  face index. Nothing but the key is written, so the result is deterministic.
//   resolve pass:  one thread per pixel. Decodes the winning face, recomputes its barycentrics
//                  and depth, and writes every output exactly once.
//
// No per-pixel lists, no bins, no (B, H, W, K) buffers: memory is the outputs plus the 8-byte
// key per pixel.
//
// Index ranges: on the CUDA path the adapters do not check that face vertex indices lie in
// [0, V) and face_index values in [-1, F) (that needs a reduction and a device-to-host sync per
// call). The kernels guard instead: a face with an out-of-range vertex index covers nothing, and
// an out-of-range face_index reads as background (-1). The CPU path checks and raises.
#pragma once

#include <cstdint>

#include "common/cuda_launch.cuh"
#include "raster/raster_core.h"

#if !defined(PNCC_CUDA_EMU)
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#endif

namespace pncc {
namespace raster {
namespace kernels {

constexpr int kThreads = 256;
// Shared memory per block of every raster kernel (for bench/sass_report.py): none.
constexpr int kDynamicSmemBytes = 0;

inline int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

// This thread's work item (a triangle or a pixel): one per thread, kThreads a block.
__device__ __forceinline__ int64_t thread_item() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Launches `kernel` with one thread per item (nothing for no items) and checks the launch.
// `kernel` is a function pointer, dereferenced for PNCC_LAUNCH, whose emulation takes its address.
template <typename Params>
void launch_per_item(void (*kernel)(const Params), const Params& p, int64_t items,
                     cudaStream_t stream) {
  if (items == 0) return;
  PNCC_LAUNCH(blocks_for(items), kThreads, 0, stream, (*kernel))(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A pixel of a batch of H x W images, from its index in (B, H, W) order.
struct PixelAt {
  int64_t b, offset;  // image, and offset within it
  int row, col;
};

HOST_DEVICE_INLINE PixelAt pixel_at(int64_t pixel, int height, int width) {
  const int64_t plane = int64_t(height) * width;
  const int64_t b = pixel / plane, offset = pixel - b * plane;
  const int row = static_cast<int>(offset / width);
  return {b, offset, row, static_cast<int>(offset - int64_t(row) * width)};
}

template <typename T>
HOST_DEVICE_INLINE int64_t pixels_of(const MeshView<T>& mesh) {
  return mesh.batch * int64_t(mesh.height) * mesh.width;
}

HOST_DEVICE_INLINE bool vertex_in_range(int32_t i, int64_t num_vertices) {
  return i >= 0 && i < num_vertices;
}

// face_index entries outside [-1, num_faces) read as background.
HOST_DEVICE_INLINE int32_t guarded_face(int32_t face, int64_t num_faces) {
  return face >= 0 && face < num_faces ? face : -1;
}

HOST_DEVICE_INLINE bool face_in_range(const int32_t* faces, int64_t f, int64_t num_vertices) {
  return vertex_in_range(faces[3 * f], num_vertices) &&
         vertex_in_range(faces[3 * f + 1], num_vertices) &&
         vertex_in_range(faces[3 * f + 2], num_vertices);
}

// ---- z-buffer ----
template <typename T>
struct ZbufferParams {
  MeshView<T> mesh;
  unsigned long long* keys;  // (B, H, W), all kEmptyKey on entry
};

template <typename T>
__global__ void zbuffer_kernel(const ZbufferParams<T> p) {
  const MeshView<T>& mesh = p.mesh;
  const int64_t item = thread_item();
  if (item >= mesh.batch * mesh.num_faces) return;
  const int64_t b = item / mesh.num_faces;
  const int64_t f = item - b * mesh.num_faces;
  if (!face_in_range(mesh.faces, f, mesh.num_vertices)) return;
  unsigned long long* image_keys = p.keys + b * int64_t(mesh.height) * mesh.width;
  const BoundsFromVertices<T> triangle_bounds{mesh.image_vertices(b), mesh.height, mesh.width, 0,
                                              mesh.height};
  zbuffer_face(mesh, b, f, 0, triangle_bounds,
               [image_keys](int64_t offset, uint64_t key, const T*, T) {
                 atomicMin(image_keys + offset, static_cast<unsigned long long>(key));
               });
}

template <typename T>
void launch_zbuffer(const ZbufferParams<T>& p, cudaStream_t stream) {
  launch_per_item(zbuffer_kernel<T>, p, p.mesh.batch * p.mesh.num_faces, stream);
}

// ---- resolve: face index, barycentrics and depth per pixel ----
template <typename T>
struct ResolveRasterParams {
  MeshView<T> mesh;
  const unsigned long long* keys;
  int32_t* face_index;  // (B, H, W)
  T* bary;              // (B, H, W, 3)
  T* depth;             // (B, H, W)
};

template <typename T>
__global__ void resolve_raster_kernel(const ResolveRasterParams<T> p) {
  const MeshView<T>& mesh = p.mesh;
  const int64_t pixel = thread_item();
  if (pixel >= pixels_of(mesh)) return;
  const PixelAt at = pixel_at(pixel, mesh.height, mesh.width);
  T pixel_bary[3], pixel_depth;
  p.face_index[pixel] =
      resolve_pixel(mesh, at.b, at.row, at.col, p.keys[pixel], pixel_bary, pixel_depth);
  p.bary[3 * pixel + 0] = pixel_bary[0];
  p.bary[3 * pixel + 1] = pixel_bary[1];
  p.bary[3 * pixel + 2] = pixel_bary[2];
  p.depth[pixel] = pixel_depth;
}

template <typename T>
void launch_resolve_raster(const ResolveRasterParams<T>& p, cudaStream_t stream) {
  launch_per_item(resolve_raster_kernel<T>, p, pixels_of(p.mesh), stream);
}

// ---- resolve straight to the PNCC image (channel-first) and the mask ----
template <typename T>
struct ResolvePnccParams {
  MeshView<T> mesh;
  const unsigned long long* keys;
  const T* ncc;              // (V, 3) or (B, V, 3)
  int64_t ncc_batch_stride;  // 0 for (V, 3)
  T* pncc;                   // (B, 3, H, W)
  T* mask;                   // (B, 1, H, W)
};

template <typename T>
__global__ void resolve_pncc_kernel(const ResolvePnccParams<T> p) {
  const MeshView<T>& mesh = p.mesh;
  const int64_t pixel = thread_item();
  if (pixel >= pixels_of(mesh)) return;
  const PixelAt at = pixel_at(pixel, mesh.height, mesh.width);
  const int64_t plane = int64_t(mesh.height) * mesh.width;
  T bary[3], depth;
  const int32_t face = resolve_pixel(mesh, at.b, at.row, at.col, p.keys[pixel], bary, depth);
  interpolate_pixel(p.ncc + at.b * p.ncc_batch_stride, 3, mesh.faces, face, bary,
                    p.pncc + at.b * 3 * plane + at.offset, plane);
  p.mask[pixel] = face >= 0 ? T(1) : T(0);
}

template <typename T>
void launch_resolve_pncc(const ResolvePnccParams<T>& p, cudaStream_t stream) {
  launch_per_item(resolve_pncc_kernel<T>, p, pixels_of(p.mesh), stream);
}

// ---- rasterize backward: barycentric and depth gradients to vertex gradients ----
template <typename T>
struct RasterizeBackwardParams {
  MeshView<T> mesh;
  const int32_t* face_index;  // (B, H, W)
  const T* bary;              // (B, H, W, 3)
  const T* grad_bary;         // (B, H, W, 3)
  const T* grad_depth;        // (B, H, W)
  T* grad_vertices;           // (B, V, 3), zeroed
};

template <typename T>
__global__ void rasterize_backward_kernel(const RasterizeBackwardParams<T> p) {
  const MeshView<T>& mesh = p.mesh;
  const int64_t pixel = thread_item();
  if (pixel >= pixels_of(mesh)) return;
  const int64_t b = pixel / (int64_t(mesh.height) * mesh.width);
  int32_t face = guarded_face(p.face_index[pixel], mesh.num_faces);
  if (face >= 0 && !face_in_range(mesh.faces, face, mesh.num_vertices)) face = -1;
  T* grad_image = p.grad_vertices + b * mesh.num_vertices * 3;
  rasterize_pixel_backward(mesh, b, face, p.bary + 3 * pixel, p.grad_bary + 3 * pixel,
                           p.grad_depth[pixel], [grad_image](int64_t vertex, int axis, T value) {
                             if (value != T(0)) atomicAdd(grad_image + vertex * 3 + axis, value);
                           });
}

template <typename T>
void launch_rasterize_backward(const RasterizeBackwardParams<T>& p, cudaStream_t stream) {
  launch_per_item(rasterize_backward_kernel<T>, p, pixels_of(p.mesh), stream);
}

// ---- interpolate and its backward ----
template <typename T>
struct InterpolateParams {
  const T* attributes;        // (B or 1, V, C)
  int64_t attr_batch_stride;  // 0 when the attributes are shared by the batch
  int64_t num_vertices;       // V
  int64_t channels;           // C
  const int32_t* faces;       // (F, 3)
  int64_t num_faces;          // F
  const int32_t* face_index;  // (B, H, W)
  const T* bary;              // (B, H, W, 3)
  int64_t pixels;             // H * W
  int64_t total;              // B * H * W
  T* out;                     // (B, H, W, C): forward
  const T* grad_out;          // (B, H, W, C): backward
  T* grad_attributes;         // like attributes, zeroed: backward
  T* grad_bary;               // like bary, zeroed: backward
};

template <typename T>
HOST_DEVICE_INLINE int32_t interpolated_face(const InterpolateParams<T>& p, int64_t pixel) {
  const int32_t face = guarded_face(p.face_index[pixel], p.num_faces);
  return face >= 0 && face_in_range(p.faces, face, p.num_vertices) ? face : -1;
}

template <typename T>
__global__ void interpolate_kernel(const InterpolateParams<T> p) {
  const int64_t pixel = thread_item();
  if (pixel >= p.total) return;
  interpolate_pixel(p.attributes + (pixel / p.pixels) * p.attr_batch_stride, p.channels, p.faces,
                    interpolated_face(p, pixel), p.bary + 3 * pixel, p.out + pixel * p.channels, 1);
}

template <typename T>
__global__ void interpolate_backward_kernel(const InterpolateParams<T> p) {
  const int64_t pixel = thread_item();
  if (pixel >= p.total) return;
  const int64_t attr_offset = (pixel / p.pixels) * p.attr_batch_stride;
  T* grad_attr = p.grad_attributes + attr_offset;
  const int64_t channels = p.channels;
  interpolate_pixel_backward(p.attributes + attr_offset, channels, p.faces,
                             interpolated_face(p, pixel), p.bary + 3 * pixel,
                             p.grad_out + pixel * channels, p.grad_bary + 3 * pixel,
                             [grad_attr, channels](int64_t vertex, int64_t c, T value) {
                               if (value != T(0)) atomicAdd(grad_attr + vertex * channels + c, value);
                             });
}

template <typename T>
void launch_interpolate(const InterpolateParams<T>& p, cudaStream_t stream) {
  launch_per_item(interpolate_kernel<T>, p, p.total, stream);
}

template <typename T>
void launch_interpolate_backward(const InterpolateParams<T>& p, cudaStream_t stream) {
  launch_per_item(interpolate_backward_kernel<T>, p, p.total, stream);
}

}  // namespace kernels
}  // namespace raster
}  // namespace pncc
