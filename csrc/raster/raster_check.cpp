#include "raster/raster_check.h"

#include <ATen/ATen.h>

#include <limits>
#include <utility>

#include "common/checks.h"

namespace pncc {
namespace raster {

namespace {

void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& like,
                       const char* like_name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on the device of ", like_name,
                    " (", device_str(like), "), got ", device_str(t));
}

bool is_float_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// Whether the values of an index tensor are range-checked here. Only on the CPU: on a GPU the
// check would cost a reduction and a device-to-host sync per call, so the CUDA kernels guard
// instead (raster_kernels.cuh: out-of-range faces cover nothing, out-of-range face_index values
// read as background).
bool checks_index_values(const at::Tensor& t) { return t.numel() > 0 && t.device().is_cpu(); }

// Range of the values of a non-empty CPU integer tensor.
std::pair<int64_t, int64_t> value_range(const at::Tensor& t) {
  auto [lo, hi] = at::aminmax(t);
  return {lo.item<int64_t>(), hi.item<int64_t>()};
}

}  // namespace

at::Tensor check_faces(const at::Tensor& faces, int64_t num_vertices, const at::Tensor& like,
                       const char* like_name) {
  TORCH_CHECK_TYPE(faces.scalar_type() == at::kInt || faces.scalar_type() == at::kLong,
                   "faces must be an int32 or int64 tensor, got ", dtype_str(faces));
  TORCH_CHECK_VALUE(faces.dim() == 2 && faces.size(1) == 3,
                    "faces must have shape (F, 3), got ", shape_str(faces));
  check_same_device("faces", faces, like, like_name);
  TORCH_CHECK_VALUE(faces.size(0) <= std::numeric_limits<int32_t>::max(),
                    "faces must have at most 2147483647 rows, got ", faces.size(0));
  if (checks_index_values(faces)) {
    const auto [lo, hi] = value_range(faces);
    TORCH_CHECK_VALUE(lo >= 0 && hi < num_vertices, "faces must index vertices in [0, ",
                      num_vertices, "), got values in [", lo, ", ", hi, "]");
  }
  return faces.to(at::kInt).contiguous();
}

at::Tensor check_mesh(const at::Tensor& vertices, const at::Tensor& faces, int64_t height,
                      int64_t width) {
  TORCH_CHECK_TYPE(is_float_dtype(vertices),
                   "vertices must be a float32 or float64 tensor, got ", dtype_str(vertices));
  TORCH_CHECK_VALUE(vertices.dim() == 3 && vertices.size(2) == 3,
                    "vertices must have shape (B, V, 3), got ", shape_str(vertices));
  TORCH_CHECK_VALUE(height >= 0 && height <= kMaxImageSide, "height must be in [0, ",
                    kMaxImageSide, "], got ", height);
  TORCH_CHECK_VALUE(width >= 0 && width <= kMaxImageSide, "width must be in [0, ",
                    kMaxImageSide, "], got ", width);
  return check_faces(faces, vertices.size(1), vertices, "vertices");
}

void check_ncc(const at::Tensor& ncc, const at::Tensor& vertices) {
  TORCH_CHECK_TYPE(ncc.scalar_type() == vertices.scalar_type(), "ncc must have dtype ",
                   dtype_str(vertices), " like vertices, got ", dtype_str(ncc));
  const int64_t batch = vertices.size(0), num_vertices = vertices.size(1);
  const bool shape_ok = (ncc.dim() == 2 || (ncc.dim() == 3 && ncc.size(0) == batch)) &&
                        ncc.size(-2) == num_vertices && ncc.size(-1) == 3;
  TORCH_CHECK_VALUE(shape_ok, "ncc must have shape (V, 3) or (B, V, 3) with B=", batch,
                    " and V=", num_vertices, ", got ", shape_str(ncc));
  check_same_device("ncc", ncc, vertices, "vertices");
}

void check_raster_outputs(const at::Tensor& face_index, const at::Tensor& bary,
                          int64_t num_faces, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_TYPE(face_index.scalar_type() == at::kInt,
                   "face_index must be an int32 tensor, got ", dtype_str(face_index));
  TORCH_CHECK_VALUE(face_index.dim() == 3, "face_index must have shape (B, H, W), got ",
                    shape_str(face_index));
  TORCH_CHECK_TYPE(bary.scalar_type() == like.scalar_type(), "bary must have dtype ",
                   dtype_str(like), " like ", like_name, ", got ", dtype_str(bary));
  TORCH_CHECK_VALUE(bary.dim() == 4 && bary.size(3) == 3 &&
                        bary.sizes().slice(0, 3) == face_index.sizes(),
                    "bary must have shape (B, H, W, 3) matching face_index ",
                    shape_str(face_index), ", got ", shape_str(bary));
  TORCH_CHECK_VALUE(like.size(0) == 1 || like.size(0) == face_index.size(0), like_name,
                    " must have batch size 1 or B=", face_index.size(0),
                    " like face_index, got ", shape_str(like));
  check_same_device("face_index", face_index, like, like_name);
  check_same_device("bary", bary, like, like_name);
  if (checks_index_values(face_index)) {
    const auto [lo, hi] = value_range(face_index);
    TORCH_CHECK_VALUE(lo >= -1 && hi < num_faces,
                      "face_index must be -1 or index faces in [0, ", num_faces,
                      "), got values in [", lo, ", ", hi, "]");
  }
}

at::Tensor check_interpolate(const at::Tensor& attributes, const at::Tensor& faces,
                             const at::Tensor& face_index, const at::Tensor& bary) {
  TORCH_CHECK_TYPE(is_float_dtype(attributes),
                   "attributes must be a float32 or float64 tensor, got ", dtype_str(attributes));
  TORCH_CHECK_VALUE(attributes.dim() == 3,
                    "attributes must have shape (B, V, C) or (1, V, C), got ",
                    shape_str(attributes));
  at::Tensor faces32 = check_faces(faces, attributes.size(1), attributes, "attributes");
  check_raster_outputs(face_index, bary, faces.size(0), attributes, "attributes");
  return faces32;
}

at::Tensor check_rasterize_backward(const at::Tensor& grad_bary, const at::Tensor& grad_depth,
                                    const at::Tensor& vertices, const at::Tensor& faces,
                                    const at::Tensor& face_index, const at::Tensor& bary) {
  TORCH_CHECK_VALUE(face_index.dim() == 3, "face_index must have shape (B, H, W), got ",
                    shape_str(face_index));
  at::Tensor faces32 = check_mesh(vertices, faces, face_index.size(1), face_index.size(2));
  check_raster_outputs(face_index, bary, faces.size(0), vertices, "vertices");
  TORCH_CHECK_VALUE(vertices.size(0) == face_index.size(0), "vertices must have batch size B=",
                    face_index.size(0), " like face_index, got ", shape_str(vertices));
  TORCH_CHECK_VALUE(grad_bary.sizes() == bary.sizes(), "grad_bary must have the shape of bary ",
                    shape_str(bary), ", got ", shape_str(grad_bary));
  TORCH_CHECK_VALUE(grad_depth.sizes() == face_index.sizes(),
                    "grad_depth must have the shape of depth ", shape_str(face_index), ", got ",
                    shape_str(grad_depth));
  check_same_device("grad_bary", grad_bary, vertices, "vertices");
  check_same_device("grad_depth", grad_depth, vertices, "vertices");
  return faces32;
}

at::Tensor check_interpolate_backward(const at::Tensor& grad_out, const at::Tensor& attributes,
                                      const at::Tensor& faces, const at::Tensor& face_index,
                                      const at::Tensor& bary) {
  at::Tensor faces32 = check_interpolate(attributes, faces, face_index, bary);
  const bool shape_ok = grad_out.dim() == 4 &&
                        grad_out.sizes().slice(0, 3) == face_index.sizes() &&
                        grad_out.size(3) == attributes.size(2);
  TORCH_CHECK_VALUE(shape_ok, "grad_out must have shape (B, H, W, C) = (", face_index.size(0),
                    ", ", face_index.size(1), ", ", face_index.size(2), ", ", attributes.size(2),
                    "), got ", shape_str(grad_out));
  check_same_device("grad_out", grad_out, attributes, "attributes");
  return faces32;
}

MeshArgs mesh_args(const at::Tensor& vertices, const at::Tensor& faces, int64_t height,
                   int64_t width) {
  at::Tensor faces32 = check_mesh(vertices, faces, height, width);
  return {vertices.contiguous(), std::move(faces32)};
}

RenderPnccArgs render_pncc_args(const at::Tensor& vertices, const at::Tensor& faces,
                                const at::Tensor& ncc, int64_t height, int64_t width) {
  at::Tensor faces32 = check_mesh(vertices, faces, height, width);
  check_ncc(ncc, vertices);
  return {vertices.contiguous(), std::move(faces32), ncc.contiguous()};
}

RasterizeBackwardArgs rasterize_backward_args(const at::Tensor& grad_bary,
                                              const at::Tensor& grad_depth,
                                              const at::Tensor& vertices, const at::Tensor& faces,
                                              const at::Tensor& face_index, const at::Tensor& bary) {
  at::Tensor faces32 =
      check_rasterize_backward(grad_bary, grad_depth, vertices, faces, face_index, bary);
  const auto dtype = vertices.scalar_type();
  return {vertices.contiguous(),           std::move(faces32),
          face_index.contiguous(),         bary.contiguous(),
          grad_bary.to(dtype).contiguous(), grad_depth.to(dtype).contiguous()};
}

InterpolateArgs interpolate_args(const at::Tensor& attributes, const at::Tensor& faces,
                                 const at::Tensor& face_index, const at::Tensor& bary) {
  at::Tensor faces32 = check_interpolate(attributes, faces, face_index, bary);
  return {attributes.contiguous(), std::move(faces32), face_index.contiguous(), bary.contiguous(),
          at::Tensor()};
}

InterpolateArgs interpolate_backward_args(const at::Tensor& grad_out, const at::Tensor& attributes,
                                          const at::Tensor& faces, const at::Tensor& face_index,
                                          const at::Tensor& bary) {
  at::Tensor faces32 = check_interpolate_backward(grad_out, attributes, faces, face_index, bary);
  return {attributes.contiguous(), std::move(faces32), face_index.contiguous(), bary.contiguous(),
          grad_out.to(attributes.scalar_type()).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_rasterize_outputs(const at::Tensor& vertices,
                                                                       int64_t height,
                                                                       int64_t width) {
  const int64_t batch = vertices.size(0);
  return {at::empty({batch, height, width}, vertices.options().dtype(at::kInt)),
          at::empty({batch, height, width, 3}, vertices.options()),
          at::empty({batch, height, width}, vertices.options())};
}

std::tuple<at::Tensor, at::Tensor> empty_render_pncc_outputs(const at::Tensor& vertices,
                                                             int64_t height, int64_t width) {
  const int64_t batch = vertices.size(0);
  return {at::empty({batch, 3, height, width}, vertices.options()),
          at::empty({batch, 1, height, width}, vertices.options())};
}

at::Tensor empty_interpolate_output(const InterpolateArgs& args) {
  const at::Tensor& face_index = args.face_index;
  return at::empty({face_index.size(0), face_index.size(1), face_index.size(2),
                    args.attributes.size(2)},
                   args.attributes.options());
}

}  // namespace raster
}  // namespace pncc
