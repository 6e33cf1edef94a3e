// The threads our CPU kernels run on.
//
// torch's intra-op threads are OpenMP's, and under OMP_WAIT_POLICY=PASSIVE (what every rank sharing a
// small machine needs) they go to sleep the moment a parallel region ends: waking one for the next
// region took 35-45 us on a 2-vCPU VM (an empty decode_attention call: 25 us on one thread, 60 us on
// two), and a decode step of OPT-1.3b runs ~125 regions. These workers can instead spin for a short
// while after each job (set_spin_microseconds), yielding the core to anything else runnable: a decode
// step's next kernel comes tens of microseconds later. Spinning is off by default: while torch's own
// threads run (prefill's oneDNN products), a spinning worker shares their cores (OPT-125m fp32 prefill:
// 2.1 -> 2.5 s with 200 us spins).
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace hybrid_engine::cpu {

// f(chunk_begin, chunk_end) over [begin, end), split as at::parallel_for splits it: into
// min(at::get_num_threads(), ceil((end - begin) / grain)) chunks of ceil((end - begin) / chunks), the
// first on the calling thread. Inside a parallel region (ours or OpenMP's) it runs inline. An exception
// thrown by f is rethrown here after every chunk has finished.
void parallel_for(int64_t begin, int64_t end, int64_t grain, c10::function_ref<void(int64_t, int64_t)> f);

// Microseconds a worker spins for its next job before it sleeps (default 0: sleep at once).
void set_spin_microseconds(int64_t microseconds);
int64_t spin_microseconds();

// For tests: the (begin, end, thread) of every chunk parallel_for ran for [0, n) with this grain, sorted,
// thread 0 being the caller and 1, 2, ... the other threads in the order they reported; the chunk holding
// index fail_at throws instead of returning.
std::vector<std::tuple<int64_t, int64_t, int64_t>> parallel_for_chunks(int64_t n, int64_t grain, int64_t fail_at);

}  // namespace hybrid_engine::cpu
