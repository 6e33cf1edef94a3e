#include "cpu_cache.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace hybrid_engine {

namespace {

constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kGranule = size_t(1) << 16;  // sizes a few elements apart share a block

size_t block_size(size_t nbytes) { return (nbytes + kGranule - 1) / kGranule * kGranule; }

// A field of /proc/meminfo in bytes (MemAvailable: what the machine can still give without swapping);
// unlimited where there is none (not Linux).
size_t meminfo_bytes(const std::string& field) {
  std::ifstream meminfo("/proc/meminfo");
  std::string name;
  size_t kib = 0;
  while (meminfo >> name >> kib) {
    if (name == field + ":") return kib << 10;
    meminfo.ignore(std::numeric_limits<std::streamsize>::max(), '\n');
  }
  return std::numeric_limits<size_t>::max();
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  CachingCPUAllocator(c10::Allocator* base, double headroom)
      : base_(base), headroom_(headroom), reserve_(meminfo_bytes("MemTotal") / 16) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinBytes) return base_->allocate(nbytes);
    void* data = take(block_size(nbytes));
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void empty() {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict(cached_bytes_, evicted);
      peak_live_ = live_bytes_;
    }
    for (void* data : evicted) base_->raw_deallocate(data);
  }

  void set_limit(size_t max_cached) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      max_cached_ = max_cached;
      trim(evicted);
    }
    for (void* data : evicted) base_->raw_deallocate(data);
  }

  void set_reserve(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    reserve_ = bytes;
  }

  void set_hand_back(bool on) {
    std::lock_guard<std::mutex> lock(mutex_);
    hand_back_ = on;
  }

  CpuCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(live_bytes_), int64_t(cached_bytes_), int64_t(peak_live_), hits_,
            misses_, system_bytes_, evicted_bytes_, pressure_evictions_};
  }

 private:
  // Raw pointers of small blocks come back here too (raw_deallocate has one deleter): they are the
  // ones this cache never saw.
  static void release(void* data);

  void* take(size_t size) {
    std::vector<void*> evicted;
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first - size <= it->first / 8) {
        data = it->second;
        size = it->first;
        cached_bytes_ -= size;
        free_.erase(it);
        ++hits_;
      } else {
        ++misses_;
        system_bytes_ += size;
        make_room(size, evicted);
      }
    }
    for (void* block : evicted) base_->raw_deallocate(block);
    if (data == nullptr) data = base_->raw_allocate(size);
    std::lock_guard<std::mutex> lock(mutex_);
    live_.emplace(data, size);
    live_bytes_ += size;
    peak_live_ = std::max(peak_live_, live_bytes_);
    return data;
  }

  // The other ranks on the machine have caches and peaks of their own: when the machine runs short, a
  // request from the system first hands back every cached block, before the kernel has to find the memory.
  void make_room(size_t size, std::vector<void*>& evicted) {
    const size_t limit = std::max(size_t(double(peak_live_) * (1 + headroom_)), live_bytes_ + size);
    const size_t footprint = live_bytes_ + size + cached_bytes_;
    if (footprint > limit) evict(footprint - limit, evicted);
    if (cached_bytes_ > 0 && meminfo_bytes("MemAvailable") < size + reserve_) {
      ++pressure_evictions_;
      evict(cached_bytes_, evicted);
    }
  }

  void trim(std::vector<void*>& evicted) {
    if (cached_bytes_ > max_cached_) evict(cached_bytes_ - max_cached_, evicted);
  }

  // Largest blocks first: the fewest frees for the bytes, and the sizes least likely to recur.
  void evict(size_t bytes, std::vector<void*>& evicted) {
    size_t freed = 0;
    while (freed < bytes && !free_.empty()) {
      auto last = std::prev(free_.end());
      freed += last->first;
      evicted_bytes_ += last->first;
      cached_bytes_ -= last->first;
      evicted.push_back(last->second);
      free_.erase(last);
    }
  }

  void give_back(void* data) {
    std::vector<void*> evicted{data};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(data);
      if (it != live_.end()) {
        const size_t size = it->second;
        live_.erase(it);
        live_bytes_ -= size;
        if (!hand_back_) {
          evicted.clear();
          cached_bytes_ += size;
          free_.emplace(size, data);
          trim(evicted);
        }
      }
    }
    for (void* block : evicted) base_->raw_deallocate(block);
  }

  c10::Allocator* base_;
  double headroom_;
  size_t max_cached_ = std::numeric_limits<size_t>::max();
  size_t reserve_;
  bool hand_back_ = false;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  std::unordered_map<void*, size_t> live_;
  size_t live_bytes_ = 0;
  size_t cached_bytes_ = 0;
  size_t peak_live_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  int64_t system_bytes_ = 0;
  int64_t evicted_bytes_ = 0;
  int64_t pressure_evictions_ = 0;
};

// Never destroyed: tensors may outlive static destruction and still call release.
CachingCPUAllocator* cache = nullptr;
std::once_flag installed;

void CachingCPUAllocator::release(void* data) { cache->give_back(data); }

}  // namespace

bool install_cpu_cache(double headroom) {
  TORCH_CHECK(headroom >= 0, "the CPU cache's headroom is a fraction of the peak live bytes, >= 0; got ", headroom);
  std::call_once(installed, [headroom] {
    cache = new CachingCPUAllocator(c10::GetCPUAllocator(), headroom);
    c10::SetCPUAllocator(cache, /*priority=*/0);
  });
  return cpu_cache_installed();
}

bool cpu_cache_installed() { return cache != nullptr && c10::GetCPUAllocator() == cache; }

void limit_cpu_cache(int64_t max_cached_bytes) {
  TORCH_CHECK(max_cached_bytes >= 0, "the CPU cache's limit is a number of bytes >= 0; got ", max_cached_bytes);
  TORCH_CHECK(cache != nullptr, "limit_cpu_cache: the CPU cache is not installed (hybrid_engine.memory.cache_cpu_blocks)");
  cache->set_limit(size_t(max_cached_bytes));
}

void reserve_free_memory(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "the memory the CPU cache leaves free is a number of bytes >= 0; got ", bytes);
  TORCH_CHECK(cache != nullptr, "reserve_free_memory: the CPU cache is not installed (hybrid_engine.memory.cache_cpu_blocks)");
  cache->set_reserve(size_t(bytes));
}

void hand_back_frees(bool on) {
  if (cache != nullptr) cache->set_hand_back(on);
}

void empty_cpu_cache() {
  if (cache != nullptr) cache->empty();
}

CpuCacheStats cpu_cache_stats() {
  return cache != nullptr ? cache->stats() : CpuCacheStats{0, 0, 0, 0, 0, 0, 0, 0};
}

}  // namespace hybrid_engine
