// Thread-parallel loops for kernels, on torch's own thread pool (so torch.set_num_threads applies), behind a
// torch-free interface.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace fl {

int num_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n), on up to num_threads() threads, each chunk at least
// `grain` long (so small loops stay on one thread). Runs inline when already inside a parallel region.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Like parallel_for, but threads take chunks of `chunk` indices in turn from a shared counter, so a thread that the
// machine slows down (a busy neighbour, an interrupt) does less of the work instead of keeping the others waiting.
// For loops whose iterations are independent and whose results do not depend on how the range is chunked.
void parallel_for_dynamic(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn);

// A spinning barrier for the threads of one parallel_team call: a step loop whose steps depend on each other
// (an LSTM's time steps) waits here instead of opening a parallel region per step (a few microseconds each).
class TeamBarrier {
 public:
  // Returns once all `size` members of the team have arrived.
  void wait(int size);

 private:
  // On separate cache lines: the waiters' reads of generation_ do not contend with the arrivals' increments.
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
};

// Calls fn(rank, size, barrier) on `size` threads that run at the same time (ranks 0..size-1), at most
// `max_threads` and num_threads(); on one thread when max_threads <= 1 or already inside a parallel region.
void parallel_team(int64_t max_threads, const std::function<void(int rank, int size, TeamBarrier& barrier)>& fn);

// Splits [0, n) into `parts` near-equal chunks; returns the bounds of chunk `index`.
inline void split_range(int64_t n, int64_t parts, int64_t index, int64_t& begin, int64_t& end) {
  const int64_t base = n / parts, extra = n % parts;
  begin = index * base + (index < extra ? index : extra);
  end = begin + base + (index < extra ? 1 : 0);
}

}  // namespace fl
