// Which implementation runs the tile products of the CPU corr_warp: the AVX-512 kernels of
// corr_cpu_simd.h or ATen's GEMMs (MKL, or oneDNN) in fp32, or, for bfloat16 inputs, the
// AVX512-BF16 kernels of corr_cpu_bf16.h; chosen per machine by measuring.
//
// Why measure: neither fp32 path wins everywhere. MKL runs its AVX2 code on AMD CPUs, where the
// project's kernel is about twice as fast; on Intel CPUs with AVX-512 MKL's own AVX-512 code beats
// it (bench/RESULTS.md). A vendor check would encode today's MKL; a measurement follows the BLAS
// the user actually has. The bf16 kernels do twice the multiply-adds per instruction, but are
// measured all the same against the fp32 path chosen for the class (on AMX tiles where the CPU
// has them: corr_cpu_bf16.h).
//
// Policy (PNCC_CORR_SIMD, read once per process; the _corr_cpu_path_mode op changes it later):
//   unset or "auto": the first call of a shape class (C and Cv, each rounded up to a power of two,
//                    and whether the inputs are bfloat16) times one query tile's two products on
//                    the candidate paths, and keeps the fastest for the life of the process (a
//                    challenger only when faster by 10%: see kMargin). The rounds stop early
//                    once one path is clearly faster (kClearly); see first_wins;
//   "1":             always the AVX-512 fp32 kernels (an error on a CPU without AVX-512F);
//   "0":             always ATen's GEMMs in fp32;
//   "bf16":          bfloat16 inputs on the AVX512-BF16 kernels, all other inputs on the AVX-512
//                    fp32 kernels (an error on a CPU without AVX512-BF16).
// The choice is fixed before any parallel region and cached, so the results stay bitwise
// identical across thread counts within a process. Two processes on a noisy machine may choose
// differently for a shape class whose paths are within noise of each other; runs that must
// agree bit for bit across processes should set PNCC_CORR_SIMD.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace pncc {
namespace corr {
namespace path {

// The implementations of the tile products.
enum class Tiles { kAten, kSimd, kBf16 };
const char* tiles_name(Tiles t);

// Times rounds of a shape class's tile products on two paths, alternately (`first` first), after
// one untimed round of each, appending the seconds of each round to first_s and second_s, until
// `enough(first_s, second_s)` says stop (checked after every pair of rounds).
using Enough = std::function<bool(const std::vector<double>&, const std::vector<double>&)>;
using Measure = std::function<void(Tiles first, Tiles second, const Enough& enough,
                                   std::vector<double>& first_s, std::vector<double>& second_s)>;

// The path of the tile products of a corr_warp with C query/key channels and Cv value channels,
// whose inputs are bfloat16 when `bf16_inputs` (float64 never asks: it always takes ATen's).
// Calls `measure` the first time a shape class is seen in "auto" mode. Thread-safe; call outside
// parallel regions.
Tiles choose(int64_t channels, int64_t value_channels, bool bf16_inputs, const Measure& measure);

// Counts one tile product run on the given path (for the debug op's counters).
void count_product(Tiles tiles);

// The debug ops (schemas in csrc/ops.cpp):
//   _corr_cpu_path_mode(mode): sets "auto", "simd", "aten" or "bf16", or "recalibrate" (auto,
//                              and every calibration forgotten); returns the previous mode. ""
//                              only returns the current one.
//   _corr_cpu_path_stats():    [AVX-512 kernels available, calibrations run, tile products on
//                              the AVX-512 kernels, tile products on ATen, AVX512-BF16 kernels
//                              available, tile products on them, whether those run on AMX
//                              tiles (bf16::amx_in_use)].
std::string set_mode(const std::string& mode);
std::vector<int64_t> stats();

// _corr_cpu_path(C, Cv, bf16): "simd", "aten" or "bf16", the path corr_warp takes for this
// shape class with fp32 inputs (bfloat16 ones when `bf16`), calibrating now when it has not been
// yet. Defined in corr_cpu.cpp, which owns the products.
std::string path_for(int64_t channels, int64_t value_channels, bool bf16_inputs);

}  // namespace path
}  // namespace corr
}  // namespace pncc
