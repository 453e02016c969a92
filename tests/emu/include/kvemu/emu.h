// kvemu: a header-only SIMT emulator that runs unchanged CUDA kernel source on the CPU.
//
// Every CUDA thread of a block is a fiber (first entered through ucontext, then switched with
// _setjmp/_longjmp; a fiber whose thread exited is reused for the next one); blocks run one
// after another on the calling thread (in the order of the seed, below). A fiber runs until it
// reaches __syncthreads, a warp collective (shuffle, ballot, __syncwarp, match, reduce, wmma) or
// its end; a barrier completes when every thread of the block arrived, a warp collective when
// every live (not exited) lane of its mask arrived. When no fiber can run but some have not
// finished, the launch stops with a deadlock report naming the kernel, the block and where each
// thread waits; it never hangs.
//
// Memory model: the rewrite (kvemu_rewrite.py) turns block-scope `__shared__` variables into
// references to per-block heap storage (kvemu::shared_var: poisoned with 0xFF bytes when a block
// first reaches the declaration, and allocated exactly so AddressSanitizer sees overruns);
// other `__shared__` variables (namespace scope) become `thread_local`; `extern __shared__`
// arrays point at a per-block buffer sized by the launch (poisoned and exact too); threadIdx/blockIdx/blockDim/gridDim
// are thread_local variables that the scheduler sets before it resumes a fiber.
//
// Order: KVFIX_EMU_SEED=0 (default) runs a launch's blocks in index order (x fastest) and ready
// fibers in thread order; any other seed runs the blocks in a random permutation (seeded per
// kernel and launch shape: BlockOrder), which exposes blocks that write the same elements or read
// what another block writes (a race on a GPU), and picks the next ready fiber at random (seeded per
// kernel and block), which exposes missing barriers. kvemu::set_seed() overrides the environment.
//
// Environment: KVFIX_EMU_SEED, KVFIX_EMU_STACK_KB (fiber stack, default 256; 1024 under ASan),
// KVFIX_EMU_SMEM_LIMIT (bytes of shared memory per block, default 232448 = sm_90 opt-in limit),
// KVFIX_EMU_TIMEOUT (seconds one launch may run before the process is aborted with a report,
// default 600, 0 = off), KVFIX_EMU_QUIET=1 (do not print launch errors to stderr).
//
// Kernel source is compiled with -DKVFIX_EMU=1 (also defined here); __CUDA_ARCH__ and
// __CUDACC__ are not defined, so inline-PTX paths need a C++ fallback under `#ifdef KVFIX_EMU`.
#pragma once

#ifndef KVFIX_EMU
#define KVFIX_EMU 1
#endif

#include <vector_types.h>
#include <vector_functions.h>
#include <driver_types.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <math.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <source_location>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define KVEMU_ASAN 1
#include <dlfcn.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define KVEMU_ASAN 0
#endif

// ------------------------------------------------------------------------------------------
// CUDA keywords

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __grid_constant__
#undef __launch_bounds__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __shared__ thread_local
#define __constant__
#define __managed__
#define __grid_constant__
#define __launch_bounds__(...)
#define __restrict__ __restrict

// Built-in variables (per CUDA thread: the scheduler sets them before it resumes a fiber).
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
inline constexpr int warpSize = 32;

namespace kvemu {

// ------------------------------------------------------------------------------------------
// configuration

namespace detail {

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  if (!s || !*s) return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  return (end && *end == '\0') ? static_cast<int64_t>(v) : fallback;
}

inline std::atomic<int64_t>& seed_override() {
  static std::atomic<int64_t> v{-1};
  return v;
}

inline std::atomic<int64_t>& grids_run() {  // grids launched with a valid configuration (kvfix tests count them)
  static std::atomic<int64_t> v{0};
  return v;
}

inline std::atomic<int>& quiet_override() {  // -1: KVFIX_EMU_QUIET decides
  static std::atomic<int> v{-1};
  return v;
}

inline std::atomic<int64_t>& opt_in_dynamic_smem() {  // largest cudaFuncAttributeMaxDynamicSharedMemorySize set
  static std::atomic<int64_t> v{0};
  return v;
}

}  // namespace detail

// The block- and fiber-order seed of the next launches: >= 0 overrides KVFIX_EMU_SEED, -1 restores it.
inline void set_seed(int64_t seed) { detail::seed_override().store(seed < 0 ? -1 : seed); }
inline uint64_t current_seed() {
  const int64_t o = detail::seed_override().load();
  if (o >= 0) return static_cast<uint64_t>(o);
  const int64_t e = detail::env_int("KVFIX_EMU_SEED", 0);
  return e < 0 ? 0 : static_cast<uint64_t>(e);
}

// Grids launched so far in this module (a valid configuration; failed or not): tests count a
// launcher's launches with it.
inline int64_t grids_run() { return detail::grids_run().load(); }

// Whether failed launches print their report on stderr: 1 quiet, 0 print, -1 KVFIX_EMU_QUIET.
inline void set_quiet(int q) { detail::quiet_override().store(q < 0 ? -1 : (q ? 1 : 0)); }

// Forget cudaFuncSetAttribute opt-ins and the seed and quiet overrides (for tests).
inline void reset() {
  detail::seed_override().store(-1);
  detail::quiet_override().store(-1);
  detail::opt_in_dynamic_smem().store(0);
}

// Report of the last failed launch on this host thread (empty when it succeeded).
inline std::string& last_report() {
  static thread_local std::string r;
  return r;
}

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr)
      : grid(g), block(b), smem(s), stream(st) {}
};

struct LaunchSite {
  const char* kernel;    // the kernel expression as written at the launch
  const char* function;  // __PRETTY_FUNCTION__ of the launching function
  std::source_location where;
};

namespace detail {

// ------------------------------------------------------------------------------------------
// fibers and the block scheduler

enum class WaitKind : uint8_t { kNone, kBarrier, kWarp };
enum class Op : uint8_t {
  kSyncwarp, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kUni, kMatchAny,
  kMatchAll, kReduceAdd, kReduceMinU, kReduceMinS, kReduceMaxU, kReduceMaxS, kReduceAnd,
  kReduceOr, kReduceXor, kWmma,
};

struct Body {
  void (*call)(void*);
  void* ctx;
};

struct Fiber {
  jmp_buf jb;
  ucontext_t uc;
  char* stack = nullptr;
  size_t stack_size = 0;
  uint3 tid{0, 0, 0};
  int index = 0, warp = 0, lane = 0;
  bool started = false, exited = false;
  // The fiber on this slot's stack: kFresh = (re)start from Engine::fiber_main; kIdle = parked
  // between CUDA threads (resuming it runs the next one); kBusy = running a CUDA thread.
  enum class Slot : uint8_t { kFresh, kIdle, kBusy } slot = Slot::kFresh;
  bool uc_init = false;
  WaitKind wait = WaitKind::kNone;
  // the collective this fiber waits at
  Op op = Op::kSyncwarp;
  const char* what = "";
  unsigned mask = 0;
  int arg = 0, width = 32, vsize = 0;
  uint64_t value = 0, result = 0;
  int pred = 0;
  std::source_location where;
  void* asan_fake = nullptr;
};

struct Rng {  // splitmix64
  uint64_t s = 0;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

inline uint64_t hash_str(const char* s) {
  uint64_t h = 1469598103934665603ull;
  for (; s && *s; ++s) h = (h ^ static_cast<unsigned char>(*s)) * 1099511628211ull;
  return h;
}

// The order a launch runs its blocks in: position k -> linear block index. The identity for seed 0;
// for any other seed a pseudo-random permutation of [0, n) keyed by the seed and the launch (its
// kernel expression and shape, not the launches before it, so one test alone reproduces it): a
// 4-round Feistel network on the smallest even bit width covering n, cycle-walked back into
// [0, n) (following a permutation of [0, 2^bits) until it lands below n permutes [0, n)). O(1)
// memory for any grid; at most 4 steps per block on average.
struct BlockOrder {
  uint64_t n = 0;
  int half = 0;  // bits per Feistel half; 0: the identity
  uint64_t key[4]{};
  BlockOrder(uint64_t blocks, uint64_t seed, uint64_t launch) : n(blocks) {
    if (seed == 0 || n < 2) return;
    do ++half;
    while (2 * half < 64 && (uint64_t{1} << (2 * half)) < n);
    Rng r{seed * 0x2545F4914F6CDD1Dull ^ launch};
    for (uint64_t& k : key) k = r.next();
  }
  uint64_t operator()(uint64_t i) const {
    if (half == 0) return i;
    const uint64_t mask = (uint64_t{1} << half) - 1;
    do {
      uint64_t hi = i >> half, lo = i & mask;
      for (const uint64_t k : key) {
        const uint64_t t = hi ^ (Rng{lo ^ k}.next() & mask);
        hi = lo;
        lo = t;
      }
      i = (hi << half) | lo;
    } while (i >= n);
    return i;
  }
};

inline std::string where_str(const std::source_location& l) {
  return std::string(l.file_name()) + ":" + std::to_string(l.line());
}

inline std::string hex32(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

inline std::string lanes_str(uint32_t m) {
  std::string s;
  for (int i = 0; i < 32;) {
    if (!((m >> i) & 1u)) { ++i; continue; }
    int j = i;
    while (j + 1 < 32 && ((m >> (j + 1)) & 1u)) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(i);
    if (j > i) s += "-" + std::to_string(j);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}

struct LaunchState {
  LaunchConfig cfg;
  LaunchSite site;
  Body body;
  int nthreads;
};

inline void watchdog_arm(const LaunchState* L);
inline void watchdog_disarm();

struct Engine {
  jmp_buf sched_jb;
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;

  std::vector<std::pair<char*, size_t>> stacks;
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;

  const LaunchState* L = nullptr;
  uint3 bidx{0, 0, 0};
  int nthreads = 0, nwarps = 0;
  std::vector<uint32_t> live, waiting;
  int barrier_arrived = 0, exited = 0;
  std::deque<int> ready;
  bool random = false;
  Rng rng;

  std::vector<void*> smem_seen;  // thread_local __shared__ variables registered in this block
  struct SharedVar {             // block-scope __shared__ variables (heap: ASan sees overruns)
    const void* key;
    void* ptr;
    size_t bytes;
    uint64_t block;  // the block that last poisoned it
  };
  std::vector<SharedVar> svars;
  uint64_t block_serial = 0;
  size_t static_smem = 0;
  unsigned char* dyn = nullptr;
  std::vector<unsigned char> dyn_buf;

  bool failed = false;
  cudaError_t fail_code = cudaSuccess;
  std::string fail_msg;

  // --- fiber switching (ASan needs to be told about every stack switch)
  static void asan_start(void** fake, const void* bottom, size_t size) {
#if KVEMU_ASAN
    __sanitizer_start_switch_fiber(fake, bottom, size);
#else
    (void)fake; (void)bottom; (void)size;
#endif
  }
  static void asan_finish(void* fake, const void** bottom, size_t* size) {
#if KVEMU_ASAN
    __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
    (void)fake; (void)bottom; (void)size;
#endif
  }

  static size_t stack_bytes() {
    static const size_t b = [] {
      int64_t kb = env_int("KVFIX_EMU_STACK_KB", KVEMU_ASAN ? 1024 : 256);
      if (kb < 64) kb = 64;
      return static_cast<size_t>(kb) * 1024;
    }();
    return b;
  }

  std::pair<char*, size_t> stack_for(int i) {
    while (static_cast<int>(stacks.size()) <= i) {
      const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      const size_t size = stack_bytes();
      void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
      if (p == MAP_FAILED) {
        std::fprintf(stderr, "kvemu: cannot map a fiber stack\n");
        std::abort();
      }
      mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
      stacks.emplace_back(static_cast<char*>(p) + page, size);
    }
    return stacks[static_cast<size_t>(i)];
  }

  static void fiber_main();

  // _longjmp(jb, 1) for a fiber switch. Under ASan it calls libc's _longjmp itself, not ASan's
  // interceptor: that runs __asan_handle_no_return first (a sigaltstack system call and a shadow
  // memset on every switch: most of the ASan pass's time), which a switch does not need: the
  // frames it leaves are suspended, not abandoned (they resume later), and the stack switch is
  // announced with __sanitizer_start_switch_fiber. The pointer's type is not noreturn, so the
  // compiler adds no __asan_handle_no_return before the call either. (fail() abandons a fiber's
  // frames: it keeps the intercepted _longjmp.)
  static inline __attribute__((always_inline)) void jump(jmp_buf jb) {
#if KVEMU_ASAN
    using Fn = void (*)(__jmp_buf_tag*, int);
    static const Fn libc_longjmp = [] {
      void* libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
      return libc ? reinterpret_cast<Fn>(dlsym(libc, "_longjmp")) : nullptr;
    }();
    if (libc_longjmp != nullptr) libc_longjmp(jb, 1);
#endif
    _longjmp(jb, 1);
  }

  __attribute__((noinline)) void resume(Fiber& f) {
    cur = &f;
    threadIdx = f.tid;
    if (_setjmp(sched_jb) == 0) {
      asan_start(&sched_fake, f.stack, f.stack_size);
      if (f.slot == Fiber::Slot::kFresh) {
        f.slot = Fiber::Slot::kBusy;
        setcontext(&f.uc);
        std::abort();
      }
      f.slot = Fiber::Slot::kBusy;
      jump(f.jb);
    }
    asan_finish(sched_fake, nullptr, nullptr);
  }

  // Called on a fiber's stack: hand control to the scheduler until resumed.
  __attribute__((noinline)) void park() {
    Fiber* f = cur;
    if (_setjmp(f->jb) == 0) {
      asan_start(&f->asan_fake, sched_bottom, sched_size);
      jump(sched_jb);
    }
    asan_finish(cur->asan_fake, &sched_bottom, &sched_size);
  }

  // Called on a fiber's stack: the launch fails, the fiber is abandoned.
  [[noreturn]] void fail(cudaError_t code, std::string msg) {
    if (!failed) {
      failed = true;
      fail_code = code;
      fail_msg = std::move(msg);
    }
    asan_start(nullptr, sched_bottom, sched_size);
    _longjmp(sched_jb, 1);
  }

  std::string block_header() const {
    char b[512];
    std::snprintf(b, sizeof b,
                  "kernel %s (launched from %s at %s), block (%u,%u,%u) of grid (%u,%u,%u), "
                  "block size (%u,%u,%u)",
                  L->site.kernel, L->site.function, where_str(L->site.where).c_str(), bidx.x, bidx.y,
                  bidx.z, L->cfg.grid.x, L->cfg.grid.y, L->cfg.grid.z, L->cfg.block.x,
                  L->cfg.block.y, L->cfg.block.z);
    return b;
  }

  std::string tid_str(int i) const {
    const Fiber& f = fibers[static_cast<size_t>(i)];
    char b[96];
    std::snprintf(b, sizeof b, "thread (%u,%u,%u) [warp %d lane %d]", f.tid.x, f.tid.y, f.tid.z,
                  f.warp, f.lane);
    return b;
  }

  std::string describe(const Fiber& f) const {
    if (f.exited) return "exited";
    if (!f.started) return "not started";
    if (f.wait == WaitKind::kBarrier)
      return std::string("waiting at ") + f.what + " (" + where_str(f.where) + ")";
    if (f.wait == WaitKind::kWarp) {
      const uint32_t need = f.mask & live[static_cast<size_t>(f.warp)];
      const uint32_t missing = need & ~waiting[static_cast<size_t>(f.warp)];
      std::string s = std::string("waiting at ") + f.what + "(mask=" + hex32(f.mask) + ") (" +
                      where_str(f.where) + "), warp " + std::to_string(f.warp);
      if (missing) s += ", lane(s) " + lanes_str(missing) + " of the mask never arrive";
      return s;
    }
    return "runnable";
  }

  // Thread states, consecutive threads with the same state on one line.
  std::string thread_table() const {
    std::string out;
    int i = 0;
    while (i < nthreads) {
      const std::string d = describe(fibers[static_cast<size_t>(i)]);
      int j = i;
      while (j + 1 < nthreads && describe(fibers[static_cast<size_t>(j + 1)]) == d) ++j;
      out += (j > i ? "  threads " + std::to_string(i) + "-" + std::to_string(j) : "  thread " + std::to_string(i)) +
             ": " + d + "\n";
      i = j + 1;
    }
    return out;
  }

  void deadlock() {
    std::string msg = "deadlock: no thread can make progress in " + block_header() + "\n";
    int at_barrier = 0;
    for (int i = 0; i < nthreads; ++i)
      at_barrier += fibers[static_cast<size_t>(i)].wait == WaitKind::kBarrier;
    if (at_barrier > 0 && exited > 0)
      msg += "  " + std::to_string(exited) + " of " + std::to_string(nthreads) +
             " threads exited without reaching the __syncthreads() that " + std::to_string(at_barrier) +
             " threads wait at: every thread of the block must reach each barrier\n";
    else if (at_barrier > 0)
      msg += "  __syncthreads() waits for all " + std::to_string(nthreads) + " threads; " +
             std::to_string(at_barrier) + " arrived\n";
    msg += "  (a warp collective completes when every live lane of its mask arrives; lanes "
           "waiting elsewhere never do)\n";
    msg += thread_table();
    failed = true;
    fail_code = cudaErrorLaunchFailure;
    fail_msg = std::move(msg);
  }

  uint64_t poison_bits(int vsize) const {
    return vsize >= 8 ? ~uint64_t{0} : ((uint64_t{1} << (8 * vsize)) - 1);
  }

  // Complete the warp collective that lane `lane` of warp `w` waits at, if all lanes arrived.
  void try_complete(int w, int lane) {
    const size_t base = static_cast<size_t>(w) * 32;
    Fiber& f = fibers[base + static_cast<size_t>(lane)];
    if (f.wait != WaitKind::kWarp) return;
    const uint32_t need = f.mask & live[static_cast<size_t>(w)];
    if (need & ~waiting[static_cast<size_t>(w)]) return;
    for (int l = 0; l < 32; ++l) {
      if (!((need >> l) & 1u)) continue;
      const Fiber& g = fibers[base + static_cast<size_t>(l)];
      if (g.op != f.op || std::strcmp(g.what, f.what) != 0 ||
          (g.mask & live[static_cast<size_t>(w)]) != need) {
        fail(cudaErrorLaunchFailure,
             "divergent warp collective in " + block_header() + "\n  " + tid_str(f.index) + " is at " +
                 f.what + "(mask=" + hex32(f.mask) + ") (" + where_str(f.where) + ")\n  " +
                 tid_str(g.index) + " is at " + g.what + "(mask=" + hex32(g.mask) + ") (" +
                 where_str(g.where) + ")\n  every live lane of a mask must reach the same "
                 "collective with the same mask\n" + thread_table());
      }
    }
    complete(w, need);
  }

  void complete(int w, uint32_t group) {
    const size_t base = static_cast<size_t>(w) * 32;
    auto F = [&](int l) -> Fiber& { return fibers[base + static_cast<size_t>(l)]; };
    const Op op = F(__builtin_ctz(group)).op;
    uint32_t preds = 0;
    for (int l = 0; l < 32; ++l)
      if (((group >> l) & 1u) && F(l).value != 0) preds |= 1u << l;
    switch (op) {
      case Op::kShflIdx:
      case Op::kShflUp:
      case Op::kShflDown:
      case Op::kShflXor:
        for (int l = 0; l < 32; ++l) {
          if (!((group >> l) & 1u)) continue;
          Fiber& g = F(l);
          const int width = g.width;
          const int segmask = (32 - width) & 0x1f;
          const int bval = g.arg & 0x1f;
          const int cval = op == Op::kShflUp ? 0 : 0x1f;
          const int max_lane = (l & segmask) | (cval & ~segmask);
          const int min_lane = l & segmask;
          int j = l;
          bool ok = true;
          switch (op) {
            case Op::kShflUp: j = l - bval; ok = j >= max_lane; break;
            case Op::kShflDown: j = l + bval; ok = j <= max_lane; break;
            case Op::kShflXor: j = l ^ bval; ok = j <= max_lane; break;
            default: j = min_lane | (bval & ~segmask); ok = j <= max_lane; break;
          }
          if (!ok) j = l;
          // reading a lane that does not take part is undefined: poison it
          g.result = ((group >> j) & 1u) ? F(j).value : poison_bits(g.vsize);
        }
        break;
      case Op::kBallot:
        for (int l = 0; l < 32; ++l) if ((group >> l) & 1u) F(l).result = preds;
        break;
      case Op::kAny:
        for (int l = 0; l < 32; ++l) if ((group >> l) & 1u) F(l).result = preds != 0;
        break;
      case Op::kAll:
        for (int l = 0; l < 32; ++l) if ((group >> l) & 1u) F(l).result = preds == group;
        break;
      case Op::kUni:
        for (int l = 0; l < 32; ++l) if ((group >> l) & 1u) F(l).result = preds == group || preds == 0;
        break;
      case Op::kMatchAny:
      case Op::kMatchAll: {
        bool all_same = true;
        const uint64_t v0 = F(__builtin_ctz(group)).value;
        for (int l = 0; l < 32; ++l) if (((group >> l) & 1u) && F(l).value != v0) all_same = false;
        for (int l = 0; l < 32; ++l) {
          if (!((group >> l) & 1u)) continue;
          if (op == Op::kMatchAll) {
            F(l).result = all_same ? group : 0;
            F(l).pred = all_same;
          } else {
            uint32_t m = 0;
            for (int k = 0; k < 32; ++k)
              if (((group >> k) & 1u) && F(k).value == F(l).value) m |= 1u << k;
            F(l).result = m;
          }
        }
        break;
      }
      case Op::kReduceAdd: case Op::kReduceMinU: case Op::kReduceMinS: case Op::kReduceMaxU:
      case Op::kReduceMaxS: case Op::kReduceAnd: case Op::kReduceOr: case Op::kReduceXor: {
        uint32_t acc = 0;
        bool first = true;
        for (int l = 0; l < 32; ++l) {
          if (!((group >> l) & 1u)) continue;
          const uint32_t v = static_cast<uint32_t>(F(l).value);
          if (first) { acc = v; first = false; continue; }
          switch (op) {
            case Op::kReduceAdd: acc += v; break;
            case Op::kReduceMinU: acc = std::min(acc, v); break;
            case Op::kReduceMaxU: acc = std::max(acc, v); break;
            case Op::kReduceMinS: acc = static_cast<uint32_t>(std::min(static_cast<int32_t>(acc), static_cast<int32_t>(v))); break;
            case Op::kReduceMaxS: acc = static_cast<uint32_t>(std::max(static_cast<int32_t>(acc), static_cast<int32_t>(v))); break;
            case Op::kReduceAnd: acc &= v; break;
            case Op::kReduceOr: acc |= v; break;
            default: acc ^= v; break;
          }
        }
        for (int l = 0; l < 32; ++l) if ((group >> l) & 1u) F(l).result = acc;
        break;
      }
      case Op::kSyncwarp:
      case Op::kWmma:
        break;
    }
    for (int l = 0; l < 32; ++l) {
      if (!((group >> l) & 1u)) continue;
      F(l).wait = WaitKind::kNone;
      ready.push_back(static_cast<int>(base) + l);
    }
    waiting[static_cast<size_t>(w)] &= ~group;
  }

  // --- entry points used by the intrinsics (always on a fiber)
  Fiber& self(const char* what) {
    if (!cur) {
      std::fprintf(stderr, "kvemu: %s called outside a kernel launch\n", what);
      std::abort();
    }
    return *cur;
  }

  uint64_t warp_op(Op op, const char* what, unsigned mask, uint64_t value, int vsize, int arg,
                   int width, const std::source_location& loc) {
    Fiber& f = self(what);
    if (!((mask >> f.lane) & 1u))
      fail(cudaErrorLaunchFailure, std::string(what) + "(mask=" + hex32(mask) + ") at " +
                                       where_str(loc) + ": the calling " + tid_str(f.index) +
                                       " is not in the mask, in " + block_header());
    if (width < 1 || width > 32 || (width & (width - 1)))
      fail(cudaErrorLaunchFailure, std::string(what) + " at " + where_str(loc) + ": width " +
                                       std::to_string(width) + " is not a power of 2 in [1, 32]");
    f.wait = WaitKind::kWarp;
    f.op = op;
    f.what = what;
    f.mask = mask;
    f.value = value;
    f.vsize = vsize;
    f.arg = arg;
    f.width = width;
    f.where = loc;
    waiting[static_cast<size_t>(f.warp)] |= 1u << f.lane;
    try_complete(f.warp, f.lane);
    park();
    return f.result;
  }

  int barrier(const char* what, int pred, const std::source_location& loc) {
    Fiber& f = self(what);
    f.wait = WaitKind::kBarrier;
    f.what = what;
    f.where = loc;
    f.value = pred != 0;
    if (++barrier_arrived == nthreads) {
      int count = 0;
      for (int i = 0; i < nthreads; ++i) count += fibers[static_cast<size_t>(i)].value != 0;
      for (int i = 0; i < nthreads; ++i) {
        fibers[static_cast<size_t>(i)].wait = WaitKind::kNone;
        fibers[static_cast<size_t>(i)].result = static_cast<uint64_t>(count);
        ready.push_back(i);
      }
      barrier_arrived = 0;
    }
    park();
    return static_cast<int>(f.result);
  }

  void on_exit() {
    Fiber& f = *cur;
    f.exited = true;
    f.wait = WaitKind::kNone;
    ++exited;
    const size_t w = static_cast<size_t>(f.warp);
    live[w] &= ~(1u << f.lane);
    // lanes that waited for this one may now complete
    for (int l = 0; l < 32; ++l)
      if ((waiting[w] >> l) & 1u) try_complete(f.warp, l);
  }

  // The storage of a block-scope `__shared__` variable (one per declaration and instantiation:
  // `key`), poisoned with 0xFF bytes when a block first reaches the declaration.
  void* shared_var(const void* key, size_t bytes, size_t align, const char* name, const std::source_location& loc) {
    self("__shared__");
    for (SharedVar& v : svars) {
      if (v.key != key) continue;
      if (v.block != block_serial) {
        v.block = block_serial;
        std::memset(v.ptr, 0xFF, v.bytes);
        count_static_smem(v.bytes, name, loc);
      }
      return v.ptr;
    }
    void* p = nullptr;
    // exact size: under ASan the allocation's redzones catch overruns of the variable
    if (posix_memalign(&p, align, bytes ? bytes : 1) != 0) {
      std::fprintf(stderr, "kvemu: out of memory for __shared__ %s\n", name);
      std::abort();
    }
    svars.push_back(SharedVar{key, p, bytes, block_serial});
    std::memset(p, 0xFF, bytes);
    count_static_smem(bytes, name, loc);
    return p;
  }

  void release_shared_vars() {  // under ASan every block gets fresh allocations
    for (SharedVar& v : svars) std::free(v.ptr);
    svars.clear();
  }

  void shared_decl(void* p, size_t bytes, const char* name, const std::source_location& loc) {
    if (!cur) return;
    for (void* q : smem_seen)
      if (q == p) return;
    smem_seen.push_back(p);
    std::memset(p, 0xFF, bytes);
    count_static_smem(bytes, name, loc);
  }

  void count_static_smem(size_t bytes, const char* name, const std::source_location& loc) {
    static_smem += bytes;
    if (static_smem > 48 * 1024)
      fail(cudaErrorInvalidValue, "static shared memory exceeds 48 KiB (" + std::to_string(static_smem) +
                                      " bytes after `" + name + "` at " + where_str(loc) + ") in " +
                                      block_header());
    const size_t limit = static_cast<size_t>(env_int("KVFIX_EMU_SMEM_LIMIT", 232448));
    if (static_smem + L->cfg.smem > limit)
      fail(cudaErrorInvalidValue, "static (" + std::to_string(static_smem) + ") + dynamic (" +
                                      std::to_string(L->cfg.smem) + ") shared memory exceeds the " +
                                      std::to_string(limit) + "-byte limit per block in " + block_header());
  }

  unsigned char* dynamic_smem() {
    self("extern __shared__");
    return dyn;
  }

  // --- one block
  void run_block(const LaunchState& st, uint3 b, uint64_t seed) {
    L = &st;
    bidx = b;
    blockIdx = b;
    blockDim = st.cfg.block;
    gridDim = st.cfg.grid;
    nthreads = st.nthreads;
    nwarps = (nthreads + 31) / 32;
    if (static_cast<int>(fibers.size()) < nthreads) fibers.resize(static_cast<size_t>(nthreads));
    live.assign(static_cast<size_t>(nwarps), 0);
    waiting.assign(static_cast<size_t>(nwarps), 0);
    const dim3 bd = st.cfg.block;
    for (int i = 0; i < nthreads; ++i) {
      Fiber& f = fibers[static_cast<size_t>(i)];
      auto [sp, ss] = stack_for(i);
      f.stack = sp;
      f.stack_size = ss;
      f.tid = uint3{static_cast<unsigned>(i) % bd.x, (static_cast<unsigned>(i) / bd.x) % bd.y,
                    static_cast<unsigned>(i) / (bd.x * bd.y)};
      f.index = i;
      f.warp = i / 32;
      f.lane = i % 32;
      f.started = f.exited = false;
      f.wait = WaitKind::kNone;
      live[static_cast<size_t>(f.warp)] |= 1u << f.lane;
      if (f.slot == Fiber::Slot::kBusy) {  // abandoned by a failed launch: start over on its stack
#if KVEMU_ASAN
        __asan_unpoison_memory_region(f.stack, f.stack_size);  // its frames left poison behind
#endif
        f.slot = Fiber::Slot::kFresh;
      }
      if (f.slot == Fiber::Slot::kFresh) {  // idle fibers are reused: no system call per thread
        if (!f.uc_init) {
          getcontext(&f.uc);
          f.uc_init = true;
        }
        f.uc.uc_stack.ss_sp = f.stack;
        f.uc.uc_stack.ss_size = f.stack_size;
        f.uc.uc_link = nullptr;
        makecontext(&f.uc, &Engine::fiber_main, 0);
        f.asan_fake = nullptr;
      }
    }
    barrier_arrived = 0;
    exited = 0;
    smem_seen.clear();
    ++block_serial;
    static_smem = 0;
    if (st.cfg.smem > 0) {
#if KVEMU_ASAN
      dyn = static_cast<unsigned char*>(std::malloc(st.cfg.smem));  // exact: overruns are reported
#else
      dyn_buf.resize(st.cfg.smem + 256);
      dyn = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(dyn_buf.data()) + 255) & ~uintptr_t{255});
#endif
      std::memset(dyn, 0xFF, st.cfg.smem);
    } else {
      dyn = nullptr;
    }
    random = seed != 0;
    rng.s = seed * 0x2545F4914F6CDD1Dull ^ hash_str(st.site.kernel) ^
            (((uint64_t{b.z} * 65536u + b.y) << 32) + b.x) * 0x9E3779B97F4A7C15ull;
    ready.clear();
    for (int i = 0; i < nthreads; ++i) ready.push_back(i);
    while (!failed) {
      if (ready.empty()) {
        if (exited == nthreads) break;
        deadlock();
        break;
      }
      size_t k = 0;
      if (random && ready.size() > 1) {
        k = static_cast<size_t>(rng.next() % ready.size());
        std::swap(ready[0], ready[k]);
      }
      const int i = ready.front();
      ready.pop_front();
      resume(fibers[static_cast<size_t>(i)]);
    }
    cur = nullptr;
    threadIdx = uint3{0, 0, 0};
#if KVEMU_ASAN
    std::free(dyn);
    release_shared_vars();
#endif
    dyn = nullptr;
  }
};

inline Engine& engine() {
  static thread_local Engine* e = new Engine;  // never destroyed: fibers may outlive statics
  return *e;
}

// A fiber runs CUDA threads one after another: after one exits it parks here until the
// scheduler hands it the next (of this or a later block or launch). Only Engine::cur is read
// after a switch: the Fiber records may have moved (the vector grows between blocks).
inline void Engine::fiber_main() {
  Engine& e = engine();
  asan_finish(nullptr, &e.sched_bottom, &e.sched_size);
  for (;;) {
    e.cur->started = true;
    e.L->body.call(e.L->body.ctx);
    e.on_exit();
    Fiber* me = e.cur;
    me->slot = Fiber::Slot::kIdle;
    if (_setjmp(me->jb) == 0) {
      asan_start(&me->asan_fake, e.sched_bottom, e.sched_size);
      jump(e.sched_jb);
    }
    asan_finish(e.cur->asan_fake, &e.sched_bottom, &e.sched_size);
  }
}

// --- watchdog: a kernel that loops forever (e.g. spins on a flag another thread would set)
// cannot be preempted; abort with a report instead of hanging.
struct Watch {
  std::mutex mu;
  const LaunchState* L = nullptr;
  std::chrono::steady_clock::time_point deadline;
  bool started = false;
};
inline Watch& watch() {
  static Watch* w = new Watch;
  return *w;
}
inline void watchdog_arm(const LaunchState* L) {
  const int64_t t = env_int("KVFIX_EMU_TIMEOUT", 600);
  if (t <= 0) return;
  Watch& w = watch();
  std::lock_guard<std::mutex> g(w.mu);
  w.L = L;
  w.deadline = std::chrono::steady_clock::now() + std::chrono::seconds(t);
  if (!w.started) {
    w.started = true;
    std::thread([] {
      Watch& ww = watch();
      for (;;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(250));
        std::lock_guard<std::mutex> g2(ww.mu);
        if (ww.L && std::chrono::steady_clock::now() > ww.deadline) {
          std::fprintf(stderr,
                       "kvemu: kernel %s (launched at %s) ran past KVFIX_EMU_TIMEOUT: a thread loops "
                       "without reaching a barrier (the emulator cannot preempt it); aborting\n",
                       ww.L->site.kernel, where_str(ww.L->site.where).c_str());
          std::fflush(stderr);
          std::abort();
        }
      }
    }).detach();
  }
}
inline void watchdog_disarm() {
  Watch& w = watch();
  std::lock_guard<std::mutex> g(w.mu);
  w.L = nullptr;
}

inline cudaError_t& last_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}

inline cudaError_t launch_failed(cudaError_t code, const std::string& msg) {
  last_report() = msg;
  last_error() = code;
  const int q = quiet_override().load();
  if (q == 0 || (q < 0 && env_int("KVFIX_EMU_QUIET", 0) == 0)) {
    std::fprintf(stderr, "kvemu: %s\n", msg.c_str());
    std::fflush(stderr);
  }
  return code;
}

inline cudaError_t run_grid(const LaunchConfig& cfg, const LaunchSite& site, Body body) {
  last_report().clear();
  const dim3 g = cfg.grid, b = cfg.block;
  const uint64_t nthreads = uint64_t{b.x} * b.y * b.z;
  auto where = [&] {
    return std::string("launch of ") + site.kernel + " at " + where_str(site.where) + ": ";
  };
  char dims[160];
  std::snprintf(dims, sizeof dims, " (grid (%u,%u,%u), block (%u,%u,%u))", g.x, g.y, g.z, b.x, b.y, b.z);
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535)
    return launch_failed(cudaErrorInvalidConfiguration, where() + "invalid grid" + dims);
  if (nthreads == 0 || nthreads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64)
    return launch_failed(cudaErrorInvalidConfiguration, where() + "invalid block" + dims);
  const size_t limit = static_cast<size_t>(env_int("KVFIX_EMU_SMEM_LIMIT", 232448));
  if (cfg.smem > limit)
    return launch_failed(cudaErrorInvalidValue, where() + std::to_string(cfg.smem) +
                                                    " bytes of dynamic shared memory exceed the limit of " +
                                                    std::to_string(limit));
  if (cfg.smem > 48 * 1024 && static_cast<int64_t>(cfg.smem) > opt_in_dynamic_smem().load())
    return launch_failed(cudaErrorInvalidValue,
                         where() + std::to_string(cfg.smem) +
                             " bytes of dynamic shared memory need cudaFuncSetAttribute("
                             "cudaFuncAttributeMaxDynamicSharedMemorySize) first");
  Engine& e = engine();
  if (e.cur)
    return launch_failed(cudaErrorNotSupported, where() + "launch from inside a kernel is not emulated");
  grids_run().fetch_add(1);
  const LaunchState st{cfg, site, body, static_cast<int>(nthreads)};
  e.failed = false;
  e.fail_code = cudaSuccess;
  e.fail_msg.clear();
  const uint64_t seed = current_seed();
  const uint64_t nblocks = uint64_t{g.x} * g.y * g.z;
  const uint64_t launch = hash_str(site.kernel) ^
                          (((uint64_t{g.z} * 65536u + g.y) << 32) + g.x) * 0x9E3779B97F4A7C15ull ^
                          ((uint64_t{b.z} * 1024u + b.y) * 1024u + b.x + (uint64_t{cfg.smem} << 20)) * 0xBF58476D1CE4E5B9ull;
  const BlockOrder order(nblocks, seed, launch);
  watchdog_arm(&st);
  for (uint64_t k = 0; k < nblocks && !e.failed; ++k) {
    const uint64_t i = order(k);
    e.run_block(st, uint3{static_cast<unsigned>(i % g.x), static_cast<unsigned>(i / g.x % g.y),
                          static_cast<unsigned>(i / (uint64_t{g.x} * g.y))}, seed);
  }
  watchdog_disarm();
  e.L = nullptr;
  blockIdx = uint3{0, 0, 0};
  blockDim = dim3{1, 1, 1};
  gridDim = dim3{1, 1, 1};
  if (e.failed) {
    std::string msg = e.fail_msg;
    if (!msg.empty() && msg.back() != '\n') msg += '\n';
    msg += "  fiber and block order seed: " + std::to_string(seed) +
           (seed == 0 ? " (thread and block order)" : " (random orders)") +
           "; set KVFIX_EMU_SEED to reproduce";
    return launch_failed(e.fail_code, msg);
  }
  return cudaSuccess;
}

}  // namespace detail

// kernel<<<cfg>>>(args...) is rewritten to kvemu::launch(LaunchConfig(cfg), site, [&](auto&... a) {
// kernel(a...); }, args...): the arguments are evaluated once and copied, as CUDA does.
template <class Fn, class... A>
cudaError_t launch(const LaunchConfig& cfg, const LaunchSite& site, Fn&& fn, A&&... args) {
  std::tuple<std::decay_t<A>...> tup(std::forward<A>(args)...);
  auto invoke = [&]() { std::apply(fn, tup); };
  using I = decltype(invoke);
  const detail::Body body{[](void* p) { (*static_cast<I*>(p))(); }, &invoke};
  return detail::run_grid(cfg, site, body);
}

// Used by the rewrite of block-scope `__shared__` declarations: poisons them once per block.
inline void shared_decl(void* p, size_t bytes, const char* name,
                        std::source_location loc = std::source_location::current()) {
  detail::engine().shared_decl(p, bytes, name, loc);
}

// Block-scope `__shared__ T x[N];` becomes `auto& x = kvemu::shared_var<T[N]>(align, "x", [] {});`
// (the lambda's type makes each declaration, in each template instantiation, its own variable).
template <class T, class Site>
inline T& shared_var(size_t align, const char* name, Site, std::source_location loc = std::source_location::current()) {
  static const char key = 0;
  const size_t a = std::max({align, alignof(T), size_t{16}});
  return *static_cast<T*>(detail::engine().shared_var(&key, sizeof(T), a, name, loc));
}

// `extern __shared__ T x[];` at block scope becomes `T* const x = kvemu::dynamic_shared<T>();`.
template <class T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::engine().dynamic_smem());
}

// ... and at namespace scope a proxy that reads the pointer of the running block.
template <class T>
struct DynamicShared {
  operator T*() const { return dynamic_shared<T>(); }
  T& operator[](size_t i) const { return dynamic_shared<T>()[i]; }
};

// Fails the running launch (from kernel code): used by __trap() and the wmma checks.
[[noreturn]] inline void kernel_fail(cudaError_t code, const std::string& msg) {
  detail::Engine& e = detail::engine();
  if (!e.cur) {
    std::fprintf(stderr, "kvemu: %s\n", msg.c_str());
    std::abort();
  }
  e.fail(code, msg + " in " + e.block_header() + ", " + e.tid_str(e.cur->index));
}

// The warp of the running CUDA thread (0 outside kernels).
inline int current_warp() {
  detail::Engine& e = detail::engine();
  return e.cur ? e.cur->warp : 0;
}

// A warp-wide synchronisation point for operations every lane of the warp must execute together
// (the wmma functions): completes when every live lane of the warp arrived.
inline void warp_converge(const char* what, const std::source_location& loc) {
  detail::engine().warp_op(detail::Op::kWmma, what, 0xffffffffu, 0, 0, 0, 32, loc);
}

}  // namespace kvemu

// ------------------------------------------------------------------------------------------
// synchronisation and warp intrinsics

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  kvemu::detail::engine().barrier("__syncthreads()", 1, loc);
}
inline int __syncthreads_count(int pred, std::source_location loc = std::source_location::current()) {
  return kvemu::detail::engine().barrier("__syncthreads_count()", pred, loc);
}
inline int __syncthreads_and(int pred, std::source_location loc = std::source_location::current()) {
  return kvemu::detail::engine().barrier("__syncthreads_and()", pred, loc) ==
         kvemu::detail::engine().nthreads;
}
inline int __syncthreads_or(int pred, std::source_location loc = std::source_location::current()) {
  return kvemu::detail::engine().barrier("__syncthreads_or()", pred, loc) != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
  kvemu::detail::engine().warp_op(kvemu::detail::Op::kSyncwarp, "__syncwarp", mask, 0, 0, 0, 32, loc);
}
inline unsigned __activemask() {
  kvemu::detail::Engine& e = kvemu::detail::engine();
  return e.live[static_cast<size_t>(e.self("__activemask").warp)];
}

namespace kvemu::detail {
template <class T>
inline T shfl(Op op, const char* what, unsigned mask, T var, int arg, int width, const std::source_location& loc) {
  static_assert(sizeof(T) <= 8, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, static_cast<const void*>(&var), sizeof(T));
  const uint64_t r = engine().warp_op(op, what, mask, bits, static_cast<int>(sizeof(T)), arg, width, loc);
  T out{};
  std::memcpy(static_cast<void*>(&out), &r, sizeof(T));
  return out;
}
}  // namespace kvemu::detail

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     std::source_location loc = std::source_location::current()) {
  return kvemu::detail::shfl(kvemu::detail::Op::kShflIdx, "__shfl_sync", mask, var, src_lane, width, loc);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        std::source_location loc = std::source_location::current()) {
  return kvemu::detail::shfl(kvemu::detail::Op::kShflUp, "__shfl_up_sync", mask, var, static_cast<int>(delta), width, loc);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          std::source_location loc = std::source_location::current()) {
  return kvemu::detail::shfl(kvemu::detail::Op::kShflDown, "__shfl_down_sync", mask, var, static_cast<int>(delta), width, loc);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         std::source_location loc = std::source_location::current()) {
  return kvemu::detail::shfl(kvemu::detail::Op::kShflXor, "__shfl_xor_sync", mask, var, lane_mask, width, loc);
}
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<unsigned>(kvemu::detail::engine().warp_op(kvemu::detail::Op::kBallot, "__ballot_sync", mask, pred != 0, 4, 0, 32, loc));
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<int>(kvemu::detail::engine().warp_op(kvemu::detail::Op::kAny, "__any_sync", mask, pred != 0, 4, 0, 32, loc));
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<int>(kvemu::detail::engine().warp_op(kvemu::detail::Op::kAll, "__all_sync", mask, pred != 0, 4, 0, 32, loc));
}
inline int __uni_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
  return static_cast<int>(kvemu::detail::engine().warp_op(kvemu::detail::Op::kUni, "__uni_sync", mask, pred != 0, 4, 0, 32, loc));
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value, std::source_location loc = std::source_location::current()) {
  static_assert(sizeof(T) <= 8, "match compares up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, static_cast<const void*>(&value), sizeof(T));
  return static_cast<unsigned>(kvemu::detail::engine().warp_op(kvemu::detail::Op::kMatchAny, "__match_any_sync", mask, bits, sizeof(T), 0, 32, loc));
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred, std::source_location loc = std::source_location::current()) {
  static_assert(sizeof(T) <= 8, "match compares up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, static_cast<const void*>(&value), sizeof(T));
  kvemu::detail::Engine& e = kvemu::detail::engine();
  const unsigned r = static_cast<unsigned>(e.warp_op(kvemu::detail::Op::kMatchAll, "__match_all_sync", mask, bits, sizeof(T), 0, 32, loc));
  *pred = e.self("__match_all_sync").pred;
  return r;
}

#define KVEMU_REDUCE(name, T, op)                                                                \
  inline T name(unsigned mask, T value, std::source_location loc = std::source_location::current()) { \
    return static_cast<T>(static_cast<uint32_t>(kvemu::detail::engine().warp_op(                 \
        kvemu::detail::Op::op, #name, mask, static_cast<uint32_t>(value), 4, 0, 32, loc)));      \
  }
KVEMU_REDUCE(__reduce_add_sync, unsigned, kReduceAdd)
KVEMU_REDUCE(__reduce_add_sync, int, kReduceAdd)
KVEMU_REDUCE(__reduce_min_sync, unsigned, kReduceMinU)
KVEMU_REDUCE(__reduce_min_sync, int, kReduceMinS)
KVEMU_REDUCE(__reduce_max_sync, unsigned, kReduceMaxU)
KVEMU_REDUCE(__reduce_max_sync, int, kReduceMaxS)
KVEMU_REDUCE(__reduce_and_sync, unsigned, kReduceAnd)
KVEMU_REDUCE(__reduce_or_sync, unsigned, kReduceOr)
KVEMU_REDUCE(__reduce_xor_sync, unsigned, kReduceXor)
#undef KVEMU_REDUCE

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}
inline long long clock64() { return static_cast<long long>(std::chrono::steady_clock::now().time_since_epoch().count()); }
[[noreturn]] inline void __trap() { kvemu::kernel_fail(cudaErrorLaunchFailure, "__trap() called"); }
[[noreturn]] inline void __brkpt() { kvemu::kernel_fail(cudaErrorLaunchFailure, "__brkpt() called"); }

// Cache-hinted loads and stores: plain memory accesses.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }
inline size_t __cvta_generic_to_global(const void* p) { return reinterpret_cast<size_t>(p); }

// Asynchronous copies (cuda_pipeline_primitives.h): done synchronously.
inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes, size_t src_zfill = 0) {
  std::memcpy(dst, src, bytes - src_zfill);
  if (src_zfill) std::memset(static_cast<char*>(dst) + (bytes - src_zfill), 0, src_zfill);
}
inline void __pipeline_commit() {}
inline void __pipeline_wait_prior(size_t) {}

// ------------------------------------------------------------------------------------------
// atomics (the __atomic builtins; float and 16-bit types through compare-and-swap)

namespace kvemu::detail {
template <class T, class F>
inline T atomic_cas_loop(T* addr, F f) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8);
  using U = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  U* p = reinterpret_cast<U*>(addr);
  U old_bits = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    T old_v{};
    std::memcpy(static_cast<void*>(&old_v), &old_bits, sizeof(T));
    const T new_v = f(old_v);
    U new_bits;
    std::memcpy(&new_bits, static_cast<const void*>(&new_v), sizeof(T));
    if (__atomic_compare_exchange_n(p, &old_bits, new_bits, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
      return old_v;
  }
}
}  // namespace kvemu::detail

#define KVEMU_ATOMIC_INT(T)                                                                       \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }            \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); }            \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }          \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); }            \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }              \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); }            \
  inline T atomicMin(T* a, T v) { return kvemu::detail::atomic_cas_loop(a, [v](T o) { return o < v ? o : v; }); } \
  inline T atomicMax(T* a, T v) { return kvemu::detail::atomic_cas_loop(a, [v](T o) { return o > v ? o : v; }); } \
  inline T atomicCAS(T* a, T cmp, T v) {                                                          \
    __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);           \
    return cmp;                                                                                   \
  }
KVEMU_ATOMIC_INT(int)
KVEMU_ATOMIC_INT(unsigned int)
KVEMU_ATOMIC_INT(unsigned long long int)
KVEMU_ATOMIC_INT(long long int)
#undef KVEMU_ATOMIC_INT

inline unsigned short atomicCAS(unsigned short* a, unsigned short cmp, unsigned short v) {
  __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline unsigned atomicInc(unsigned* a, unsigned v) {
  return kvemu::detail::atomic_cas_loop(a, [v](unsigned o) { return o >= v ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* a, unsigned v) {
  return kvemu::detail::atomic_cas_loop(a, [v](unsigned o) { return (o == 0 || o > v) ? v : o - 1; });
}
inline float atomicAdd(float* a, float v) { return kvemu::detail::atomic_cas_loop(a, [v](float o) { return o + v; }); }
inline double atomicAdd(double* a, double v) { return kvemu::detail::atomic_cas_loop(a, [v](double o) { return o + v; }); }
inline float atomicSub(float* a, float v) { return kvemu::detail::atomic_cas_loop(a, [v](float o) { return o - v; }); }
inline float atomicExch(float* a, float v) { return kvemu::detail::atomic_cas_loop(a, [v](float) { return v; }); }
inline float atomicMax(float* a, float v) { return kvemu::detail::atomic_cas_loop(a, [v](float o) { return fmaxf(o, v); }); }
inline float atomicMin(float* a, float v) { return kvemu::detail::atomic_cas_loop(a, [v](float o) { return fminf(o, v); }); }
inline __half atomicAdd(__half* a, __half v) {
  return kvemu::detail::atomic_cas_loop(a, [v](__half o) { return __float2half(__half2float(o) + __half2float(v)); });
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* a, __nv_bfloat16 v) {
  return kvemu::detail::atomic_cas_loop(a, [v](__nv_bfloat16 o) { return __float2bfloat16(__bfloat162float(o) + __bfloat162float(v)); });
}
inline __half2 atomicAdd(__half2* a, __half2 v) {
  return kvemu::detail::atomic_cas_loop(a, [v](__half2 o) {
    const float2 x = __half22float2(o), y = __half22float2(v);
    return __floats2half2_rn(x.x + y.x, x.y + y.y);
  });
}
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* a, __nv_bfloat162 v) {
  return kvemu::detail::atomic_cas_loop(a, [v](__nv_bfloat162 o) {
    const float2 x = __bfloat1622float2(o), y = __bfloat1622float2(v);
    return __floats2bfloat162_rn(x.x + y.x, x.y + y.y);
  });
}
// Scoped variants (_block, _system) behave like the device-wide ones.
template <class T, class U> inline T atomicAdd_block(T* a, U v) { return atomicAdd(a, static_cast<T>(v)); }
template <class T, class U> inline T atomicAdd_system(T* a, U v) { return atomicAdd(a, static_cast<T>(v)); }
template <class T, class U> inline T atomicMax_block(T* a, U v) { return atomicMax(a, static_cast<T>(v)); }
template <class T, class U> inline T atomicMin_block(T* a, U v) { return atomicMin(a, static_cast<T>(v)); }
template <class T, class U> inline T atomicExch_block(T* a, U v) { return atomicExch(a, static_cast<T>(v)); }
template <class T, class U> inline T atomicCAS_block(T* a, U c, U v) { return atomicCAS(a, static_cast<T>(c), static_cast<T>(v)); }

// ------------------------------------------------------------------------------------------
// math intrinsics (device-only in the CUDA headers)

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline float __saturatef(float x) { return std::isnan(x) ? 0.0f : std::min(1.0f, std::max(0.0f, x)); }
inline float normcdff(float x) { return 0.5f * std::erfc(-x * 0.70710678118654752f); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }

namespace kvemu::detail {
template <class I>
inline I cvt_int(double x) {  // CUDA conversions saturate and map NaN to 0
  if (std::isnan(x)) return 0;
  if (x <= static_cast<double>(std::numeric_limits<I>::lowest())) return std::numeric_limits<I>::lowest();
  if (x >= static_cast<double>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(x);
}
}  // namespace kvemu::detail

inline int __float2int_rn(float x) { return kvemu::detail::cvt_int<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return kvemu::detail::cvt_int<int>(std::trunc(x)); }
inline int __float2int_rd(float x) { return kvemu::detail::cvt_int<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return kvemu::detail::cvt_int<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return kvemu::detail::cvt_int<unsigned>(std::nearbyint(x)); }
inline unsigned __float2uint_rz(float x) { return kvemu::detail::cvt_int<unsigned>(std::trunc(x)); }
inline long long __float2ll_rn(float x) { return kvemu::detail::cvt_int<long long>(std::nearbyint(x)); }
inline long long __float2ll_rz(float x) { return kvemu::detail::cvt_int<long long>(std::trunc(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline int __double2int_rn(double x) { return kvemu::detail::cvt_int<int>(std::nearbyint(x)); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}
inline int __mul24(int x, int y) { return ((x << 8) >> 8) * ((y << 8) >> 8); }
inline unsigned __umul24(unsigned x, unsigned y) { return (x & 0xFFFFFFu) * (y & 0xFFFFFFu); }
inline int __mulhi(int x, int y) { return static_cast<int>((static_cast<long long>(x) * y) >> 32); }
inline unsigned __umulhi(unsigned x, unsigned y) { return static_cast<unsigned>((static_cast<unsigned long long>(x) * y) >> 32); }
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  s &= 31; return s ? (hi << s) | (lo >> (32 - s)) : hi;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  s &= 31; return s ? (lo >> s) | (hi << (32 - s)) : lo;
}

// min/max as CUDA overloads them for device code
#define KVEMU_MINMAX(A, B, R)                                                    \
  inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); } \
  inline R max(A a, B b) { return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); }
KVEMU_MINMAX(int, int, int)
KVEMU_MINMAX(unsigned, unsigned, unsigned)
KVEMU_MINMAX(int, unsigned, unsigned)
KVEMU_MINMAX(unsigned, int, unsigned)
KVEMU_MINMAX(long, long, long)
KVEMU_MINMAX(unsigned long, unsigned long, unsigned long)
KVEMU_MINMAX(long long, long long, long long)
KVEMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
KVEMU_MINMAX(long long, int, long long)
KVEMU_MINMAX(int, long long, long long)
KVEMU_MINMAX(double, double, double)
KVEMU_MINMAX(float, double, double)
KVEMU_MINMAX(double, float, double)
#undef KVEMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// half / bfloat16 functions that cuda_fp16.h and cuda_bf16.h declare for device code only:
// computed in float and rounded once.
#define KVEMU_HALF_UNARY(base, expr)                                                              \
  inline __half h##base(__half a) { const float x = __half2float(a); return __float2half(expr); } \
  inline __nv_bfloat16 h##base(__nv_bfloat16 a) {                                                 \
    const float x = __bfloat162float(a);                                                          \
    return __float2bfloat16(expr);                                                                \
  }                                                                                               \
  inline __half2 h2##base(__half2 a) { return __halves2half2(h##base(__low2half(a)), h##base(__high2half(a))); } \
  inline __nv_bfloat162 h2##base(__nv_bfloat162 a) {                                              \
    return __halves2bfloat162(h##base(__low2bfloat16(a)), h##base(__high2bfloat16(a)));           \
  }
KVEMU_HALF_UNARY(exp, std::exp(x))
KVEMU_HALF_UNARY(exp2, std::exp2(x))
KVEMU_HALF_UNARY(exp10, std::pow(10.0f, x))
KVEMU_HALF_UNARY(log, std::log(x))
KVEMU_HALF_UNARY(log2, std::log2(x))
KVEMU_HALF_UNARY(log10, std::log10(x))
KVEMU_HALF_UNARY(sqrt, std::sqrt(x))
KVEMU_HALF_UNARY(rsqrt, 1.0f / std::sqrt(x))
KVEMU_HALF_UNARY(rcp, 1.0f / x)
KVEMU_HALF_UNARY(sin, std::sin(x))
KVEMU_HALF_UNARY(cos, std::cos(x))
KVEMU_HALF_UNARY(tanh, std::tanh(x))
KVEMU_HALF_UNARY(tanh_approx, std::tanh(x))
KVEMU_HALF_UNARY(ceil, std::ceil(x))
KVEMU_HALF_UNARY(floor, std::floor(x))
KVEMU_HALF_UNARY(rint, std::nearbyint(x))
KVEMU_HALF_UNARY(trunc, std::trunc(x))
#undef KVEMU_HALF_UNARY

#define KVEMU_HALF_FMA(H, H2, TO_F, FROM_F, LO, HI, PAIR)                                          \
  inline H __hfma(H a, H b, H c) { return FROM_F(std::fma(TO_F(a), TO_F(b), TO_F(c))); }            \
  inline H __hfma_relu(H a, H b, H c) {                                                           \
    const float r = std::fma(TO_F(a), TO_F(b), TO_F(c));                                          \
    return FROM_F(std::isnan(r) ? r : std::max(r, 0.0f));                                         \
  }                                                                                               \
  inline H __hfma_sat(H a, H b, H c) { return FROM_F(__saturatef(std::fma(TO_F(a), TO_F(b), TO_F(c)))); } \
  inline H2 __hfma2(H2 a, H2 b, H2 c) { return PAIR(__hfma(LO(a), LO(b), LO(c)), __hfma(HI(a), HI(b), HI(c))); } \
  inline H2 __hfma2_relu(H2 a, H2 b, H2 c) {                                                      \
    return PAIR(__hfma_relu(LO(a), LO(b), LO(c)), __hfma_relu(HI(a), HI(b), HI(c)));              \
  }                                                                                               \
  inline H2 __hfma2_sat(H2 a, H2 b, H2 c) {                                                       \
    return PAIR(__hfma_sat(LO(a), LO(b), LO(c)), __hfma_sat(HI(a), HI(b), HI(c)));                \
  }
KVEMU_HALF_FMA(__half, __half2, __half2float, __float2half, __low2half, __high2half, __halves2half2)
KVEMU_HALF_FMA(__nv_bfloat16, __nv_bfloat162, __bfloat162float, __float2bfloat16, __low2bfloat16,
               __high2bfloat16, __halves2bfloat162)
#undef KVEMU_HALF_FMA

#define KVEMU_HALF_TO_INT(prefix, H, TO_F)                                                        \
  inline int prefix##int_rn(H h) { return kvemu::detail::cvt_int<int>(std::nearbyint(TO_F(h))); } \
  inline int prefix##int_rd(H h) { return kvemu::detail::cvt_int<int>(std::floor(TO_F(h))); }     \
  inline int prefix##int_ru(H h) { return kvemu::detail::cvt_int<int>(std::ceil(TO_F(h))); }      \
  inline unsigned prefix##uint_rn(H h) { return kvemu::detail::cvt_int<unsigned>(std::nearbyint(TO_F(h))); } \
  inline unsigned prefix##uint_rd(H h) { return kvemu::detail::cvt_int<unsigned>(std::floor(TO_F(h))); } \
  inline unsigned prefix##uint_ru(H h) { return kvemu::detail::cvt_int<unsigned>(std::ceil(TO_F(h))); } \
  inline short prefix##short_rn(H h) { return kvemu::detail::cvt_int<short>(std::nearbyint(TO_F(h))); } \
  inline short prefix##short_rd(H h) { return kvemu::detail::cvt_int<short>(std::floor(TO_F(h))); } \
  inline short prefix##short_ru(H h) { return kvemu::detail::cvt_int<short>(std::ceil(TO_F(h))); } \
  inline unsigned short prefix##ushort_rn(H h) { return kvemu::detail::cvt_int<unsigned short>(std::nearbyint(TO_F(h))); } \
  inline unsigned short prefix##ushort_rd(H h) { return kvemu::detail::cvt_int<unsigned short>(std::floor(TO_F(h))); } \
  inline unsigned short prefix##ushort_ru(H h) { return kvemu::detail::cvt_int<unsigned short>(std::ceil(TO_F(h))); } \
  inline long long prefix##ll_rn(H h) { return kvemu::detail::cvt_int<long long>(std::nearbyint(TO_F(h))); } \
  inline long long prefix##ll_rd(H h) { return kvemu::detail::cvt_int<long long>(std::floor(TO_F(h))); } \
  inline long long prefix##ll_ru(H h) { return kvemu::detail::cvt_int<long long>(std::ceil(TO_F(h))); } \
  inline unsigned long long prefix##ull_rn(H h) { return kvemu::detail::cvt_int<unsigned long long>(std::nearbyint(TO_F(h))); } \
  inline unsigned long long prefix##ull_rd(H h) { return kvemu::detail::cvt_int<unsigned long long>(std::floor(TO_F(h))); } \
  inline unsigned long long prefix##ull_ru(H h) { return kvemu::detail::cvt_int<unsigned long long>(std::ceil(TO_F(h))); }
KVEMU_HALF_TO_INT(__half2, __half, __half2float)
KVEMU_HALF_TO_INT(__bfloat162, __nv_bfloat16, __bfloat162float)
#undef KVEMU_HALF_TO_INT

// ------------------------------------------------------------------------------------------
// host runtime API used by launchers (synchronous: streams are accepted and ignored). The real
// cuda_runtime_api.h is included (by vector_functions.h), so these define its extern "C"
// declarations (with its default arguments); the modules are built with hidden visibility so
// a libcudart loaded in the same process never interposes them.

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = kvemu::detail::last_error();
  kvemu::detail::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return kvemu::detail::last_error(); }
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    default: return "cudaError";
  }
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  switch (attr) {  // an sm_90 device (H100 SXM)
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *v = static_cast<int>(kvemu::detail::env_int("KVFIX_EMU_SMEM_LIMIT", 232448)); break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = 233472; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *v = 2048; break;
    case cudaDevAttrMaxRegistersPerBlock: *v = 65536; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaFuncSetAttribute(T*, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > kvemu::detail::env_int("KVFIX_EMU_SMEM_LIMIT", 232448)) return cudaErrorInvalidValue;
    auto& cur = kvemu::detail::opt_in_dynamic_smem();
    int64_t old = cur.load();
    while (value > old && !cur.compare_exchange_weak(old, value)) {}
  }
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, T, int block, size_t smem) {
  const int by_threads = block > 0 ? 2048 / block : 0;
  const int by_smem = smem > 0 ? static_cast<int>(233472 / smem) : 32;
  *n = std::max(0, std::min({by_threads, by_smem, 32}));
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemset(void* p, int v, size_t n) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { std::memmove(d, s, n); return cudaSuccess; }
template <class T>
inline cudaError_t cudaMemcpyToSymbol(T& symbol, const void* src, size_t n, size_t offset = 0,
                                      cudaMemcpyKind = cudaMemcpyHostToDevice) {
  std::memcpy(reinterpret_cast<char*>(&symbol) + offset, src, n);
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMemcpyToSymbolAsync(T& symbol, const void* src, size_t n, size_t offset = 0,
                                           cudaMemcpyKind = cudaMemcpyHostToDevice, cudaStream_t = nullptr) {
  std::memcpy(reinterpret_cast<char*>(&symbol) + offset, src, n);
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::aligned_alloc(256, (n + 255) & ~size_t{255});
  return *p || n == 0 ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) { return cudaMalloc(p, n); }
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { std::free(p); return cudaSuccess; }

// cudaLaunchKernelEx(config, kernel, args...): the C++ form of the extensible launch.
template <class... P, class... A>
inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* c, void (*kernel)(P...), A&&... args) {
  return kvemu::launch(kvemu::LaunchConfig(c->gridDim, c->blockDim, c->dynamicSmemBytes, c->stream),
                       kvemu::LaunchSite{"cudaLaunchKernelEx", "(unknown)", std::source_location::current()},
                       [kernel](auto&... a) { kernel(a...); }, std::forward<A>(args)...);
}
