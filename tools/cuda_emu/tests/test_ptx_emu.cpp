// Unit tests of the emulated PTX wrappers (csrc/common/ptx.cuh under tools/cuda_emu). Each layout is
// checked against values worked out by hand from the PTX ISA's figures ("Matrix Fragments for
// mma.m16n8k16 with floating point type", "ldmatrix"), not against the emulator's own formulas,
// then the ldmatrix -> mma path against a plain matrix product. Built and run by
// tests/test_cuda_emu.py; exits non-zero on the first failed check.
#include "emu_runtime.h"

#include "common/cuda_launch.cuh"
#include "common/ptx.cuh"

#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace {

int failures = 0;
#define EXPECT(cond, ...)                                            \
  do {                                                               \
    if (!(cond)) {                                                   \
      ++failures;                                                    \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);    \
      std::printf(__VA_ARGS__);                                      \
      std::printf("\n");                                             \
    }                                                                \
  } while (0)

uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }
uint16_t f16_bits(float v) { return c10::Half(v).x; }
uint32_t pack(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// ---- mma ----
struct MmaParams {
  const uint32_t* a;  // [32][4] per lane
  const uint32_t* b;  // [32][2]
  const float* c;     // [32][4]
  float* d;           // [32][4]
  bool bf16;
};

__global__ void mma_kernel(MmaParams p) {
  const int l = threadIdx.x;
  const uint32_t a[4] = {p.a[4 * l], p.a[4 * l + 1], p.a[4 * l + 2], p.a[4 * l + 3]};
  const uint32_t b[2] = {p.b[2 * l], p.b[2 * l + 1]};
  float acc[4] = {p.c[4 * l], p.c[4 * l + 1], p.c[4 * l + 2], p.c[4 * l + 3]};
  // d aliases c, as in a kernel's accumulation loop.
  if (p.bf16) pncc::ptx::mma_m16n8k16_bf16(acc, a, b, acc);
  else pncc::ptx::mma_m16n8k16_f16(acc, a, b, acc);
  for (int i = 0; i < 4; ++i) p.d[4 * l + i] = acc[i];
}

struct Fragments {
  std::vector<uint32_t> a = std::vector<uint32_t>(128, 0), b = std::vector<uint32_t>(64, 0);
  std::vector<float> c = std::vector<float>(128, 0.f), d = std::vector<float>(128, 0.f);
  void run(bool bf16) {
    PNCC_LAUNCH(1, 32, 0, nullptr, mma_kernel)(MmaParams{a.data(), b.data(), c.data(), d.data(), bf16});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// One non-zero A element and one non-zero B element, placed by (lane, register, half) as read off
// the PTX figures; the product must appear in exactly one (lane, register) of D.
void test_mma_single_products() {
  struct Case {
    int a_lane, a_reg, a_half;  // A element
    int b_lane, b_reg, b_half;  // B element (same k as the A element)
    int d_lane, d_reg;          // where A[row][k] * B[k][col] lands
    const char* what;
  };
  const Case cases[] = {
      // A[9][0]: group 1 (+8 rows: a[1]), t 0 -> lane 4, a[1] lo. B[0][5]: t 0, group 5 -> lane
      // 20, b[0] lo. D[9][5]: group 1, t 2 (cols 4, 5), row +8 -> lane 6, d[3].
      {4, 1, 0, 20, 0, 0, 6, 3, "A[9][0] B[0][5] -> D[9][5]"},
      // A[2][13]: group 2, cols 8+ (a[2]), 2t+1 = 13-8 -> t 2, hi -> lane 10, a[2] hi.
      // B[13][0]: rows 8+ (b[1]), 2t+1 = 5 -> t 2, hi; group 0 -> lane 2, b[1] hi.
      // D[2][0]: group 2, t 0 -> lane 8, d[0].
      {10, 2, 1, 2, 1, 1, 8, 0, "A[2][13] B[13][0] -> D[2][0]"},
      // A[15][15]: group 7, rows +8 and cols +8 (a[3]), t 3 hi -> lane 31, a[3] hi.
      // B[15][7]: b[1] hi, t 3, group 7 -> lane 31, b[1] hi. D[15][7]: lane 31, d[3].
      {31, 3, 1, 31, 1, 1, 31, 3, "A[15][15] B[15][7] -> D[15][7]"},
      // A[0][6]: group 0, a[0], 2t = 6 -> t 3 lo -> lane 3, a[0] lo. B[6][1]: b[0], t 3 lo,
      // group 1 -> lane 7, b[0] lo. D[0][1]: group 0, t 0, d[1] -> lane 0, d[1].
      {3, 0, 0, 7, 0, 0, 0, 1, "A[0][6] B[6][1] -> D[0][1]"},
  };
  for (const bool bf16 : {true, false}) {
    const uint16_t two = bf16 ? bf16_bits(2.f) : f16_bits(2.f);
    const uint16_t three = bf16 ? bf16_bits(3.f) : f16_bits(3.f);
    for (const Case& k : cases) {
      Fragments f;
      f.a[4 * k.a_lane + k.a_reg] = uint32_t(two) << (16 * k.a_half);
      f.b[2 * k.b_lane + k.b_reg] = uint32_t(three) << (16 * k.b_half);
      f.run(bf16);
      for (int l = 0; l < 32; ++l)
        for (int i = 0; i < 4; ++i) {
          const float want = (l == k.d_lane && i == k.d_reg) ? 6.f : 0.f;
          EXPECT(f.d[4 * l + i] == want, "%s %s: lane %d d[%d] = %g, want %g", bf16 ? "bf16" : "f16",
                 k.what, l, i, f.d[4 * l + i], want);
        }
    }
  }
}

// The accumulator is added in place: C[g][2t] etc. come back in the same registers.
void test_mma_accumulates() {
  Fragments f;
  for (int i = 0; i < 128; ++i) f.c[i] = 0.5f * i;
  // A[3][4] = 1 (lane 14: group 3, t 2, a[0] lo), B[4][6] = 1 (lane 26: group 6, t 2, b[0] lo):
  // D[3][6] = C[3][6] + 1; C[3][6] is lane 15 (group 3, t 3) c[0].
  f.a[4 * 14] = bf16_bits(1.f);
  f.b[2 * 26] = bf16_bits(1.f);
  f.run(true);
  for (int i = 0; i < 128; ++i) {
    const float want = 0.5f * i + (i == 4 * 15 ? 1.f : 0.f);
    EXPECT(f.d[i] == want, "d flat[%d] = %g, want %g", i, f.d[i], want);
  }
}

// ---- ldmatrix ----
struct LdmParams {
  const uint16_t* source;  // 4 matrices of 8x8, row stride `stride` elements
  int stride;
  int count;  // 1, 2 or 4
  bool trans;
  int misalign_lane;  // this lane's address is moved by 2 bytes (-1: none)
  int outside_lane;   // this lane's address points at global memory (-1: none)
  uint32_t* out;      // [32][4]
};

__global__ void ldmatrix_kernel(LdmParams p) {
  uint16_t* tile = pncc::dynamic_smem<uint16_t>();
  const int l = threadIdx.x;
  for (int i = l; i < 32 * p.stride; i += 32) tile[i] = p.source[i];
  __syncthreads();
  // Matrix l/8, row l%8; rows of matrix i lie 8 * stride elements apart.
  const unsigned char* row = reinterpret_cast<const unsigned char*>(tile + (l / 8) * 8 * p.stride + (l % 8) * p.stride);
  if (l == p.misalign_lane) row += 2;
  if (l == p.outside_lane) row = reinterpret_cast<const unsigned char*>(p.source);
  uint32_t r[4] = {0, 0, 0, 0};
  using namespace pncc::ptx;
  if (p.count == 1) {
    uint32_t x[1];
    p.trans ? ldmatrix_x1_trans(x, row) : ldmatrix_x1(x, row);
    r[0] = x[0];
  } else if (p.count == 2) {
    uint32_t x[2];
    p.trans ? ldmatrix_x2_trans(x, row) : ldmatrix_x2(x, row);
    r[0] = x[0], r[1] = x[1];
  } else {
    p.trans ? ldmatrix_x4_trans(r, row) : ldmatrix_x4(r, row);
  }
  for (int i = 0; i < 4; ++i) p.out[4 * l + i] = r[i];
}

// Element (m, r, c) of the 4 matrices holds the bits 64m + 8r + c; rows are 16 elements (32 bytes)
// apart, 8 of them unused, so rows are found by their addresses, not by contiguity.
constexpr int kStride = 16;
std::vector<uint16_t> ldmatrix_source() {
  std::vector<uint16_t> s(32 * kStride, 0xdead);
  for (int m = 0; m < 4; ++m)
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c) s[(8 * m + r) * kStride + c] = uint16_t(64 * m + 8 * r + c);
  return s;
}

std::vector<uint32_t> run_ldmatrix(int count, bool trans, int misalign = -1, int outside = -1) {
  const std::vector<uint16_t> source = ldmatrix_source();
  std::vector<uint32_t> out(128, 0);
  PNCC_LAUNCH(1, 32, 32 * kStride * sizeof(uint16_t), nullptr, ldmatrix_kernel)(
      LdmParams{source.data(), kStride, count, trans, misalign, outside, out.data()});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void test_ldmatrix_layouts() {
  // Lane 13 holds row 13/4 = 3, columns 2(13%4) = 2 and 3: matrix i gives 64i + 26 and 64i + 27.
  // With .trans it holds row 3 of the transpose, columns 2 and 3: M[2][3], M[3][3] = 64i + 19, 27.
  const auto x4 = run_ldmatrix(4, false);
  EXPECT(x4[4 * 13 + 0] == pack(26, 27), "x4 lane 13 r[0] = %08x", x4[4 * 13]);
  EXPECT(x4[4 * 13 + 2] == pack(154, 155), "x4 lane 13 r[2] = %08x", x4[4 * 13 + 2]);
  const auto t4 = run_ldmatrix(4, true);
  EXPECT(t4[4 * 13 + 0] == pack(19, 27), "x4.trans lane 13 r[0] = %08x", t4[4 * 13]);
  EXPECT(t4[4 * 13 + 3] == pack(211, 219), "x4.trans lane 13 r[3] = %08x", t4[4 * 13 + 3]);
  // Lane 0: M[0][0], M[0][1]; lane 31: row 7, columns 6, 7 (trans: M[6][7], M[7][7]).
  EXPECT(x4[4 * 31 + 1] == pack(64 + 62, 64 + 63), "x4 lane 31 r[1] = %08x", x4[4 * 31 + 1]);
  EXPECT(t4[4 * 31 + 1] == pack(64 + 55, 64 + 63), "x4.trans lane 31 r[1] = %08x", t4[4 * 31 + 1]);
  EXPECT(t4[4 * 0 + 0] == pack(0, 8), "x4.trans lane 0 r[0] = %08x", t4[0]);
  // Every lane, every count: x1 and x2 give the first matrices of x4.
  for (const bool trans : {false, true}) {
    const auto& full = trans ? t4 : x4;
    for (const int count : {1, 2}) {
      const auto part = run_ldmatrix(count, trans);
      for (int l = 0; l < 32; ++l)
        for (int i = 0; i < count; ++i)
          EXPECT(part[4 * l + i] == full[4 * l + i], "x%d%s lane %d r[%d]", count,
                 trans ? ".trans" : "", l, i);
    }
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) {
        const int r = l / 4, c = 2 * (l % 4);
        const uint32_t want = trans ? pack(64 * i + 8 * c + r, 64 * i + 8 * (c + 1) + r)
                                    : pack(64 * i + 8 * r + c, 64 * i + 8 * r + c + 1);
        EXPECT(full[4 * l + i] == want, "x4%s lane %d r[%d]", trans ? ".trans" : "", l, i);
      }
  }
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

void test_ldmatrix_address_checks() {
  // x1 reads the addresses of lanes 0-7 only: a bad address in lane 9 is ignored, in lane 3 not.
  EXPECT(error_of([] { run_ldmatrix(1, false, 9); }).empty(), "x1 used lane 9's address");
  std::string e = error_of([] { run_ldmatrix(1, false, 3); });
  EXPECT(e.find("lane 3's row address is not 16-byte aligned") != std::string::npos, "got '%s'", e.c_str());
  e = error_of([] { run_ldmatrix(4, true, -1, 30); });
  EXPECT(e.find("lane 30's row address is not in the block's dynamic shared memory") != std::string::npos,
         "got '%s'", e.c_str());
}

// ---- ldmatrix -> mma: a 16x16 by 16x8 product against a plain one ----
struct GemmParams {
  const uint16_t* a;   // 16x16 row-major
  const uint16_t* bt;  // B as [n][k] (8x16, k contiguous: the "col" operand)
  const uint16_t* b;   // B as [k][n] (16x8 row-major: loaded with .trans)
  float* d;            // 16x8 row-major, from bt
  float* d_trans;      // 16x8 row-major, from b
  bool bf16;
};

__global__ void gemm_kernel(GemmParams p) {
  uint16_t* sa = pncc::dynamic_smem<uint16_t>();  // 16 x 16
  uint16_t* sbt = sa + 256;                       // 8 x 16
  uint16_t* sb = sbt + 128;                       // 16 x 8
  const int l = threadIdx.x;
  for (int i = l; i < 256; i += 32) sa[i] = p.a[i];
  for (int i = l; i < 128; i += 32) sbt[i] = p.bt[i], sb[i] = p.b[i];
  __syncthreads();
  using namespace pncc::ptx;
  // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
  uint32_t a[4], b[2], bt[2];
  ldmatrix_x4(a, sa + ((l / 8) % 2 * 8 + l % 8) * 16 + (l / 16) * 8);
  // B from [n][k]: matrices (n 0-7, k 0-7), (n 0-7, k 8-15); lanes 16-31 are ignored by .x2.
  ldmatrix_x2(bt, sbt + (l % 8) * 16 + ((l / 8) % 2) * 8);
  // B from [k][n]: matrices (k 0-7), (k 8-15), transposed.
  ldmatrix_x2_trans(b, sb + (l % 16) * 8);
  float d[4] = {0, 0, 0, 0}, e[4] = {0, 0, 0, 0};
  if (p.bf16) {
    mma_m16n8k16_bf16(d, a, bt, d);
    mma_m16n8k16_bf16(e, a, b, e);
  } else {
    mma_m16n8k16_f16(d, a, bt, d);
    mma_m16n8k16_f16(e, a, b, e);
  }
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    p.d[row * 8 + col] = d[i];
    p.d_trans[row * 8 + col] = e[i];
  }
}

void test_ldmatrix_mma_product() {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-8, 8);
  for (const bool bf16 : {true, false}) {
    // Small integers: every product and sum is exact, so the comparison can be exact.
    std::vector<float> A(256), B(128);
    for (auto& x : A) x = float(small(rng));
    for (auto& x : B) x = float(small(rng));
    std::vector<uint16_t> a(256), b(128), bt(128);
    const auto bits = [&](float v) { return bf16 ? bf16_bits(v) : f16_bits(v); };
    for (int i = 0; i < 256; ++i) a[i] = bits(A[i]);
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 8; ++n) b[k * 8 + n] = bits(B[k * 8 + n]), bt[n * 16 + k] = bits(B[k * 8 + n]);
    std::vector<float> d(128, -1.f), d_trans(128, -1.f);
    PNCC_LAUNCH(1, 32, (256 + 128 + 128) * sizeof(uint16_t), nullptr, gemm_kernel)(
        GemmParams{a.data(), bt.data(), b.data(), d.data(), d_trans.data(), bf16});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        float want = 0;
        for (int k = 0; k < 16; ++k) want += A[m * 16 + k] * B[k * 8 + n];
        EXPECT(d[m * 8 + n] == want, "%s D[%d][%d] = %g, want %g", bf16 ? "bf16" : "f16", m, n,
               d[m * 8 + n], want);
        EXPECT(d_trans[m * 8 + n] == want, "%s (B .trans) D[%d][%d] = %g, want %g",
               bf16 ? "bf16" : "f16", m, n, d_trans[m * 8 + n], want);
      }
  }
}

// A warp collective needs all 32 lanes.
__global__ void partial_warp_mma_kernel(float* out) {
  if (threadIdx.x == 5) return;
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float d[4] = {0, 0, 0, 0};
  pncc::ptx::mma_m16n8k16_bf16(d, a, b, d);
  out[threadIdx.x] = d[0];
}

void test_collective_needs_whole_warp() {
  std::vector<float> out(32);
  const std::string e = error_of([&] { PNCC_LAUNCH(1, 32, 0, nullptr, partial_warp_mma_kernel)(out.data()); });
  EXPECT(e.find("a lane of the warp has exited") != std::string::npos, "got '%s'", e.c_str());
}

// ---- cp.async ----
enum class Wait { all, none, newest_pending };
struct CopyParams {
  const float* src;  // 2 groups x 32 lanes x 4 floats
  float* out;        // the same, read back from shared memory by another lane
  Wait wait;
  bool valid;
  int misalign_lane;
};

__global__ void cp_async_kernel(CopyParams p) {
  float* tile = pncc::dynamic_smem<float>();
  const int l = threadIdx.x;
  for (int group = 0; group < 2; ++group) {
    const int chunk = 32 * group + l;
    float* dst = tile + 4 * chunk + (l == p.misalign_lane ? 1 : 0);
    pncc::ptx::cp_async_16(dst, p.valid ? p.src + 4 * chunk : p.src, p.valid);
    pncc::ptx::cp_async_commit();
  }
  if (p.wait == Wait::all) pncc::ptx::cp_async_wait<0>();
  else if (p.wait == Wait::newest_pending) pncc::ptx::cp_async_wait<1>();
  __syncthreads();
  // Read what another lane copied (so the barrier, not the wait alone, makes it visible).
  const int other = (l + 7) % 32;
  for (int group = 0; group < 2; ++group)
    for (int i = 0; i < 4; ++i) p.out[4 * (32 * group + other) + i] = tile[4 * (32 * group + other) + i];
}

std::vector<float> run_cp_async(Wait wait, bool valid, int misalign = -1) {
  std::vector<float> src(256), out(256, -7.f);
  for (int i = 0; i < 256; ++i) src[i] = float(i) + 0.25f;
  PNCC_LAUNCH(1, 32, 256 * sizeof(float), nullptr, cp_async_kernel)(
      CopyParams{src.data(), out.data(), wait, valid, misalign});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void test_cp_async() {
  const auto all = run_cp_async(Wait::all, true);
  for (int i = 0; i < 256; ++i) EXPECT(all[i] == float(i) + 0.25f, "waited copy [%d] = %g", i, all[i]);
  // A missing wait: the destination still holds the poison, NaN.
  const auto none = run_cp_async(Wait::none, true);
  for (int i = 0; i < 256; ++i) EXPECT(std::isnan(none[i]), "unwaited copy [%d] = %g", i, none[i]);
  // wait<1> after two groups: the first landed, the second (newest) may still be in flight.
  const auto one = run_cp_async(Wait::newest_pending, true);
  for (int i = 0; i < 128; ++i) EXPECT(one[i] == float(i) + 0.25f, "group 0 [%d] = %g", i, one[i]);
  for (int i = 128; i < 256; ++i) EXPECT(std::isnan(one[i]), "group 1 [%d] = %g", i, one[i]);
  // Zero-fill: nothing is read, 16 zero bytes land at the wait.
  const auto zero = run_cp_async(Wait::all, false);
  for (int i = 0; i < 256; ++i) EXPECT(zero[i] == 0.f, "zero-filled [%d] = %g", i, zero[i]);
  const std::string e = error_of([] { run_cp_async(Wait::all, true, 4); });
  EXPECT(e.find("destination not 16-byte aligned") != std::string::npos, "got '%s'", e.c_str());
}

// ---- exp2, shuffles, launches of multi-argument templates ----
template <typename T, int Scale>
__global__ void misc_kernel(T* out) {
  const int l = threadIdx.x;
  const T down = __shfl_down_sync(0xffffffffu, T(l * Scale), 3);
  const T from = __shfl_sync(0xffffffffu, T(l * Scale), 31 - l);
  out[2 * l] = down;
  out[2 * l + 1] = from;
}

void test_misc() {
  using pncc::ptx::exp2_approx;
  EXPECT(exp2_approx(3.f) == 8.f, "2^3");
  EXPECT(exp2_approx(-INFINITY) == 0.f, "2^-inf");
  EXPECT(exp2_approx(-126.f) == std::ldexp(1.f, -126), "2^-126 is normal");
  EXPECT(exp2_approx(-130.f) == 0.f, "2^-130 is subnormal: flushed to zero");
  EXPECT(exp2_approx(std::ldexp(1.f, -140)) == 1.f, "subnormal input flushed to zero");
  std::vector<float> out(64);
  PNCC_LAUNCH(1, 32, 0, nullptr, misc_kernel<float, 2>)(out.data());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int l = 0; l < 32; ++l) {
    EXPECT(out[2 * l] == float(2 * (l + 3 < 32 ? l + 3 : l)), "shfl_down lane %d = %g", l, out[2 * l]);
    EXPECT(out[2 * l + 1] == float(2 * (31 - l)), "shfl lane %d = %g", l, out[2 * l + 1]);
  }
}

}  // namespace

int main() {
  test_mma_single_products();
  test_mma_accumulates();
  test_ldmatrix_layouts();
  test_ldmatrix_address_checks();
  test_ldmatrix_mma_product();
  test_collective_needs_whole_warp();
  test_cp_async();
  test_misc();
  std::printf("%s: %d failed checks\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
