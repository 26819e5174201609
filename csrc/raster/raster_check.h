// Input validation of the rasterizer ops, shared by the CPU and CUDA adapters.
//
// Every check runs before any kernel: a failing check raises ValueError or TypeError in Python
// (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE) with a message naming the argument. The fake kernels in
// pncc_cuda/_checks.py state the same preconditions with the same words.
//
// No check synchronises with a GPU. Index values (faces in [0, V), face_index in [-1, F)) are
// therefore range-checked only for CPU tensors; for CUDA tensors the kernels guard instead (see
// raster_kernels.cuh): a face with an out-of-range vertex index covers nothing and an
// out-of-range face_index value reads as background.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "raster/raster_core.h"

namespace pncc {
namespace raster {

// Largest image side: pixel coordinates stay exact in float32 and rows/columns fit in int.
constexpr int64_t kMaxImageSide = 32768;

// Validates faces (F, 3) int32/int64 against `num_vertices` and the device of `like` (named
// `like_name` in messages). Returns them as contiguous int32, the kernels' index type, after
// checking, for CPU tensors, that every index lies in [0, num_vertices).
at::Tensor check_faces(const at::Tensor& faces, int64_t num_vertices, const at::Tensor& like,
                       const char* like_name);

// Validates a mesh batch and an image size; returns check_faces(faces, V, vertices).
//
// Args:
//   vertices: (B, V, 3) float32 or float64, image-space x, y (pixels) and z (larger is nearer).
//   faces:    (F, 3) int32 or int64 vertex indices.
//   height, width: output size in pixels, each in [0, kMaxImageSide].
at::Tensor check_mesh(const at::Tensor& vertices, const at::Tensor& faces, int64_t height,
                      int64_t width);

// Validates render_pncc's per-vertex colours: (V, 3) or (B, V, 3), dtype and device of vertices.
void check_ncc(const at::Tensor& ncc, const at::Tensor& vertices);

// Validates rasterizer outputs fed back as inputs: face_index (B, H, W) int32 with values in
// [-1, num_faces) (checked for CPU tensors) and bary (B, H, W, 3) with the dtype of `like`, whose batch must be 1 or B,
// all on the device of `like` (named `like_name` in messages).
void check_raster_outputs(const at::Tensor& face_index, const at::Tensor& bary,
                          int64_t num_faces, const at::Tensor& like, const char* like_name);

// Validates interpolate's inputs: attributes (B|1, V, C) float32/float64, then faces, then
// face_index (B, H, W) int32 with values in [-1, F) and bary (B, H, W, 3) of the attributes'
// dtype, all on one device. Returns the faces as check_faces does.
at::Tensor check_interpolate(const at::Tensor& attributes, const at::Tensor& faces,
                             const at::Tensor& face_index, const at::Tensor& bary);

// Validates _rasterize_backward's inputs: the mesh, rasterize's face_index and bary for it, and
// upstream gradients of bary's and face_index's (depth's) shapes. Returns the int32 faces.
at::Tensor check_rasterize_backward(const at::Tensor& grad_bary, const at::Tensor& grad_depth,
                                    const at::Tensor& vertices, const at::Tensor& faces,
                                    const at::Tensor& face_index, const at::Tensor& bary);

// Validates _interpolate_backward's inputs: interpolate's inputs and an upstream gradient of its
// output's shape (B, H, W, C). Returns the int32 faces.
at::Tensor check_interpolate_backward(const at::Tensor& grad_out, const at::Tensor& attributes,
                                      const at::Tensor& faces, const at::Tensor& face_index,
                                      const at::Tensor& bary);

// The validated inputs of each op, contiguous (upstream gradients also cast to the dtype of the
// vertices or attributes): what every device's adapter starts from, so that the CPU and CUDA
// adapters differ only in how they compute. CUDA adapters build them inside their device guard.
struct MeshArgs {
  at::Tensor vertices, faces32;
};
MeshArgs mesh_args(const at::Tensor& vertices, const at::Tensor& faces, int64_t height,
                   int64_t width);

struct RenderPnccArgs {
  at::Tensor vertices, faces32, ncc;
};
RenderPnccArgs render_pncc_args(const at::Tensor& vertices, const at::Tensor& faces,
                                const at::Tensor& ncc, int64_t height, int64_t width);

struct RasterizeBackwardArgs {
  at::Tensor vertices, faces32, face_index, bary, grad_bary, grad_depth;
};
RasterizeBackwardArgs rasterize_backward_args(const at::Tensor& grad_bary,
                                              const at::Tensor& grad_depth,
                                              const at::Tensor& vertices, const at::Tensor& faces,
                                              const at::Tensor& face_index, const at::Tensor& bary);

struct InterpolateArgs {
  at::Tensor attributes, faces32, face_index, bary;
  at::Tensor grad_out;  // the backward's only
};
InterpolateArgs interpolate_args(const at::Tensor& attributes, const at::Tensor& faces,
                                 const at::Tensor& face_index, const at::Tensor& bary);
InterpolateArgs interpolate_backward_args(const at::Tensor& grad_out, const at::Tensor& attributes,
                                          const at::Tensor& faces, const at::Tensor& face_index,
                                          const at::Tensor& bary);

// The outputs each op allocates (uninitialised; every pixel is written): rasterize's face_index
// (B, H, W) int32, bary (B, H, W, 3) and depth (B, H, W); render_pncc's pncc (B, 3, H, W) and
// mask (B, 1, H, W); interpolate's (B, H, W, C).
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_rasterize_outputs(const at::Tensor& vertices,
                                                                       int64_t height,
                                                                       int64_t width);
std::tuple<at::Tensor, at::Tensor> empty_render_pncc_outputs(const at::Tensor& vertices,
                                                             int64_t height, int64_t width);
at::Tensor empty_interpolate_output(const InterpolateArgs& args);

// Fills a MeshView from validated contiguous tensors.
template <typename T>
MeshView<T> mesh_view(const at::Tensor& vertices, const at::Tensor& faces32, int64_t height,
                      int64_t width) {
  MeshView<T> m;
  m.vertices = vertices.data_ptr<T>();
  m.faces = faces32.data_ptr<int32_t>();
  m.batch = vertices.size(0);
  m.num_vertices = vertices.size(1);
  m.num_faces = faces32.size(0);
  m.height = static_cast<int>(height);
  m.width = static_cast<int>(width);
  return m;
}

}  // namespace raster
}  // namespace pncc
