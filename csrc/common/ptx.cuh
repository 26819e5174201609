// Thin wrappers over the sm_80+ warp-level matrix and asynchronous-copy instructions that the
// tensor-core kernels use. Kernels call only these, never inline asm of their own, so that the host
// emulation (tools/cuda_emu, which defines PNCC_CUDA_EMU and implements each function below with
// the same signature and the PTX ISA's fragment layouts) runs the same kernel source.
//
// Fragment layouts are the PTX ISA's ("Matrix Fragments for mma.m16n8k16", "ldmatrix"); in short,
// with lane = 4 * group + tid_in_group:
//   mma m16n8k16 A (16x16, row): a[0] = A[group][2t..2t+1], a[1] = A[group+8][2t..2t+1],
//                                a[2] = A[group][2t+8..2t+9], a[3] = A[group+8][2t+8..2t+9]
//   mma m16n8k16 B (16x8, col):  b[0] = B[2t..2t+1][group], b[1] = B[2t+8..2t+9][group]
//   mma m16n8k16 C/D (16x8 f32): c[0..1] = C[group][2t..2t+1], c[2..3] = C[group+8][2t..2t+1]
//   ldmatrix .x1/.x2/.x4: lanes 8i..8i+7 give the row addresses of matrix i (16 bytes each); in
//                         matrix i, lane l receives r[i] = row l/4, columns 2(l%4)..2(l%4)+1
//                         (.trans: the transposed 8x8 matrix).
#pragma once

#include <cstdint>

#if defined(PNCC_CUDA_EMU)
// tools/cuda_emu/emu_runtime.h defines namespace pncc::ptx with the functions declared below.
#else

namespace pncc {
namespace ptx {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// D = A * B + C with bf16 (or fp16) operands and fp32 accumulation.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
        "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

// ldmatrix: `row` is this lane's row address in shared memory (16-byte aligned).
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0]) : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0]) : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(row)));
}

// 16-byte global -> shared copy that bypasses L1 (cp.async.cg). With `valid` false nothing is
// read and the 16 destination bytes are zero-filled (src-size 0), so tile edges need no branch
// around the copy; `src` must still be a valid-looking address (pass the tensor's base).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_address(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `Pending` of this thread's committed groups are still in flight. Other
// threads' copies are visible only after a __syncthreads() that follows the wait.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(Pending));
}

// 2^x on the SFU (ex2.approx.ftz.f32): the online softmax works in base 2 with log2(e) folded
// into the scale, as FlashAttention does.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace ptx
}  // namespace pncc

#endif  // PNCC_CUDA_EMU
