// Work sharing for jaxinfer's CPU kernels: items run on the calling thread and XLA's intra-op pool.
#ifndef JAXINFER_CPU_PARALLEL_H_
#define JAXINFER_CPU_PARALLEL_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

struct NoThreadSetup {};

// Runs fn(0 .. items - 1), each item once, and returns when all are done. Each participating
// thread holds a ThreadSetup (constructed before its first item, destroyed after its last) for
// per-thread state such as AMX's tile configuration. A helper that starts late finds nothing left.
template <typename ThreadSetup = NoThreadSetup, typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, items, fn]() {
    if (state->next.load(std::memory_order_relaxed) >= items) return;
    [[maybe_unused]] ThreadSetup setup;
    for (int64_t i; (i = state->next.fetch_add(1)) < items;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto copy = work;
    pool.Schedule(std::move(copy));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < items) _mm_pause();
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_PARALLEL_H_
