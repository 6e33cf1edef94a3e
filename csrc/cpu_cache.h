#pragma once

#include <cstdint>

namespace hybrid_engine {

// A cache in front of PyTorch's CPU allocator for blocks of 1 MiB and more. Freed blocks are kept and
// handed out again for requests of their size (up to an eighth smaller), so a training step reuses
// the pages the last one faulted in instead of the kernel mapping and zeroing fresh ones: glibc
// returns every block above its mmap threshold at free, and a ZeRO-3 step allocates gigabytes of
// gathered layers, logits and flattened gradients. The process stays within `headroom` of its own
// peak: a request the cache cannot serve first evicts cached blocks (largest first) until live +
// cached + the new block fit under (1 + headroom) x the highest live bytes since the last empty().
// A limit in bytes may bound the cached blocks too, where memory is planned for the whole machine. And
// when the machine runs short (MemAvailable below the request + a reserve, by default 1/16 of its memory),
// a request the cache cannot serve first hands every cached block back.
struct CpuCacheStats {
  int64_t live_bytes;       // in blocks handed out and not yet freed
  int64_t cached_bytes;     // freed, kept for reuse
  int64_t peak_live_bytes;  // since the last empty()
  int64_t hits;             // requests served from the cache
  int64_t misses;           // requests that went to the system
  int64_t system_bytes;     // the bytes those requests took from the system
  int64_t evicted_bytes;    // cached bytes given back to make room or by empty()
  int64_t pressure_evictions;  // times the machine ran short and every cached block went back
};

// Puts the cache in front of PyTorch's CPU allocator for the rest of the process (once; later calls
// do nothing). False if another allocator of higher priority is installed.
bool install_cpu_cache(double headroom);
bool cpu_cache_installed();
// Cached blocks beyond max_cached_bytes go back to the system (largest first), now and after every free.
void limit_cpu_cache(int64_t max_cached_bytes);
// The machine's available memory below which a request from the system first empties the cache.
void reserve_free_memory(int64_t bytes);
// While on, freed blocks go back to the system at once: for memory dropped for good.
void hand_back_frees(bool on);
// Frees every cached block and starts a new peak window.
void empty_cpu_cache();
CpuCacheStats cpu_cache_stats();

}  // namespace hybrid_engine
