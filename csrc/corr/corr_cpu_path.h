// Which implementation runs the fp32 tile products of the CPU corr_warp: the AVX-512 kernels of
// corr_cpu_simd.h or ATen's GEMMs (MKL, or oneDNN), chosen per machine by measuring.
//
// Why measure: neither wins everywhere. MKL runs its AVX2 code on AMD CPUs, where the project's
// kernel is about twice as fast; on Intel CPUs with AVX-512 MKL's own AVX-512 code beats it
// (bench/RESULTS.md). A vendor check would encode today's MKL; a measurement follows the BLAS the
// user actually has.
//
// Policy (PNCC_CORR_SIMD, read once per process; the _corr_cpu_path_mode op changes it later):
//   unset or "auto": the first fp32 call of a shape class (C and Cv, each rounded up to a power of
//                    two) times one query tile's two products on both paths, a few milliseconds,
//                    and keeps the faster one for the life of the process (ATen's only when
//                    faster by 10%: see kAtenMargin);
//   "1":             always the AVX-512 kernels (an error on a CPU without AVX-512F);
//   "0":             always ATen's GEMMs.
// The choice is fixed before any parallel region and cached, so the results stay bitwise
// identical across thread counts within a process. Two processes on a noisy machine may choose
// differently for a shape class whose two paths are within noise of each other; runs that must
// agree bit for bit across processes should set PNCC_CORR_SIMD.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace pncc {
namespace corr {
namespace path {

// Times `rounds` rounds of a shape class's tile products on each path, alternately (AVX-512
// first), after one untimed round of each: appends the seconds of each round to `simd_s` and
// `aten_s`.
using Measure =
    std::function<void(int rounds, std::vector<double>& simd_s, std::vector<double>& aten_s)>;

// Whether the fp32 tile products of a corr_warp with C query/key channels and Cv value channels
// run on the AVX-512 kernels. Calls `measure` the first time a shape class is seen in "auto"
// mode. Thread-safe; call outside parallel regions.
bool use_simd(int64_t channels, int64_t value_channels, const Measure& measure);

// Counts one tile product run on the given path (for the debug op's counters).
void count_product(bool simd);

// The debug ops (schemas in csrc/ops.cpp):
//   _corr_cpu_path_mode(mode): sets "auto", "simd" or "aten", or "recalibrate" (auto, and every
//                              calibration forgotten); returns the previous mode. "" only
//                              returns the current one.
//   _corr_cpu_path_stats():    [AVX-512 kernels available, calibrations run, tile products on
//                              the AVX-512 kernels, tile products on ATen].
std::string set_mode(const std::string& mode);
std::vector<int64_t> stats();

// _corr_cpu_path(C, Cv): "simd" or "aten", the path fp32 corr_warp takes for this shape class
// (calibrating now when it has not been yet). Defined in corr_cpu.cpp, which owns the products.
std::string path_for(int64_t channels, int64_t value_channels);

}  // namespace path
}  // namespace corr
}  // namespace pncc
