// Thread-parallel loops for kernels, on torch's own thread pool (so torch.set_num_threads applies), behind a
// torch-free interface.
#pragma once

#include <cstdint>
#include <functional>

namespace fl {

int num_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n), on up to num_threads() threads, each chunk at least
// `grain` long (so small loops stay on one thread). Runs inline when already inside a parallel region.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Splits [0, n) into `parts` near-equal chunks; returns the bounds of chunk `index`.
inline void split_range(int64_t n, int64_t parts, int64_t index, int64_t& begin, int64_t& end) {
  const int64_t base = n / parts, extra = n % parts;
  begin = index * base + (index < extra ? index : extra);
  end = begin + base + (index < extra ? 1 : 0);
}

}  // namespace fl
