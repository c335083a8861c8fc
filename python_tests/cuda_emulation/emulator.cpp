// The scheduler behind emulator.h: one block at a time, its threads as
// fibers (ucontext) on the calling OS thread.
#include "emulator.h"

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <memory>
#include <random>
#include <string>
#include <vector>

// Under AddressSanitizer (python_tests/run_emulated_sanitized.py) the guards
// around the dynamic shared memory are poisoned while a block runs, so that a
// read of one stops the run too, not only a write (which the guard check at
// the end of the block finds either way).
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define FASTNLP_POISON(begin, end) ASAN_POISON_MEMORY_REGION((begin), (end) - (begin))
#define FASTNLP_UNPOISON(begin, end) ASAN_UNPOISON_MEMORY_REGION((begin), (end) - (begin))
#else
#define FASTNLP_POISON(begin, end) ((void)(begin), (void)(end))
#define FASTNLP_UNPOISON(begin, end) ((void)(begin), (void)(end))
#endif

// The linker's bounds of the __shared__ variables' section (see emulator.h);
// weak, for a library without any.
extern "C" unsigned char __start_fastnlp_emulated_shared[] __attribute__((weak));
extern "C" unsigned char __stop_fastnlp_emulated_shared[] __attribute__((weak));

namespace fastnlp_emulation {
namespace {

constexpr unsigned kWarp = 32;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute's opt-in
constexpr size_t kGuardBytes = 256;
// 0x7f7f7f7f reads as 3.4e38 (float), 0x7f7f... as 1.4e306 (double): a read
// of the guard throws results far off. The region itself starts as 0xff
// bytes, NaN in either type.
constexpr unsigned char kGuardByte = 0x7f;
constexpr unsigned char kFillByte = 0xff;
// Twice what the deepest kernel needs under ASan (32 KiB suffice there, with
// ASan's larger frames): ASan clears the shadow of a fiber's whole stack at
// each switch, so a smaller stack makes the sanitized run faster.
constexpr size_t kStackBytes = 64 * 1024;

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone, kFailed };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Coordinates coordinates;
  unsigned linear = 0;  // x + y * bx + z * bx * by
  State state = State::kRunnable;
};

struct Block {
  std::vector<Fiber> fibers;
  unsigned count = 0;  // threads in the block (the first `count` fibers)
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> shared;  // guard + alignment slack + dynamic shared memory + guard
  unsigned char* dynamic = nullptr;
  std::vector<std::array<unsigned char, 8>> offered;  // one word per thread, for shuffles
};

Block block;
ucontext_t scheduler;
Fiber* running = nullptr;
std::string failure;
cudaError_t last_error = cudaSuccess;
std::mt19937_64 order_rng(0);

void fail(const std::string& what) {
  if (failure.empty()) failure = what;
}

// Back to the scheduler, which resumes this fiber when its barrier opens.
void wait_in(State state) {
  running->state = state;
  Fiber* me = running;
  swapcontext(&me->context, &scheduler);
}

void fiber_main() {
  (*block.body)();
  running->state = State::kDone;
  // uc_link returns to the scheduler.
}

std::string where(const Fiber& f) {
  const Coordinates& c = f.coordinates;
  return "block (" + std::to_string(c.block.x) + "," + std::to_string(c.block.y) + "," +
         std::to_string(c.block.z) + ") thread (" + std::to_string(c.thread.x) + "," +
         std::to_string(c.thread.y) + "," + std::to_string(c.thread.z) + ")";
}

// After `f` stopped: a warp whose lanes all wait in a shuffle goes on (its
// lanes become runnable); a lane that can no longer reach the shuffle its
// warp waits in is a divergent warp. False after a reported fault.
bool settle_warp(const Fiber& f, std::vector<unsigned>& runnable) {
  const unsigned lo = f.linear - f.linear % kWarp, hi = std::min(block.count, lo + kWarp);
  unsigned waiting = 0;
  for (unsigned t = lo; t < hi; ++t) waiting += block.fibers[t].state == State::kAtWarpBarrier;
  if (waiting == 0) return true;
  for (unsigned t = lo; t < hi; ++t) {
    const State s = block.fibers[t].state;
    if (s == State::kDone || s == State::kAtBlockBarrier) {
      fail("divergent warp shuffle: " + where(block.fibers[t]) +
           (s == State::kDone ? " returned" : " waits in __syncthreads") + " while its warp waits in a shuffle");
      return false;
    }
  }
  if (waiting < hi - lo) return true;  // the others are still on their way
  for (unsigned t = lo; t < hi; ++t) {
    block.fibers[t].state = State::kRunnable;
    runnable.push_back(t);
  }
  return true;
}

// Nothing can run: opens __syncthreads when every thread is there; anything
// else is a fault (reported, false), or the block is done.
bool open_block_barrier(std::vector<unsigned>& runnable, bool& done) {
  unsigned at_block = 0, finished = 0;
  for (unsigned t = 0; t < block.count; ++t) {
    at_block += block.fibers[t].state == State::kAtBlockBarrier;
    finished += block.fibers[t].state == State::kDone;
  }
  done = finished == block.count;
  if (done) return true;
  if (at_block + finished == block.count) {
    for (unsigned t = 0; t < block.count; ++t) {
      if (block.fibers[t].state == State::kDone) {
        fail("divergent __syncthreads: " + where(block.fibers[t]) + " returned while other threads wait in it");
        return false;
      }
    }
    for (unsigned t = 0; t < block.count; ++t) {
      block.fibers[t].state = State::kRunnable;
      runnable.push_back(t);
    }
    return true;
  }
  fail("deadlock: threads wait in __syncthreads and in warp shuffles that cannot complete");
  return false;
}

// Runs the block's fibers, one at a time until it returns or waits. Which
// one runs next follows one of two orders, drawn per block: any runnable
// thread at random, or (warp-serial) the threads of one warp, drawn at
// random, for as long as any of them can run, so that one warp gets as far
// ahead of the others as a GPU allows between two __syncthreads. Each finds
// its own kind of missing barrier.
void run_block(const Coordinates& first) {
  std::vector<unsigned> runnable(block.count);
  for (unsigned t = 0; t < block.count; ++t) {
    Fiber& f = block.fibers[t];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.coordinates = first;
    f.linear = t;
    f.coordinates.thread = {t % first.block_dim.x, (t / first.block_dim.x) % first.block_dim.y,
                            t / (first.block_dim.x * first.block_dim.y)};
    f.state = State::kRunnable;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &scheduler;
    makecontext(&f.context, fiber_main, 0);
    runnable[t] = t;
  }
  const bool warp_serial = std::bernoulli_distribution(0.5)(order_rng);
  unsigned ahead = ~0u;  // the warp that runs on, in the warp-serial order
  for (;;) {
    if (runnable.empty()) {
      bool done = false;
      if (!open_block_barrier(runnable, done) || done) return;
      continue;
    }
    size_t pick = std::uniform_int_distribution<size_t>(0, runnable.size() - 1)(order_rng);
    if (warp_serial && ahead != ~0u) {
      for (size_t i = 0; i < runnable.size(); ++i) {
        if (runnable[i] / kWarp == ahead) {
          pick = i;
          break;
        }
      }
    }
    ahead = runnable[pick] / kWarp;
    Fiber& f = block.fibers[runnable[pick]];
    runnable[pick] = runnable.back();
    runnable.pop_back();
    running = &f;
    swapcontext(&scheduler, &f.context);
    running = nullptr;
    if (f.state == State::kFailed || !failure.empty()) return;
    if (!settle_warp(f, runnable)) return;
  }
}

cudaError_t check_configuration(dim3 grid, dim3 threads, size_t smem) {
  const uint64_t count = uint64_t(threads.x) * threads.y * threads.z;
  if (count == 0 || count > kMaxBlockThreads || threads.z > 64) return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (smem > kMaxDynamicShared) return cudaErrorInvalidValue;
  return cudaSuccess;
}

}  // namespace

const Coordinates& current() {
  if (running == nullptr) {
    static const Coordinates outside{};
    fail("threadIdx/blockIdx read outside a kernel");
    return outside;
  }
  return running->coordinates;
}

unsigned lane() {
  if (running == nullptr) {
    fail("lane read outside a kernel");
    return 0;
  }
  return running->linear % kWarp;  // warps are runs of 32 in linear thread order
}

void sync_block() {
  if (running == nullptr) return fail("__syncthreads outside a kernel");
  wait_in(State::kAtBlockBarrier);
}

int sync_block_or(int predicate) {
  if (running == nullptr) {
    fail("__syncthreads_or outside a kernel");
    return 0;
  }
  block.offered[running->linear][0] = predicate != 0;
  wait_in(State::kAtBlockBarrier);  // every thread has offered
  int any = 0;
  for (unsigned t = 0; t < block.count; ++t) any |= block.offered[t][0];
  wait_in(State::kAtBlockBarrier);  // every thread has read before anyone offers again
  return any;
}

void exchange_in_warp(unsigned mask, const void* value, void* out, size_t bytes, unsigned source_lane) {
  if (running == nullptr) return fail("warp shuffle outside a kernel");
  const unsigned base = running->linear - running->linear % kWarp;
  if (mask != 0xffffffffu || base + kWarp > block.count || source_lane >= kWarp ||
      block.count % kWarp != 0 || block.fibers[0].coordinates.block_dim.x % kWarp != 0) {
    fail("warp shuffle not emulated: only full warps of 32 lanes with a full mask and width 32 are, at " +
         where(*running));
    running->state = State::kFailed;
    swapcontext(&running->context, &scheduler);
    return;
  }
  std::memcpy(block.offered[running->linear].data(), value, bytes);
  wait_in(State::kAtWarpBarrier);  // every lane has offered
  std::memcpy(out, block.offered[base + source_lane].data(), bytes);
  wait_in(State::kAtWarpBarrier);  // every lane has read before the next shuffle offers
}

unsigned char* dynamic_shared_memory() {
  if (running == nullptr) {
    fail("dynamic shared memory outside a kernel");
    return nullptr;
  }
  return block.dynamic;
}

uint64_t launches_run = 0;

uint64_t launch_count() { return launches_run; }

void run_grid(dim3 grid, dim3 threads, size_t smem, const std::function<void()>& body) {
  ++launches_run;
  const cudaError_t config = check_configuration(grid, threads, smem);
  if (config != cudaSuccess) {
    last_error = config;
    return;
  }
  block.count = threads.x * threads.y * threads.z;
  if (block.fibers.size() < block.count) block.fibers.resize(block.count);
  block.offered.assign(block.count, {});
  block.body = &body;
  Coordinates first{};
  first.block_dim = threads;
  first.grid_dim = grid;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        FASTNLP_UNPOISON(block.shared.data(), block.shared.data() + block.shared.size());
        block.shared.assign(kGuardBytes + 16 + smem + kGuardBytes, kGuardByte);
        const uintptr_t raw = reinterpret_cast<uintptr_t>(block.shared.data() + kGuardBytes);
        block.dynamic = block.shared.data() + kGuardBytes + ((16 - raw % 16) % 16);
        std::fill(block.dynamic, block.dynamic + smem, kFillByte);
        FASTNLP_POISON(block.shared.data(), block.dynamic);
        FASTNLP_POISON(block.dynamic + smem, block.shared.data() + block.shared.size());
        if (__start_fastnlp_emulated_shared != nullptr)
          std::fill(__start_fastnlp_emulated_shared, __stop_fastnlp_emulated_shared, kFillByte);
        first.block = {x, y, z};
        run_block(first);
        FASTNLP_UNPOISON(block.shared.data(), block.shared.data() + block.shared.size());
        if (!failure.empty()) return;
        const auto intact = [](const unsigned char* p) {
          return std::all_of(p, p + kGuardBytes, [](unsigned char b) { return b == kGuardByte; });
        };
        if (!intact(block.dynamic - kGuardBytes) || !intact(block.dynamic + smem)) {
          fail("block (" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) +
               ") wrote outside its " + std::to_string(smem) + " bytes of dynamic shared memory");
          return;
        }
      }
    }
  }
}

const char* take_failure() {
  static std::string taken;
  taken = failure;
  failure.clear();
  return taken.c_str();
}

void set_seed(uint64_t seed) { order_rng.seed(seed); }

}  // namespace fastnlp_emulation

// cudaGetLastError() for the launchers (see emulator.h): the error of the
// last launch, reset.
cudaError_t fastnlp_emulation_cuda_get_last_error() {
  const cudaError_t error = fastnlp_emulation::last_error;
  fastnlp_emulation::last_error = cudaSuccess;
  return error;
}
