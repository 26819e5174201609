// A host emulation of the small part of CUDA that csrc/**/*_cuda.cu use, so that their kernels
// (thread mapping, barriers, shared-memory tiles, wmma calls, launch configuration) can run on a
// machine without a GPU. translate.py rewrites a .cu file into a .cpp that includes this header
// first; nothing here is part of the op library. See README.md.
//
// Model:
//   - a launch runs its blocks one after another; a block runs all its threads, either as fibers
//     switched only at barriers (the default: fast and deterministic) or, with
//     EMU_EXECUTOR=threads, as OS threads (real interleavings, for ThreadSanitizer);
//   - __syncthreads and the warp collectives (__shfl_xor_sync, wmma::*_sync) are barriers; a
//     thread that returns drops out of them, as exited threads do on sm_70+;
//   - dynamic shared memory is a fresh heap buffer of exactly the launch's size per block, filled
//     with 0xff bytes (NaN in every float type), so reading it before writing shows up as NaN and
//     reading past its end shows up under AddressSanitizer;
//   - wmma fragments hold whole 16x16 tiles per lane; loads and stores check the documented
//     pointer (32-byte) and leading-dimension (16-byte) alignment; a store is done by lane 0
//     alone, so a lane that reads the stored tile without a barrier is a race; mma_sync sums exact
//     products in double (a model of a tensor core, not its rounding);
//   - launches check the configuration rules of the CUDA runtime (grid and block limits, empty
//     grids, dynamic shared memory over 48 KiB without cudaFuncSetAttribute, over the device's
//     opt-in maximum, EMU_MAX_SMEM_OPTIN, default 232448 as on an H100) and report them through
//     C10_CUDA_KERNEL_LAUNCH_CHECK, like a real launch.
// Not modelled: lock-step execution without a collective, nvcc's FMA contraction and its device
// maths library (host expf etc. run instead), memory coalescing, timing.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <ucontext.h>
#include <vector>

// ---- keywords ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ---- runtime types and error codes ----
using cudaStream_t = void*;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

namespace emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void fail(const std::string& what) {
  throw Error("cuda_emu: " + what);
}

// ---- device properties (EMU_MAX_SMEM_OPTIN: 232448 on H100, 166912 on A100) ----
inline int max_smem_optin() {
  const char* env = std::getenv("EMU_MAX_SMEM_OPTIN");
  return env ? std::atoi(env) : 232448;
}
constexpr size_t kDefaultSmem = 48 * 1024;

inline std::mutex& state_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<const void*, int>& smem_attribute() {
  static std::map<const void*, int> m;
  return m;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline std::string& last_error_text() {
  static std::string s;
  return s;
}

// ---- counters a driver can read (launches, blocks, threads) ----
struct Stats {
  std::atomic<long> launches{0}, blocks{0};
};
inline Stats& stats() {
  static Stats s;
  return s;
}

struct Block;
// What a kernel's built-in variables read: one per emulated thread. The executor points `tls` at
// the running thread's state (a thread_local pointer, re-pointed at every fiber switch).
struct ThreadState {
  dim3 thread, block, block_dim, grid_dim;
  Block* blk = nullptr;
  int linear = 0;
};
inline thread_local ThreadState* tls = nullptr;

// ---- executors ----
//
// EMU_EXECUTOR=threads runs every emulated thread as an OS thread (what the sanitizer driver
// uses: ThreadSanitizer sees the real interleavings); the default, fibers, runs a block's threads
// as ucontext fibers on the calling thread, switching only at barriers (fast, deterministic, for
// running the test suite).
inline bool use_os_threads() {
  static const bool os = [] {
    const char* env = std::getenv("EMU_EXECUTOR");
    return env && std::string(env) == "threads";
  }();
  return os;
}

// The fibers of the block being run (fiber executor only).
struct FiberScheduler {
  ucontext_t main;
  std::vector<ucontext_t> contexts;
  std::vector<char> done;
  std::vector<ThreadState> states;
  std::function<void(int)> body;
  int current = -1;
  long progress = 0;  // barrier releases and exits: a round without any is a deadlock

  void yield() {
    const int self = current;
    swapcontext(&contexts[self], &main);
    tls = &states[self];
  }

  static void entry(unsigned hi, unsigned lo);

  void run(int n) {
    constexpr size_t kStack = 256 * 1024;
    // Stacks are reused across blocks and launches (a launch may run thousands of blocks).
    static thread_local std::vector<std::unique_ptr<char[]>> stacks;
    while (int(stacks.size()) < n) stacks.emplace_back(new char[kStack]);
    contexts.assign(n, ucontext_t{});
    done.assign(n, 0);
    states.assign(n, ThreadState{});
    const uintptr_t self = reinterpret_cast<uintptr_t>(this);
    for (int t = 0; t < n; ++t) {
      getcontext(&contexts[t]);
      contexts[t].uc_stack.ss_sp = stacks[t].get();
      contexts[t].uc_stack.ss_size = kStack;
      contexts[t].uc_link = &main;
      makecontext(&contexts[t], reinterpret_cast<void (*)()>(&FiberScheduler::entry), 2,
                  unsigned(self >> 32), unsigned(self & 0xffffffffu));
    }
    int remaining = n;
    while (remaining > 0) {
      const long before = progress;
      for (int t = 0; t < n; ++t) {
        if (done[t]) continue;
        current = t;
        tls = &states[t];
        swapcontext(&main, &contexts[t]);
        if (done[t]) --remaining;
      }
      if (remaining > 0 && progress == before)
        throw std::runtime_error("cuda_emu: deadlock (threads wait at barriers that never fill)");
    }
    current = -1;
  }
};
inline thread_local FiberScheduler* fibers = nullptr;

inline void FiberScheduler::entry(unsigned hi, unsigned lo) {
  auto* s = reinterpret_cast<FiberScheduler*>((uintptr_t(hi) << 32) | uintptr_t(lo));
  const int t = s->current;
  tls = &s->states[t];
  s->body(t);
  s->done[t] = 1;
  ++s->progress;
}

// ---- barriers ----
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n) {}
  void arrive_and_wait() {
    if (fibers) {
      const uint64_t gen = gen_;
      if (++arrived_ == expected_) {
        release();
      } else {
        while (gen_ == gen) fibers->yield();
      }
      return;
    }
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t gen = gen_;
    if (++arrived_ == expected_) {
      release();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }
  // An exiting thread: later barriers wait for one thread fewer.
  void arrive_and_drop() {
    std::unique_lock<std::mutex> lock(m_, std::defer_lock);
    if (!fibers) lock.lock();
    --expected_;
    if (expected_ > 0 && arrived_ == expected_) release();
  }
  int expected() {
    std::unique_lock<std::mutex> lock(m_, std::defer_lock);
    if (!fibers) lock.lock();
    return expected_;
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    if (fibers) ++fibers->progress;
    else cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_;
  int arrived_ = 0;
  uint64_t gen_ = 0;
};

struct Warp {
  explicit Warp(int lanes) : barrier(lanes), lanes(lanes) {}
  Barrier barrier;
  int lanes;
  alignas(8) unsigned char slots[32][8];
};

struct Block {
  Block(int threads, size_t smem_bytes) : barrier(threads), smem_size(smem_bytes) {
    for (int w = 0; w < (threads + 31) / 32; ++w)
      warps.emplace_back(std::make_unique<Warp>(std::min(32, threads - 32 * w)));
    // Exactly the launch's bytes (AddressSanitizer then sees a read past the end), filled with
    // 0xff bytes: NaN as float, half and bfloat16, so an uninitialised read is visible.
    const size_t n = std::max<size_t>(smem_bytes, 1);
    smem = static_cast<unsigned char*>(::operator new(n, std::align_val_t(1024)));
    std::memset(smem, 0xff, n);
  }
  ~Block() { ::operator delete(smem, std::align_val_t(1024)); }
  Barrier barrier;
  size_t smem_size;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* smem;
};


inline unsigned char* dynamic_smem() { return tls->blk->smem; }
inline int lane() { return tls->linear % 32; }
inline Warp& warp() { return *tls->blk->warps[tls->linear / 32]; }
inline void warp_sync() { warp().barrier.arrive_and_wait(); }

// Bounds check of an access made through an emulated collective (wmma), for builds without
// AddressSanitizer: inside the shared-memory buffer's pages but past the launch's size is an error.
inline void check_smem_range(const void* p, size_t bytes, const char* what) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = tls->blk->smem;
  if (c >= base && c < base + tls->blk->smem_size + 4096 && c + bytes > base + tls->blk->smem_size)
    fail(std::string(what) + " reads or writes past the end of dynamic shared memory");
}

// ---- launches ----
template <typename G>
dim3 to_dim3(G g, const char* what) {
  if constexpr (std::is_integral_v<G>) {
    // <<<n, ...>>> with an integer converts it to unsigned: a value that does not fit is
    // silently truncated on a real launch.
    if (g < 0 || static_cast<uint64_t>(g) > 0xffffffffull)
      fail(std::string(what) + " " + std::to_string(g) + " does not fit in unsigned int");
    return dim3(static_cast<unsigned>(g));
  } else {
    return dim3(g);
  }
}

inline bool config_ok(const dim3& g, const dim3& b, size_t smem, const void* kernel,
                      std::string& why) {
  std::ostringstream os;
  if (g.x == 0 || g.y == 0 || g.z == 0) os << "empty grid (" << g.x << ", " << g.y << ", " << g.z << ")";
  else if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u)
    os << "grid (" << g.x << ", " << g.y << ", " << g.z << ") over the limits";
  else if (b.x == 0 || b.y == 0 || b.z == 0 || uint64_t(b.x) * b.y * b.z > 1024 || b.z > 64)
    os << "block (" << b.x << ", " << b.y << ", " << b.z << ") invalid";
  else if (smem > size_t(max_smem_optin()))
    os << "dynamic shared memory " << smem << " over the device maximum " << max_smem_optin();
  else if (smem > kDefaultSmem) {
    std::lock_guard<std::mutex> lock(state_mutex());
    auto it = smem_attribute().find(kernel);
    if (it == smem_attribute().end() || size_t(it->second) < smem)
      os << "dynamic shared memory " << smem
         << " over 48 KiB without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)";
  }
  why = os.str();
  return why.empty();
}

template <typename... P, typename... A>
void run_grid(void (*kernel)(P...), dim3 g, dim3 b, size_t smem, A&&... args) {
  std::string why;
  if (!config_ok(g, b, smem, reinterpret_cast<const void*>(kernel), why)) {
    std::lock_guard<std::mutex> lock(state_mutex());
    last_error() = cudaErrorInvalidConfiguration;
    last_error_text() = why;
    return;
  }
  stats().launches++;
  const int threads = static_cast<int>(b.x * b.y * b.z);
  // Kernel parameters are copied once, as the launch does.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        stats().blocks++;
        Block block(threads, smem);
        std::mutex error_mutex;
        std::string error;
        const auto body = [&](int t) {
          ThreadState own;
          ThreadState& st = fibers ? *tls : own;  // a fiber's state lives in the scheduler
          tls = &st;
          st.thread = dim3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
          st.block = dim3(bx, by, bz);
          st.block_dim = b;
          st.grid_dim = g;
          st.blk = &block;
          st.linear = t;
          try {
            std::apply(kernel, params);
          } catch (const std::exception& e) {
            std::lock_guard<std::mutex> lock(error_mutex);
            if (error.empty()) error = e.what();
          }
          block.warps[t / 32]->barrier.arrive_and_drop();
          block.barrier.arrive_and_drop();
        };
        if (use_os_threads()) {
          std::vector<std::thread> pool;
          pool.reserve(threads);
          for (int t = 0; t < threads; ++t) pool.emplace_back(body, t);
          for (auto& th : pool) th.join();
        } else {
          FiberScheduler scheduler;
          scheduler.body = body;
          fibers = &scheduler;
          try {
            scheduler.run(threads);
          } catch (...) {
            fibers = nullptr;
            throw;
          }
          fibers = nullptr;
          tls = nullptr;
        }
        if (!error.empty()) fail("kernel failed: " + error);
      }
}

template <typename... P, typename G, typename B>
auto launch(void (*kernel)(P...), G grid, B block, size_t smem, cudaStream_t) {
  const dim3 g = to_dim3(grid, "grid size");
  const dim3 b = to_dim3(block, "block size");
  return [=](auto&&... args) { run_grid(kernel, g, b, smem, std::forward<decltype(args)>(args)...); };
}

}  // namespace emu

// ---- built-in variables ----
#define threadIdx (::emu::tls->thread)
#define blockIdx (::emu::tls->block)
#define blockDim (::emu::tls->block_dim)
#define gridDim (::emu::tls->grid_dim)

inline void __syncthreads() { ::emu::tls->blk->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::emu::warp_sync(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int offset) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  ::emu::Warp& w = ::emu::warp();
  if (mask != 0xffffffffu) ::emu::fail("__shfl_xor_sync with a partial mask is not modelled");
  // Every lane named by the mask must take part: a lane that has already returned is an error.
  if (w.barrier.expected() != 32)
    ::emu::fail("__shfl_xor_sync with a full mask while a lane of the warp has exited");
  const int lane = ::emu::lane();
  ::emu::warp_sync();
  std::memcpy(w.slots[lane], &v, sizeof(T));
  ::emu::warp_sync();
  T r;
  std::memcpy(&r, w.slots[lane ^ offset], sizeof(T));
  ::emu::warp_sync();
  return r;
}

// ---- atomics (on global memory) ----
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

// ---- runtime API ----
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *v = ::emu::max_smem_optin();
  return cudaSuccess;
}
template <typename K>
cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > ::emu::max_smem_optin()) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(::emu::state_mutex());
  ::emu::smem_attribute()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) {
  std::memset(p, value, n);
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t) { return ::emu::last_error_text().c_str(); }

#define C10_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    const cudaError_t emu_err = (expr);                                                 \
    TORCH_CHECK(emu_err == cudaSuccess, "CUDA error ", int(emu_err), " from " #expr); \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                                    \
  do {                                                                                    \
    std::lock_guard<std::mutex> emu_lock(::emu::state_mutex());                           \
    const cudaError_t emu_err = ::emu::last_error();                                      \
    ::emu::last_error() = cudaSuccess;                                                    \
    TORCH_CHECK(emu_err == cudaSuccess, "CUDA kernel launch failed: invalid configuration: ", \
                ::emu::last_error_text());                                                \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStreamEmu {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStreamEmu getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace c10

// ---- 16-bit float types (bit-compatible with c10::Half and c10::BFloat16) ----
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.x, c10::Half::from_bits())); }
inline __half __float2half_rn(float f) { return __half{c10::Half(f).x}; }
inline float __bfloat162float(__nv_bfloat16 h) {
  return static_cast<float>(c10::BFloat16(h.x, c10::BFloat16::from_bits()));
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{c10::BFloat16(f).x}; }

// ---- nvcuda::wmma, m16n16k16 ----
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is modelled");
  float v[16][16];  // a: (m, k); b: (k, n); accumulator: (m, n)
};

template <typename T>
float elem_to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return static_cast<float>(x);
}

template <typename T>
void check_operand(const T* p, unsigned ldm, const char* what) {
  // CUDA C++ Programming Guide, wmma: mptr 256-bit aligned; ldm a multiple of 16 bytes.
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::emu::fail(std::string(what) + ": pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    ::emu::fail(std::string(what) + ": leading dimension " + std::to_string(ldm) +
                " is not a multiple of 16 bytes");
}

// Reads the 16x16 tile (r, c) -> p[r * ldm + c] (row-major) or p[r + c * ldm] (column-major).
template <typename T>
void read_tile(float (&v)[16][16], const T* p, unsigned ldm, bool row_major_layout,
               const char* what) {
  check_operand(p, ldm, what);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      const T* e = row_major_layout ? p + size_t(r) * ldm + c : p + r + size_t(c) * ldm;
      ::emu::check_smem_range(e, sizeof(T), what);
      v[r][c] = elem_to_float(*e);
    }
}

template <typename T, typename Layout>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  ::emu::warp_sync();
  read_tile(f.v, p, ldm, std::is_same_v<Layout, row_major>, "load_matrix_sync(matrix_a)");
}

template <typename T, typename Layout>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  ::emu::warp_sync();
  read_tile(f.v, p, ldm, std::is_same_v<Layout, row_major>, "load_matrix_sync(matrix_b)");
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  ::emu::warp_sync();
  read_tile(f.v, p, ldm, layout == mem_row_major, "load_matrix_sync(accumulator)");
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(!std::is_same_v<T, float>, "wmma has no fp32 m16n16k16 operands");
  ::emu::warp_sync();
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double s = 0;  // exact products, wide sum: a model of the tensor core, not its rounding
      for (int k = 0; k < 16; ++k) s += double(a.v[i][k]) * double(b.v[k][j]);
      out[i][j] = static_cast<float>(double(c.v[i][j]) + s);
    }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  ::emu::warp_sync();
  check_operand(p, ldm, "store_matrix_sync");
  // One lane writes the whole tile: reading it from another lane needs a barrier, as on a GPU,
  // where each lane writes only its own elements.
  if (::emu::lane() != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      float* e = layout == mem_row_major ? p + size_t(r) * ldm + c : p + r + size_t(c) * ldm;
      ::emu::check_smem_range(e, sizeof(float), "store_matrix_sync");
      *e = f.v[r][c];
    }
}

}  // namespace wmma
}  // namespace nvcuda
