// The SIMT runner behind tests/simt/include/simt/cuda.h (test tooling, never shipped).
//
// A launch's blocks run one after another. A block's threads are fibers: makecontext starts each
// on its own stack, and GCC's __builtin_setjmp/__builtin_longjmp switch between them (no system
// call, and not AddressSanitizer's longjmp interceptor, which unpoisons the whole stack; every
// switch is announced to AddressSanitizer as a fiber switch). A thread runs until it waits at a
// barrier or ends. When every thread a barrier waits for has arrived, they run on in an order drawn
// from (SIMT_SEED, the launch's number), so code that relies on an unstated schedule gives other
// results under other seeds.
//
// What a launch reports (std::runtime_error at its end, or at once for a hang):
//  - a race: two threads of a block that access one byte, one of them writing, with no barrier
//    between them that both took part in (a __syncthreads, or a __syncwarp of both: vector clocks
//    over the warp's lanes; a shuffle orders no memory), or two blocks of one launch that do so
//    (blocks never synchronize);
//  - a read of shared memory that no thread of the block has written (each block's shared arrays
//    are fresh, filled with 0xFF bytes: NaN in every floating type);
//  - a block that hangs (a warp barrier whose lanes wait elsewhere, or at another kind of warp
//    barrier), a thread that ends while others wait at __syncthreads, a shuffle by a lane its mask
//    leaves out, or from a lane outside the mask or exited.
// The accesses come from AddressSanitizer's instrumentation of the kernel sources: simt_build.py
// compiles them with every access as a call (__asan_load4, ...), renamed to the simt_asan_* hooks
// at the end of this file, which let AddressSanitizer check it, then log it. Stores the
// instrumentation leaves out are found by log_unseen_writes. This file is not instrumented.
#include "simt/cuda.h"

#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <memory>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace simt {
namespace {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;  // AddressSanitizer's redzones make frames larger
constexpr size_t kMaxReports = 8;

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone, kAbandoned };
// What a thread waits for at a warp barrier: lanes are released together only at the same kind
// with the same mask (a shuffle's two steps never pair with a __syncwarp).
enum class WarpWait { kSyncwarp, kShuffleValues, kShuffleRead };

struct Thread {
  ucontext_t context;  // its start
  void* resume_at[5];  // where it stopped (a __builtin_setjmp buffer)
  bool started = false;
  unsigned index = 0;
  State state = State::kRunnable;
  unsigned warp_mask = 0;  // of the warp barrier it waits at
  WarpWait warp_wait = WarpWait::kSyncwarp;
  // A vector clock over its warp's lanes, advanced at warp barriers; __syncthreads orders all.
  std::array<uint32_t, kWarpSize> warp_clock{};
  void* fake_stack = nullptr;  // AddressSanitizer's, kept across switches
  // Each byte it has read since it last stopped, with the value read (see log_unseen_writes).
  std::vector<std::pair<uintptr_t, uint8_t>> read_bytes;
};

// One access: the thread (its index in the launch), the block's __syncthreads count and the
// thread's own warp clock at the time.
struct Access {
  uint32_t thread, epoch, warp_clock;
};

// A byte's accesses in the current launch: the last write, and the reads since (the first inline,
// the others in Launch::more_reads[more - 1]).
struct Cell {
  bool written = false, read = false;
  uint32_t more = 0;
  Access write, first_read;
};

constexpr uintptr_t kPageBytes = 1024;
using Page = std::array<Cell, kPageBytes>;

struct SharedArray {
  void* data;
  size_t bytes;
};

struct Launch {
  unsigned blocks = 0, threads = 0, block = 0;
  const std::function<void()>* body = nullptr;
  uintptr_t params_begin = 0, params_end = 0;  // the kernel's parameters
  uint32_t epoch = 0;  // __syncthreads completed in this block
  std::vector<Thread> fibers;
  Thread* current = nullptr;
  void* scheduler[5];
  void* scheduler_fake_stack = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  std::unordered_map<const void*, SharedArray> shared;  // this block's, by call site
  std::unordered_map<uintptr_t, std::unique_ptr<Page>> pages;  // the log, a page of cells per KiB
  std::vector<std::vector<Access>> more_reads;
  uintptr_t last_page_number = 0;  // the page of the last access, looked up again at once
  Page* last_page = nullptr;
  std::vector<uint64_t> slots;  // a shuffle's values, a slot per thread
  std::vector<std::string> reports;
  std::string fatal;
  std::mt19937_64 schedule;  // the order in which released threads run on
};

std::mutex launch_mutex;  // one launch at a time
Launch* active = nullptr;
char* stacks = nullptr;  // kMaxThreads stacks, mapped once
uint64_t launches = 0;   // launches so far: each draws its schedule from (SIMT_SEED, its number)

Launch& this_launch() {
  if (active == nullptr || active->current == nullptr) {
    std::fprintf(stderr, "simt: a CUDA built-in used outside a kernel launch\n");
    std::abort();
  }
  return *active;
}

std::string hex(uintptr_t v) {
  std::ostringstream s;
  s << "0x" << std::hex << v;
  return s.str();
}

std::string who(const Launch& l, uint32_t thread) {
  return "thread " + std::to_string(thread % l.threads) + " of block " + std::to_string(thread / l.threads);
}

// The shared array that holds `address`, or none.
const SharedArray* shared_array_at(const Launch& l, uintptr_t address) {
  for (const auto& [key, array] : l.shared) {
    const auto begin = reinterpret_cast<uintptr_t>(array.data);
    if (address >= begin && address < begin + array.bytes) {
      return &array;
    }
  }
  return nullptr;
}

std::string where(const Launch& l, uintptr_t address) {
  if (const SharedArray* array = shared_array_at(l, address)) {
    return "shared memory (byte " + std::to_string(address - reinterpret_cast<uintptr_t>(array->data)) + " of a " +
           std::to_string(array->bytes) + "-byte array)";
  }
  return "global memory " + hex(address);
}

void report(Launch& l, std::string message) {
  if (l.reports.size() < kMaxReports) {
    l.reports.push_back(std::move(message));
  }
}

// __builtin_longjmp must not be called from the function of its __builtin_setjmp.
[[gnu::noinline]] void jump_to(void** buffer) {
  __builtin_longjmp(buffer, 1);
}

// Switches from the scheduler to fiber t, until it blocks or ends.
void resume(Launch& l, Thread& t) {
  l.current = &t;
  __sanitizer_start_switch_fiber(&l.scheduler_fake_stack, stacks + t.index * kStackBytes, kStackBytes);
  if (__builtin_setjmp(l.scheduler) == 0) {
    if (t.started) {
      jump_to(t.resume_at);
    }
    t.started = true;
    setcontext(&t.context);
  }
  __sanitizer_finish_switch_fiber(l.scheduler_fake_stack, nullptr, nullptr);
  l.current = nullptr;
}

void log_unseen_writes(Launch& l);

// From the current fiber back to the scheduler; returns when the scheduler resumes it.
void yield(Launch& l, State state) {
  log_unseen_writes(l);
  Thread& t = *l.current;
  t.state = state;
  __sanitizer_start_switch_fiber(&t.fake_stack, l.main_bottom, l.main_size);
  if (__builtin_setjmp(t.resume_at) == 0) {
    jump_to(l.scheduler);
  }
  __sanitizer_finish_switch_fiber(t.fake_stack, nullptr, nullptr);
}

// An error that stops the calling thread for good; the launch fails after this round.
[[noreturn]] void abandon(Launch& l, const std::string& message) {
  if (l.fatal.empty()) {
    l.fatal = message;
  }
  yield(l, State::kAbandoned);
  std::abort();  // never resumed
}

// A fiber is thread `index` of every block of its launch in turn: it is started once per launch.
void fiber_main() {
  Launch& l = *active;
  __sanitizer_finish_switch_fiber(nullptr, &l.main_bottom, &l.main_size);
  while (true) {
    try {
      (*l.body)();
    } catch (const std::exception& e) {
      abandon(l, std::string("a kernel threw: ") + e.what());
    }
    yield(l, State::kDone);  // resumed for the next block
  }
}

// The lanes of a warp barrier leave it with the join of their clocks, each its own entry advanced:
// an access before the barrier is then ordered before every participant's later ones.
void join_warp_clocks(Launch& l, const std::vector<unsigned>& lanes) {
  std::array<uint32_t, kWarpSize> joined{};
  for (unsigned p : lanes) {
    for (unsigned k = 0; k < kWarpSize; ++k) {
      joined[k] = std::max(joined[k], l.fibers[p].warp_clock[k]);
    }
  }
  for (unsigned p : lanes) {
    l.fibers[p].warp_clock = joined;
    ++l.fibers[p].warp_clock[p % kWarpSize];
  }
}

// Releases every warp barrier whose lanes have all arrived (lanes of the mask that have exited, or
// that the block does not have, are not waited for, as on the GPU); the released threads go into
// `ready`. A __syncwarp orders the memory accesses of its lanes; a shuffle does not.
void release_warp_barriers(Launch& l, std::vector<unsigned>& ready) {
  for (unsigned base = 0; base < l.threads; base += kWarpSize) {
    const unsigned lanes = std::min(kWarpSize, l.threads - base);
    for (unsigned lane = 0; lane < lanes; ++lane) {
      Thread& t = l.fibers[base + lane];
      if (t.state != State::kAtWarpBarrier) {
        continue;
      }
      std::vector<unsigned> group;
      bool complete = true;
      for (unsigned other = 0; other < kWarpSize; ++other) {
        if (!(t.warp_mask >> other & 1u)) {
          continue;
        }
        const Thread* o = other < lanes ? &l.fibers[base + other] : nullptr;
        if (o == nullptr || o->state == State::kDone) {
          continue;
        }
        if (o->state != State::kAtWarpBarrier || o->warp_mask != t.warp_mask || o->warp_wait != t.warp_wait) {
          complete = false;
          break;
        }
        group.push_back(base + other);
      }
      if (complete) {
        if (t.warp_wait == WarpWait::kSyncwarp) {
          join_warp_clocks(l, group);
        }
        for (unsigned g : group) {
          l.fibers[g].state = State::kRunnable;
          ready.push_back(g);
        }
      }
    }
  }
}

std::string describe_states(const Launch& l) {
  std::ostringstream s;
  for (const Thread& t : l.fibers) {
    if (t.state == State::kAtBlockBarrier) {
      s << " thread " << t.index << " waits at __syncthreads;";
    } else if (t.state == State::kAtWarpBarrier) {
      s << " thread " << t.index << (t.warp_wait == WarpWait::kSyncwarp ? " waits at __syncwarp" : " waits in a shuffle")
        << " (mask " << hex(t.warp_mask) << ");";
    }
    if (s.tellp() > 400) {
      s << " ...";
      break;
    }
  }
  return s.str();
}

void free_shared(Launch& l) {
  for (auto& [key, array] : l.shared) {
    std::free(array.data);
  }
  l.shared.clear();
}

void run_block(Launch& l, unsigned block) {
  l.block = block;
  l.epoch = 0;
  free_shared(l);
  std::vector<unsigned> ready;
  for (unsigned i = 0; i < l.threads; ++i) {
    Thread& t = l.fibers[i];
    t.state = State::kRunnable;
    t.warp_clock.fill(0);
    t.warp_clock[i % kWarpSize] = 1;
    ready.push_back(i);
  }
  while (true) {
    std::shuffle(ready.begin(), ready.end(), l.schedule);
    for (unsigned i : ready) {
      resume(l, l.fibers[i]);
    }
    ready.clear();
    if (!l.fatal.empty()) {
      return;
    }
    release_warp_barriers(l, ready);
    if (!l.fatal.empty() || !ready.empty()) {
      continue;
    }
    std::vector<unsigned> waiting;
    bool others = false;
    int ended = -1;
    for (Thread& t : l.fibers) {
      if (t.state == State::kAtBlockBarrier) {
        waiting.push_back(t.index);
      } else if (t.state == State::kDone) {
        ended = static_cast<int>(t.index);
      } else {
        others = true;
      }
    }
    if (waiting.empty() && !others) {
      return;  // every thread has ended
    }
    if (others) {
      l.fatal = "block " + std::to_string(block) + " hangs:" + describe_states(l);
      return;
    }
    if (ended >= 0) {  // a __syncthreads in code that not every thread of the block reaches
      l.fatal = "thread " + std::to_string(ended) + " of block " + std::to_string(block) +
                " has ended while others wait at __syncthreads:" + describe_states(l);
      return;
    }
    ++l.epoch;
    for (unsigned i : waiting) {
      l.fibers[i].state = State::kRunnable;
      ready.push_back(i);
    }
  }
}

// Whether the access `before` happened before the current thread's access now.
bool ordered_before_now(const Launch& l, const Access& before, uint32_t now) {
  if (before.thread == now) {
    return true;
  }
  if (before.thread / l.threads != now / l.threads) {
    return false;  // blocks of one launch never synchronize
  }
  if (before.epoch < l.epoch) {
    return true;  // a __syncthreads since
  }
  const unsigned other = before.thread % l.threads;
  return other / kWarpSize == l.current->index / kWarpSize && l.current->warp_clock[other % kWarpSize] >= before.warp_clock;
}

Cell& cell_of(Launch& l, uintptr_t address) {
  if (address / kPageBytes != l.last_page_number || l.last_page == nullptr) {
    std::unique_ptr<Page>& page = l.pages[address / kPageBytes];
    if (!page) {
      page = std::make_unique<Page>();
    }
    l.last_page_number = address / kPageBytes;
    l.last_page = page.get();
  }
  return (*l.last_page)[address % kPageBytes];
}

void log_access(uintptr_t address, size_t size, bool write) {
  Launch* l = active;
  if (l == nullptr || l->current == nullptr) {
    return;  // host code, or the runner
  }
  const auto stacks_begin = reinterpret_cast<uintptr_t>(stacks);
  if (address >= stacks_begin && address < stacks_begin + kMaxThreads * kStackBytes) {
    return;  // a thread's own locals
  }
  if (address >= l->params_begin && address < l->params_end) {
    return;  // the kernel's parameters: read-only
  }
  Thread& t = *l->current;
  const Access now{l->block * l->threads + t.index, l->epoch, t.warp_clock[t.index % kWarpSize]};
  if (!write) {
    for (uintptr_t a = address; a < address + size; ++a) {
      t.read_bytes.emplace_back(a, *reinterpret_cast<const uint8_t*>(a));
    }
  }
  std::string finding;  // one report per access, for its first byte found wanting
  for (uintptr_t a = address; a < address + size; ++a) {
    Cell& cell = cell_of(*l, a);
    const bool race_with_write = cell.written && !ordered_before_now(*l, cell.write, now.thread);
    if (finding.empty() && race_with_write) {
      finding = "race: " + who(*l, now.thread) + (write ? " writes " : " reads ") + where(*l, a) + ", which " +
                who(*l, cell.write.thread) + " wrote, with no barrier between them";
    } else if (finding.empty() && !cell.written && !write && shared_array_at(*l, a) != nullptr) {
      finding = "uninitialized: " + who(*l, now.thread) + " reads " + where(*l, a) + ", which no thread of its block has written";
    }
    if (write) {
      std::vector<Access>* more = cell.more ? &l->more_reads[cell.more - 1] : nullptr;
      const auto check_read = [&](const Access& r) {
        if (finding.empty() && !ordered_before_now(*l, r, now.thread)) {
          finding = "race: " + who(*l, now.thread) + " writes " + where(*l, a) + ", which " + who(*l, r.thread) +
                    " read, with no barrier between them";
        }
      };
      if (cell.read) {
        check_read(cell.first_read);
      }
      if (more) {
        for (const Access& r : *more) {
          check_read(r);
        }
        more->clear();
      }
      cell.read = false;
      cell.written = true;
      cell.write = now;
    } else if (!cell.read || cell.first_read.thread == now.thread) {
      cell.read = true;
      cell.first_read = now;
    } else {
      if (cell.more == 0) {
        l->more_reads.emplace_back();
        cell.more = static_cast<uint32_t>(l->more_reads.size());
      }
      std::vector<Access>& more = l->more_reads[cell.more - 1];
      if (more.empty() || more.back().thread != now.thread) {
        more.push_back(now);
      } else {
        more.back() = now;
      }
    }
  }
  if (!finding.empty()) {
    report(*l, finding + " (a " + std::to_string(size) + "-byte " + (write ? "write" : "read") + ")");
  }
}

// The instrumentation does not report a store that follows a load of the same address (GCC's
// AddressSanitizer checks the address once: x[i] = f(x[i]), shared[t] += ...). A thread runs
// alone until it stops, so a byte it read whose value has changed when it stops is one it wrote:
// logged then, as its write (a write of the value already there stays unseen).
void log_unseen_writes(Launch& l) {
  std::vector<std::pair<uintptr_t, uint8_t>> bytes;
  bytes.swap(l.current->read_bytes);
  for (const auto& [address, value] : bytes) {
    if (*reinterpret_cast<const uint8_t*>(address) != value) {
      log_access(address, 1, true);
    }
  }
}

} // namespace

uint3 thread_idx() {
  return {this_launch().current->index, 0, 0};
}
uint3 block_idx() {
  return {this_launch().block, 0, 0};
}
dim3 block_dim() {
  return {this_launch().threads, 1, 1};
}
dim3 grid_dim() {
  return {this_launch().blocks, 1, 1};
}

void sync_block() {
  yield(this_launch(), State::kAtBlockBarrier);
}

namespace {

void wait_for_warp(Launch& l, unsigned mask, WarpWait wait) {
  const unsigned lane = l.current->index % kWarpSize;
  if (!(mask >> lane & 1u)) {
    abandon(l, "lane " + std::to_string(lane) + " of warp " + std::to_string(l.current->index / kWarpSize) +
                   " of block " + std::to_string(l.block) + " calls a warp barrier or shuffle with the mask " +
                   hex(mask) + ", which leaves it out");
  }
  l.current->warp_mask = mask;
  l.current->warp_wait = wait;
  yield(l, State::kAtWarpBarrier);
}

} // namespace

void sync_warp(unsigned mask) {
  wait_for_warp(this_launch(), mask, WarpWait::kSyncwarp);
}

void exchange(unsigned mask, int src, const void* value, void* out, size_t size) {
  Launch& l = this_launch();
  const unsigned index = l.current->index, base = index - index % kWarpSize;
  std::memcpy(&l.slots[index], value, size);
  wait_for_warp(l, mask, WarpWait::kShuffleValues);  // every lane of the mask has put its value
  const std::string lane = "lane " + std::to_string(index % kWarpSize) + " of warp " + std::to_string(index / kWarpSize);
  if (src < 0 || src >= static_cast<int>(kWarpSize) || !(mask >> src & 1u)) {
    abandon(l, lane + " shuffles from lane " + std::to_string(src) + ", outside the mask " + hex(mask));
  }
  if (base + src >= l.threads || l.fibers[base + src].state == State::kDone) {
    abandon(l, lane + " shuffles from lane " + std::to_string(src) + ", which has exited or does not exist");
  }
  std::memcpy(out, &l.slots[base + src], size);
  wait_for_warp(l, mask, WarpWait::kShuffleRead);  // every lane has read before the slots are used again
}

void* shared(const void* key, size_t bytes, size_t align) {
  Launch& l = this_launch();
  auto it = l.shared.find(key);
  if (it == l.shared.end()) {
    void* data = std::aligned_alloc(align, (bytes + align - 1) / align * align);
    std::memset(data, 0xFF, bytes);
    for (size_t i = 0; i < bytes; ++i) {
      cell_of(l, reinterpret_cast<uintptr_t>(data) + i) = Cell{};  // fresh memory: forget a freed array's accesses
    }
    it = l.shared.emplace(key, SharedArray{data, bytes}).first;
  }
  return it->second.data;
}

void launch(unsigned blocks, unsigned threads, const std::function<void()>& body, const void* params, size_t params_bytes) {
  if (blocks == 0 || threads == 0 || threads > kMaxThreads) {  // refused by CUDA too
    throw std::runtime_error("simt: a launch of " + std::to_string(blocks) + " blocks of " + std::to_string(threads) + " threads");
  }
  const std::lock_guard<std::mutex> lock(launch_mutex);
  if (stacks == nullptr) {
    void* mapped = mmap(nullptr, kMaxThreads * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapped == MAP_FAILED) {
      throw std::runtime_error("simt: no memory for the fibers' stacks");
    }
    stacks = static_cast<char*>(mapped);
  }
  const char* seed_text = std::getenv("SIMT_SEED");
  const uint64_t seed = seed_text != nullptr ? std::strtoull(seed_text, nullptr, 10) : 0, number = launches++;
  Launch l;
  std::seed_seq seq{seed, number};
  l.schedule.seed(seq);
  l.blocks = blocks;
  l.threads = threads;
  l.body = &body;
  l.params_begin = reinterpret_cast<uintptr_t>(params);
  l.params_end = l.params_begin + params_bytes;
  l.fibers.resize(threads);
  l.slots.resize(threads);
  ucontext_t start;  // copied into each fiber (getcontext once a launch, not once a fiber)
  getcontext(&start);
  for (unsigned i = 0; i < threads; ++i) {
    Thread& t = l.fibers[i];
    t.index = i;
    t.context = start;
    t.context.uc_stack.ss_sp = stacks + i * kStackBytes;
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = nullptr;
    makecontext(&t.context, fiber_main, 0);
  }
  {
    const struct Active {
      explicit Active(Launch* l) {
        active = l;
      }
      ~Active() {
        active = nullptr;
      }
    } scope(&l);
    for (unsigned b = 0; b < blocks && l.fatal.empty(); ++b) {
      run_block(l, b);
    }
  }
  free_shared(l);
  const std::string which = "simt (SIMT_SEED=" + std::to_string(seed) + ", launch " + std::to_string(number) + "): ";
  if (!l.fatal.empty()) {
    // Abandoned threads leave their frames' redzones poisoned on the stacks the next launch reuses.
    __asan_unpoison_memory_region(stacks, kMaxThreads * kStackBytes);
    throw std::runtime_error(which + l.fatal);
  }
  if (!l.reports.empty()) {
    std::string all = which + std::to_string(l.reports.size()) + " finding(s) in a launch of " + std::to_string(blocks) +
                      " block(s) of " + std::to_string(threads) + " threads:";
    for (const std::string& r : l.reports) {
      all += "\n  " + r;
    }
    throw std::runtime_error(all);
  }
}

} // namespace simt

// The instrumentation's calls (renamed by tests/simt/simt_build.py): AddressSanitizer's check, then the log.
#define SIMT_HOOKS(n)                                 \
  extern "C" void simt_asan_load##n(uintptr_t a) {  \
    __asan_load##n(a);                                \
    simt::log_access(a, n, false);                    \
  }                                                   \
  extern "C" void simt_asan_store##n(uintptr_t a) { \
    __asan_store##n(a);                               \
    simt::log_access(a, n, true);                     \
  }
extern "C" {
void __asan_load1(uintptr_t);
void __asan_load2(uintptr_t);
void __asan_load4(uintptr_t);
void __asan_load8(uintptr_t);
void __asan_load16(uintptr_t);
void __asan_store1(uintptr_t);
void __asan_store2(uintptr_t);
void __asan_store4(uintptr_t);
void __asan_store8(uintptr_t);
void __asan_store16(uintptr_t);
void __asan_loadN(uintptr_t, size_t);
void __asan_storeN(uintptr_t, size_t);
}
SIMT_HOOKS(1)
SIMT_HOOKS(2)
SIMT_HOOKS(4)
SIMT_HOOKS(8)
SIMT_HOOKS(16)
extern "C" void simt_asan_loadN(uintptr_t a, size_t n) {
  __asan_loadN(a, n);
  simt::log_access(a, n, false);
}
extern "C" void simt_asan_storeN(uintptr_t a, size_t n) {
  __asan_storeN(a, n);
  simt::log_access(a, n, true);
}
