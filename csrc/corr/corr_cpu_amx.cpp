// AMX-BF16 engine of the bf16 tile products of corr_cpu_bf16.h (bf16::gemm_amx). This file alone
// is compiled for AMX-TILE/AMX-BF16 and AVX-512 (the pragma below); nothing in it runs unless
// bf16::amx_available() said that the CPU has them, the kernel enabled them and Linux granted this
// process the tile data state. Torch-free, like the other kernel files.
//
// Why: on a Sapphire Rapids core one TDPBF16PS does 16 x 16 x 32 multiply-adds in 16 cycles, eight
// times what vdpbf16ps on zmm registers does, and SDPA reaches it through oneDNN; without it the
// bf16 corr_warp ran at a quarter of SDPA's speed there (bench/RESULTS.md).
//
// Operands are the same "pairs" as the AVX512-BF16 kernel's, and they are already AMX's layouts:
// a row of 16 pairs of row-major A is a 64-byte tile row, 16 columns of pair p of B a 64-byte
// B-tile row. Each call computes 32 x 32 blocks of C in four accumulator tiles (tmm0-3) from two A
// tiles (tmm4-5) and two B tiles (tmm6-7), 16 pairs at a time. Operands are read in place when a
// block is whole; ragged edges (rows, columns, a reduction that is not a multiple of 16 pairs) and
// pair-major A go through zero-padded copies, so nothing outside the operands is read and padded
// lanes contribute exact zeros. Summation order: C's start value (0, or C itself when
// accumulating), then the pairs in order, 16 per instruction, as the hardware adds them; fixed by
// the sizes alone, so a row's result does not depend on the rows around it.
#include "corr/corr_cpu_bf16.h"

#include <algorithm>
#include <cstring>

#include "common/aligned_buffer.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PNCC_CORR_AMX_BUILT 1
#else
#define PNCC_CORR_AMX_BUILT 0
#endif

#if PNCC_CORR_AMX_BUILT
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pncc {
namespace corr {
namespace bf16 {

#if PNCC_CORR_AMX_BUILT
namespace {

// Linux's arch_prctl request for a dynamically enabled state component, and that component.
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool amx_hardware_and_permission() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = (edx >> 24) & 1u, bf16 = (edx >> 22) & 1u;
  if (!tile || !bf16) return false;
  // The OS must have enabled the tile state in XCR0 (bits 17 and 18), which needs OSXSAVE.
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !((ecx >> 27) & 1u)) return false;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;
  // Since Linux 5.16 a process must ask before its first tile instruction (else SIGILL).
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace
#endif

bool amx_available() {
#if PNCC_CORR_AMX_BUILT
  static const bool ok = available() && amx_hardware_and_permission();
  return ok;
#else
  return false;
#endif
}

}  // namespace bf16
}  // namespace corr
}  // namespace pncc

#if PNCC_CORR_AMX_BUILT

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,amx-tile,amx-bf16")
// As in corr_cpu_simd.cpp: GCC 12's _mm512_undefined_* initialise a variable from itself.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "corr/corr_cpu_avx512.h"

namespace pncc {
namespace corr {
namespace bf16 {
namespace {

constexpr int64_t kBlock = 32;  // rows and columns of C per block: 2 x 2 tiles of 16 x 16
constexpr int64_t kStep = 16;   // pairs per tile product (64 bytes per tile row)

// The LDTILECFG operand (palette 1): eight tiles of 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

const TileConfig& tile_config() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = 64;
      c.rows[t] = 16;
    }
    return c;
  }();
  return cfg;
}

// out[r][0:16] = column r of the 16 x 16 block of 32-bit words in[0:16][0:16] (rows of 16 words).
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + c], 128-bit lane L: column 4L + c of rows 4g .. 4g + 3.
  for (int g = 0; g < 4; ++g) {
    const __m512i* tg = t + 4 * g;
    u[4 * g + 0] = _mm512_unpacklo_epi64(tg[0], tg[2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(tg[0], tg[2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(tg[1], tg[3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(tg[1], tg[3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
}

// A block of kBlock rows of A (rows >= 1 of them real) as row-major pairs with row stride ld
// (a multiple of kStep, >= kp), zero-padded in both directions.
void pack_a_block(const uint32_t* a, int64_t a_rs, int64_t a_ps, int64_t rows, int64_t kp,
                  int64_t ld, uint32_t* out) {
  if (a_ps == 1) {
    for (int64_t r = 0; r < kBlock; ++r) {
      uint32_t* o = out + r * ld;
      if (r < rows) std::memcpy(o, a + r * a_rs, size_t(kp) * 4);
      std::memset(o + (r < rows ? kp : 0), 0, size_t(ld - (r < rows ? kp : 0)) * 4);
    }
    return;
  }
  // Pair-major (a_rs == 1): pair p of row r at a[p * a_ps + r]. 16 x 16 blocks, transposed.
  for (int64_t r0 = 0; r0 < kBlock; r0 += 16) {
    const __mmask16 mrow = tail_mask(rows - r0);
    for (int64_t p0 = 0; p0 < ld; p0 += 16) {
      __m512i v[16];
      for (int64_t i = 0; i < 16; ++i)
        v[i] = p0 + i < kp ? _mm512_maskz_loadu_epi32(mrow, a + (p0 + i) * a_ps + r0)
                           : _mm512_setzero_si512();
      transpose16(v);
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(out + (r0 + i) * ld + p0, v[i]);
    }
  }
}

// One panel of B (cols >= 1 real columns of pairs, row p of the panel at b + p * ldb) as a whole
// panel: kBlock columns, ld_p (a multiple of kStep, >= kp) rows of pairs, zero-padded.
void pack_b_panel(const uint32_t* b, int64_t ldb, int64_t cols, int64_t kp, int64_t ld_p,
                  uint32_t* out) {
  const __mmask16 m0 = tail_mask(cols), m1 = tail_mask(cols - 16);
  for (int64_t p = 0; p < ld_p; ++p) {
    uint32_t* o = out + p * kBlock;
    const bool real = p < kp;
    _mm512_storeu_si512(o, real ? _mm512_maskz_loadu_epi32(m0, b + p * ldb)
                                : _mm512_setzero_si512());
    _mm512_storeu_si512(o + 16, real ? _mm512_maskz_loadu_epi32(m1, b + p * ldb + 16)
                                     : _mm512_setzero_si512());
  }
}

// C block (kBlock x kBlock) = start + A B over steps * kStep pairs, A tile rows at a (stride
// a_ld words), B tile rows at b (stride b_ld words), C read and written at c (stride ldc floats);
// `load_c`: the sum starts from C, otherwise from zero.
inline void block_product(int64_t steps, const uint32_t* a, int64_t a_ld, const uint32_t* b,
                          int64_t b_ld, float* c, int64_t ldc, bool load_c) {
  const int64_t a_bytes = a_ld * 4, b_bytes = b_ld * 4, c_bytes = ldc * 4;
  if (load_c) {
    _tile_loadd(0, c, c_bytes);
    _tile_loadd(1, c + 16, c_bytes);
    _tile_loadd(2, c + 16 * ldc, c_bytes);
    _tile_loadd(3, c + 16 * ldc + 16, c_bytes);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a + s * kStep, a_bytes);
    _tile_loadd(6, b + s * kStep * b_ld, b_bytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b + s * kStep * b_ld + 16, b_bytes);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a + 16 * a_ld + s * kStep, a_bytes);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, c_bytes);
  _tile_stored(1, c + 16, c_bytes);
  _tile_stored(2, c + 16 * ldc, c_bytes);
  _tile_stored(3, c + 16 * ldc + 16, c_bytes);
}

}  // namespace

void gemm_amx(int64_t m, int64_t n, int64_t kp, const uint32_t* a, int64_t a_rs, int64_t a_ps,
              const uint32_t* b, int64_t ldb, int64_t b_panel_stride, float* c, int64_t ldc,
              bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (kp <= 0) {  // an empty sum: C = 0, or C unchanged (and no operand to copy or load)
    if (!accumulate)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  const int64_t steps = (kp + kStep - 1) / kStep, kp_pad = steps * kStep;
  const int64_t panels = (n + kBlock - 1) / kBlock;
  const bool whole_k = kp_pad == kp;
  // B panels that cannot be read in place (a ragged reduction, or a partial last panel whose
  // missing columns may lie outside B) are copied, zero-padded, once per call.
  thread_local AlignedBuffer<uint32_t> b_copy, a_copy;
  const bool last_partial = n % kBlock != 0;
  const int64_t copied = whole_k ? (last_partial ? 1 : 0) : panels;
  b_copy.resize(size_t(copied * kp_pad * kBlock));
  for (int64_t j = panels - copied; j < panels; ++j) {
    const int64_t slot = j - (panels - copied);
    pack_b_panel(b + j * b_panel_stride, ldb, std::min(kBlock, n - j * kBlock), kp, kp_pad,
                 b_copy.data() + slot * kp_pad * kBlock);
  }
  a_copy.resize(size_t(kBlock * kp_pad));
  alignas(64) float c_block[kBlock * kBlock];

  _tile_loadconfig(&tile_config());
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t rows = std::min(kBlock, m - i0);
    const uint32_t* ab = a + i0 * a_rs;
    int64_t a_ld = a_rs;
    if (rows < kBlock || a_ps != 1 || !whole_k) {
      pack_a_block(ab, a_rs, a_ps, rows, kp, kp_pad, a_copy.data());
      ab = a_copy.data();
      a_ld = kp_pad;
    }
    for (int64_t j = 0; j < panels; ++j) {
      const int64_t j0 = j * kBlock, cols = std::min(kBlock, n - j0);
      const bool in_place = j < panels - copied;
      const uint32_t* bb = in_place ? b + j * b_panel_stride
                                    : b_copy.data() + (j - (panels - copied)) * kp_pad * kBlock;
      const int64_t b_ld = in_place ? ldb : kBlock;
      float* cb = c + i0 * ldc + j0;
      if (rows == kBlock && cols == kBlock) {
        block_product(steps, ab, a_ld, bb, b_ld, cb, ldc, accumulate);
        continue;
      }
      // A ragged block of C goes through c_block, so that nothing outside C is read or written.
      if (accumulate) {
        for (int64_t r = 0; r < kBlock; ++r)
          for (int64_t x = 0; x < kBlock; ++x)
            c_block[r * kBlock + x] = r < rows && x < cols ? cb[r * ldc + x] : 0.0f;
      }
      block_product(steps, ab, a_ld, bb, b_ld, c_block, kBlock, accumulate);
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(cb + r * ldc, c_block + r * kBlock, size_t(cols) * 4);
    }
  }
  _tile_release();
}

}  // namespace bf16
}  // namespace corr
}  // namespace pncc

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else  // !PNCC_CORR_AMX_BUILT: never called, since amx_available() is false

namespace pncc {
namespace corr {
namespace bf16 {

void gemm_amx(int64_t, int64_t, int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*,
              int64_t, int64_t, float*, int64_t, bool) {}

}  // namespace bf16
}  // namespace corr
}  // namespace pncc

#endif  // PNCC_CORR_AMX_BUILT
