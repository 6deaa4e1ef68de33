#include "common/derived_cache.h"

#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

namespace fl {

namespace {

constexpr std::size_t kCapacity = 64;  // entries (weights of 32 LSTM layer-directions)
constexpr int64_t kSamples = 64;       // sampled elements per source

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Entry {
  WeakImpl source;
  uint32_t version;
  const void* data;
  std::string kind;
  std::vector<int64_t> sizes;
  std::vector<unsigned char> sample;
  at::Tensor value;
};

std::mutex cache_mutex;
std::list<Entry> cache;  // most recently used first
std::atomic<bool> enabled{true};

std::vector<unsigned char> sample_bytes(const at::Tensor& t) {
  const int64_t n = t.numel(), size = t.element_size();
  const auto* base = static_cast<const unsigned char*>(t.data_ptr());
  std::vector<unsigned char> out;
  if (n == 0) return out;
  const int64_t count = std::min(n, kSamples);
  out.resize(count * size);
  for (int64_t k = 0; k < count; ++k) {
    const int64_t index = count == 1 ? 0 : k * (n - 1) / (count - 1);  // first and last included
    std::memcpy(out.data() + k * size, base + index * size, size);
  }
  return out;
}

bool cacheable(const at::Tensor& t) {
  return enabled.load() && t.defined() && t.device().is_cpu() && t.is_contiguous() && !t.is_inference();
}

}  // namespace

at::Tensor cached_derived(const at::Tensor& source, const std::string& kind,
                          const std::function<at::Tensor()>& make) {
  if (!cacheable(source)) return make();
  const uint32_t version = source._version();
  std::vector<unsigned char> sample = sample_bytes(source);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    for (auto it = cache.begin(); it != cache.end();) {
      auto alive = it->source.lock();
      if (!alive) {
        it = cache.erase(it);
        continue;
      }
      if (alive.get() == source.unsafeGetTensorImpl() && it->kind == kind) {
        if (it->version == version && it->data == source.data_ptr() && it->sizes == source.sizes().vec() &&
            it->sample == sample) {
          cache.splice(cache.begin(), cache, it);
          return cache.front().value;
        }
        it = cache.erase(it);  // the source changed: this entry can never match again
        continue;
      }
      ++it;
    }
  }
  at::Tensor value = make();
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.push_front(Entry{WeakImpl(source.getIntrusivePtr()), version, source.data_ptr(), kind, source.sizes().vec(),
                         std::move(sample), value});
  if (cache.size() > kCapacity) cache.pop_back();
  return value;
}

void clear_derived_cache() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.clear();
}

void set_derived_cache_enabled(bool on) {
  enabled.store(on);
  if (!on) clear_derived_cache();
}

bool derived_cache_enabled() { return enabled.load(); }

}  // namespace fl
