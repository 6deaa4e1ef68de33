#include "common/derived_cache.h"

#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace fl {

namespace {

// Entries: 3 per MADE layer, 2 per LSTM layer-direction; a 5-transform flow of 6-layer MADEs needs 90. Looked up
// through a hash index, so the capacity costs no scan.
constexpr std::size_t kCapacity = 512;
constexpr int64_t kSamples = 64;       // sampled elements per source

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Entry {
  WeakImpl source;
  const void* impl;  // the source's TensorImpl when cached (the index key; may dangle once the source dies)
  uint32_t version;
  const void* data;
  std::string kind;
  std::vector<int64_t> sizes;
  std::vector<unsigned char> sample;
  at::Tensor value;
};

struct Key {
  const void* impl;
  std::string kind;
  bool operator==(const Key& other) const { return impl == other.impl && kind == other.kind; }
};
struct KeyHash {
  std::size_t operator()(const Key& k) const {
    return std::hash<const void*>()(k.impl) ^ (std::hash<std::string>()(k.kind) * 31);
  }
};

std::mutex cache_mutex;
std::list<Entry> cache;  // most recently used first
std::unordered_map<Key, std::list<Entry>::iterator, KeyHash> index;

void erase(std::list<Entry>::iterator it, const Key& key) {
  index.erase(key);
  cache.erase(it);
}
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
  const Key key{source.unsafeGetTensorImpl(), kind};
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    const auto found = index.find(key);
    if (found != index.end()) {
      const auto it = found->second;
      auto alive = it->source.lock();
      if (alive && alive.get() == source.unsafeGetTensorImpl() && it->version == version &&
          it->data == source.data_ptr() && it->sizes == source.sizes().vec() && it->sample == sample) {
        cache.splice(cache.begin(), cache, it);
        return cache.front().value;
      }
      erase(it, key);  // the source changed (or another tensor took its address): never to match again
    }
  }
  at::Tensor value = make();
  std::lock_guard<std::mutex> lock(cache_mutex);
  // On a miss (which costs a repack anyway) drop the entries whose source died, so they hold no memory.
  for (auto it = cache.begin(); it != cache.end();) {
    const auto next = std::next(it);
    if (it->source.expired()) erase(it, Key{it->impl, it->kind});
    it = next;
  }
  if (const auto found = index.find(key); found != index.end()) erase(found->second, key);  // made meanwhile
  cache.push_front(Entry{WeakImpl(source.getIntrusivePtr()), source.unsafeGetTensorImpl(), version, source.data_ptr(), kind, source.sizes().vec(),
                         std::move(sample), value});
  index[key] = cache.begin();
  if (cache.size() > kCapacity) {
    const auto last = std::prev(cache.end());
    erase(last, Key{last->impl, last->kind});
  }
  return value;
}

void clear_derived_cache() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  index.clear();
  cache.clear();
}

void set_derived_cache_enabled(bool on) {
  enabled.store(on);
  if (!on) clear_derived_cache();
}

bool derived_cache_enabled() { return enabled.load(); }

}  // namespace fl
