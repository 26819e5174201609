// A host emulation of the small part of CUDA that csrc/**/*_cuda.cu use, so that their kernels
// (thread mapping, barriers, shared-memory tiles, the PTX wrappers of csrc/common/ptx.cuh, launch
// configuration) can run on a machine without a GPU. build.py compiles each <op>_cuda.cu as it is,
// after this header and emu_torch.h; nothing here is part of the op library. See README.md.
//
// Model:
//   - a launch runs its blocks one after another; a block runs all its threads, either as fibers
//     switched only at barriers (the default: fast and deterministic) or, with
//     EMU_EXECUTOR=threads, as OS threads (real interleavings, for ThreadSanitizer);
//   - __syncthreads and the warp collectives (__shfl_xor_sync, mma, ldmatrix) are barriers; a
//     thread that returns drops out of them, as exited threads do on sm_70+;
//   - dynamic shared memory is a fresh heap buffer of exactly the launch's size per block, filled
//     with 0xff bytes (NaN in every float type), so reading it before writing shows up as NaN and
//     reading past its end shows up under AddressSanitizer;
//   - launches check the configuration rules of the CUDA runtime (grid and block limits, empty
//     grids, dynamic shared memory over 48 KiB without cudaFuncSetAttribute, over the device's
//     opt-in maximum, EMU_MAX_SMEM_OPTIN, default 232448 as on an H100) and report them through
//     C10_CUDA_KERNEL_LAUNCH_CHECK, like a real launch.
// Not modelled: lock-step execution without a collective, nvcc's FMA contraction and its device
// maths library (host expf etc. run instead), memory coalescing, timing.
#pragma once

// Kernel headers (csrc/common/ptx.cuh, cuda_launch.cuh) take their emulated definitions from here.
#ifndef PNCC_CUDA_EMU
#define PNCC_CUDA_EMU 1
#endif

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#include <atomic>
#include <condition_variable>
#include <cmath>
#include <deque>
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
#include <tuple>
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
// One cp.async of 16 bytes: the source is read when the copy is issued, the destination written
// only when a cp_async_wait covers its group (until then it holds poison, 0xff bytes).
struct AsyncCopy {
  unsigned char* dst;
  unsigned char bytes[16];
};
// What a kernel's built-in variables read: one per emulated thread. The executor points `tls` at
// the running thread's state (a thread_local pointer, re-pointed at every fiber switch).
struct ThreadState {
  dim3 thread, block, block_dim, grid_dim;
  Block* blk = nullptr;
  int linear = 0;
  std::vector<AsyncCopy> uncommitted;           // issued since the last cp_async_commit
  std::deque<std::vector<AsyncCopy>> in_flight;  // committed groups, oldest first
};
inline thread_local ThreadState* tls = nullptr;

// ---- executors ----
//
// EMU_EXECUTOR=threads runs every emulated thread of a block on an OS thread of ThreadPool (what
// the sanitizer driver uses: ThreadSanitizer sees the real interleavings); the default, fibers,
// runs a block's threads as ucontext fibers on the calling thread, switching only at barriers
// (fast, deterministic, for running the test suite).
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

// The OS threads of EMU_EXECUTOR=threads, created once and reused by every block of every launch.
// A thread per emulated thread and block (about 100,000 per sanitizer run) spent most of the
// sanitizer step's time creating and destroying threads. The threads meet only at the pool's mutex,
// when a block starts and when it ends, so ThreadSanitizer still sees no order between the threads
// of one block but the emulated barriers.
class ThreadPool {
 public:
  // Runs body(0), ..., body(n - 1) on n threads at once and returns when all have finished.
  void run(int n, const std::function<void(int)>& body) {
    std::unique_lock<std::mutex> lock(m_);
    while (int(workers_.size()) < n) {
      const int id = int(workers_.size());
      workers_.emplace_back([this, id] { work(id); });
    }
    body_ = &body;
    n_ = n;
    remaining_ = n;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    body_ = nullptr;
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
  }

 private:
  void work(int id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (id >= n_) continue;
      const std::function<void(int)>* body = body_;
      lock.unlock();
      (*body)(id);
      lock.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }
  std::mutex m_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* body_ = nullptr;
  int n_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

inline ThreadPool& thread_pool() {
  static ThreadPool pool;
  return pool;
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
  // Operands of the warp-collective PTX instructions (mma, ldmatrix): each lane posts its own.
  const char* op[32] = {};
  uint32_t words[32][4];
  float accum[32][4];
  const unsigned char* rows[32];
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
          thread_pool().run(threads, body);
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
// Returns and clears the last launch error, as the runtime does (corr_kernels.cuh's launchers).
inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(::emu::state_mutex());
  const cudaError_t err = ::emu::last_error();
  ::emu::last_error() = cudaSuccess;
  return err;
}
inline const char* cudaGetErrorString(cudaError_t) { return ::emu::last_error_text().c_str(); }

#define C10_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    const cudaError_t emu_err = (expr);                                                 \
    TORCH_CHECK(emu_err == cudaSuccess, "CUDA error ", int(emu_err), " from " #expr, ": ", \
                ::emu::last_error_text());                                              \
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

// ---- vector types, paired 16-bit floats and intrinsics kernels commonly use ----
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return {__bfloat162float(h.x), __bfloat162float(h.y)};
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- csrc/common/cuda_launch.cuh ----
// The kernel is the last argument (a template-id with commas needs no parentheses there).
#define PNCC_LAUNCH(grid, block, smem_bytes, stream, ...) \
  ::emu::launch(&__VA_ARGS__, (grid), (block), (smem_bytes), (stream))

namespace pncc {
template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(::emu::dynamic_smem());
}
}  // namespace pncc

// ---- more warp shuffles ----
namespace emu {
// Every lane posts `v`; lane i receives the value of lane source(i). All 32 lanes must take part.
template <typename T, typename Source>
T shuffle(unsigned mask, T v, Source source, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  Warp& w = warp();
  if (mask != 0xffffffffu) fail(std::string(what) + " with a partial mask is not modelled");
  if (w.barrier.expected() != 32)
    fail(std::string(what) + " with a full mask while a lane of the warp has exited");
  const int self = lane();
  warp_sync();
  std::memcpy(w.slots[self], &v, sizeof(T));
  warp_sync();
  T r;
  std::memcpy(&r, w.slots[source(self) & 31], sizeof(T));
  warp_sync();
  return r;
}
}  // namespace emu

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  if (width != 32) ::emu::fail("__shfl_sync with a width other than 32 is not modelled");
  return ::emu::shuffle(mask, v, [=](int) { return src_lane; }, "__shfl_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) ::emu::fail("__shfl_down_sync with a width other than 32 is not modelled");
  // A lane whose source is past the warp keeps its own value, as on the GPU.
  return ::emu::shuffle(mask, v, [=](int l) { return l + int(delta) < 32 ? l + int(delta) : l; },
                        "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) ::emu::fail("__shfl_up_sync with a width other than 32 is not modelled");
  return ::emu::shuffle(mask, v, [=](int l) { return l >= int(delta) ? l - int(delta) : l; },
                        "__shfl_up_sync");
}

// ---- csrc/common/ptx.cuh: mma.sync, ldmatrix, cp.async, ex2.approx ----
//
// Model:
//   - mma and ldmatrix are warp collectives: all 32 lanes must execute the same instruction (a lane
//     that has exited, or lanes at different instructions, is an error); every lane posts its
//     registers or row address, and each lane then takes its own part of the result by the PTX
//     ISA's fragment layouts (see ptx.cuh's comment);
//   - mma: the 16 products of each dot product are exact (16-bit operands), summed in double with
//     the fp32 accumulator and rounded once to fp32. A tensor core truncates partial sums to about
//     fp32 precision instead, so results may differ from a GPU's in the last bits of fp32;
//   - ldmatrix: each used lane's row address must be 16-byte aligned and lie, with its 16 bytes,
//     inside the block's dynamic shared memory (the only shared memory the emulator has);
//   - cp.async: the 16 source bytes are read at issue and the destination is set to poison (0xff:
//     NaN in every float type) at once; the bytes land only when a cp_async_wait<N> covers the
//     copy's commit group, so a missing wait or barrier reads NaN. Copies issued after the last
//     commit are covered by no wait, as in PTX;
//   - exp2_approx: host exp2f with subnormal inputs and outputs flushed to zero (.ftz), not the
//     SFU's approximation (about 2 ulp on a GPU).
namespace emu {
namespace ptx_model {

inline bool in_smem(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = tls->blk->smem;
  return c >= base && c + bytes <= base + tls->blk->smem_size;
}

inline void check_smem_row(const void* p, const char* what, int source_lane) {
  const std::string who = std::string(what) + ": lane " + std::to_string(source_lane);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail(who + "'s row address is not 16-byte aligned");
  if (!in_smem(p, 16)) fail(who + "'s row address is not in the block's dynamic shared memory");
}

// enter() claims this lane's slots, gather() waits for the whole warp and checks that every lane
// is at the same collective, leave() waits until every lane has read what it needs.
inline Warp& enter(const char* what) {
  Warp& w = warp();
  if (w.barrier.expected() != 32)
    fail(std::string(what) + ": a warp collective while a lane of the warp has exited");
  // Every collective ends with leave(), so no lane still reads the slots written here.
  w.op[lane()] = what;
  return w;
}
inline void gather(Warp& w, const char* what) {
  warp_sync();
  // A lane may have exited while the others waited here.
  if (w.barrier.expected() != 32)
    fail(std::string(what) + ": a warp collective while a lane of the warp has exited");
  for (int l = 0; l < 32; ++l)
    if (w.op[l] != what)
      fail(std::string(what) + ": lanes of one warp at different collectives (lane " +
           std::to_string(l) + " is at " + (w.op[l] ? w.op[l] : "none") + ")");
}
inline void leave() { warp_sync(); }

inline uint16_t lo16(uint32_t w) { return uint16_t(w & 0xffffu); }
inline uint16_t hi16(uint32_t w) { return uint16_t(w >> 16); }
inline uint32_t pack16(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

template <bool BF16>
double value16(uint16_t bits) {
  if constexpr (BF16) return double(float(c10::BFloat16(bits, c10::BFloat16::from_bits())));
  else return double(float(c10::Half(bits, c10::Half::from_bits())));
}

template <bool BF16>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                  const float (&c)[4], const char* what) {
  Warp& w = enter(what);
  const int self = lane();
  for (int i = 0; i < 4; ++i) w.words[self][i] = a[i];
  for (int i = 0; i < 4; ++i) w.accum[self][i] = c[i];
  // B's two registers go in slots (a's four words are taken).
  std::memcpy(w.slots[self], b, 8);
  gather(w, what);
  // The whole operands, from every lane's fragment (lane = 4 * group + t).
  double A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* aw = w.words[l];
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[rows[i]][cols[i]] = value16<BF16>(lo16(aw[i]));
      A[rows[i]][cols[i] + 1] = value16<BF16>(hi16(aw[i]));
    }
    uint32_t bw[2];
    std::memcpy(bw, w.slots[l], 8);
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = value16<BF16>(lo16(bw[i]));
      B[2 * t + 8 * i + 1][g] = value16<BF16>(hi16(bw[i]));
    }
    C[g][2 * t] = w.accum[l][0];
    C[g][2 * t + 1] = w.accum[l][1];
    C[g + 8][2 * t] = w.accum[l][2];
    C[g + 8][2 * t + 1] = w.accum[l][3];
  }
  leave();
  const int g = self / 4, t = self % 4;
  const int out_row[4] = {g, g, g + 8, g + 8}, out_col[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    double s = C[out_row[i]][out_col[i]];
    for (int k = 0; k < 16; ++k) s += A[out_row[i]][k] * B[k][out_col[i]];
    d[i] = static_cast<float>(s);
  }
}

// ldmatrix .xN: lanes 8i..8i+7 give the rows of matrix i; lane l receives, in r[i], row l/4 and
// columns 2(l%4), 2(l%4)+1 of matrix i (of its transpose with .trans), low half first.
template <int N, bool Trans>
void ldmatrix(uint32_t (&r)[N], const void* row, const char* what) {
  Warp& w = enter(what);
  const int self = lane();
  w.rows[self] = static_cast<const unsigned char*>(row);
  gather(w, what);
  uint16_t m[N][8][8];
  for (int i = 0; i < N; ++i)
    for (int rr = 0; rr < 8; ++rr) {
      const unsigned char* p = w.rows[8 * i + rr];
      check_smem_row(p, what, 8 * i + rr);
      std::memcpy(m[i][rr], p, 16);
    }
  leave();
  const int rr = self / 4, cc = 2 * (self % 4);
  for (int i = 0; i < N; ++i)
    r[i] = Trans ? pack16(m[i][cc][rr], m[i][cc + 1][rr]) : pack16(m[i][rr][cc], m[i][rr][cc + 1]);
}

}  // namespace ptx_model
}  // namespace emu

namespace pncc {
namespace ptx {

inline uint32_t smem_address(const void* p) {
  if (!::emu::ptx_model::in_smem(p, 1))
    ::emu::fail("smem_address of a pointer outside the block's dynamic shared memory");
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - ::emu::tls->blk->smem);
}

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                              const float (&c)[4]) {
  ::emu::ptx_model::mma_m16n8k16<true>(d, a, b, c, "mma_m16n8k16_bf16");
}
inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4]) {
  ::emu::ptx_model::mma_m16n8k16<false>(d, a, b, c, "mma_m16n8k16_f16");
}

inline void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  ::emu::ptx_model::ldmatrix<1, false>(r, row, "ldmatrix_x1");
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  ::emu::ptx_model::ldmatrix<2, false>(r, row, "ldmatrix_x2");
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  ::emu::ptx_model::ldmatrix<4, false>(r, row, "ldmatrix_x4");
}
inline void ldmatrix_x1_trans(uint32_t (&r)[1], const void* row) {
  ::emu::ptx_model::ldmatrix<1, true>(r, row, "ldmatrix_x1_trans");
}
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  ::emu::ptx_model::ldmatrix<2, true>(r, row, "ldmatrix_x2_trans");
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  ::emu::ptx_model::ldmatrix<4, true>(r, row, "ldmatrix_x4_trans");
}

inline void cp_async_16(void* dst, const void* src, bool valid) {
  using ::emu::fail;
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) fail("cp_async_16: destination not 16-byte aligned");
  if (!::emu::ptx_model::in_smem(dst, 16))
    fail("cp_async_16: destination not inside the block's dynamic shared memory");
  ::emu::AsyncCopy copy{static_cast<unsigned char*>(dst), {}};
  if (valid) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp_async_16: source not 16-byte aligned");
    if (::emu::ptx_model::in_smem(src, 1)) fail("cp_async_16: source is in shared memory, not global");
    std::memcpy(copy.bytes, src, 16);
  }  // else: src-size 0, the destination is zero-filled and nothing is read
  std::memset(copy.dst, 0xff, 16);
  ::emu::tls->uncommitted.push_back(copy);
}

inline void cp_async_commit() {
  ::emu::ThreadState& st = *::emu::tls;
  st.in_flight.push_back(std::move(st.uncommitted));
  st.uncommitted.clear();
}

template <int Pending>
void cp_async_wait() {
  static_assert(Pending >= 0, "cp_async_wait<N> needs N >= 0");
  ::emu::ThreadState& st = *::emu::tls;
  while (st.in_flight.size() > size_t(Pending)) {
    for (const ::emu::AsyncCopy& copy : st.in_flight.front()) std::memcpy(copy.dst, copy.bytes, 16);
    st.in_flight.pop_front();
  }
}

inline float exp2_approx(float x) {
  const auto flush = [](float v) { return std::fpclassify(v) == FP_SUBNORMAL ? 0.0f * v : v; };
  return flush(std::exp2(flush(x)));
}

}  // namespace ptx
}  // namespace pncc
