#include "common/reusable_tensor.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fl {

namespace {

// Per kind and shape: a flow's layers, all alive at once (5 MAF transforms at hidden 64 save 25 tensors of one
// shape; with 8 per shape, a log_prob with gradients enabled took 17 fresh megabytes, faulted in page by page,
// on every call).
constexpr std::size_t kPerShape = 64;
// Up to a training step's activations (a 2-layer LSTM at T=100 B=64 H=512 saves 2 x 52 MiB of gates; above
// 32 MiB glibc maps every allocation afresh, about 15,000 page faults a step, 4% of its time). A training loop
// holds these at its peak anyway; the pool keeps them between steps.
constexpr int64_t kMaxBytes = int64_t(256) << 20;   // larger tensors are the allocator's
constexpr int64_t kMaxPooled = int64_t(256) << 20;  // in all: free buffers of other shapes (batch sizes that
                                                    // came and went) are dropped, least recently used first

struct Entry {
  at::Tensor buffer;
  uint64_t used;  // when it was last handed out
};

std::mutex pool_mutex;
std::unordered_map<std::string, std::vector<Entry>> pool;
int64_t pooled_bytes = 0;
uint64_t clock_now = 0;

int64_t bytes_of(const at::Tensor& t) { return static_cast<int64_t>(t.storage().nbytes()); }
bool free_to_reuse(const at::Tensor& t) { return t.storage().use_count() == 1; }  // the pool's reference only

std::string key_of(const std::string& kind, at::IntArrayRef sizes, const at::TensorOptions& options) {
  std::string key = kind + ":" + std::string(c10::toString(options.dtype()));
  for (const int64_t s : sizes) key += ":" + std::to_string(s);
  return key;
}

// Drops the least recently used free buffer; false when every pooled buffer is in use.
bool drop_oldest_free() {
  std::vector<Entry>* owner = nullptr;
  std::size_t index = 0;
  for (auto& [key, kept] : pool)
    for (std::size_t i = 0; i < kept.size(); ++i)
      if (free_to_reuse(kept[i].buffer) && (owner == nullptr || kept[i].used < (*owner)[index].used)) {
        owner = &kept;
        index = i;
      }
  if (owner == nullptr) return false;
  pooled_bytes -= bytes_of((*owner)[index].buffer);
  owner->erase(owner->begin() + static_cast<std::ptrdiff_t>(index));
  return true;
}

}  // namespace

at::Tensor reusable_empty(const std::string& kind, at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (!options.device().is_cpu() || bytes == 0 || bytes > kMaxBytes) return at::empty(sizes, options);
  // Each call gets a tensor of its own over pooled memory (fresh autograd and version records): while it, a view
  // of it or anything saved from it lives, the storage has more references than the pool's.
  const auto handed_out = [&](Entry& entry) {
    entry.used = ++clock_now;
    return at::empty({0}, options).set_(entry.buffer.storage(), 0, sizes);
  };
  const std::string key = key_of(kind, sizes, options);
  std::lock_guard<std::mutex> lock(pool_mutex);
  std::vector<Entry>& kept = pool[key];
  for (Entry& entry : kept)
    if (free_to_reuse(entry.buffer)) return handed_out(entry);
  at::Tensor fresh = at::empty(sizes, options);
  if (kept.size() >= kPerShape) {  // the pool lets go of the oldest (its users keep their memory)
    pooled_bytes -= bytes_of(kept.front().buffer);
    kept.erase(kept.begin());
  }
  while (pooled_bytes + bytes > kMaxPooled && drop_oldest_free()) {
  }
  if (pooled_bytes + bytes > kMaxPooled) return fresh;  // everything pooled is in use: this one is not kept
  pooled_bytes += bytes_of(fresh);
  kept.push_back(Entry{fresh, 0});
  return handed_out(kept.back());
}

int64_t reusable_pooled_bytes() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  return pooled_bytes;
}

void clear_reusable_tensors() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  pool.clear();
  pooled_bytes = 0;
}

}  // namespace fl
