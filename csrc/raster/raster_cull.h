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
// Variant selection, once per process, by measuring: the first call times every variant this CPU
// supports on a small synthetic face-like mesh (about 1 ms each, on the calling thread, before
// any parallel region) and keeps the fastest; PNCC_RASTER_SIMD names one instead ("avx512",
// "avx2" or "scalar"; asking for one the CPU lacks is an error). All variants give bit-identical
// outputs, so the choice changes nothing but the speed. On a Zen 5 core the avx2 variant (8-lane
// culling, scalar coverage) measured slower than scalar and avx512 fastest (bench_raster.py's time
// split, bench/RESULTS.md); on another CPU the measurement decides.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "raster/raster_math.h"

namespace pncc {
namespace raster {
namespace cull {

enum class Variant { kScalar, kAvx2, kAvx512 };

// The faces of one batch that survive culling, in face order, with their sample bounds
// (struct of arrays, so the vector variants store them with one instruction each).
// (The arrays have kSlack slots beyond their capacity: the vector variants store whole
// registers.)
constexpr int kSlack = 16;

struct Survivors {
  static constexpr int kBatch = 128;  // faces culled per call
  int32_t face[kBatch + kSlack];
  int32_t col0[kBatch + kSlack], col1[kBatch + kSlack], row0[kBatch + kSlack],
      row1[kBatch + kSlack];
  // The corners' image-space coordinates, kept by a culling from float32 vertices
  // (CullVerticesFn) for the vector coverage test; not written by a CullFn.
  float x[3][kBatch + kSlack], y[3][kBatch + kSlack], z[3][kBatch + kSlack];

  SampleBounds bounds(int k) const { return {col0[k], col1[k], row0[k], row1[k]}; }
};

// Culls faces [first, first + count) (count <= Survivors::kBatch) against rows
// [row_begin, row_end) of a `width`-wide image, from the vertices' fixed points. Writes the
// survivors to `out` and returns their number. Face indices are int32 (as in the depth keys).
using CullFn = int (*)(const FixedPoint* points, const int32_t* faces, int32_t first, int count,
                       int row_begin, int row_end, int width, Survivors& out);

// The same culling from the (V, 3) float32 image-space vertices of a `height` x `width` image:
// each corner's fixed point is formed in registers (vertex_fixed_point's clamps and truncation,
// operation for operation, so the survivors and bounds are a CullFn's), and the survivors keep
// their corners' x, y and z. It spares the fixed-point table and every gather of the coverage
// test. (V * 3 must fit in int32, and every index must be in [0, V).)
using CullVerticesFn = int (*)(const float* vertices, int64_t num_vertices, const int32_t* faces,
                               int32_t first, int count, int row_begin, int row_end, int height,
                               int width, Survivors& out);

// The vector coverage test of the survivors of one culling call: a float32 triangle with at
// most kMaxVectorSamples samples in its bounds (on a face mesh at 256x256, 94% of the survivors
// have one or two) is set up and tested 16 triangles at a time, sample k of every lane's bounds
// at once: the triangle setup and cover_sample of raster_math.h, operation for operation in the
// same IEEE single precision (no FMA, the same comparisons, the same NaN outcomes), so the covered
// samples and their weights are bit-identical. Larger triangles are left to the scalar loop.
constexpr int kMaxVectorSamples = 4;

// The covered samples, with the barycentric weights and depth cover_sample gives.
struct CoveredSamples {
  static constexpr int kSize = kMaxVectorSamples * Survivors::kBatch + kSlack;
  int32_t face[kSize], col[kSize], row[kSize];
  float bary[3][kSize], depth[kSize];
};

// The survivors (their positions in Survivors) with more than kMaxVectorSamples samples.
struct LargeSurvivors {
  int32_t index[Survivors::kBatch + kSlack];
  int n = 0;
};

// Tests the first `count` survivors of the variant's CullVerticesFn (whose corner coordinates it
// reads); writes the covered samples of the small ones to `out` and returns their number, and
// lists the large ones in `large`.
using CoverFn = int (*)(const Survivors& survivors, int count, CoveredSamples& out,
                        LargeSurvivors& large);

// render_pncc's resolve of `pixels` consecutive pixels of a band z-buffer (raster_band.h): the
// face of each pixel's key, interpolate_pixel of the (V, 3) float32 `ncc` with the stored weights
// into out[c * plane + offset] (c < 3), and mask[offset] = 1 where covered, 0 elsewhere; the
// vector variant computes interpolate_pixel's products and sums in its order on 16 pixels at once
// (gathers for the face's vertices and their codes), so the values are bit-identical. (V * 3 and
// F * 3 must fit in int32.)
using ResolveFn = void (*)(const uint64_t* keys, const float* bary_depth, int64_t pixels,
                           const float* ncc, const int32_t* faces, float* out, int64_t plane,
                           float* mask);

// The variant this process uses (see above), and its functions. Throws std::runtime_error with a
// one-line message when PNCC_RASTER_SIMD is invalid or names a variant this CPU lacks.
Variant selected();
CullFn function(Variant variant);
// The variant's float32 vector kernels, all three or none (every member nullptr): the coverage
// test reads the coordinates only the culling from vertices keeps. Without them the survivors go
// to the scalar coverage loop and the scalar loop resolves.
struct VectorKernels {
  CullVerticesFn cull = nullptr;
  CoverFn cover = nullptr;
  ResolveFn resolve = nullptr;
};
VectorKernels vector_kernels(Variant variant);
bool supported(Variant variant);
const char* name(Variant variant);

// name(selected()), for the _raster_cpu_variant debug op.
std::string selected_name();

// The calibration behind selected() (for the _raster_cpu_calibration debug op): thread CPU
// seconds of the synthetic workload per variant, indexed by Variant (scalar, avx2, avx512); -1
// for a variant not timed (unsupported, or PNCC_RASTER_SIMD chose without measuring).
std::vector<double> selection_seconds();

}  // namespace cull
}  // namespace raster
}  // namespace pncc
