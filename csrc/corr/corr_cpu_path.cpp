// The path choice of corr_cpu_path.h: mode, per-shape-class cache, counters. Torch-free apart
// from TORCH_CHECK for its one-line errors.
#include "corr/corr_cpu_path.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "corr/corr_cpu_bf16.h"
#include "corr/corr_cpu_simd.h"

namespace pncc {
namespace corr {
namespace path {
namespace {

enum class Mode { kAuto, kSimd, kAten, kBf16 };

// Rounds of the calibration per path at most (after one warm-up round each), timed alternately so
// that a burst of load on a shared machine falls on both paths alike; the medians are compared.
constexpr int kRounds = 5;
// A challenger (ATen's GEMMs against the AVX-512 kernels; an fp32 path against the bf16 kernels)
// must be this much faster to be chosen. The two fp32 families measured are far from the boundary
// (AVX-512 kernels 2x faster on Zen 5; MKL about 1.25x faster on Sapphire Rapids, issue 11), so a
// margin keeps noise from flipping the choice between processes, which would change results in
// the last bits from one run to the next.
constexpr double kMargin = 1.1;
// The rounds stop after kEarly of each when the outcome is clear: every round of the challenger
// faster than every round of the incumbent by kClearly, or no round of the challenger faster than
// any of the incumbent's by kMargin. On the two CPU families measured the paths differ by
// 1.25-2x, so most calibrations take the warm-up and two rounds, not five.
constexpr int kEarly = 2;
constexpr double kClearly = 1.3;

const char* mode_name(Mode m) {
  return m == Mode::kAuto ? "auto" : m == Mode::kSimd ? "simd" : m == Mode::kAten ? "aten" : "bf16";
}

void check_simd_possible(const char* origin) {
  TORCH_CHECK(simd::available(), origin,
              " asks for the AVX-512 corr_warp kernels, but this CPU (or build) has no AVX-512F");
}

void check_bf16_possible(const char* origin) {
  TORCH_CHECK(bf16::available(), origin,
              " asks for the AVX512-BF16 corr_warp kernels, but this CPU (or build) has no "
              "AVX512-BF16");
}

Mode mode_from_env() {
  const char* env = std::getenv("PNCC_CORR_SIMD");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return Mode::kAuto;
  const std::string value(env);
  TORCH_CHECK(value == "0" || value == "1" || value == "bf16",
              "PNCC_CORR_SIMD must be 0 (ATen GEMMs), 1 (AVX-512 kernels), bf16 (AVX512-BF16 "
              "kernels for bfloat16 inputs) or auto, not '", value, "'");
  return value == "1" ? Mode::kSimd : value == "0" ? Mode::kAten : Mode::kBf16;
}

struct State {
  std::mutex mutex;
  bool mode_read = false;
  Mode mode = Mode::kAuto;
  // shape class (C, Cv rounded up, bfloat16 inputs) -> chosen path
  std::map<std::tuple<int64_t, int64_t, bool>, Tiles> chosen;
  std::atomic<int64_t> calibrations{0}, simd_products{0}, aten_products{0}, bf16_products{0};

  // The mode, read from the environment the first time (under `mutex`).
  Mode current_mode() {
    if (!mode_read) {
      mode = mode_from_env();
      if (mode == Mode::kSimd) check_simd_possible("PNCC_CORR_SIMD=1");
      if (mode == Mode::kBf16) check_bf16_possible("PNCC_CORR_SIMD=bf16");
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

double median(std::vector<double> x) {
  std::nth_element(x.begin(), x.begin() + x.size() / 2, x.end());
  return x[x.size() / 2];
}

// Whether every round of `fast` beat every round of `slow` by `factor`.
bool faster_by(const std::vector<double>& fast, const std::vector<double>& slow, double factor) {
  return *std::max_element(fast.begin(), fast.end()) * factor <
         *std::min_element(slow.begin(), slow.end());
}

// true unless the challenger's rounds were faster than the incumbent's by kMargin (by the medians
// of alternating rounds, or clearly after kEarly rounds).
bool incumbent_wins(const Measure& measure, Tiles incumbent, Tiles challenger) {
  std::vector<double> inc_s, cha_s;
  measure(incumbent, challenger,
          [](const std::vector<double>& inc, const std::vector<double>& cha) {
            const size_t n = std::min(inc.size(), cha.size());
            if (n >= size_t(kRounds)) return true;
            if (n < size_t(kEarly)) return false;
            const bool challenger_clearly = faster_by(cha, inc, kClearly);
            const bool challenger_never = *std::min_element(cha.begin(), cha.end()) * kMargin >=
                                          *std::max_element(inc.begin(), inc.end());
            return challenger_clearly || challenger_never;
          },
          inc_s, cha_s);
  TORCH_INTERNAL_ASSERT(!inc_s.empty() && inc_s.size() == cha_s.size());
  return median(inc_s) <= kMargin * median(cha_s);
}

// The fp32 path of a shape class in auto mode (under the state's mutex).
Tiles fp32_choice(State& s, int64_t c, int64_t cv, const Measure& measure) {
  if (!simd::available()) return Tiles::kAten;
  const auto key = std::make_tuple(c, cv, false);
  const auto found = s.chosen.find(key);
  if (found != s.chosen.end()) return found->second;
  const Tiles t = incumbent_wins(measure, Tiles::kSimd, Tiles::kAten) ? Tiles::kSimd : Tiles::kAten;
  s.calibrations.fetch_add(1, std::memory_order_relaxed);
  s.chosen.emplace(key, t);
  return t;
}

}  // namespace

const char* tiles_name(Tiles t) {
  return t == Tiles::kSimd ? "simd" : t == Tiles::kAten ? "aten" : "bf16";
}

Tiles choose(int64_t channels, int64_t value_channels, bool bf16_inputs, const Measure& measure) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  switch (s.current_mode()) {
    case Mode::kAten: return Tiles::kAten;
    case Mode::kSimd: return Tiles::kSimd;
    case Mode::kBf16: return bf16_inputs ? Tiles::kBf16 : Tiles::kSimd;
    case Mode::kAuto: break;
  }
  const int64_t c = round_up_pow2(channels), cv = round_up_pow2(value_channels);
  const Tiles fp32 = fp32_choice(s, c, cv, measure);
  if (!bf16_inputs || !bf16::available()) return fp32;
  const auto key = std::make_tuple(c, cv, true);
  const auto found = s.chosen.find(key);
  if (found != s.chosen.end()) return found->second;
  const Tiles t = incumbent_wins(measure, Tiles::kBf16, fp32) ? Tiles::kBf16 : fp32;
  s.calibrations.fetch_add(1, std::memory_order_relaxed);
  s.chosen.emplace(key, t);
  return t;
}

void count_product(Tiles tiles) {
  State& s = state();
  (tiles == Tiles::kSimd ? s.simd_products : tiles == Tiles::kAten ? s.aten_products
                                                                    : s.bf16_products)
      .fetch_add(1, std::memory_order_relaxed);
}

std::string set_mode(const std::string& mode) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  const Mode previous = s.current_mode();
  if (mode.empty()) return mode_name(previous);
  TORCH_CHECK(mode == "auto" || mode == "simd" || mode == "aten" || mode == "bf16" ||
                  mode == "recalibrate",
              "corr_warp CPU path mode must be 'auto', 'simd', 'aten', 'bf16' or 'recalibrate', "
              "not '", mode, "'");
  if (mode == "simd") check_simd_possible("mode 'simd'");
  if (mode == "bf16") check_bf16_possible("mode 'bf16'");
  s.mode = mode == "simd" ? Mode::kSimd : mode == "aten" ? Mode::kAten
         : mode == "bf16" ? Mode::kBf16 : Mode::kAuto;
  if (mode == "recalibrate") s.chosen.clear();
  return mode_name(previous);
}

std::vector<int64_t> stats() {
  State& s = state();
  return {simd::available() ? 1 : 0, s.calibrations.load(), s.simd_products.load(),
          s.aten_products.load(), bf16::available() ? 1 : 0, s.bf16_products.load(),
          bf16::amx_in_use() ? 1 : 0};
}

}  // namespace path
}  // namespace corr
}  // namespace pncc
