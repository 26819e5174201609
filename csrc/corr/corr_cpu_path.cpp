// The path choice of corr_cpu_path.h: mode, per-shape-class cache, counters. Torch-free apart
// from TORCH_CHECK for its one-line errors.
#include "corr/corr_cpu_path.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

#include "corr/corr_cpu_simd.h"

namespace pncc {
namespace corr {
namespace path {
namespace {

enum class Mode { kAuto, kSimd, kAten };

// Rounds of the calibration per path (after one warm-up round each), timed alternately so that a
// burst of load on a shared machine falls on both paths alike; the medians are compared.
constexpr int kRounds = 5;
// ATen's GEMMs must be this much faster to be chosen. The two families measured are far from the
// boundary (AVX-512 kernels 2x faster on Zen 5; MKL about 1.25x faster on Sapphire Rapids,
// issue 11), so a margin keeps noise from flipping the choice between processes, which would
// change results in the last bits from one run to the next.
constexpr double kAtenMargin = 1.1;

const char* mode_name(Mode m) {
  return m == Mode::kAuto ? "auto" : m == Mode::kSimd ? "simd" : "aten";
}

void check_simd_possible(const char* origin) {
  TORCH_CHECK(simd::available(), origin,
              " asks for the AVX-512 corr_warp kernels, but this CPU (or build) has no AVX-512F");
}

Mode mode_from_env() {
  const char* env = std::getenv("PNCC_CORR_SIMD");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return Mode::kAuto;
  const std::string value(env);
  TORCH_CHECK(value == "0" || value == "1",
              "PNCC_CORR_SIMD must be 0 (ATen GEMMs), 1 (AVX-512 kernels) or auto, not '", value,
              "'");
  return value == "1" ? Mode::kSimd : Mode::kAten;
}

struct State {
  std::mutex mutex;
  bool mode_read = false;
  Mode mode = Mode::kAuto;
  std::map<std::pair<int64_t, int64_t>, bool> chosen;  // shape class -> AVX-512 kernels
  std::atomic<int64_t> calibrations{0}, simd_products{0}, aten_products{0};

  // The mode, read from the environment the first time (under `mutex`).
  Mode current_mode() {
    if (!mode_read) {
      mode = mode_from_env();
      if (mode == Mode::kSimd) check_simd_possible("PNCC_CORR_SIMD=1");
      mode_read = true;
    }
    return mode;
  }
};

State& state() {
  static State s;
  return s;
}

int64_t round_up_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

// true unless ATen's rounds were faster by kAtenMargin, by the medians of alternating rounds.
bool simd_wins(const Measure& measure) {
  std::vector<double> simd_s, aten_s;
  measure(kRounds, simd_s, aten_s);
  TORCH_INTERNAL_ASSERT(simd_s.size() == size_t(kRounds) && aten_s.size() == size_t(kRounds));
  std::nth_element(simd_s.begin(), simd_s.begin() + kRounds / 2, simd_s.end());
  std::nth_element(aten_s.begin(), aten_s.begin() + kRounds / 2, aten_s.end());
  return simd_s[kRounds / 2] <= kAtenMargin * aten_s[kRounds / 2];
}

}  // namespace

bool use_simd(int64_t channels, int64_t value_channels, const Measure& measure) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  const Mode mode = s.current_mode();
  if (mode != Mode::kAuto) return mode == Mode::kSimd;
  if (!simd::available()) return false;
  const auto key = std::make_pair(round_up_pow2(channels), round_up_pow2(value_channels));
  const auto found = s.chosen.find(key);
  if (found != s.chosen.end()) return found->second;
  const bool simd = simd_wins(measure);
  s.calibrations.fetch_add(1, std::memory_order_relaxed);
  s.chosen.emplace(key, simd);
  return simd;
}

void count_product(bool simd) {
  (simd ? state().simd_products : state().aten_products).fetch_add(1, std::memory_order_relaxed);
}

std::string set_mode(const std::string& mode) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  const Mode previous = s.current_mode();
  if (mode.empty()) return mode_name(previous);
  TORCH_CHECK(mode == "auto" || mode == "simd" || mode == "aten" || mode == "recalibrate",
              "corr_warp CPU path mode must be 'auto', 'simd', 'aten' or 'recalibrate', not '",
              mode, "'");
  if (mode == "simd") check_simd_possible("mode 'simd'");
  s.mode = mode == "simd" ? Mode::kSimd : mode == "aten" ? Mode::kAten : Mode::kAuto;
  if (mode == "recalibrate") s.chosen.clear();
  return mode_name(previous);
}

std::vector<int64_t> stats() {
  State& s = state();
  return {simd::available() ? 1 : 0, s.calibrations.load(), s.simd_products.load(),
          s.aten_products.load()};
}

}  // namespace path
}  // namespace corr
}  // namespace pncc
