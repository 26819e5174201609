// CUDA kernels of the rasterizer ops. This file owns only the thread mapping: the per-triangle
// and per-pixel work is in raster_core.h, shared with the CPU.
//
//   z-buffer pass: one thread per (image, triangle). Setup, bounding box, coverage, and one
//                  64-bit atomicMin per covered sample on a key that packs the depth above the
//                  face index. Nothing but the key is written, so the result is deterministic.
//   resolve pass:  one thread per pixel. Decodes the winning face, recomputes its barycentrics
//                  and depth, and writes every output exactly once.
//
// No per-pixel lists, no bins, no (B, H, W, K) buffers: memory is the outputs plus the 8-byte
// key per pixel.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "raster/raster_check.h"
#include "raster/raster_core.h"

namespace pncc {
namespace raster {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

template <typename T>
__global__ void zbuffer_kernel(MeshView<T> mesh, unsigned long long* keys) {
  const int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= mesh.batch * mesh.num_faces) return;
  const int64_t b = item / mesh.num_faces;
  const int64_t f = item - b * mesh.num_faces;
  unsigned long long* image_keys = keys + b * int64_t(mesh.height) * mesh.width;
  const BoundsFromVertices<T> triangle_bounds{mesh.image_vertices(b), mesh.height, mesh.width, 0,
                                              mesh.height};
  zbuffer_face(mesh, b, f, 0, triangle_bounds,
               [image_keys](int64_t offset, uint64_t key, const T*, T) {
                 atomicMin(image_keys + offset, static_cast<unsigned long long>(key));
               });
}

template <typename T>
__global__ void resolve_raster_kernel(MeshView<T> mesh, const unsigned long long* keys,
                                      int32_t* face_index, T* bary, T* depth) {
  const int64_t pixel = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t plane = int64_t(mesh.height) * mesh.width;
  if (pixel >= mesh.batch * plane) return;
  const int64_t b = pixel / plane;
  const int row = static_cast<int>((pixel - b * plane) / mesh.width);
  const int col = static_cast<int>(pixel - b * plane - int64_t(row) * mesh.width);
  T pixel_bary[3], pixel_depth;
  face_index[pixel] = resolve_pixel(mesh, b, row, col, keys[pixel], pixel_bary, pixel_depth);
  bary[3 * pixel + 0] = pixel_bary[0];
  bary[3 * pixel + 1] = pixel_bary[1];
  bary[3 * pixel + 2] = pixel_bary[2];
  depth[pixel] = pixel_depth;
}

// Writes the PNCC image channel-first and the mask directly: no (B, H, W, 3) intermediate.
template <typename T>
__global__ void resolve_pncc_kernel(MeshView<T> mesh, const unsigned long long* keys,
                                    const T* ncc, int64_t ncc_batch_stride, T* pncc, T* mask) {
  const int64_t pixel = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t plane = int64_t(mesh.height) * mesh.width;
  if (pixel >= mesh.batch * plane) return;
  const int64_t b = pixel / plane;
  const int64_t offset = pixel - b * plane;
  const int row = static_cast<int>(offset / mesh.width);
  const int col = static_cast<int>(offset - int64_t(row) * mesh.width);
  T bary[3], depth;
  const int32_t face = resolve_pixel(mesh, b, row, col, keys[pixel], bary, depth);
  interpolate_pixel(ncc + b * ncc_batch_stride, 3, mesh.faces, face, bary,
                    pncc + b * 3 * plane + offset, plane);
  mask[pixel] = face >= 0 ? T(1) : T(0);
}

template <typename T>
__global__ void rasterize_backward_kernel(MeshView<T> mesh, const int32_t* face_index,
                                          const T* bary, const T* grad_bary,
                                          const T* grad_depth, T* grad_vertices) {
  const int64_t pixel = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t plane = int64_t(mesh.height) * mesh.width;
  if (pixel >= mesh.batch * plane) return;
  const int64_t b = pixel / plane;
  T* grad_image = grad_vertices + b * mesh.num_vertices * 3;
  rasterize_pixel_backward(mesh, b, face_index[pixel], bary + 3 * pixel, grad_bary + 3 * pixel,
                           grad_depth[pixel], [grad_image](int64_t vertex, int axis, T value) {
                             if (value != T(0)) atomicAdd(grad_image + vertex * 3 + axis, value);
                           });
}

template <typename T>
__global__ void interpolate_kernel(const T* attributes, int64_t attr_batch_stride,
                                   int64_t channels, const int32_t* faces,
                                   const int32_t* face_index, const T* bary, int64_t pixels,
                                   int64_t total, T* out) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= total) return;
  interpolate_pixel(attributes + (p / pixels) * attr_batch_stride, channels, faces,
                    face_index[p], bary + 3 * p, out + p * channels, 1);
}

template <typename T>
__global__ void interpolate_backward_kernel(const T* attributes, int64_t attr_batch_stride,
                                            int64_t channels, const int32_t* faces,
                                            const int32_t* face_index, const T* bary,
                                            const T* grad_out, int64_t pixels, int64_t total,
                                            T* grad_attributes, T* grad_bary) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= total) return;
  const int64_t attr_offset = (p / pixels) * attr_batch_stride;
  T* grad_attr = grad_attributes + attr_offset;
  interpolate_pixel_backward(attributes + attr_offset, channels, faces, face_index[p],
                             bary + 3 * p, grad_out + p * channels, grad_bary + 3 * p,
                             [grad_attr, channels](int64_t vertex, int64_t c, T value) {
                               if (value != T(0)) atomicAdd(grad_attr + vertex * channels + c, value);
                             });
}

// The packed z-buffer of a batch: (B, H, W) keys, all empty, on the current stream.
template <typename T>
at::Tensor zbuffer(const MeshView<T>& mesh, const at::Tensor& like, cudaStream_t stream) {
  at::Tensor keys = at::empty({mesh.batch, mesh.height, mesh.width}, like.options().dtype(at::kLong));
  // All-ones bytes are kEmptyKey.
  C10_CUDA_CHECK(cudaMemsetAsync(keys.data_ptr(), 0xff, keys.numel() * sizeof(uint64_t), stream));
  const int64_t items = mesh.batch * mesh.num_faces;
  if (items > 0) {
    zbuffer_kernel<T><<<blocks_for(items), kThreads, 0, stream>>>(
        mesh, reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return keys;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rasterize_cuda(const at::Tensor& vertices_in,
                                                               const at::Tensor& faces,
                                                               int64_t height, int64_t width) {
  const at::Tensor faces32 = check_mesh(vertices_in, faces, height, width);
  const c10::cuda::CUDAGuard guard(vertices_in.device());
  const at::Tensor vertices = vertices_in.contiguous();
  const int64_t batch = vertices.size(0);
  at::Tensor face_index = at::empty({batch, height, width}, vertices.options().dtype(at::kInt));
  at::Tensor bary = at::empty({batch, height, width, 3}, vertices.options());
  at::Tensor depth = at::empty({batch, height, width}, vertices.options());
  if (face_index.numel() == 0) return {face_index, bary, depth};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(vertices.scalar_type(), "rasterize_cuda", [&] {
    const MeshView<scalar_t> mesh = mesh_view<scalar_t>(vertices, faces32, height, width);
    const at::Tensor keys = zbuffer(mesh, vertices, stream);
    resolve_raster_kernel<scalar_t><<<blocks_for(face_index.numel()), kThreads, 0, stream>>>(
        mesh, reinterpret_cast<const unsigned long long*>(keys.data_ptr<int64_t>()),
        face_index.data_ptr<int32_t>(), bary.data_ptr<scalar_t>(), depth.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {face_index, bary, depth};
}

std::tuple<at::Tensor, at::Tensor> render_pncc_cuda(const at::Tensor& vertices_in,
                                                    const at::Tensor& faces,
                                                    const at::Tensor& ncc_in, int64_t height,
                                                    int64_t width) {
  const at::Tensor faces32 = check_mesh(vertices_in, faces, height, width);
  check_ncc(ncc_in, vertices_in);
  const c10::cuda::CUDAGuard guard(vertices_in.device());
  const at::Tensor vertices = vertices_in.contiguous();
  const at::Tensor ncc = ncc_in.contiguous();
  const int64_t batch = vertices.size(0);
  at::Tensor pncc = at::empty({batch, 3, height, width}, vertices.options());
  at::Tensor mask = at::empty({batch, 1, height, width}, vertices.options());
  if (mask.numel() == 0) return {pncc, mask};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(vertices.scalar_type(), "render_pncc_cuda", [&] {
    const MeshView<scalar_t> mesh = mesh_view<scalar_t>(vertices, faces32, height, width);
    const at::Tensor keys = zbuffer(mesh, vertices, stream);
    resolve_pncc_kernel<scalar_t><<<blocks_for(mask.numel()), kThreads, 0, stream>>>(
        mesh, reinterpret_cast<const unsigned long long*>(keys.data_ptr<int64_t>()),
        ncc.data_ptr<scalar_t>(), ncc.dim() == 3 ? mesh.num_vertices * 3 : 0,
        pncc.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pncc, mask};
}

at::Tensor rasterize_backward_cuda(const at::Tensor& grad_bary_in,
                                   const at::Tensor& grad_depth_in,
                                   const at::Tensor& vertices_in, const at::Tensor& faces,
                                   const at::Tensor& face_index_in, const at::Tensor& bary_in) {
  const at::Tensor faces32 = check_rasterize_backward(grad_bary_in, grad_depth_in, vertices_in,
                                                      faces, face_index_in, bary_in);
  at::globalContext().alertNotDeterministic("_rasterize_backward_cuda");
  const c10::cuda::CUDAGuard guard(vertices_in.device());
  const at::Tensor vertices = vertices_in.contiguous();
  const at::Tensor face_index = face_index_in.contiguous();
  const at::Tensor bary = bary_in.contiguous();
  const at::Tensor grad_bary = grad_bary_in.to(vertices.scalar_type()).contiguous();
  const at::Tensor grad_depth = grad_depth_in.to(vertices.scalar_type()).contiguous();
  at::Tensor grad_vertices = at::zeros_like(vertices);
  if (face_index.numel() == 0) return grad_vertices;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(vertices.scalar_type(), "rasterize_backward_cuda", [&] {
    const MeshView<scalar_t> mesh =
        mesh_view<scalar_t>(vertices, faces32, face_index.size(1), face_index.size(2));
    rasterize_backward_kernel<scalar_t><<<blocks_for(face_index.numel()), kThreads, 0, stream>>>(
        mesh, face_index.data_ptr<int32_t>(), bary.data_ptr<scalar_t>(),
        grad_bary.data_ptr<scalar_t>(), grad_depth.data_ptr<scalar_t>(),
        grad_vertices.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_vertices;
}

at::Tensor interpolate_cuda(const at::Tensor& attributes_in, const at::Tensor& faces,
                            const at::Tensor& face_index_in, const at::Tensor& bary_in) {
  const at::Tensor faces32 = check_interpolate(attributes_in, faces, face_index_in, bary_in);
  const c10::cuda::CUDAGuard guard(attributes_in.device());
  const at::Tensor attributes = attributes_in.contiguous();
  const at::Tensor face_index = face_index_in.contiguous();
  const at::Tensor bary = bary_in.contiguous();
  const int64_t channels = attributes.size(2);
  at::Tensor out = at::empty({face_index.size(0), face_index.size(1), face_index.size(2), channels},
                             attributes.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pixels = face_index.size(1) * face_index.size(2), total = face_index.numel();

  AT_DISPATCH_FLOATING_TYPES(attributes.scalar_type(), "interpolate_cuda", [&] {
    interpolate_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        attributes.data_ptr<scalar_t>(),
        attributes.size(0) == 1 ? 0 : attributes.size(1) * channels, channels,
        faces32.data_ptr<int32_t>(), face_index.data_ptr<int32_t>(), bary.data_ptr<scalar_t>(),
        pixels, total, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> interpolate_backward_cuda(const at::Tensor& grad_out_in,
                                                             const at::Tensor& attributes_in,
                                                             const at::Tensor& faces,
                                                             const at::Tensor& face_index_in,
                                                             const at::Tensor& bary_in) {
  const at::Tensor faces32 =
      check_interpolate_backward(grad_out_in, attributes_in, faces, face_index_in, bary_in);
  const int64_t channels = attributes_in.size(2);
  at::globalContext().alertNotDeterministic("_interpolate_backward_cuda");
  const c10::cuda::CUDAGuard guard(attributes_in.device());
  const at::Tensor attributes = attributes_in.contiguous();
  const at::Tensor face_index = face_index_in.contiguous();
  const at::Tensor bary = bary_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(attributes.scalar_type()).contiguous();
  at::Tensor grad_attributes = at::zeros_like(attributes);
  at::Tensor grad_bary = at::zeros_like(bary);
  if (grad_out.numel() == 0) return {grad_attributes, grad_bary};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pixels = face_index.size(1) * face_index.size(2), total = face_index.numel();

  AT_DISPATCH_FLOATING_TYPES(attributes.scalar_type(), "interpolate_backward_cuda", [&] {
    interpolate_backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        attributes.data_ptr<scalar_t>(),
        attributes.size(0) == 1 ? 0 : attributes.size(1) * channels, channels,
        faces32.data_ptr<int32_t>(), face_index.data_ptr<int32_t>(), bary.data_ptr<scalar_t>(),
        grad_out.data_ptr<scalar_t>(), pixels, total, grad_attributes.data_ptr<scalar_t>(),
        grad_bary.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_attributes, grad_bary};
}

}  // namespace

TORCH_LIBRARY_IMPL(pncc, CUDA, m) {
  m.impl("rasterize", &rasterize_cuda);
  m.impl("_rasterize_backward", &rasterize_backward_cuda);
  m.impl("interpolate", &interpolate_cuda);
  m.impl("_interpolate_backward", &interpolate_backward_cuda);
  m.impl("render_pncc", &render_pncc_cuda);
}

}  // namespace raster
}  // namespace pncc
