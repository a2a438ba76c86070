// Work split into tasks over XLA's intra-op thread pool, for the FFI
// handlers of csrc/*.cc.
#ifndef DRDD_JAX_CSRC_PARALLEL_H_
#define DRDD_JAX_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace drdd {

namespace ffi = xla::ffi;

// The threads that run n tasks: the caller and up to pool.num_threads() - 1
// pool threads.
inline int64_t Workers(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
}

// Runs f(0, w) ... f(n - 1, w) on Workers(pool, n) threads, w numbering the
// thread that runs the task. Tasks are claimed from a shared counter; a pool
// thread that starts after all are claimed returns at once, so f is called
// only while the caller waits for the claimed tasks.
template <typename F>
void ParallelForWorkers(ffi::ThreadPool& pool, int64_t n, const F& f) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0}, workers{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, fn = &f, n] {
    int64_t w = counters->workers.fetch_add(1);
    for (int64_t i; (i = counters->next.fetch_add(1)) < n;) {
      (*fn)(i, w);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = Workers(pool, n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (counters->done.load(std::memory_order_acquire) < n) {
    std::this_thread::yield();
  }
}

template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& f) {
  ParallelForWorkers(pool, n, [&f](int64_t i, int64_t) { f(i); });
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

template <typename T>
using ScratchPtr = std::unique_ptr<T[], FreeDeleter>;

// n elements of uninitialized scratch (every user writes what it reads),
// 64-byte aligned: AMX tile loads of rows that straddle cache lines ran at
// half the rate (docs/performance.md, "The AMX machine").
template <typename T>
ScratchPtr<T> Scratch(int64_t n) {
  const size_t bytes = (std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return ScratchPtr<T>(static_cast<T*>(p));
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace drdd

#endif  // DRDD_JAX_CSRC_PARALLEL_H_
