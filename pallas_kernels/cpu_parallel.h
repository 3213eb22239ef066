// Work sharing for jaxinfer's CPU kernels: items run on the calling thread and XLA's intra-op pool.
#ifndef JAXINFER_CPU_PARALLEL_H_
#define JAXINFER_CPU_PARALLEL_H_

#include <immintrin.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

// Items finished, for threads that wait on them. A wait spins for up to 100 us and then sleeps on
// a futex: when the thread it waits for has lost its core (the host's Python thread shares two
// cores with XLA's), a spinning waiter would keep that core busy for nothing, while a sleeping one
// lets the OS run the late thread on it. Shorter spins cost batch-32 steps: an item left over
// there takes tens of microseconds, and a waiter that slept wakes late (20 us: 1-3% slower steps,
// exploratory).
class DoneCount {
 public:
  void Add() {
    count_.fetch_add(1);
    if (sleepers_.load() > 0) syscall(SYS_futex, &count_, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
  }

  int32_t Load() const { return count_.load(std::memory_order_acquire); }

  void AwaitAtLeast(int32_t target) {
    if (Load() >= target) return;
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
    for (int spins = 0; Load() < target; ++spins) {
      if (spins % 64 != 63 || std::chrono::steady_clock::now() < spin_until) {
        _mm_pause();
        continue;
      }
      sleepers_.fetch_add(1);
      const int32_t seen = count_.load();
      if (seen < target) syscall(SYS_futex, &count_, FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
      sleepers_.fetch_sub(1);
    }
  }

 private:
  static constexpr int kSpinMicros = 100;
  std::atomic<int32_t> count_{0};
  std::atomic<int32_t> sleepers_{0};
};

struct NoThreadSetup {};

// Runs work() on the calling thread and on as many of the pool's threads as `width` items can
// keep busy (all of them returning once nothing is left to claim).
template <typename Work>
void ShareWithPool(xla::ffi::ThreadPool& pool, int64_t width, const Work& work) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), width) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto copy = work;
    pool.Schedule(std::move(copy));
  }
  work();
}

// Runs fn(0 .. items - 1), each item once, and returns when all are done. Each participating
// thread holds a ThreadSetup (constructed before its first item, destroyed after its last) for
// per-thread state such as AMX's tile configuration. A helper that starts late finds nothing left.
template <typename ThreadSetup = NoThreadSetup, typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    DoneCount done;
  };
  auto state = std::make_shared<State>();
  auto work = [state, items, fn]() {
    if (state->next.load(std::memory_order_relaxed) >= items) return;
    [[maybe_unused]] ThreadSetup setup;
    for (int64_t i; (i = state->next.fetch_add(1)) < items;) {
      fn(i);
      state->done.Add();
    }
  };
  ShareWithPool(pool, items, work);
  state->done.AwaitAtLeast(static_cast<int32_t>(items));
}

// How many consecutive items a work item of a ParallelFor takes when each item reads ahead what the
// next one in its run will read (the CPU matmuls' panels, decode attention's pages): two runs a
// thread, so that a helper that starts late or items of uneven cost still even out. One run a
// thread and four were within 4% of that in the matmul (exploratory).
inline int64_t RunLength(int64_t items, int64_t threads) {
  const int64_t runs = 2 * std::max<int64_t>(1, threads);
  return std::max<int64_t>(1, (items + runs - 1) / runs);
}

// Runs phases in order, as one ParallelFor each but with a single hand-off to the pool:
// fn(phase, item) for items 0 .. counts[phase] - 1 of every phase, and no item of a phase
// before every item of the phases before it is done. Items are numbered across phases and
// claimed in that order, so a thread waiting for its phase to open waits only on items other
// threads are running; a helper that starts late joins the phase under way, and the calling
// thread alone finishes everything if no helper comes.
template <typename Fn>
void RunPhases(xla::ffi::ThreadPool& pool, const std::vector<int64_t>& counts, Fn fn) {
  struct State {
    std::vector<int64_t> starts;  // starts[p]: the first item of phase p; back(): all items
    std::atomic<int64_t> next{0};
    DoneCount done;
  };
  auto state = std::make_shared<State>();
  state->starts.push_back(0);
  for (const int64_t count : counts) state->starts.push_back(state->starts.back() + count);
  const int64_t total = state->starts.back();
  auto work = [state, total, fn]() {
    size_t phase = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < total;) {
      while (state->starts[phase + 1] <= i) ++phase;
      state->done.AwaitAtLeast(static_cast<int32_t>(state->starts[phase]));
      fn(static_cast<int>(phase), i - state->starts[phase]);
      state->done.Add();
    }
  };
  ShareWithPool(pool, counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end()), work);
  state->done.AwaitAtLeast(static_cast<int32_t>(total));
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_PARALLEL_H_
