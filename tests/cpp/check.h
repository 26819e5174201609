// A minimal test harness for the torch-free kernel core: CHECK records failures with their
// location; main() of each test file runs its cases and returns non-zero if any failed.
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace pncc_test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline std::vector<std::pair<std::string, std::function<void()>>>& cases() {
  static std::vector<std::pair<std::string, std::function<void()>>> all;
  return all;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { cases().emplace_back(name, fn); }
};

inline int run_all() {
  for (auto& [name, fn] : cases()) {
    const int before = failures();
    fn();
    std::printf("%s %s\n", failures() == before ? "[ ok ]" : "[FAIL]", name.c_str());
  }
  std::printf("%zu cases, %d failed checks\n", cases().size(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace pncc_test

#define TEST_CASE(name)                                               \
  static void name();                                                 \
  static pncc_test::Register register_##name(#name, name);            \
  static void name()

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      ++pncc_test::failures();                                               \
      std::printf("  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
    }                                                                        \
  } while (0)
