// AVX-512 helpers shared by the corr_warp kernel files (corr_cpu_simd.cpp, corr_cpu_bf16.cpp,
// corr_cpu_amx.cpp). Include it only inside a region compiled for AVX-512F (`#pragma GCC target`);
// it has internal linkage, so each file's copy is compiled for that file's target.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace pncc {
namespace corr {
namespace {

// The first n of 16 lanes (none for n <= 0, all for n >= 16).
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}

// bf16::round_to_bf16 (corr_cpu_bf16.h) on 16 fp32 lanes, for the bf16 operand conversions. Each
// 32-bit lane's high half becomes the bf16 value (the low half is left over). Not vcvtneps2bf16,
// which flushes denormals to zero: this is the same integer rounding as the portable statement
// (round to nearest even; a NaN stays a quiet NaN). Only the forward's exp pass uses the
// instruction, where a probability below 2^-126 of the row's largest may as well be 0.
inline __m512i round16(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_or_epi32(r, nan, x, _mm512_set1_epi32(0x00400000));
}

}  // namespace
}  // namespace corr
}  // namespace pncc
