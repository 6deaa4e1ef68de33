#include "common/parallel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <thread>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace fl {

namespace {

// Spins politely; after many rounds (the other thread was descheduled on a busy machine) gives the core away.
void pause_round(int64_t& rounds) {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
  if (++rounds % 4096 == 0) std::this_thread::yield();
}

}  // namespace

int num_threads() { return at::get_num_threads(); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

void parallel_for_dynamic(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (chunk < 1) chunk = 1;
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(chunks, num_threads());
  if (threads <= 1 || at::in_parallel_region()) return fn(0, n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t begin; (begin = next.fetch_add(chunk, std::memory_order_relaxed)) < n;)
      fn(begin, std::min(n, begin + chunk));
  });
}

void TeamBarrier::wait(int size) {
  if (size <= 1) return;
  const int generation = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == size - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    return;
  }
  int64_t rounds = 0;
  while (generation_.load(std::memory_order_acquire) == generation) pause_round(rounds);
}

void parallel_team(int64_t max_threads, const std::function<void(int, int, TeamBarrier&)>& fn) {
  TeamBarrier barrier;
  const int64_t wanted = std::min<int64_t>(max_threads, num_threads());
  if (wanted <= 1 || at::in_parallel_region()) {
    fn(0, 1, barrier);
    return;
  }
  // at::parallel_for may hand one thread several indices (when the runtime grants fewer threads): the team is
  // whoever joined, known once every index is accounted for (each member joins before it counts its indices).
  std::atomic<int> joined{0};
  std::atomic<int64_t> counted{0};
  at::parallel_for(0, wanted, 1, [&](int64_t begin, int64_t end) {
    const int rank = joined.fetch_add(1, std::memory_order_acq_rel);
    counted.fetch_add(end - begin, std::memory_order_acq_rel);
    int64_t rounds = 0;
    while (counted.load(std::memory_order_acquire) < wanted) pause_round(rounds);
    fn(rank, joined.load(std::memory_order_acquire), barrier);
  });
}

}  // namespace fl
