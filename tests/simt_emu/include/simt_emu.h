// A SIMT emulator for csrc/cuda/*.cu on the CPU: every CUDA thread of a block is a fiber (its own stack, switched
// cooperatively on one OS thread), so __syncthreads, __syncwarp and the warp collectives are real barriers between
// real threads, and the kernels run exactly as written. Blocks run in parallel on OS threads. What it checks beyond
// the results: barriers every thread (block) or every lane (warp, full mask) reaches, lanes of a warp meeting in
// the same collective, shared memory read before it is written (it starts as 0xff bytes: NaN, -1), 16-byte and
// typed accesses on their alignment, and the launch limits of sm_90 (block size, grid, shared memory).
// What it does not model: timing, memory ordering between blocks, and out-of-bounds global accesses (`make
// cuda-emulate` runs it under AddressSanitizer for those).
#pragma once

#include <c10/core/Device.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

// CUDA's math library declares isnan / isinf for device code in the global namespace; <cmath> puts them in std.
using std::isinf;
using std::isnan;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)  // the rewrite moves the bound into the kernel's body: ::simt::launch_bounds
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) ulonglong2 {
  unsigned long long x, y;
};

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double d) { long long x; std::memcpy(&x, &d, 8); return x; }

// ---- the CUDA runtime calls the host code makes --------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxGridDimX = 5, cudaDevAttrMultiProcessorCount = 16 };

namespace simt {

constexpr size_t kMaxStaticShared = 48 * 1024;    // static __shared__ per block
constexpr size_t kMaxShared = 227 * 1024;         // static + dynamic per block on sm_90, with the opt-in
constexpr size_t kDefaultDynamicShared = 48 * 1024;  // dynamic without cudaFuncSetAttribute
constexpr size_t kStackBytes = 256 * 1024;

struct Stream {};

inline std::mutex& attr_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<const void*, int>& max_dynamic_smem() {  // cudaFuncSetAttribute, per kernel
  static std::map<const void*, int> m;
  return m;
}

// ---- fibers, blocks, barriers --------------------------------------------------------------------------------
// Under AddressSanitizer every stack switch is announced, so that ASan knows which stack is live.
#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#endif
enum class Wait { kNone, kBlock, kWarp };

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  int lane = 0, warp = 0;
  Wait wait = Wait::kNone;
  bool done = false;
  size_t shared_seq = 0;  // the next static __shared__ declaration this thread reaches
  char* stack = nullptr;
  // cp.async: copies issued since the last commit, then committed groups (oldest first), each copy a destination
  // and the source bytes read at issue. A group's bytes land in shared memory only when a wait retires it, so a
  // read before the wait sees the old contents.
  struct AsyncCopy {
    void* dst;
    unsigned char bytes[16];
    size_t size;
  };
  std::vector<AsyncCopy> open_group;
  std::vector<std::vector<AsyncCopy>> groups;
};

struct Warp {
  int arrived = 0, live = 32;
  unsigned gen = 0;
  const char* op = nullptr;
  uint64_t slots[2][32][8];  // per lane 64 bytes, double-buffered by generation
};

struct Block {
  dim3 idx, dim, grid;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t sched;
  int live = 0, arrived = 0;
  unsigned gen = 0;
  int or_acc[2] = {0, 0};
  std::vector<std::pair<void*, size_t>> shared;  // static __shared__ arrays in declaration order
  size_t static_bytes = 0;
  void* dynamic = nullptr;
  bool eager_copies = false;  // SIMT_EMU_CP_ASYNC=eager (see async_copy)
  const std::function<void()>* body = nullptr;
  std::string error;
  const void* sched_stack = nullptr;  // the scheduler's (OS thread's) stack, for ASan's switch annotations
  size_t sched_stack_size = 0;
};

inline thread_local Block* t_block = nullptr;
inline thread_local Fiber* t_fiber = nullptr;

inline Fiber& self() { return *t_fiber; }
inline Block& block() { return *t_block; }

// Fiber -> scheduler (dying: the fiber never resumes) and scheduler -> fiber.
inline void to_scheduler(bool dying) {
  Block& b = *t_block;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake, b.sched_stack, b.sched_stack_size);
#endif
  if (dying) {
    setcontext(&b.sched);
  } else {
    swapcontext(&t_fiber->ctx, &b.sched);
  }
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void to_fiber(Block& b, Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  t_fiber = &f;
  swapcontext(&b.sched, &f.ctx);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void yield() { to_scheduler(false); }

// A kernel error: recorded, the block stops (its fibers are never resumed), the launch throws on the host.
[[noreturn]] inline void fail(const std::string& what) {
  Block& b = block();
  if (b.error.empty()) {
    const Fiber& f = self();
    b.error = what + " (block (" + std::to_string(b.idx.x) + "," + std::to_string(b.idx.y) + "," +
              std::to_string(b.idx.z) + "), thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) +
              "," + std::to_string(f.tid.z) + "))";
  }
  to_scheduler(true);
  std::abort();  // unreachable
}

inline void release_block(Block& b) {
  b.arrived = 0;
  ++b.gen;
  b.or_acc[b.gen & 1] = 0;  // the parity the next barrier accumulates into (its readers are all past it)
  for (Fiber& f : b.fibers) {
    if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
  }
}

inline void sync_block() {
  Block& b = block();
  if (++b.arrived == b.live) {
    release_block(b);
    return;
  }
  self().wait = Wait::kBlock;
  yield();
}

inline void release_warp(Block& b, Warp& w, int warp) {
  if (w.live != 32) fail(std::string("a lane of warp ") + std::to_string(warp) + " exited while the others wait in " + w.op + " with a full mask");
  w.arrived = 0;
  w.op = nullptr;
  ++w.gen;
  for (Fiber& f : b.fibers) {
    if (f.warp == warp && f.wait == Wait::kWarp) f.wait = Wait::kNone;
  }
}

inline void sync_warp(const char* op) {
  Block& b = block();
  Fiber& f = self();
  Warp& w = b.warps[f.warp];
  if (w.arrived == 0) {
    w.op = op;
  } else if (std::strcmp(w.op, op) != 0) {
    fail(std::string("lanes of a warp diverged: lane ") + std::to_string(f.lane) + " reached " + op +
         " while others wait in " + w.op);
  }
  if (++w.arrived == w.live) {
    release_warp(b, w, f.warp);
    return;
  }
  f.wait = Wait::kWarp;
  yield();
}

inline void check_full_mask(unsigned mask, const char* op) {
  if (mask != 0xffffffffu) fail(std::string(op) + ": the emulator models full-warp masks only");
}

// Every lane deposits `v`, the warp meets, and each lane gets the 32 deposits (slot[lane]).
template <typename T>
inline const uint64_t (*exchange(const T& v, const char* op))[8] {
  static_assert(sizeof(T) <= sizeof(uint64_t) * 8, "64 bytes per lane");
  Warp& w = block().warps[self().warp];
  const unsigned parity = w.gen & 1;
  std::memcpy(w.slots[parity][self().lane], &v, sizeof(T));
  sync_warp(op);
  return w.slots[parity];
}

template <typename T>
inline T slot_as(const uint64_t (*slots)[8], int lane) {
  T v;
  std::memcpy(&v, slots[lane], sizeof(T));
  return v;
}

// Static __shared__ arrays: a thread's n-th declaration is the block's n-th array, allocated (0xff bytes) by the
// first thread to reach it.
template <typename T>
inline T* shared_array(size_t count, size_t align) {
  Block& b = block();
  const size_t n = self().shared_seq++;
  const size_t bytes = count * sizeof(T);
  if (n == b.shared.size()) {
    b.static_bytes = (b.static_bytes + align - 1) / align * align + bytes;
    if (b.static_bytes > kMaxStaticShared) fail("static shared memory over 48 KiB: " + std::to_string(b.static_bytes));
    const size_t al = std::max<size_t>(align, 16);
    void* p = std::aligned_alloc(al, std::max(al, (bytes + al - 1) / al * al));
    std::memset(p, 0xff, bytes);
    b.shared.emplace_back(p, bytes);
  } else if (b.shared[n].second != bytes) {
    fail("threads of a block declared different __shared__ arrays");
  }
  return static_cast<T*>(b.shared[n].first);
}

template <typename T>
inline T* dynamic_shared() {
  return static_cast<T*>(block().dynamic);
}

// ---- cp.async ----------------------------------------------------------------------------------------------------
// The two extremes of when a copy may land: SIMT_EMU_CP_ASYNC=deferred (default: at the wait that retires its
// group; a read before the wait sees old bytes) or eager (at issue; a write into a buffer other threads still
// read shows). Read once per launch (run_grid).
inline void async_copy(void* dst, const void* src, size_t size, bool valid) {
  Fiber::AsyncCopy c{dst, {}, size};
  if (valid) std::memcpy(c.bytes, src, size);  // else zeros (src-size 0)
  if (block().eager_copies) {
    std::memcpy(dst, c.bytes, size);
  } else {
    self().open_group.push_back(c);
  }
}

inline void async_commit() {
  Fiber& f = self();
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

inline void async_wait(size_t pending) {  // cp.async.wait_group: at most `pending` newest groups still in flight
  Fiber& f = self();
  while (f.groups.size() > pending) {
    for (const auto& c : f.groups.front()) std::memcpy(c.dst, c.bytes, c.size);
    f.groups.erase(f.groups.begin());
  }
}

inline void fiber_main() {
  Block& b = block();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack, &b.sched_stack_size);
#endif
  (*b.body)();
  async_commit();
  async_wait(0);  // copies still in flight land anyway
  Fiber& f = self();
  f.done = true;
  --b.live;
  Warp& w = b.warps[f.warp];
  --w.live;
  if (w.arrived > 0 && w.arrived == w.live) release_warp(b, w, f.warp);  // fails: a full-mask op lost a lane
  if (b.arrived > 0 && b.arrived == b.live) release_block(b);           // exited threads count as arrived
  to_scheduler(true);
}

// Which runnable threads the scheduler resumes, in what order (SIMT_EMU_ORDER): forward (default), reverse or
// shuffle resume every runnable thread once per round in that order, so warps advance about together;
// warps-ahead resumes only the lowest warp that can run, so a warp runs on until it waits on the others (a
// warp that overwrites what another warp still reads shows). A missing barrier shows under at least one of them.
struct ResumeOrder {
  std::vector<int> threads;
  bool warps_ahead = false;
};

inline ResumeOrder resume_order(int n, unsigned seed) {
  ResumeOrder r;
  r.threads.resize(n);
  std::iota(r.threads.begin(), r.threads.end(), 0);
  const char* env = std::getenv("SIMT_EMU_ORDER");
  const std::string mode = env ? env : "forward";
  if (mode == "reverse") std::reverse(r.threads.begin(), r.threads.end());
  if (mode == "shuffle") std::shuffle(r.threads.begin(), r.threads.end(), std::mt19937(seed));
  r.warps_ahead = mode == "warps-ahead";
  return r;
}

inline void run_block(Block& b, char* stacks) {
  const int n = static_cast<int>(b.dim.x * b.dim.y * b.dim.z);
  b.fibers.assign(n, Fiber{});
  b.warps.assign((n + 31) / 32, Warp{});
  if (n % 32) b.warps.back().live = n % 32;
  b.live = n;
  t_block = &b;
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.tid = dim3(i % b.dim.x, (i / b.dim.x) % b.dim.y, i / (b.dim.x * b.dim.y));
    f.lane = i % 32;
    f.warp = i / 32;
    f.stack = stacks + static_cast<size_t>(i) * kStackBytes;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
#if defined(__SANITIZE_ADDRESS__)
  __asan_unpoison_memory_region(stacks, static_cast<size_t>(n) * kStackBytes);  // frames a failed block left poisoned
#endif
  const ResumeOrder order = resume_order(n, b.idx.x * 7919u + b.idx.y * 104729u + b.idx.z);
  int done = 0;
  while (b.error.empty() && done < n) {
    bool progressed = false;
    done = 0;
    int lead_warp = -1;  // warps-ahead: the one warp resumed this round
    for (int i : order.threads) {
      Fiber& f = b.fibers[i];
      if (f.done) {
        ++done;
        continue;
      }
      if (f.wait != Wait::kNone) continue;
      if (order.warps_ahead) {
        if (lead_warp < 0) lead_warp = f.warp;
        if (f.warp != lead_warp) continue;
      }
      to_fiber(b, f);
      progressed = true;
      if (!b.error.empty()) break;
    }
    if (!progressed && done < n && b.error.empty()) {
      std::string who;
      for (const Fiber& f : b.fibers) {
        if (!f.done && who.size() < 200) {
          who += " t" + std::to_string(f.tid.x) + (f.wait == Wait::kBlock ? ":__syncthreads" : ":warp op");
        }
      }
      b.error = "deadlock: no thread can go on (a barrier some threads never reach);" + who;
    }
  }
  for (auto& s : b.shared) std::free(s.first);
  b.shared.clear();
  t_block = nullptr;
  t_fiber = nullptr;
}

// grid.x's limit: 2^31 - 1 as on every GPU since sm_30, unless SIMT_EMU_MAX_GRID_X lowers it, so that host code
// that launches in chunks of at most this many blocks (csrc/cuda/launch.cuh) runs its chunking on small inputs.
inline int max_grid_x() {
  const char* env = std::getenv("SIMT_EMU_MAX_GRID_X");
  return env ? std::max(1, std::atoi(env)) : 2147483647;
}

inline void run_grid(const void* kernel, dim3 grid, dim3 blk, size_t dynamic_bytes, const std::function<void()>& body) {
  const int64_t threads = int64_t{blk.x} * blk.y * blk.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && blk.z <= 64, "SIMT emulator: launch with block (", blk.x, ",", blk.y,
              ",", blk.z, "): at most 1024 threads, z <= 64");
  const int max_x = max_grid_x();
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= static_cast<unsigned>(max_x) &&
                  grid.y <= 65535 && grid.z <= 65535,
              "SIMT emulator: launch with grid (", grid.x, ",", grid.y, ",", grid.z, "), over the device's (", max_x,
              ",65535,65535)");
  size_t allowed = kDefaultDynamicShared;
  bool opted_in = false;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize) called for this kernel
  {
    std::lock_guard<std::mutex> lock(attr_mutex());
    auto it = max_dynamic_smem().find(kernel);
    if (it != max_dynamic_smem().end()) allowed = it->second, opted_in = true;
  }
  TORCH_CHECK(dynamic_bytes <= allowed, "SIMT emulator: ", dynamic_bytes,
              " bytes of dynamic shared memory, over the kernel's limit of ", allowed,
              " (cudaFuncSetAttribute(MaxDynamicSharedMemorySize) raises it)");
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  const char* copies = std::getenv("SIMT_EMU_CP_ASYNC");
  const bool eager_copies = copies != nullptr && std::string(copies) == "eager";
  const char* env = std::getenv("SIMT_EMU_THREADS");
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>(blocks, env ? std::atoi(env) : std::max(1u, std::thread::hardware_concurrency())));
  std::atomic<int64_t> next{0};
  std::mutex error_mutex;
  std::string error;
  auto work = [&] {
    const std::unique_ptr<char[]> stacks(new char[static_cast<size_t>(threads) * kStackBytes]);  // not zeroed
    void* dynamic = std::aligned_alloc(128, std::max<size_t>(128, (dynamic_bytes + 127) / 128 * 128));
    for (int64_t i = next++; i < blocks; i = next++) {
      {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error.empty()) break;
      }
      Block b;
      b.idx = dim3(i % grid.x, (i / grid.x) % grid.y, i / (int64_t{grid.x} * grid.y));
      b.dim = blk;
      b.grid = grid;
      b.body = &body;
      std::memset(dynamic, 0xff, dynamic_bytes);
      b.dynamic = dynamic;
      b.eager_copies = eager_copies;
      run_block(b, stacks.get());
      if (b.error.empty() && b.static_bytes + dynamic_bytes > kMaxShared) {
        b.error = "shared memory per block over 227 KiB: " + std::to_string(b.static_bytes + dynamic_bytes);
      }
      // Without the opt-in, static and dynamic together must fit the default 48 KiB (the static size is known
      // only once the block has declared its arrays).
      if (b.error.empty() && !opted_in && b.static_bytes + dynamic_bytes > kDefaultDynamicShared) {
        b.error = "static + dynamic shared memory over 48 KiB without cudaFuncSetAttribute"
                  "(MaxDynamicSharedMemorySize): " + std::to_string(b.static_bytes) + " + " +
                  std::to_string(dynamic_bytes);
      }
      if (!b.error.empty()) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = b.error;
      }
    }
    std::free(dynamic);
  };
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  TORCH_CHECK(error.empty(), "SIMT emulator: ", error);
}

inline dim3 to_dim3(dim3 d) { return d; }
inline dim3 to_dim3(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= 2147483647, "SIMT emulator: launch with ", n, " blocks (1 .. 2^31 - 1)");
  return dim3(static_cast<unsigned>(n));
}
inline dim3 to_dim3(int n) { return to_dim3(static_cast<int64_t>(n)); }
inline dim3 to_dim3(unsigned n) { return to_dim3(static_cast<int64_t>(n)); }

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to launch(kernel, grid, block, smem, stream)(args...).
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, blk;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<P...> params(static_cast<P>(std::forward<A>(args))...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    run_grid(reinterpret_cast<const void*>(kernel), grid, blk, smem, body);
  }
};

template <typename... P, typename G, typename B, typename S>
Launch<P...> launch(void (*kernel)(P...), G grid, B blk, size_t smem, S) {
  return {kernel, to_dim3(grid), to_dim3(blk), smem};
}

}  // namespace simt

// ---- device built-ins -------------------------------------------------------------------------------------------
#define threadIdx (::simt::self().tid)
#define blockIdx (::simt::block().idx)
#define blockDim (::simt::block().dim)
#define gridDim (::simt::block().grid)

namespace simt {
// A kernel's __launch_bounds__(n): launched with more threads per block it fails, as the launch does on a GPU.
inline void launch_bounds(int64_t max_threads, ...) {
  const int64_t threads = int64_t{block().dim.x} * block().dim.y * block().dim.z;
  if (threads > max_threads) {
    fail("launch with " + std::to_string(threads) + " threads per block, over the kernel's __launch_bounds__(" +
         std::to_string(max_threads) + ")");
  }
}
}  // namespace simt

inline void __syncthreads() { ::simt::sync_block(); }
inline int __syncthreads_or(int pred) {
  simt::Block& b = simt::block();
  const unsigned parity = b.gen & 1;
  b.or_acc[parity] |= pred != 0;
  simt::sync_block();
  return b.or_acc[parity];
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::check_full_mask(mask, "__syncwarp");
  simt::sync_warp("__syncwarp");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  simt::check_full_mask(mask, "__ballot_sync");
  const auto* s = simt::exchange(static_cast<int>(pred != 0), "__ballot_sync");
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= simt::slot_as<int>(s, l) ? 1u << l : 0u;
  return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  simt::check_full_mask(mask, "__match_any_sync");
  const auto* s = simt::exchange(v, "__match_any_sync");
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= simt::slot_as<T>(s, l) == v ? 1u << l : 0u;
  return r;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  simt::check_full_mask(mask, "__shfl_xor_sync");
  const auto* s = simt::exchange(v, "__shfl_xor_sync");
  return simt::slot_as<T>(s, (simt::self().lane ^ lane_mask) & 31);
}
template <typename T>
inline T atomicAdd(T* p, T v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

inline cudaError_t cudaStreamIsCapturing(simt::Stream, cudaStreamCaptureStatus* status) {
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
// The device is an H100 SXM (132 SMs) unless SIMT_EMU_SMS says otherwise: host code that sizes its grid by the SM
// count (partial_attn's split-KV) can be run both ways. Its grid.x limit: simt::max_grid_x.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr == cudaDevAttrMaxGridDimX) {
    *value = simt::max_grid_x();
    return cudaSuccess;
  }
  TORCH_CHECK(attr == cudaDevAttrMultiProcessorCount, "SIMT emulator: cudaDeviceGetAttribute(", static_cast<int>(attr),
              ") is not modelled");
  const char* env = std::getenv("SIMT_EMU_SMS");
  *value = env ? std::max(1, std::atoi(env)) : 132;
  return cudaSuccess;
}
// Blocks per SM by the shared-memory and thread limits of sm_90 (registers are not modelled).
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F* /*kernel*/, int threads,
                                                                 size_t dynamic_bytes) {
  const size_t per_block = dynamic_bytes + 1024;  // the 1 KB the driver reserves per block
  *blocks = static_cast<int>(std::min<size_t>({32, 2048 / static_cast<size_t>(threads), (228 * 1024) / per_block}));
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  TORCH_CHECK(attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value <= static_cast<int>(simt::kMaxShared),
              "SIMT emulator: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, ", value, ") is over 227 KiB");
  std::lock_guard<std::mutex> lock(simt::attr_mutex());
  simt::max_dynamic_smem()[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
