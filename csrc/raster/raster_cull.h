// Triangle culling of the CPU z-buffer, 16 (AVX-512) or 8 (AVX2) triangles at a time. CPU only
// and torch-free (the CUDA kernel culls one triangle per thread with raster_math.h directly).
//
// Why: most triangles of a real face mesh at 256x256 are sub-pixel, so the CPU rasterizer spends
// most of its time fetching three vertices, forming a bounding box and finding it holds no pixel
// sample. The vector variants do exactly that arithmetic (triangle_sample_bounds and is_empty of
// raster_math.h, integers only) on a whole register of triangles, and hand the survivors, in face
// order, to the scalar setup and coverage loop. Integer arithmetic has no rounding, so every
// variant produces the same survivors and bounds, and the rasterizer's outputs stay bitwise
// identical whichever runs.
//
// Variant selection, once per process: the widest the CPU supports, unless PNCC_RASTER_SIMD
// names one ("avx512", "avx2" or "scalar"; asking for one the CPU lacks is an error).
#pragma once

#include <cstdint>
#include <string>

#include "raster/raster_math.h"

namespace pncc {
namespace raster {
namespace cull {

enum class Variant { kScalar, kAvx2, kAvx512 };

// The faces of one batch that survive culling, in face order, with their sample bounds
// (struct of arrays, so the vector variants store them with one instruction each).
struct Survivors {
  static constexpr int kBatch = 64;  // faces culled per call
  int32_t face[kBatch];
  int32_t col0[kBatch], col1[kBatch], row0[kBatch], row1[kBatch];

  SampleBounds bounds(int k) const { return {col0[k], col1[k], row0[k], row1[k]}; }
};

// Culls faces [first, first + count) (count <= Survivors::kBatch) against rows
// [row_begin, row_end) of a `width`-wide image, from the vertices' fixed points. Writes the
// survivors to `out` and returns their number. Face indices are int32 (as in the depth keys).
using CullFn = int (*)(const FixedPoint* points, const int32_t* faces, int32_t first, int count,
                       int row_begin, int row_end, int width, Survivors& out);

// The variant this process uses (see above), and its function. Throws std::runtime_error with a
// one-line message when PNCC_RASTER_SIMD is invalid or names a variant this CPU lacks.
Variant selected();
CullFn function(Variant variant);
bool supported(Variant variant);
const char* name(Variant variant);

// name(selected()), for the _raster_cpu_variant debug op.
std::string selected_name();

}  // namespace cull
}  // namespace raster
}  // namespace pncc
