// Workers with a mailbox each: the caller writes the job, then bumps the mailboxes of the workers
// it needs; a worker spins on its mailbox (pause, then sched_yield, so that a thread woken on its
// core runs at once), sleeps on the condition variable after spin_microseconds, runs its chunk and
// counts it done. A job is never overwritten before every worker it used has finished it.
#include "thread_pool.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

namespace hybrid_engine::cpu {
namespace {

using Clock = std::chrono::steady_clock;

std::atomic<int64_t> g_spin_microseconds{0};
thread_local bool t_in_job = false;  // on a worker, or on a caller running its own chunk: nested calls run inline

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

struct Job {
  c10::function_ref<void(int64_t, int64_t)>* f = nullptr;
  int64_t begin = 0, end = 0, chunk = 0;
};

class Pool {
 public:
  // Runs job chunks 1..chunks-1 on workers 1..chunks-1 and chunk 0 here.
  void run(int64_t chunks, const Job& job) {
    grow(chunks - 1);
    job_ = job;
    std::exception_ptr error;
    pending_.store(chunks - 1);
    for (int64_t w = 1; w < chunks; ++w) mailboxes_[w - 1]->fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.notify_all();
    }
    t_in_job = true;
    run_chunk(0, &error);
    t_in_job = false;
    while (pending_.load(std::memory_order_acquire) > 0) pause();
    if (!error) error = worker_error_;
    worker_error_ = nullptr;
    if (error) std::rethrow_exception(error);
  }

 private:
  void run_chunk(int64_t i, std::exception_ptr* error) {
    const int64_t b = job_.begin + i * job_.chunk;
    if (b >= job_.end) return;
    try {
      (*job_.f)(b, std::min(job_.end, b + job_.chunk));
    } catch (...) {
      *error = std::current_exception();
    }
  }

  void grow(int64_t workers) {
    while (static_cast<int64_t>(threads_.size()) < workers) {
      const int64_t w = threads_.size() + 1;
      // The worker gets its mailbox, not an index: the next push_back may move the vector under it.
      std::atomic<uint64_t>* mailbox = mailboxes_.emplace_back(std::make_unique<std::atomic<uint64_t>>(0)).get();
      threads_.emplace_back([this, w, mailbox] { work(w, *mailbox); });
      threads_.back().detach();  // never joined: the pool lives as long as the process
    }
  }

  void work(int64_t w, std::atomic<uint64_t>& mailbox) {
    t_in_job = true;
    uint64_t seen = 0;
    for (;;) {
      wait_for_change(mailbox, seen);
      seen = mailbox.load(std::memory_order_acquire);
      std::exception_ptr error;
      run_chunk(w, &error);
      if (error) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!worker_error_) worker_error_ = error;
      }
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  void wait_for_change(const std::atomic<uint64_t>& mailbox, uint64_t seen) {
    const auto deadline = Clock::now() + std::chrono::microseconds(g_spin_microseconds.load());
    for (int spins = 0; mailbox.load(std::memory_order_acquire) == seen; ++spins) {
      if (spins % 64 != 63) {
        pause();
        continue;
      }
      sched_yield();
      if (Clock::now() < deadline) continue;
      std::unique_lock<std::mutex> lock(mutex_);
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return mailbox.load() != seen; });
      sleepers_.fetch_sub(1);
    }
  }

  Job job_;
  std::vector<std::unique_ptr<std::atomic<uint64_t>>> mailboxes_;
  std::vector<std::thread> threads_;
  std::atomic<int64_t> pending_{0};
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  std::exception_ptr worker_error_;
};

// Leaked on purpose: workers blocked in it must never meet a destroyed mutex at exit. A forked child
// has none of the parent's threads, so it starts a pool of its own.
Pool* g_pool = nullptr;
std::mutex g_callers;  // one job at a time, whichever thread calls

Pool& pool() {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; });
    return true;
  }();
  (void)registered;
  if (!g_pool) g_pool = new Pool();
  return *g_pool;
}

int64_t chunks_for(int64_t n, int64_t grain) {
  const int64_t by_grain = (n + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_grain));
}

}  // namespace

void parallel_for(int64_t begin, int64_t end, int64_t grain, c10::function_ref<void(int64_t, int64_t)> f) {
  if (end <= begin) return;
  const int64_t chunks = chunks_for(end - begin, grain);
  if (chunks == 1 || t_in_job || at::in_parallel_region()) {
    f(begin, end);
    return;
  }
  const int64_t chunk = (end - begin + chunks - 1) / chunks;
  std::lock_guard<std::mutex> lock(g_callers);
  pool().run(chunks, Job{&f, begin, end, chunk});
}

void set_spin_microseconds(int64_t microseconds) {
  TORCH_CHECK(microseconds >= 0, "set_spin_microseconds: microseconds must be >= 0, got ", microseconds);
  g_spin_microseconds.store(microseconds);
}

int64_t spin_microseconds() { return g_spin_microseconds.load(); }

std::vector<std::tuple<int64_t, int64_t, int64_t>> parallel_for_chunks(int64_t n, int64_t grain, int64_t fail_at) {
  TORCH_CHECK(n >= 0 && grain >= 1, "parallel_for_chunks: need n >= 0 and grain >= 1, got ", n, " and ", grain);
  const auto caller = std::this_thread::get_id();
  std::vector<std::thread::id> ids;
  std::vector<std::tuple<int64_t, int64_t, int64_t>> chunks;
  std::mutex m;
  parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    const auto id = std::this_thread::get_id();
    std::lock_guard<std::mutex> lock(m);
    const auto seen = std::find(ids.begin(), ids.end(), id);
    const int64_t thread = id == caller ? 0 : 1 + (seen - ids.begin());
    if (id != caller && seen == ids.end()) ids.push_back(id);
    chunks.emplace_back(b, e, thread);
    TORCH_CHECK(fail_at < b || fail_at >= e, "parallel_for_chunks: the chunk [", b, ", ", e, ") failed as asked");
  });
  std::sort(chunks.begin(), chunks.end());
  return chunks;
}

}  // namespace hybrid_engine::cpu
