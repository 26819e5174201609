// Every schema of the `pncc` operator namespace, declared once.
//
// Backends register their kernels with TORCH_LIBRARY_IMPL(pncc, CPU|CUDA, m) in their own files;
// fake (meta) kernels and autograd formulas are registered from Python (pncc_cuda/raster.py,
// pncc_cuda/corr.py). The dispatcher routes devices: no kernel checks `is_cuda()` itself.
#include <Python.h>
#include <torch/library.h>

#include "corr/corr_cpu_path.h"
#include "raster/raster_cull.h"

// An empty Python module, so that `import pncc_cuda._C` loads this shared library and runs the
// registrations below. The package imports it before any Python-side registration.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "pncc_cuda compiled ops (registered with torch.library)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(pncc, m) {
  // ---- PNCC z-buffer rasterizer (csrc/raster) ----
  m.def(
      "rasterize(Tensor vertices, Tensor faces, int height, int width)"
      " -> (Tensor face_index, Tensor bary, Tensor depth)");
  m.def(
      "_rasterize_backward(Tensor grad_bary, Tensor grad_depth, Tensor vertices, Tensor faces,"
      " Tensor face_index, Tensor bary) -> Tensor grad_vertices");
  m.def(
      "interpolate(Tensor attributes, Tensor faces, Tensor face_index, Tensor bary)"
      " -> Tensor");
  m.def(
      "_interpolate_backward(Tensor grad_out, Tensor attributes, Tensor faces,"
      " Tensor face_index, Tensor bary) -> (Tensor grad_attributes, Tensor grad_bary)");
  m.def(
      "render_pncc(Tensor vertices, Tensor faces, Tensor ncc, int height, int width)"
      " -> (Tensor pncc, Tensor mask)");
  // The CPU rasterizer's triangle-culling variant (csrc/raster/raster_cull.h): "avx512", "avx2"
  // or "scalar". Takes no tensor, so it is defined here with its one kernel.
  m.def("_raster_cpu_variant() -> str", &pncc::raster::cull::selected_name);
  // The calibration that chose it: thread CPU seconds per variant (scalar, avx2, avx512), -1 for
  // a variant not timed.
  m.def("_raster_cpu_calibration() -> float[]", &pncc::raster::cull::selection_seconds);

  // ---- correspondence softmax-warp (csrc/corr) ----
  m.def(
      "corr_warp(Tensor query, Tensor key, Tensor value, float temperature, bool normalize,"
      " float eps) -> (Tensor out, Tensor lse)");
  m.def(
      "_corr_warp_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out,"
      " Tensor lse, float temperature, bool normalize, float eps)"
      " -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // Which CPU implementation runs corr_warp's tile products (csrc/corr/corr_cpu_path.h): for
  // tests, benchmarks and bug reports. They take no tensor, so they are defined here with their
  // one kernel.
  m.def("_corr_cpu_path(int channels, int value_channels, bool bf16=False) -> str",
        &pncc::corr::path::path_for);
  m.def("_corr_cpu_path_mode(str mode) -> str", &pncc::corr::path::set_mode);
  m.def("_corr_cpu_path_stats() -> int[]", &pncc::corr::path::stats);
}
