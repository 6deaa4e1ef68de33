#include "common/parallel.h"

#include <ATen/Parallel.h>

namespace fl {

int num_threads() { return at::get_num_threads(); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

}  // namespace fl
