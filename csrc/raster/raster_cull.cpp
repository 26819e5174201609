// The culling variants of raster_cull.h. The vector ones are compiled for their ISA by function
// attributes (the rest of the extension stays baseline x86-64) and only run when the CPU has it.
#include "raster/raster_cull.h"

#include <time.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "raster/raster_band.h"

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

// The lanes of v selected by `keep`, stored contiguously at `out`; all 16 lanes are written (the
// buffers have 16 slots of slack), because a compressing store to memory is microcoded on AMD
// Zen 4 and 5 and costs more than the rest of a batch.
__attribute__((target("avx512f"))) inline void store_compressed(int32_t* out, __mmask16 keep,
                                                                __m512i v) {
  _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(keep, v));
}

__attribute__((target("avx512f"))) inline void store_compressed(float* out, __mmask16 keep,
                                                                __m512 v) {
  _mm512_storeu_ps(out, _mm512_maskz_compress_ps(keep, v));
}

// The three fields of the first `count` (<= 16) of 16 consecutive int32 triples at p, lane by
// lane (0 in the lanes past `count`): a face's three vertex indices, or a vertex's x, y and z
// bits. Three loads of the 48 contiguous values and two permutes per field, not three 16-lane
// gathers (a gather costs one load per lane).
__attribute__((target("avx512f"))) inline void load_triples16(const int32_t* p, int count,
                                                              __m512i field[3]) {
  const int n = 3 * count;  // valid int32 elements at p (at most 48)
  const auto mask = [n](int from) {
    const int k = std::min(16, std::max(0, n - from));
    return k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << k) - 1u);
  };
  const __m512i a = _mm512_maskz_loadu_epi32(mask(0), p);
  const __m512i b = _mm512_maskz_loadu_epi32(mask(16), p + 16);
  const __m512i c = _mm512_maskz_loadu_epi32(mask(32), p + 32);
  const __m512i lane3 = _mm512_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45);
  for (int v = 0; v < 3; ++v) {
    // Element 3 * lane + v: from a or b when below 32, else from c.
    const __m512i at = _mm512_add_epi32(lane3, _mm512_set1_epi32(v));
    const __m512i from_ab = _mm512_permutex2var_epi32(a, at, b);
    const __mmask16 in_c = _mm512_cmpge_epi32_mask(at, _mm512_set1_epi32(32));
    field[v] = _mm512_mask_permutexvar_epi32(from_ab, in_c,
                                             _mm512_sub_epi32(at, _mm512_set1_epi32(32)), c);
  }
}

// The 8-byte pairs at base + kScale * index[lane] for the `valid` lanes (0 elsewhere), split into
// their first and second 4-byte halves: two 8-lane 64-bit gathers load 16 pairs, half the loads
// of two 16-lane 32-bit gathers.
template <int kScale>
__attribute__((target("avx512f"))) inline void gather_pairs16(__m512i index, __mmask16 valid,
                                                              const void* base, __m512i& first,
                                                              __m512i& second) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i lo = _mm512_mask_i32gather_epi64(zero, __mmask8(valid),
                                                 _mm512_castsi512_si256(index), base, kScale);
  const __m512i hi = _mm512_mask_i32gather_epi64(zero, __mmask8(valid >> 8),
                                                 _mm512_extracti64x4_epi64(index, 1), base, kScale);
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  first = _mm512_permutex2var_epi32(lo, even, hi);
  second = _mm512_permutex2var_epi32(lo, _mm512_add_epi32(even, _mm512_set1_epi32(1)), hi);
}

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

// to_fixed_point of raster_math.h on 16 float32 coordinates, operation for operation:
// max(v, -1) keeps -1 for NaN as `v > -1 ? v : -1` does, min(c, size) is `c < size ? c : size`,
// and the conversion truncates.
__attribute__((target("avx512f"))) inline __m512i to_fixed_point16(__m512 v, int size) {
  const __m512 c = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-1.0f)),
                                 _mm512_set1_ps(float(size)));
  return _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_add_ps(c, _mm512_set1_ps(1.0f)),
                                           _mm512_set1_ps(float(1 << kFixedPointShift))));
}

// The coordinates (as bits) of the three corners of 16 faces without gathers, when the batch's
// vertex indices fall in two windows of 16 consecutive vertices: a mesh stored row by row
// references two rows of its grid at a time (93.6% of the 16-face batches of the 3DDFA BFM face
// mesh fit). Each window is three plain loads and a deinterleave (load_triples16), and each
// corner's x, y and z a permute over both windows, in place of six pair gathers and three
// gathers (on Zen 4 a 16-lane gather costs some 20 cycles; bench/RESULTS.md). Returns false,
// having written nothing, when the indices of the `valid` lanes do not fit. (Indices are in
// [0, V).)
__attribute__((target("avx512f"))) inline bool window_corners16(const float* vertices,
                                                                int64_t num_vertices,
                                                                const __m512i index[3],
                                                                __mmask16 valid, __m512i x[3],
                                                                __m512i y[3], __m512i z[3]) {
  const int lo = _mm512_mask_reduce_min_epi32(
      valid, _mm512_min_epi32(_mm512_min_epi32(index[0], index[1]), index[2]));
  const int hi = _mm512_mask_reduce_max_epi32(
      valid, _mm512_max_epi32(_mm512_max_epi32(index[0], index[1]), index[2]));
  const int base_b = std::max(lo + 16, hi - 15);  // window B: past window A, ending at hi
  const __m512i sixteen = _mm512_set1_epi32(16);
  __m512i from_a[3], from_b[3];
  __mmask16 in_a[3];
  for (int v = 0; v < 3; ++v) {
    from_a[v] = _mm512_sub_epi32(index[v], _mm512_set1_epi32(lo));
    from_b[v] = _mm512_sub_epi32(index[v], _mm512_set1_epi32(base_b));
    in_a[v] = _mm512_cmplt_epu32_mask(from_a[v], sixteen);
    const __mmask16 in_b = _mm512_cmplt_epu32_mask(from_b[v], sixteen);
    if ((valid & ~(in_a[v] | in_b)) != 0) return false;
  }
  // Window w's x, y and z of its 16 vertices (0 past the last vertex).
  __m512i window[2][3];
  for (int w = 0; w < 2; ++w) {
    const int64_t first = w == 0 ? lo : base_b;
    const int count = static_cast<int>(std::clamp<int64_t>(num_vertices - first, 0, 16));
    load_triples16(reinterpret_cast<const int32_t*>(vertices) + 3 * first, count, window[w]);
  }
  for (int v = 0; v < 3; ++v) {
    // Table entries 0-15 are window A, 16-31 window B.
    const __m512i at = _mm512_mask_blend_epi32(in_a[v], _mm512_add_epi32(from_b[v], sixteen),
                                               from_a[v]);
    x[v] = _mm512_permutex2var_epi32(window[0][0], at, window[1][0]);
    y[v] = _mm512_permutex2var_epi32(window[0][1], at, window[1][1]);
    z[v] = _mm512_permutex2var_epi32(window[0][2], at, window[1][2]);
  }
  return true;
}

// The culling of 16 faces at a time, from the vertices' fixed points (kFromVertices false: any
// mesh dtype, `source` is the FixedPoint table) or from float32 image-space vertices
// (kFromVertices true: `source` is the (V, 3) array; the fixed points are formed in registers
// and the survivors keep their corners' coordinates for the coverage test).
template <bool kFromVertices>
__attribute__((target("avx512f"))) int cull16(const void* source, int64_t num_vertices,
                                              const int32_t* faces, int32_t first, int count,
                                              int row_begin, int row_end, int height, int width,
                                              Survivors& out) {
  static_assert(sizeof(FixedPoint) == 8, "x and y of a vertex are gathered as one int32 pair");
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i col_first = _mm512_setzero_si512(), col_last = _mm512_set1_epi32(width - 1);
  const __m512i row_first = _mm512_set1_epi32(row_begin), row_last = _mm512_set1_epi32(row_end - 1);
  int n = 0;
  for (int base = 0; base < count; base += 16) {
    const int left = count - base;
    const __mmask16 valid = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    // Vertex indices, then each vertex's (x, y) pair: fixed points, or coordinates (and depth).
    __m512i index[3], x[3], y[3], x_bits[3], y_bits[3], z_bits[3];
    load_triples16(faces + 3 * (int64_t(first) + base), std::min(left, 16), index);
    if constexpr (kFromVertices) {
      const float* vertices = static_cast<const float*>(source);
      if (!window_corners16(vertices, num_vertices, index, valid, x_bits, y_bits, z_bits)) {
        for (int v = 0; v < 3; ++v) {
          const __m512i at = _mm512_mullo_epi32(index[v], _mm512_set1_epi32(3));
          gather_pairs16<4>(at, valid, vertices, x_bits[v], y_bits[v]);
          z_bits[v] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, at,
                                                  vertices + 2, 4);
        }
      }
      for (int v = 0; v < 3; ++v) {
        x[v] = to_fixed_point16(_mm512_castsi512_ps(x_bits[v]), width);
        y[v] = to_fixed_point16(_mm512_castsi512_ps(y_bits[v]), height);
      }
    } else {
      for (int v = 0; v < 3; ++v) gather_pairs16<8>(index[v], valid, source, x[v], y[v]);
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
    store_compressed(out.face + n, keep, face);
    store_compressed(out.col0 + n, keep, c0);
    store_compressed(out.col1 + n, keep, c1);
    store_compressed(out.row0 + n, keep, r0);
    store_compressed(out.row1 + n, keep, r1);
    if constexpr (kFromVertices) {
      for (int v = 0; v < 3; ++v) {
        store_compressed(reinterpret_cast<int32_t*>(out.x[v]) + n, keep, x_bits[v]);
        store_compressed(reinterpret_cast<int32_t*>(out.y[v]) + n, keep, y_bits[v]);
        store_compressed(reinterpret_cast<int32_t*>(out.z[v]) + n, keep, z_bits[v]);
      }
    }
    n += __builtin_popcount(keep);
  }
  return n;
}

__attribute__((target("avx512f"))) int cull_avx512(const FixedPoint* points,
                                                   const int32_t* faces, int32_t first, int count,
                                                   int row_begin, int row_end, int width,
                                                   Survivors& out) {
  return cull16<false>(points, 0, faces, first, count, row_begin, row_end, 0, width, out);
}

__attribute__((target("avx512f"))) int cull_vertices_avx512(const float* vertices,
                                                            int64_t num_vertices,
                                                            const int32_t* faces, int32_t first,
                                                            int count, int row_begin, int row_end,
                                                            int height, int width,
                                                            Survivors& out) {
  return cull16<true>(vertices, num_vertices, faces, first, count, row_begin, row_end, height,
                      width, out);
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
    __m256i index[3], x[3], y[3];
    for (int v = 0; v < 3; ++v) {
      index[v] = _mm256_i32gather_epi32(f + v, three_lane, 4);
      const __m256i pair = _mm256_slli_epi32(index[v], 1);
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

// ---- vector coverage (raster_math.h's Edge, setup_triangle and cover_sample on 16 lanes) ----

// An Edge of raster_math.h on 16 triangles.
struct Edge16 {
  __m512 dx, dy, rx, ry;
};

__attribute__((target("avx512f"))) inline Edge16 edge16(__m512 x0, __m512 y0, __m512 x1,
                                                        __m512 y1) {
  // second_first = (y1 < y0) || (y1 == y0 && x1 < x0); ordered predicates: NaN compares false,
  // as C++'s < and == do.
  const __mmask16 second_first =
      _mm512_cmp_ps_mask(y1, y0, _CMP_LT_OQ) |
      (_mm512_cmp_ps_mask(y1, y0, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(x1, x0, _CMP_LT_OQ));
  return {_mm512_sub_ps(x1, x0), _mm512_sub_ps(y1, y0),
          _mm512_mask_blend_ps(second_first, x0, x1), _mm512_mask_blend_ps(second_first, y0, y1)};
}

// Edge::operator(): dx * (py - ry) - dy * (px - rx), each product rounded (no FMA).
__attribute__((target("avx512f"))) inline __m512 edge_value16(const Edge16& e, __m512 px,
                                                              __m512 py) {
  return _mm512_sub_ps(_mm512_mul_ps(e.dx, _mm512_sub_ps(py, e.ry)),
                       _mm512_mul_ps(e.dy, _mm512_sub_ps(px, e.rx)));
}

// is_finite_value: v - v == 0.
__attribute__((target("avx512f"))) inline __mmask16 finite16(__m512 v) {
  return _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);
}

// The inside test of cover_sample for edge e: w > 0, or w == 0 on an edge the triangle owns
// (owns_edge: the edge flipped to positive orientation has dy < 0, or dy == 0 and dx > 0).
__attribute__((target("avx512f"))) inline __mmask16 inside16(const Edge16& e, __m512 orient,
                                                             __m512 w) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 dx = _mm512_mul_ps(orient, e.dx), dy = _mm512_mul_ps(orient, e.dy);
  const __mmask16 owns = _mm512_cmp_ps_mask(dy, zero, _CMP_LT_OQ) |
                         (_mm512_cmp_ps_mask(dy, zero, _CMP_EQ_OQ) &
                          _mm512_cmp_ps_mask(dx, zero, _CMP_GT_OQ));
  return _mm512_cmp_ps_mask(w, zero, _CMP_GT_OQ) |
         (_mm512_cmp_ps_mask(w, zero, _CMP_EQ_OQ) & owns);
}

// The three codes of one vertex per lane, at float offset `at` (3 * vertex index) of a (V, 3)
// array: codes 0 and 1 as one 8-byte pair, code 2 alone.
__attribute__((target("avx512f"))) inline void gather_codes16(const float* codes, __m512i at,
                                                              __mmask16 lanes, __m512 code[3]) {
  __m512i c0, c1;
  gather_pairs16<4>(at, lanes, codes, c0, c1);
  code[0] = _mm512_castsi512_ps(c0);
  code[1] = _mm512_castsi512_ps(c1);
  code[2] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, at, codes + 2, 4);
}

// interpolate_pixel's value of channel c: (w0 * a0 + w1 * a1) + w2 * a2, each product rounded.
__attribute__((target("avx512f"))) inline __m512 interpolate16(const __m512 w[3],
                                                               const __m512 code[3][3], int c) {
  return _mm512_add_ps(
      _mm512_add_ps(_mm512_mul_ps(w[0], code[0][c]), _mm512_mul_ps(w[1], code[1][c])),
      _mm512_mul_ps(w[2], code[2][c]));
}

__attribute__((target("avx512f"))) int cover_avx512(const Survivors& survivors, int count,
                                                    CoveredSamples& out, LargeSurvivors& large) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512i one_i = _mm512_set1_epi32(1);
  const __m512i two_i = _mm512_set1_epi32(2);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int n = 0;
  large.n = 0;
  for (int base = 0; base < count; base += 16) {
    const int left = count - base;
    const __mmask16 valid = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const __m512i face = _mm512_maskz_loadu_epi32(valid, survivors.face + base);
    const __m512i col0 = _mm512_maskz_loadu_epi32(valid, survivors.col0 + base);
    const __m512i row0 = _mm512_maskz_loadu_epi32(valid, survivors.row0 + base);
    const __m512i cols = _mm512_sub_epi32(
        _mm512_maskz_loadu_epi32(valid, survivors.col1 + base), _mm512_sub_epi32(col0, one_i));
    const __m512i rows = _mm512_sub_epi32(
        _mm512_maskz_loadu_epi32(valid, survivors.row1 + base), _mm512_sub_epi32(row0, one_i));
    // (bounds are clamped to the image, so the product cannot overflow)
    const __m512i samples = _mm512_mullo_epi32(cols, rows);
    const __mmask16 is_large =
        _mm512_mask_cmpgt_epi32_mask(valid, samples, _mm512_set1_epi32(kMaxVectorSamples));
    if (is_large != 0) {
      store_compressed(large.index + large.n, is_large,
                       _mm512_add_epi32(lane, _mm512_set1_epi32(base)));
      large.n += __builtin_popcount(is_large);
    }
    const __mmask16 small = valid & ~is_large;
    if (small == 0) continue;
    __m512 x[3], y[3], z[3];
    for (int v = 0; v < 3; ++v) {  // kept by the culling
      x[v] = _mm512_maskz_loadu_ps(small, survivors.x[v] + base);
      y[v] = _mm512_maskz_loadu_ps(small, survivors.y[v] + base);
      z[v] = _mm512_maskz_loadu_ps(small, survivors.z[v] + base);
    }
    // setup_triangle: edge i is opposite vertex i; the doubled area decides the orientation.
    const Edge16 e0 = edge16(x[1], y[1], x[2], y[2]);
    const Edge16 e1 = edge16(x[2], y[2], x[0], y[0]);
    const Edge16 e2 = edge16(x[0], y[0], x[1], y[1]);
    const __m512 area = edge_value16(e0, x[0], y[0]);
    const __mmask16 set_up =
        small & _mm512_cmp_ps_mask(area, zero, _CMP_NEQ_UQ) & finite16(area);  // NaN != 0
    if (set_up == 0) continue;
    const __m512 orient = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(area, zero, _CMP_GT_OQ),
                                               _mm512_set1_ps(-1.0f), one);
    // Sample k of a lane's bounds, in row-major order: a box of at most 4 samples is one row, one
    // column, or 2 x 2.
    const __mmask16 one_col = _mm512_cmpeq_epi32_mask(cols, one_i);
    const __mmask16 two_cols = _mm512_cmpeq_epi32_mask(cols, two_i);
    for (int k = 0; k < kMaxVectorSamples; ++k) {
      const __mmask16 live = set_up & _mm512_cmpgt_epi32_mask(samples, _mm512_set1_epi32(k));
      if (live == 0) break;  // samples > k fails for every larger k too
      const __m512i kv = _mm512_set1_epi32(k);
      const __m512i row_step = _mm512_mask_mov_epi32(
          _mm512_maskz_mov_epi32(two_cols, _mm512_set1_epi32(k >> 1)), one_col, kv);
      const __m512i col_step = _mm512_maskz_mov_epi32(
          __mmask16(~one_col), _mm512_mask_mov_epi32(kv, two_cols, _mm512_set1_epi32(k & 1)));
      const __m512i col = _mm512_add_epi32(col0, col_step);
      const __m512i row = _mm512_add_epi32(row0, row_step);
      // cover_sample at (col, row).
      const __m512 px = _mm512_cvtepi32_ps(col), py = _mm512_cvtepi32_ps(row);
      const __m512 w0 = _mm512_mul_ps(orient, edge_value16(e0, px, py));
      const __m512 w1 = _mm512_mul_ps(orient, edge_value16(e1, px, py));
      const __m512 w2 = _mm512_mul_ps(orient, edge_value16(e2, px, py));
      __mmask16 covered =
          live & inside16(e0, orient, w0) & inside16(e1, orient, w1) & inside16(e2, orient, w2);
      if (covered == 0) continue;
      // bary_from_edges and interpolate_depth.
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(w0, w1), w2);
      const __m512 inv = _mm512_div_ps(one, sum);
      const __m512 bary[3] = {_mm512_mul_ps(w0, inv), _mm512_mul_ps(w1, inv),
                              _mm512_mul_ps(w2, inv)};
      const __m512 depth = _mm512_add_ps(
          _mm512_add_ps(_mm512_mul_ps(bary[0], z[0]), _mm512_mul_ps(bary[1], z[1])),
          _mm512_mul_ps(bary[2], z[2]));
      covered &= _mm512_cmp_ps_mask(sum, zero, _CMP_NEQ_UQ) & finite16(sum) & finite16(depth);
      if (covered == 0) continue;
      store_compressed(out.face + n, covered, face);
      store_compressed(out.col + n, covered, col);
      store_compressed(out.row + n, covered, row);
      store_compressed(out.depth + n, covered, depth);
      for (int i = 0; i < 3; ++i) store_compressed(out.bary[i] + n, covered, bary[i]);
      n += __builtin_popcount(covered);
    }
  }
  return n;
}

__attribute__((target("avx512f"))) void resolve_avx512(const uint64_t* keys,
                                                       const float* bary_depth, int64_t pixels,
                                                       const float* ncc, const int32_t* faces,
                                                       float* out, int64_t plane, float* mask) {
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512i zero_i = _mm512_setzero_si512(), three = _mm512_set1_epi32(3);
  const __m512i empty = _mm512_set1_epi64(int64_t(kEmptyKey));
  // Field v of 8 (bary[3], depth) records held in two registers: elements v, v + 4, ..., v + 28.
  const __m512i field = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  for (int64_t base = 0; base < pixels; base += 16) {
    const int64_t left = pixels - base;
    const __mmask16 valid = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const __m512i keys_lo = _mm512_maskz_loadu_epi64(__mmask8(valid), keys + base);
    const __m512i keys_hi = _mm512_maskz_loadu_epi64(__mmask8(valid >> 8), keys + base + 8);
    // key_face: -1 for the empty key, its low 32 bits otherwise.
    const __mmask16 covered =
        __mmask16(_mm512_mask_cmpneq_epu64_mask(__mmask8(valid), keys_lo, empty)) |
        __mmask16(_mm512_mask_cmpneq_epu64_mask(__mmask8(valid >> 8), keys_hi, empty) << 8);
    float* o = out + base;
    _mm512_mask_storeu_ps(mask + base, valid, _mm512_mask_blend_ps(covered, zero, one));
    if (covered == 0) {
      for (int c = 0; c < 3; ++c) _mm512_mask_storeu_ps(o + c * plane, valid, zero);
      continue;
    }
    // The 16 pixels' records are contiguous: four loads (masked past the end) and a transpose,
    // not three 16-lane gathers.
    const float* records = bary_depth + 4 * base;
    __m512 r[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t k = std::min<int64_t>(16, std::max<int64_t>(0, 4 * left - 16 * j));
      r[j] = _mm512_maskz_loadu_ps(k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << k) - 1u),
                                   records + 16 * j);
    }
    __m512 w[3];  // the weights
    for (int v = 0; v < 3; ++v) {
      const __m512i pick = _mm512_add_epi32(field, _mm512_set1_epi32(v));
      const __m512 low = _mm512_permutex2var_ps(r[0], pick, r[1]);
      const __m512 high = _mm512_permutex2var_ps(r[2], pick, r[3]);
      w[v] = _mm512_shuffle_f32x4(low, high, 0x44);  // low's lanes 0-7, then high's
    }
    const __m512i face = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm512_cvtepi64_epi32(keys_lo)), _mm512_cvtepi64_epi32(keys_hi), 1);
    const __m512i corner = _mm512_mullo_epi32(face, three);
    __m512 code[3][3];  // code[v][c]: code c of corner v
    for (int v = 0; v < 3; ++v) {
      const __m512i at = _mm512_mullo_epi32(
          _mm512_mask_i32gather_epi32(zero_i, covered, corner, faces + v, 4), three);
      gather_codes16(ncc, at, covered, code[v]);
    }
    for (int c = 0; c < 3; ++c) {
      const __m512 value = interpolate16(w, code, c);
      _mm512_mask_storeu_ps(o + c * plane, valid, _mm512_maskz_mov_ps(covered, value));
    }
  }
}

#pragma GCC diagnostic pop
#endif  // PNCC_CULL_SIMD_BUILT

// This thread's CPU time: a descheduled thread does not stretch it (the machine may be shared).
double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

// Thread CPU seconds per variant of the last calibration (index: Variant), -1 where not timed.
std::vector<double>& calibration_seconds() {
  static std::vector<double> seconds(3, -1.0);
  return seconds;
}

// Times every variant this CPU supports on a small synthetic face-like workload (a curved grid
// of 2 * 112 * 112 triangles of about 0.25 square pixels each, most of them sub-pixel, in the
// middle of a 128 x 128 image) and returns the fastest: rasterize and render_pncc's resolve, on
// the calling thread, 3 rounds in alternation after a warm-up, the best round of each. About
// 1 ms per variant and round on a Zen 5 core. The variants' outputs are bit-identical, so the
// choice only changes the speed.
Variant calibrate() {
  constexpr int kSide = 128, kGrid = 112;
  constexpr float kSpan = 80.f;  // pixels covered by the grid
  std::vector<float> vertices, codes;
  for (int r = 0; r <= kGrid; ++r)
    for (int c = 0; c <= kGrid; ++c) {
      const float u = 2.f * c / kGrid - 1.f, v = 2.f * r / kGrid - 1.f;
      const float x = kSide / 2 + 0.5f * kSpan * u, y = kSide / 2 + 0.5f * kSpan * v;
      const float z = 1.5f - 0.5f * (u * u + v * v);
      vertices.insert(vertices.end(), {x, y, z});
      codes.insert(codes.end(), {0.5f + 0.5f * u, 0.5f + 0.5f * v, z - 0.5f});
    }
  std::vector<int32_t> faces;
  for (int r = 0; r < kGrid; ++r)
    for (int c = 0; c < kGrid; ++c) {
      const int32_t a = r * (kGrid + 1) + c, b = a + 1, d = a + kGrid + 1, e = d + 1;
      faces.insert(faces.end(), {a, b, d, b, e, d});
    }
  const MeshView<float> mesh{vertices.data(), faces.data(), 1,
                             int64_t(vertices.size() / 3), int64_t(faces.size() / 3), kSide,
                             kSide};
  std::vector<float> image(3 * kSide * kSide), mask(kSide * kSide);
  BandBuffer<float> buffer;
  std::vector<double>& best = calibration_seconds();
  for (int round = 0; round < 4; ++round)  // round 0 warms up
    for (Variant v : {Variant::kScalar, Variant::kAvx2, Variant::kAvx512}) {
      if (!supported(v)) continue;
      const double start = thread_seconds();
      const RasterizedBand<float> band = buffer.rasterize(mesh, 0, 0, kSide, v);
      resolve_pncc_band(band, int64_t(kSide) * kSide, codes.data(), mesh, image.data(),
                        int64_t(kSide) * kSide, mask.data(), v);
      const double seconds = thread_seconds() - start;
      double& slot = best[static_cast<int>(v)];
      if (round > 0 && (slot < 0 || seconds < slot)) slot = seconds;
    }
  Variant fastest = Variant::kScalar;
  for (Variant v : {Variant::kAvx2, Variant::kAvx512})
    if (best[static_cast<int>(v)] >= 0 &&
        best[static_cast<int>(v)] < best[static_cast<int>(fastest)])
      fastest = v;
  return fastest;
}

Variant parse_env() {
  const char* env = std::getenv("PNCC_RASTER_SIMD");
  const std::string value = env == nullptr ? "" : env;
  if (value.empty() || value == "auto") return calibrate();
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

std::vector<double> selection_seconds() {
  selected();
  return calibration_seconds();
}

VectorKernels vector_kernels(Variant variant) {
#if PNCC_CULL_SIMD_BUILT
  if (variant == Variant::kAvx512) return {cull_vertices_avx512, cover_avx512, resolve_avx512};
#endif
  (void)variant;
  return {};
}

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
