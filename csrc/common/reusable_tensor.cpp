#include "common/reusable_tensor.h"

#include <ATen/ATen.h>

#include <mutex>
#include <unordered_map>
#include <vector>

namespace fl {

namespace {

constexpr std::size_t kPerShape = 8;           // tensors kept per kind and shape (a flow's layers, all alive at once)
constexpr int64_t kMaxBytes = int64_t(32) << 20;  // larger ones are the allocator's (mmap'd anyway)

std::mutex pool_mutex;
std::unordered_map<std::string, std::vector<at::Tensor>> pool;

std::string key_of(const std::string& kind, at::IntArrayRef sizes, const at::TensorOptions& options) {
  std::string key = kind + ":" + std::string(c10::toString(options.dtype()));
  for (const int64_t s : sizes) key += ":" + std::to_string(s);
  return key;
}

}  // namespace

at::Tensor reusable_empty(const std::string& kind, at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (!options.device().is_cpu() || bytes == 0 || bytes > kMaxBytes) return at::empty(sizes, options);
  const std::string key = key_of(kind, sizes, options);
  std::lock_guard<std::mutex> lock(pool_mutex);
  std::vector<at::Tensor>& kept = pool[key];
  // Each call gets a tensor of its own over pooled memory (fresh autograd and version records): while it, a view
  // of it or anything saved from it lives, the storage has more references than the pool's.
  const auto handed_out = [&](const at::Tensor& pooled) {
    return at::empty({0}, options).set_(pooled.storage(), 0, sizes);
  };
  for (const at::Tensor& t : kept)
    if (t.storage().use_count() == 1) return handed_out(t);
  at::Tensor fresh = at::empty(sizes, options);
  if (kept.size() >= kPerShape) kept.erase(kept.begin());
  kept.push_back(fresh);
  return handed_out(fresh);
}

void clear_reusable_tensors() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  pool.clear();
}

}  // namespace fl
