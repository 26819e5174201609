// CPU kernels of the rasterizer ops. This file owns only the loop structure: the per-triangle
// and per-pixel work is in raster_core.h, shared with CUDA, and the z-buffer of one band of rows
// in raster_band.h.
//
// Parallelism: at::parallel_for over (image, band of rows) work items. Each item owns its rows
// outright (its own z-buffer slice), so no two threads ever write the same pixel, and because
// the z-buffer order is total (depth, then face index) the result does not depend on how the
// work was split: outputs are bitwise identical for every thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "raster/raster_band.h"
#include "raster/raster_check.h"
#include "raster/raster_core.h"
#include "raster/raster_cull.h"

namespace pncc {
namespace raster {
namespace {

// Runs fn(image, row_begin, row_end) over every image, split into enough row bands that a small
// batch (even a single image) still occupies every thread.
template <typename Fn>
void for_each_band(int64_t batch, int64_t height, const Fn& fn) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t bands = std::min<int64_t>(
      std::max<int64_t>(1, height), batch >= threads ? 1 : (threads + batch - 1) / batch);
  const int64_t rows_per_band = (height + bands - 1) / bands;
  at::parallel_for(0, batch * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / bands;
      const int64_t row_begin = (item % bands) * rows_per_band;
      const int64_t row_end = std::min(height, row_begin + rows_per_band);
      if (row_begin < row_end) fn(image, static_cast<int>(row_begin), static_cast<int>(row_end));
    }
  });
}

// The z-buffer pass of one band, compiled twice and picked at load time: for x86-64-v3 (AVX2:
// three-operand and blend instructions shorten the selects of the edge setup) and for the
// baseline. No FMA is ever formed (-ffp-contract=off), so both give bit-identical results.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PNCC_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PNCC_CPU_CLONES
#endif

template <typename T>
RasterizedBand<T> rasterize_band(const MeshView<T>& mesh, int64_t b, int row_begin, int row_end,
                                 cull::Variant variant);

template <>
PNCC_CPU_CLONES RasterizedBand<float> rasterize_band(const MeshView<float>& mesh, int64_t b,
                                                     int row_begin, int row_end,
                                                     cull::Variant variant) {
  return BandBuffer<float>::for_this_thread().rasterize(mesh, b, row_begin, row_end, variant);
}

template <>
PNCC_CPU_CLONES RasterizedBand<double> rasterize_band(const MeshView<double>& mesh, int64_t b,
                                                      int row_begin, int row_end,
                                                      cull::Variant variant) {
  return BandBuffer<double>::for_this_thread().rasterize(mesh, b, row_begin, row_end, variant);
}

// The culling variant, chosen (and any PNCC_RASTER_SIMD error raised) before a parallel region.
cull::Variant selected_cull() {
  try {
    return cull::selected();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rasterize_cpu(const at::Tensor& vertices_in,
                                                              const at::Tensor& faces,
                                                              int64_t height, int64_t width) {
  const auto [vertices, faces32] = mesh_args(vertices_in, faces, height, width);
  const int64_t batch = vertices.size(0);
  auto [face_index, bary, depth] = empty_rasterize_outputs(vertices, height, width);
  if (face_index.numel() == 0) return {face_index, bary, depth};

  AT_DISPATCH_FLOATING_TYPES(vertices.scalar_type(), "rasterize_cpu", [&] {
    const MeshView<scalar_t> mesh = mesh_view<scalar_t>(vertices, faces32, height, width);
    const cull::Variant cull = selected_cull();
    int32_t* face_out = face_index.data_ptr<int32_t>();
    scalar_t* bary_out = bary.data_ptr<scalar_t>();
    scalar_t* depth_out = depth.data_ptr<scalar_t>();
    for_each_band(batch, height, [&](int64_t b, int row_begin, int row_end) {
      const RasterizedBand<scalar_t> band =
          rasterize_band(mesh, b, row_begin, row_end, cull);
      const int64_t first_pixel = (b * height + row_begin) * width;
      for (int64_t offset = 0; offset < int64_t(row_end - row_begin) * width; ++offset) {
        const int64_t pixel = first_pixel + offset;
        const int32_t face = band.face(offset);
        face_out[pixel] = face;
        scalar_t* bary = bary_out + 3 * pixel;
        const bool covered = face >= 0;
        for (int i = 0; i < 3; ++i) bary[i] = covered ? band.bary(offset)[i] : scalar_t(0);
        depth_out[pixel] = covered ? band.depth(offset) : scalar_t(0);
      }
    });
  });
  return {face_index, bary, depth};
}

std::tuple<at::Tensor, at::Tensor> render_pncc_cpu(const at::Tensor& vertices_in,
                                                   const at::Tensor& faces,
                                                   const at::Tensor& ncc_in, int64_t height,
                                                   int64_t width) {
  const auto [vertices, faces32, ncc] = render_pncc_args(vertices_in, faces, ncc_in, height, width);
  const int64_t batch = vertices.size(0);
  auto [pncc, mask] = empty_render_pncc_outputs(vertices, height, width);
  if (mask.numel() == 0) return {pncc, mask};

  AT_DISPATCH_FLOATING_TYPES(vertices.scalar_type(), "render_pncc_cpu", [&] {
    const MeshView<scalar_t> mesh = mesh_view<scalar_t>(vertices, faces32, height, width);
    const cull::Variant cull = selected_cull();
    const scalar_t* ncc_data = ncc.data_ptr<scalar_t>();
    const int64_t ncc_batch_stride = ncc.dim() == 3 ? mesh.num_vertices * 3 : 0;
    scalar_t* pncc_out = pncc.data_ptr<scalar_t>();
    scalar_t* mask_out = mask.data_ptr<scalar_t>();
    const int64_t plane = height * width;
    for_each_band(batch, height, [&](int64_t b, int row_begin, int row_end) {
      const RasterizedBand<scalar_t> band =
          rasterize_band(mesh, b, row_begin, row_end, cull);
      const int64_t first_offset = int64_t(row_begin) * width;
      resolve_pncc_band(band, int64_t(row_end - row_begin) * width,
                        ncc_data + b * ncc_batch_stride, mesh,
                        pncc_out + b * 3 * plane + first_offset, plane,
                        mask_out + b * plane + first_offset, cull);
    });
  });
  return {pncc, mask};
}

at::Tensor rasterize_backward_cpu(const at::Tensor& grad_bary_in, const at::Tensor& grad_depth_in,
                                  const at::Tensor& vertices_in, const at::Tensor& faces,
                                  const at::Tensor& face_index_in, const at::Tensor& bary_in) {
  const auto [vertices, faces32, face_index, bary, grad_bary, grad_depth] = rasterize_backward_args(
      grad_bary_in, grad_depth_in, vertices_in, faces, face_index_in, bary_in);
  at::Tensor grad_vertices = at::zeros_like(vertices);
  const int64_t batch = face_index.size(0), height = face_index.size(1),
                width = face_index.size(2);
  if (face_index.numel() == 0) return grad_vertices;

  AT_DISPATCH_FLOATING_TYPES(vertices.scalar_type(), "rasterize_backward_cpu", [&] {
    const MeshView<scalar_t> mesh = mesh_view<scalar_t>(vertices, faces32, height, width);
    const int32_t* face_data = face_index.data_ptr<int32_t>();
    const scalar_t* bary_data = bary.data_ptr<scalar_t>();
    const scalar_t* grad_bary_data = grad_bary.data_ptr<scalar_t>();
    const scalar_t* grad_depth_data = grad_depth.data_ptr<scalar_t>();
    scalar_t* grad_data = grad_vertices.data_ptr<scalar_t>();
    // One image per work item: its pixels only touch its own vertices, in a fixed order.
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* grad_image = grad_data + b * mesh.num_vertices * 3;
        const auto accumulate = [grad_image](int64_t vertex, int axis, scalar_t value) {
          grad_image[vertex * 3 + axis] += value;
        };
        for (int64_t p = b * height * width; p < (b + 1) * height * width; ++p)
          rasterize_pixel_backward(mesh, b, face_data[p], bary_data + 3 * p,
                                   grad_bary_data + 3 * p, grad_depth_data[p], accumulate);
      }
    });
  });
  return grad_vertices;
}

at::Tensor interpolate_cpu(const at::Tensor& attributes_in, const at::Tensor& faces,
                           const at::Tensor& face_index_in, const at::Tensor& bary_in) {
  const InterpolateArgs args = interpolate_args(attributes_in, faces, face_index_in, bary_in);
  const at::Tensor &attributes = args.attributes, &faces32 = args.faces32,
                   &face_index = args.face_index, &bary = args.bary;
  const int64_t batch = face_index.size(0), pixels = face_index.size(1) * face_index.size(2);
  const int64_t num_vertices = attributes.size(1), channels = attributes.size(2);
  at::Tensor out = empty_interpolate_output(args);
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(attributes.scalar_type(), "interpolate_cpu", [&] {
    const scalar_t* attr = attributes.data_ptr<scalar_t>();
    const int64_t attr_batch_stride = attributes.size(0) == 1 ? 0 : num_vertices * channels;
    const int32_t* face_data = face_index.data_ptr<int32_t>();
    const int32_t* face_table = faces32.data_ptr<int32_t>();
    const scalar_t* bary_data = bary.data_ptr<scalar_t>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * pixels, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        interpolate_pixel(attr + (p / pixels) * attr_batch_stride, channels, face_table,
                          face_data[p], bary_data + 3 * p, out_data + p * channels, 1);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> interpolate_backward_cpu(const at::Tensor& grad_out_in,
                                                            const at::Tensor& attributes_in,
                                                            const at::Tensor& faces,
                                                            const at::Tensor& face_index_in,
                                                            const at::Tensor& bary_in) {
  const auto [attributes, faces32, face_index, bary, grad_out] =
      interpolate_backward_args(grad_out_in, attributes_in, faces, face_index_in, bary_in);
  const int64_t batch = face_index.size(0), pixels = face_index.size(1) * face_index.size(2);
  const int64_t attr_batch = attributes.size(0), num_vertices = attributes.size(1),
                channels = attributes.size(2);
  at::Tensor grad_bary = at::zeros_like(bary);
  // A shared (1, V, C) attribute table receives gradients from every image: each image
  // accumulates into its own slice, and the slices are summed afterwards in image order, so the
  // result is independent of the thread count.
  const bool shared = attr_batch == 1 && batch > 1;
  at::Tensor partial = at::zeros({shared ? batch : attr_batch, num_vertices, channels},
                                 attributes.options());
  if (grad_out.numel() == 0) return {at::zeros_like(attributes), grad_bary};

  AT_DISPATCH_FLOATING_TYPES(attributes.scalar_type(), "interpolate_backward_cpu", [&] {
    const scalar_t* attr = attributes.data_ptr<scalar_t>();
    const int64_t attr_batch_stride = attr_batch == 1 ? 0 : num_vertices * channels;
    const int32_t* face_data = face_index.data_ptr<int32_t>();
    const int32_t* face_table = faces32.data_ptr<int32_t>();
    const scalar_t* bary_data = bary.data_ptr<scalar_t>();
    const scalar_t* grad_out_data = grad_out.data_ptr<scalar_t>();
    scalar_t* grad_bary_data = grad_bary.data_ptr<scalar_t>();
    scalar_t* partial_data = partial.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* grad_attr = partial_data + b * num_vertices * channels;
        const auto accumulate = [grad_attr, channels](int64_t vertex, int64_t c, scalar_t value) {
          grad_attr[vertex * channels + c] += value;
        };
        for (int64_t p = b * pixels; p < (b + 1) * pixels; ++p)
          interpolate_pixel_backward(attr + b * attr_batch_stride, channels, face_table,
                                     face_data[p], bary_data + 3 * p,
                                     grad_out_data + p * channels, grad_bary_data + 3 * p,
                                     accumulate);
      }
    });
  });
  if (!shared) return {partial, grad_bary};
  // Fixed-order sum over images, parallel over elements (each element's order never changes).
  at::Tensor grad_attr = at::empty_like(attributes);
  AT_DISPATCH_FLOATING_TYPES(attributes.scalar_type(), "interpolate_backward_cpu_sum", [&] {
    const scalar_t* src = partial.data_ptr<scalar_t>();
    scalar_t* dst = grad_attr.data_ptr<scalar_t>();
    const int64_t n = num_vertices * channels;
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t acc = src[i];
        for (int64_t b = 1; b < batch; ++b) acc += src[b * n + i];
        dst[i] = acc;
      }
    });
  });
  return {grad_attr, grad_bary};
}

}  // namespace

TORCH_LIBRARY_IMPL(pncc, CPU, m) {
  m.impl("rasterize", &rasterize_cpu);
  m.impl("_rasterize_backward", &rasterize_backward_cpu);
  m.impl("interpolate", &interpolate_cpu);
  m.impl("_interpolate_backward", &interpolate_backward_cpu);
  m.impl("render_pncc", &render_pncc_cpu);
}

}  // namespace raster
}  // namespace pncc
