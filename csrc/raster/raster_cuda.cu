// CUDA adapters of the rasterizer ops: validate, allocate, pick the dtype, launch, register. The
// kernels and their launchers are in raster_kernels.cuh (see its comment for the passes and for
// what the CUDA path does not validate: index ranges, which would need a host sync per call).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "raster/raster_check.h"
#include "raster/raster_kernels.cuh"

namespace pncc {
namespace raster {
namespace {

using namespace kernels;

// The packed z-buffer of a batch: (B, H, W) keys, all empty, on the current stream.
template <typename T>
at::Tensor zbuffer(const MeshView<T>& mesh, const at::Tensor& like, cudaStream_t stream) {
  at::Tensor keys = at::empty({mesh.batch, mesh.height, mesh.width}, like.options().dtype(at::kLong));
  // All-ones bytes are kEmptyKey.
  C10_CUDA_CHECK(cudaMemsetAsync(keys.data_ptr(), 0xff, keys.numel() * sizeof(uint64_t), stream));
  launch_zbuffer(ZbufferParams<T>{mesh, reinterpret_cast<unsigned long long*>(keys.data_ptr<int64_t>())},
                 stream);
  return keys;
}

const unsigned long long* key_ptr(const at::Tensor& keys) {
  return reinterpret_cast<const unsigned long long*>(keys.data_ptr<int64_t>());
}

// The pointers and sizes interpolate and its backward share; outputs are filled in by the caller.
template <typename T>
InterpolateParams<T> interpolate_params(const InterpolateArgs& args) {
  const at::Tensor &attributes = args.attributes, &faces32 = args.faces32,
                   &face_index = args.face_index, &bary = args.bary;
  InterpolateParams<T> p{};
  p.attributes = attributes.data_ptr<T>();
  p.num_vertices = attributes.size(1);
  p.channels = attributes.size(2);
  p.attr_batch_stride = attributes.size(0) == 1 ? 0 : p.num_vertices * p.channels;
  p.faces = faces32.data_ptr<int32_t>();
  p.num_faces = faces32.size(0);
  p.face_index = face_index.data_ptr<int32_t>();
  p.bary = bary.data_ptr<T>();
  p.pixels = face_index.size(1) * face_index.size(2);
  p.total = face_index.numel();
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rasterize_cuda(const at::Tensor& vertices_in,
                                                               const at::Tensor& faces,
                                                               int64_t height, int64_t width) {
  const c10::cuda::CUDAGuard guard(vertices_in.device());
  const auto [vertices, faces32] = mesh_args(vertices_in, faces, height, width);
  auto [face_index, bary, depth] = empty_rasterize_outputs(vertices, height, width);
  if (face_index.numel() == 0) return {face_index, bary, depth};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(vertices.scalar_type(), "rasterize_cuda", [&] {
    const MeshView<scalar_t> mesh = mesh_view<scalar_t>(vertices, faces32, height, width);
    const at::Tensor keys = zbuffer(mesh, vertices, stream);
    launch_resolve_raster(
        ResolveRasterParams<scalar_t>{mesh, key_ptr(keys), face_index.data_ptr<int32_t>(),
                                      bary.data_ptr<scalar_t>(), depth.data_ptr<scalar_t>()},
        stream);
  });
  return {face_index, bary, depth};
}

std::tuple<at::Tensor, at::Tensor> render_pncc_cuda(const at::Tensor& vertices_in,
                                                    const at::Tensor& faces,
                                                    const at::Tensor& ncc_in, int64_t height,
                                                    int64_t width) {
  const c10::cuda::CUDAGuard guard(vertices_in.device());
  const auto [vertices, faces32, ncc] = render_pncc_args(vertices_in, faces, ncc_in, height, width);
  auto [pncc, mask] = empty_render_pncc_outputs(vertices, height, width);
  if (mask.numel() == 0) return {pncc, mask};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(vertices.scalar_type(), "render_pncc_cuda", [&] {
    const MeshView<scalar_t> mesh = mesh_view<scalar_t>(vertices, faces32, height, width);
    const at::Tensor keys = zbuffer(mesh, vertices, stream);
    launch_resolve_pncc(
        ResolvePnccParams<scalar_t>{mesh, key_ptr(keys), ncc.data_ptr<scalar_t>(),
                                    ncc.dim() == 3 ? mesh.num_vertices * 3 : 0,
                                    pncc.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>()},
        stream);
  });
  return {pncc, mask};
}

at::Tensor rasterize_backward_cuda(const at::Tensor& grad_bary_in,
                                   const at::Tensor& grad_depth_in,
                                   const at::Tensor& vertices_in, const at::Tensor& faces,
                                   const at::Tensor& face_index_in, const at::Tensor& bary_in) {
  const c10::cuda::CUDAGuard guard(vertices_in.device());
  const auto [vertices, faces32, face_index, bary, grad_bary, grad_depth] = rasterize_backward_args(
      grad_bary_in, grad_depth_in, vertices_in, faces, face_index_in, bary_in);
  at::globalContext().alertNotDeterministic("_rasterize_backward_cuda");
  at::Tensor grad_vertices = at::zeros_like(vertices);
  if (face_index.numel() == 0) return grad_vertices;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(vertices.scalar_type(), "rasterize_backward_cuda", [&] {
    const MeshView<scalar_t> mesh =
        mesh_view<scalar_t>(vertices, faces32, face_index.size(1), face_index.size(2));
    launch_rasterize_backward(
        RasterizeBackwardParams<scalar_t>{mesh, face_index.data_ptr<int32_t>(),
                                          bary.data_ptr<scalar_t>(), grad_bary.data_ptr<scalar_t>(),
                                          grad_depth.data_ptr<scalar_t>(),
                                          grad_vertices.data_ptr<scalar_t>()},
        stream);
  });
  return grad_vertices;
}

at::Tensor interpolate_cuda(const at::Tensor& attributes_in, const at::Tensor& faces,
                            const at::Tensor& face_index_in, const at::Tensor& bary_in) {
  const c10::cuda::CUDAGuard guard(attributes_in.device());
  const InterpolateArgs args = interpolate_args(attributes_in, faces, face_index_in, bary_in);
  at::Tensor out = empty_interpolate_output(args);
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(args.attributes.scalar_type(), "interpolate_cuda", [&] {
    InterpolateParams<scalar_t> p = interpolate_params<scalar_t>(args);
    p.out = out.data_ptr<scalar_t>();
    launch_interpolate(p, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> interpolate_backward_cuda(const at::Tensor& grad_out_in,
                                                             const at::Tensor& attributes_in,
                                                             const at::Tensor& faces,
                                                             const at::Tensor& face_index_in,
                                                             const at::Tensor& bary_in) {
  const c10::cuda::CUDAGuard guard(attributes_in.device());
  const InterpolateArgs args =
      interpolate_backward_args(grad_out_in, attributes_in, faces, face_index_in, bary_in);
  at::globalContext().alertNotDeterministic("_interpolate_backward_cuda");
  at::Tensor grad_attributes = at::zeros_like(args.attributes);
  at::Tensor grad_bary = at::zeros_like(args.bary);
  if (args.grad_out.numel() == 0) return {grad_attributes, grad_bary};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(args.attributes.scalar_type(), "interpolate_backward_cuda", [&] {
    InterpolateParams<scalar_t> p = interpolate_params<scalar_t>(args);
    p.grad_out = args.grad_out.data_ptr<scalar_t>();
    p.grad_attributes = grad_attributes.data_ptr<scalar_t>();
    p.grad_bary = grad_bary.data_ptr<scalar_t>();
    launch_interpolate_backward(p, stream);
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
