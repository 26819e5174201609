// The culling variants of raster_cull.h. The vector ones are compiled for their ISA by function
// attributes (the rest of the extension stays baseline x86-64) and only run when the CPU has it.
#include "raster/raster_cull.h"

#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PNCC_CULL_SIMD_BUILT 1
#include <immintrin.h>
#else
#define PNCC_CULL_SIMD_BUILT 0
#endif

namespace pncc {
namespace raster {
namespace cull {
namespace {

int cull_scalar(const FixedPoint* points, const int32_t* faces, int32_t first, int count,
                int row_begin, int row_end, int width, Survivors& out) {
  int n = 0;
  for (int k = 0; k < count; ++k) {
    const int32_t f = first + k;
    const int32_t* idx = faces + 3 * int64_t(f);
    const SampleBounds s = triangle_sample_bounds(points[idx[0]], points[idx[1]], points[idx[2]],
                                                  row_begin, row_end, width);
    if (is_empty(s)) continue;
    out.face[n] = f;
    out.col0[n] = s.col0;
    out.col1[n] = s.col1;
    out.row0[n] = s.row0;
    out.row1[n] = s.row1;
    ++n;
  }
  return n;
}

#if PNCC_CULL_SIMD_BUILT
// GCC 12's _mm512_undefined_epi32 (behind most AVX-512 intrinsics) initialises a variable from
// itself on purpose, which -Wall reports at every use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// fixed_point_span of raster_math.h on vectors: max(ceil(lo) - 1, first) and
// min(floor(hi) - 1, last) in pixels (the fixed points are non-negative, so the arithmetic shift
// is the scalar code's `>>`). Functions rather than lambdas: a lambda would not inherit the
// target attribute its intrinsics need.
constexpr int kOneMinusUlp = (1 << kFixedPointShift) - 1;

__attribute__((target("avx512f"))) inline __m512i span_begin16(__m512i lo, __m512i first) {
  const __m512i ceil = _mm512_srai_epi32(_mm512_add_epi32(lo, _mm512_set1_epi32(kOneMinusUlp)),
                                         kFixedPointShift);
  return _mm512_max_epi32(_mm512_sub_epi32(ceil, _mm512_set1_epi32(1)), first);
}

__attribute__((target("avx512f"))) inline __m512i span_end16(__m512i hi, __m512i last) {
  const __m512i floor = _mm512_srai_epi32(hi, kFixedPointShift);
  return _mm512_min_epi32(_mm512_sub_epi32(floor, _mm512_set1_epi32(1)), last);
}

__attribute__((target("avx2"))) inline __m256i span_begin8(__m256i lo, __m256i first) {
  const __m256i ceil = _mm256_srai_epi32(_mm256_add_epi32(lo, _mm256_set1_epi32(kOneMinusUlp)),
                                         kFixedPointShift);
  return _mm256_max_epi32(_mm256_sub_epi32(ceil, _mm256_set1_epi32(1)), first);
}

__attribute__((target("avx2"))) inline __m256i span_end8(__m256i hi, __m256i last) {
  const __m256i floor = _mm256_srai_epi32(hi, kFixedPointShift);
  return _mm256_min_epi32(_mm256_sub_epi32(floor, _mm256_set1_epi32(1)), last);
}

__attribute__((target("avx512f"))) int cull_avx512(const FixedPoint* points,
                                                   const int32_t* faces, int32_t first, int count,
                                                   int row_begin, int row_end, int width,
                                                   Survivors& out) {
  static_assert(sizeof(FixedPoint) == 8, "x and y of a vertex are gathered as int32 pairs");
  const int* xs = reinterpret_cast<const int*>(points);
  const int* ys = xs + 1;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i three_lane = _mm512_mullo_epi32(lane, _mm512_set1_epi32(3));
  const __m512i col_first = _mm512_setzero_si512(), col_last = _mm512_set1_epi32(width - 1);
  const __m512i row_first = _mm512_set1_epi32(row_begin), row_last = _mm512_set1_epi32(row_end - 1);
  const __m512i zero = _mm512_setzero_si512();
  int n = 0;
  for (int base = 0; base < count; base += 16) {
    const int left = count - base;
    const __mmask16 valid = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const int32_t* f = faces + 3 * (int64_t(first) + base);
    // Vertex indices, then each vertex's (x, y) pair at int offset 2 * index.
    __m512i x[3], y[3];
    for (int v = 0; v < 3; ++v) {
      const __m512i index = _mm512_mask_i32gather_epi32(zero, valid, three_lane, f + v, 4);
      const __m512i pair = _mm512_slli_epi32(index, 1);
      x[v] = _mm512_mask_i32gather_epi32(zero, valid, pair, xs, 4);
      y[v] = _mm512_mask_i32gather_epi32(zero, valid, pair, ys, 4);
    }
    const __m512i x_lo = _mm512_min_epi32(_mm512_min_epi32(x[0], x[1]), x[2]);
    const __m512i x_hi = _mm512_max_epi32(_mm512_max_epi32(x[0], x[1]), x[2]);
    const __m512i y_lo = _mm512_min_epi32(_mm512_min_epi32(y[0], y[1]), y[2]);
    const __m512i y_hi = _mm512_max_epi32(_mm512_max_epi32(y[0], y[1]), y[2]);
    const __m512i c0 = span_begin16(x_lo, col_first), c1 = span_end16(x_hi, col_last);
    const __m512i r0 = span_begin16(y_lo, row_first), r1 = span_end16(y_hi, row_last);
    const __mmask16 keep =
        valid & _mm512_cmple_epi32_mask(c0, c1) & _mm512_cmple_epi32_mask(r0, r1);
    if (keep == 0) continue;
    const __m512i face = _mm512_add_epi32(lane, _mm512_set1_epi32(first + base));
    _mm512_mask_compressstoreu_epi32(out.face + n, keep, face);
    _mm512_mask_compressstoreu_epi32(out.col0 + n, keep, c0);
    _mm512_mask_compressstoreu_epi32(out.col1 + n, keep, c1);
    _mm512_mask_compressstoreu_epi32(out.row0 + n, keep, r0);
    _mm512_mask_compressstoreu_epi32(out.row1 + n, keep, r1);
    n += __builtin_popcount(keep);
  }
  return n;
}

__attribute__((target("avx2"))) int cull_avx2(const FixedPoint* points, const int32_t* faces,
                                              int32_t first, int count, int row_begin,
                                              int row_end, int width, Survivors& out) {
  const int* xs = reinterpret_cast<const int*>(points);
  const int* ys = xs + 1;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i three_lane = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  const __m256i col_first = _mm256_setzero_si256(), col_last = _mm256_set1_epi32(width - 1);
  const __m256i row_first = _mm256_set1_epi32(row_begin), row_last = _mm256_set1_epi32(row_end - 1);
  int n = 0, base = 0;
  for (; base + 8 <= count; base += 8) {
    const int32_t* f = faces + 3 * (int64_t(first) + base);
    __m256i x[3], y[3];
    for (int v = 0; v < 3; ++v) {
      const __m256i pair = _mm256_slli_epi32(_mm256_i32gather_epi32(f + v, three_lane, 4), 1);
      x[v] = _mm256_i32gather_epi32(xs, pair, 4);
      y[v] = _mm256_i32gather_epi32(ys, pair, 4);
    }
    const __m256i x_lo = _mm256_min_epi32(_mm256_min_epi32(x[0], x[1]), x[2]);
    const __m256i x_hi = _mm256_max_epi32(_mm256_max_epi32(x[0], x[1]), x[2]);
    const __m256i y_lo = _mm256_min_epi32(_mm256_min_epi32(y[0], y[1]), y[2]);
    const __m256i y_hi = _mm256_max_epi32(_mm256_max_epi32(y[0], y[1]), y[2]);
    const __m256i c0 = span_begin8(x_lo, col_first), c1 = span_end8(x_hi, col_last);
    const __m256i r0 = span_begin8(y_lo, row_first), r1 = span_end8(y_hi, row_last);
    // Empty when first > last on either axis.
    const __m256i empty = _mm256_or_si256(_mm256_cmpgt_epi32(c0, c1), _mm256_cmpgt_epi32(r0, r1));
    unsigned keep = ~unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(empty))) & 0xFFu;
    if (keep == 0) continue;
    alignas(32) int32_t lanes[5][8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[2]), r0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[3]), r1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[4]),
                       _mm256_add_epi32(lane, _mm256_set1_epi32(first + base)));
    for (; keep != 0; keep &= keep - 1) {
      const int k = __builtin_ctz(keep);
      out.col0[n] = lanes[0][k];
      out.col1[n] = lanes[1][k];
      out.row0[n] = lanes[2][k];
      out.row1[n] = lanes[3][k];
      out.face[n] = lanes[4][k];
      ++n;
    }
  }
  // The last count % 8 faces one at a time.
  Survivors tail;
  const int m = cull_scalar(points, faces, first + base, count - base, row_begin, row_end, width,
                            tail);
  for (int k = 0; k < m; ++k, ++n) {
    out.face[n] = tail.face[k];
    out.col0[n] = tail.col0[k];
    out.col1[n] = tail.col1[k];
    out.row0[n] = tail.row0[k];
    out.row1[n] = tail.row1[k];
  }
  return n;
}

#pragma GCC diagnostic pop
#endif  // PNCC_CULL_SIMD_BUILT

Variant parse_env() {
  const char* env = std::getenv("PNCC_RASTER_SIMD");
  const std::string value = env == nullptr ? "" : env;
  if (value.empty() || value == "auto") {
    if (supported(Variant::kAvx512)) return Variant::kAvx512;
    if (supported(Variant::kAvx2)) return Variant::kAvx2;
    return Variant::kScalar;
  }
  for (Variant v : {Variant::kScalar, Variant::kAvx2, Variant::kAvx512}) {
    if (value != name(v)) continue;
    if (!supported(v))
      throw std::runtime_error("PNCC_RASTER_SIMD=" + value + ": this CPU (or build) lacks " +
                               value);
    return v;
  }
  throw std::runtime_error("PNCC_RASTER_SIMD must be auto, avx512, avx2 or scalar, not '" + value +
                           "'");
}

}  // namespace

bool supported(Variant variant) {
  if (variant == Variant::kScalar) return true;
#if PNCC_CULL_SIMD_BUILT
  __builtin_cpu_init();
  return variant == Variant::kAvx512 ? __builtin_cpu_supports("avx512f") != 0
                                     : __builtin_cpu_supports("avx2") != 0;
#else
  return false;
#endif
}

const char* name(Variant variant) {
  return variant == Variant::kAvx512 ? "avx512" : variant == Variant::kAvx2 ? "avx2" : "scalar";
}

Variant selected() {
  static const Variant variant = parse_env();  // a throw here is rethrown by the next call too
  return variant;
}

std::string selected_name() { return name(selected()); }

CullFn function(Variant variant) {
#if PNCC_CULL_SIMD_BUILT
  if (variant == Variant::kAvx512) return cull_avx512;
  if (variant == Variant::kAvx2) return cull_avx2;
#endif
  (void)variant;
  return cull_scalar;
}

}  // namespace cull
}  // namespace raster
}  // namespace pncc
