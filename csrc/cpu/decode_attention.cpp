// Paged decode attention on the CPU: one query token per sequence against its K/V read straight
// from the paged cache through the block table.
//
// Decode is memory-bandwidth bound: each K/V byte is used by one GQA group of queries. A task
// is (sequence, range of kv heads); with enough sequences the range is all kv heads. A block is
// visited kv head by kv head, so each kv head's rows are read once, by its whole query group,
// while they are in L1, and software prefetch fetches the rows of the heads a little ahead.
// Scores of 16 tokens (8 on AVX2) are reduced together (hsum_lanes), the value accumulator stays
// in registers across the block's tokens, and softmax is online per block (fp32 running max, sum
// and accumulator), so no score row longer than a block exists. A sliding window (window > 0) starts
// at the block holding the sequence's last `window` tokens and masks the tokens before them.
#include <algorithm>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace hybrid_engine::cpu {
namespace {

constexpr const char* kOp = "decode_attention";

struct DecodeParams {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;
  const int32_t* block_tables;
  const int32_t* context_lens;
  int64_t num_heads, num_kv_heads, head_dim, block_size, max_blocks;
  int64_t kv_heads_per_task;  // a task is (sequence, kv_heads_per_task consecutive kv heads)
  int64_t window;             // 0: none
  float scale;
};

int64_t padded_block(const DecodeParams& p) { return (p.block_size + kLanes - 1) / kLanes * kLanes; }

// Scratch floats of one task: queries and accumulators [heads, D], scores [heads, padded block],
// running max and sum [heads].
int64_t scratch_floats(const DecodeParams& p) {
  const int64_t heads = p.kv_heads_per_task * (p.num_heads / p.num_kv_heads);
  return heads * (2 * p.head_dim + padded_block(p) + 2);
}

// The rows of one kv head in a block are 16+ separate runs of D elements (one per token), too short and
// far apart for the hardware prefetchers, so the kernel fetches them itself, in two steps: the rows of the
// (block, kv head) pair two ahead into L2, one token's rows per token of the current pair's value loop, so
// that requests to memory stay spread over the work instead of queueing in a burst; and the next pair's rows,
// by then in L2, into L1 before the pair starts. A burst of L2 prefetches two pairs ahead (the scheme before)
// left memory idle while the kernel computed: the kernel took its bytes' time plus its time from cache. All
// layers of OPT-125m fp32 (16 x 288 tokens) and OPT-1.3b bf16 (8 x 160), alternated in one process on a
// 2-vCPU Zen 5: 9.20 -> 7.80 ms and 8.65 -> 7.16 ms (faster in 8 of 8 rounds each). Prefetching from memory
// straight into L1 holds one of the core's few line-fill buffers until the line arrives, which capped these
// shapes at 11-18 GB/s (Zen 4, one thread).
constexpr int64_t kPrefetchPairs = 2;

template <int kLocality, typename T>
HE_INLINE void prefetch_row(const T* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 64 / int64_t(sizeof(T))) __builtin_prefetch(row + d, 0, kLocality);
}

// The rows of one (block, kv head) pair to prefetch: n tokens from `k` and `v`, token_stride apart.
template <typename T>
struct PairRows {
  const T* k = nullptr;
  const T* v = nullptr;
  int64_t n = 0;
};

template <int kLocality, typename T>
HE_INLINE void prefetch_pair(const PairRows<T>& rows, int64_t token_stride, int64_t D) {
  for (int64_t t = 0; t < rows.n; ++t) {
    prefetch_row<kLocality>(rows.k + t * token_stride, D);
    prefetch_row<kLocality>(rows.v + t * token_stride, D);
  }
}

// Scores of one query row (fp32, pair layout) against up to lanes<V> consecutive tokens of a block,
// reduced together (hsum_lanes). Lanes past m repeat the last token; the caller masks them. One
// accumulator per token: 16 of 16 lanes on AVX-512, 8 of 8 on AVX2, whose 16 registers cannot hold
// 16 tokens' accumulators (GCC kept them on the stack, a load and a store per product).
template <typename V, typename T, int kD>
HE_INLINE V token_scores(const float* q, const T* k, int64_t token_stride, int64_t m, int64_t head_dim) {
  constexpr int kTokens = lanes<V>, kPer = 32 / lanes<V>;
  const int64_t D = kD ? kD : head_dim;
  V part[kTokens] = {};
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    V qc[kPer];
    load_chunk<V>(q + d, qc);
    const T* row = k + d;
    for (int t = 0; t < kTokens; ++t, row += t < m ? token_stride : 0) {
      V x[kPer];
      load_chunk<V>(row, x);
      for (int j = 0; j < kPer; ++j) part[t] += qc[j] * x[j];
    }
  }
  for (; d + kTokens <= D; d += kTokens) {  // a tail shorter than 32 elements is in natural order
    const V qc = loadv<V>(q + d);
    const T* row = k + d;
    for (int t = 0; t < kTokens; ++t, row += t < m ? token_stride : 0) part[t] += qc * loadv<V>(row);
  }
  V s = hsum_lanes(part);
  for (; d < D; ++d)
    for (int64_t t = 0; t < m; ++t) s[t] += q[d] * to_float(k[t * token_stride + d]);
  return s;
}

// acc[0:NP*32] += sum_t p[t] * v[t][0:NP*32] with the accumulators in registers across tokens, as
// vectors of V: 16 lanes on AVX-512; 8 elsewhere, where GCC builds every 16-lane p[t] operand through
// memory, 16 scalar stores each (it was most of the AVX2 variant's time).
// Token t's rows of `ahead` are prefetched into L2 as token t is accumulated (see PairRows).
template <typename V, int NP, typename T>
HE_INLINE void accumulate_pairs(float* acc, const float* p, const T* v, int64_t token_stride, int64_t n,
                                const PairRows<T>& ahead, int64_t D) {
  constexpr int kPer = 32 / lanes<V>;  // vectors per 32-element chunk
  V a[NP * kPer];
  for (int i = 0; i < NP * kPer; ++i) a[i] = loadv<V>(acc + i * lanes<V>);
  for (int64_t t = 0; t < n; ++t, v += token_stride) {
    if (t < ahead.n) {
      prefetch_row<1>(ahead.k + t * token_stride, D);
      prefetch_row<1>(ahead.v + t * token_stride, D);
    }
    for (int i = 0; i < NP; ++i) {
      V x[kPer];
      load_chunk<V>(v + i * 32, x);
      for (int j = 0; j < kPer; ++j) a[i * kPer + j] += p[t] * x[j];
    }
  }
  for (int i = 0; i < NP * kPer; ++i) storev(acc + i * lanes<V>, a[i]);
}

// acc (fp32, pair layout) += sum_t p[t] * v[t] over n tokens of a block.
// The rows of `ahead` are prefetched during the first chunk's pass (see PairRows).
template <typename T, int kD, typename V>
HE_INLINE void accumulate_values(float* acc, const float* p, const T* v, int64_t token_stride, int64_t n,
                                 int64_t head_dim, PairRows<T> ahead) {
  const int64_t D = kD ? kD : head_dim;
  int64_t d = 0;
  for (; d + 4 * kLanes <= D; d += 4 * kLanes, ahead.n = 0)
    accumulate_pairs<V, 2>(acc + d, p, v + d, token_stride, n, ahead, D);
  if (d + 2 * kLanes <= D) {
    accumulate_pairs<V, 1>(acc + d, p, v + d, token_stride, n, ahead, D);
    d += 2 * kLanes;
    ahead.n = 0;
  }
  prefetch_pair<1>(ahead, token_stride, D);  // a head too small for the loops above (else ahead.n is 0 by now)
  for (; d < D; ++d)  // a tail shorter than 32 elements stays in natural order (see to_pair_layout)
    for (int64_t t = 0; t < n; ++t) acc[d] += p[t] * to_float(v[t * token_stride + d]);
}

// Attention of the query heads of kv heads [kv0, kv0 + kvn) of sequence b.
template <typename T, int kD, typename V>
HE_INLINE void decode_task(const DecodeParams& p, int64_t b, int64_t kv0, int64_t kvn, float* scratch) {
  const int64_t group = p.num_heads / p.num_kv_heads, D = kD ? kD : p.head_dim, block_size = p.block_size;
  const int64_t heads = kvn * group, stride = padded_block(p), token_stride = p.num_kv_heads * D;
  float* q = scratch;
  float* acc = q + heads * D;
  float* scores = acc + heads * D;
  float* row_max = scores + heads * stride;
  float* row_sum = row_max + heads;

  const T* q_src = static_cast<const T*>(p.q) + (b * p.num_heads + kv0 * group) * D;
  for (int64_t h = 0; h < heads; ++h)  // q and acc rows are in the pair layout of T (see load_pair)
    to_pair_layout(q_src + h * D, q + h * D, D, p.scale);
  std::fill(acc, acc + heads * D, 0.f);
  std::fill(row_max, row_max + heads, -INFINITY);
  std::fill(row_sum, row_sum + heads, 0.f);

  const int64_t context_len = p.context_lens[b];
  const int32_t* block_table = p.block_tables + b * p.max_blocks;
  const int64_t num_blocks = (context_len + block_size - 1) / block_size;
  const int64_t first_token = p.window > 0 ? std::max<int64_t>(context_len - p.window, 0) : 0;
  auto block_base = [&](const void* cache, int64_t i) {
    return static_cast<const T*>(cache) + (int64_t(block_table[i]) * block_size * p.num_kv_heads + kv0) * D;
  };
  // (block, kv head) pairs are numbered in visiting order; none past the last block
  auto pair_rows = [&](int64_t pair) {
    const int64_t blk = pair / kvn, j = pair % kvn;
    if (blk >= num_blocks) return PairRows<T>{};
    return PairRows<T>{block_base(p.k_cache, blk) + j * D, block_base(p.v_cache, blk) + j * D,
                       std::min(block_size, context_len - blk * block_size)};
  };
  for (int64_t blk = first_token / block_size; blk < num_blocks; ++blk) {
    const int64_t n = std::min(block_size, context_len - blk * block_size);
    const int64_t behind_window = std::max<int64_t>(first_token - blk * block_size, 0);
    const T* k = block_base(p.k_cache, blk);
    const T* v = block_base(p.v_cache, blk);
    for (int64_t j = 0; j < kvn; ++j) {  // the group's heads read the kv head's rows while they are in L1
      const PairRows<T> next = pair_rows(blk * kvn + j + 1), ahead = pair_rows(blk * kvn + j + kPrefetchPairs);
      prefetch_pair<3>(next, token_stride, D);
      for (int64_t h = j * group; h < (j + 1) * group; ++h) {
        float* s = scores + h * stride;
        for (int64_t t0 = 0; t0 < n; t0 += lanes<V>)
          storev(s + t0, token_scores<V, T, kD>(q + h * D, k + t0 * token_stride + j * D, token_stride,
                                                std::min(lanes<V>, n - t0), D));
        std::fill(s + n, s + stride, -INFINITY);
        std::fill(s, s + behind_window, -INFINITY);
        online_softmax_step<V>(s, stride, row_max[h], row_sum[h], acc + h * D, D);
        accumulate_values<T, kD, V>(acc + h * D, s, v + j * D, token_stride, n, D,
                                    h == j * group ? ahead : PairRows<T>{});
      }
    }
  }

  T* out = static_cast<T*>(p.out) + (b * p.num_heads + kv0 * group) * D;
  for (int64_t h = 0; h < heads; ++h)
    from_pair_layout(acc + h * D, out + h * D, D, 1.0f / row_sum[h]);
}

template <typename T, typename V>
HE_INLINE void decode_tasks(const DecodeParams& p, int64_t begin, int64_t end) {
  std::vector<float> scratch(scratch_floats(p));
  const int64_t tasks_per_seq = p.num_kv_heads / p.kv_heads_per_task;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / tasks_per_seq, kv0 = task % tasks_per_seq * p.kv_heads_per_task;
    switch (p.head_dim) {  // the common head sizes get fully unrolled rows
      case 64: decode_task<T, 64, V>(p, b, kv0, p.kv_heads_per_task, scratch.data()); break;
      case 128: decode_task<T, 128, V>(p, b, kv0, p.kv_heads_per_task, scratch.data()); break;
      default: decode_task<T, 0, V>(p, b, kv0, p.kv_heads_per_task, scratch.data());
    }
  }
}

HE_MULTIVERSION(run_decode, decode_tasks, DecodeParams)

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, int64_t window) {
  check_input(q, kOp, "q", 3, "[batch, num_heads, head_dim]");
  check_input(k_cache, kOp, "k_cache", 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  check_input(v_cache, kOp, "v_cache", 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  check_input(block_tables, kOp, "block_tables", 2, "[batch, max_blocks]");
  check_input(context_lens, kOp, "context_lens", 1, "[batch]");
  check_attention(q, k_cache, v_cache, kOp, "k_cache", "v_cache", scale, window);
  check_int32(block_tables, kOp, "block_tables");
  check_int32(context_lens, kOp, "context_lens");
  TORCH_CHECK(k_cache.size(1) > 0, kOp, ": k_cache block_size must be positive");
  TORCH_CHECK(block_tables.size(0) == q.size(0), kOp, ": block_tables has ", block_tables.size(0),
              " rows but q has batch ", q.size(0));
  TORCH_CHECK(context_lens.size(0) == q.size(0), kOp, ": context_lens has ", context_lens.size(0),
              " entries but q has batch ", q.size(0));
}

// Out-of-range indices must never reach the kernel: every block a sequence reads must exist.
void check_indices(const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t num_blocks,
                   int64_t block_size) {
  const int64_t max_blocks = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < context_lens.size(0); ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size, kOp, ": context_lens[", b, "] = ", lens[b],
                " is out of range: must be in [1, max_blocks * block_size = ", max_blocks * block_size, "]");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int32_t block = tables[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, kOp, ": block_tables[", b, ", ", i, "] = ", block,
                  " is not a valid block id (the cache has ", num_blocks, " blocks; context_lens[", b, "] = ",
                  lens[b], " needs this entry)");
    }
  }
}

// Enough tasks to keep every thread busy (and balanced when batch < threads), none smaller than a
// kv head; the count must divide num_kv_heads.
int64_t kv_heads_per_task(int64_t batch, int64_t num_kv_heads) {
  const int64_t wanted_splits = (2 * at::get_num_threads() + batch - 1) / std::max<int64_t>(batch, 1);
  int64_t splits = std::min(wanted_splits, num_kv_heads);
  while (num_kv_heads % splits != 0) ++splits;
  return num_kv_heads / splits;
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            int64_t window) {
  check_inputs(q, k_cache, v_cache, block_tables, context_lens, scale, window);
  check_indices(block_tables, context_lens, k_cache.size(0), k_cache.size(1));
  at::Tensor out = at::empty_like(q);
  if (q.numel() == 0) return out;
  DecodeParams p{q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                 block_tables.data_ptr<int32_t>(), context_lens.data_ptr<int32_t>(),
                 q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), block_tables.size(1),
                 kv_heads_per_task(q.size(0), k_cache.size(2)), window, static_cast<float>(scale)};
  const int64_t tasks = q.size(0) * (p.num_kv_heads / p.kv_heads_per_task);
  parallel_run(q.scalar_type(), tasks, 1, p, run_decode<float>, run_decode<uint16_t>);
  return out;
}

}  // namespace hybrid_engine::cpu
