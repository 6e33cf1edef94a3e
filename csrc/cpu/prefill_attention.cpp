// Variable-length (packed) prefill attention on the CPU, flash style.
//
// A task is (span of query tiles of one sequence, kv head; the whole sequence unless more tasks
// are needed to keep the threads busy). A query tile's rows are its tokens times the kv head's
// GQA group, packed to fp32. Key/value tiles of kKeyTile tokens are packed to fp32 (keys
// transposed) once per task and reused by all its query tiles; register-blocked micro-kernels
// multiply them. Softmax is online per key tile with fp32 running max/sum/accumulator, so no
// score matrix larger than [tile rows, kKeyTile] exists. Causal masking aligns each query with
// the same position in its own sequence; key tiles entirely in a query tile's future are skipped.
// A sliding window (window > 0) also hides keys window or more positions behind a query; key
// tiles entirely behind the window of a query tile's first row are packed but not multiplied.
//
// On AVX2 every vector here is 8 lanes wide (V = f32x8), the softmax's too: with 16-lane vectors
// GCC kept the softmax's temporaries on the stack, and the kernel ran 1.6x slower (16 x 256 tokens,
// 12 heads of 64, causal, one thread, 2-vCPU EPYC Zen 3: 85-90 ms, now 56-57 against sdpa's 50-52).
//
// Measured and dropped: a bf16 variant multiplying with AVX512-BF16 dot products (vdpbf16ps) on
// VNNI-packed tiles ran 81 ms against 57 ms for converting the tiles to fp32 (4 x 512 tokens,
// 32 heads, head_dim 64, causal, one thread).
#include <algorithm>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace hybrid_engine::cpu {
namespace {

constexpr const char* kOp = "prefill_attention";
constexpr int64_t kKeyTile = 64;        // keys per tile: 4 vectors of 16 lanes
constexpr int64_t kRowsPerTile = 64;    // query rows (tokens x group) a tile aims for

// Consecutive query tiles [q_begin, q_end) of the sequence [seq_begin, seq_end).
struct QuerySpan {
  int64_t seq_begin, seq_end, q_begin, q_end;
};

struct PrefillParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const QuerySpan* spans;
  int64_t q_stride, k_stride, v_stride;  // elements between tokens (views of a fused projection)
  int64_t num_spans, workers, num_heads, num_kv_heads, head_dim, padded_dim, tile_tokens, max_seq_len;
  int64_t window;  // 0: none
  bool causal;
  float scale;
};

// A micro-kernel keeps Rows x 4 vectors of accumulators in registers: 4 x 4 of AVX-512's 32, 2 x 4
// of AVX2's 16 (8-lane vectors there: a 16-lane one is two registers to the compiler, and the
// accumulators of 4 x 4 of them went to the stack, 13x slower than AVX-512 instead of about 2x).
template <typename V>
struct Blocking;
template <>
struct Blocking<f32x16> {
  static constexpr int kRows = 4;
};
template <>
struct Blocking<f32x8> {
  static constexpr int kRows = 2;
};

// s[MR, 4 lanes] = scale * q[MR, Dp] @ kt[Dp, 4 lanes]  (kt and s row stride kKeyTile)
template <typename V, int MR>
HE_INLINE void qk_micro(const float* q, const float* kt, float* s, int64_t Dp, float scale) {
  constexpr int64_t L = lanes<V>;
  V c[MR][4] = {};
  for (int64_t d = 0; d < Dp; ++d) {
    const float* k = kt + d * kKeyTile;
    const V k0 = loadv<V>(k), k1 = loadv<V>(k + L), k2 = loadv<V>(k + 2 * L), k3 = loadv<V>(k + 3 * L);
    for (int i = 0; i < MR; ++i) {
      const float a = q[i * Dp + d];
      c[i][0] += a * k0;
      c[i][1] += a * k1;
      c[i][2] += a * k2;
      c[i][3] += a * k3;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int x = 0; x < 4; ++x) storev(s + i * kKeyTile + x * L, c[i][x] * scale);
}

// o[MR, NV lanes] += p[MR, n] @ v[n, NV lanes]  (p row stride kKeyTile, v and o row stride Dp)
template <typename V, int MR, int NV>
HE_INLINE void pv_micro(const float* p, const float* v, int64_t n, float* o, int64_t Dp) {
  constexpr int64_t L = lanes<V>;
  V c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int x = 0; x < NV; ++x) c[i][x] = loadv<V>(o + i * Dp + x * L);
  for (int64_t j = 0; j < n; ++j) {
    V vj[NV];
    for (int x = 0; x < NV; ++x) vj[x] = loadv<V>(v + j * Dp + x * L);
    for (int i = 0; i < MR; ++i) {
      const float a = p[i * kKeyTile + j];
      for (int x = 0; x < NV; ++x) c[i][x] += a * vj[x];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int x = 0; x < NV; ++x) storev(o + i * Dp + x * L, c[i][x]);
}

template <typename V, int MR>
HE_INLINE void qk_columns(const float* q, const float* kt, float* s, int64_t Dp, float scale) {
  for (int64_t c0 = 0; c0 < kKeyTile; c0 += 4 * lanes<V>) qk_micro<V, MR>(q, kt + c0, s + c0, Dp, scale);
}

template <typename V, int MR>
HE_INLINE void pv_columns(const float* p, const float* v, int64_t n, float* o, int64_t Dp) {
  constexpr int64_t L = lanes<V>;
  int64_t c0 = 0;
  for (; c0 + 4 * L <= Dp; c0 += 4 * L) pv_micro<V, MR, 4>(p, v + c0, n, o + c0, Dp);
  for (; c0 < Dp; c0 += L) pv_micro<V, MR, 1>(p, v + c0, n, o + c0, Dp);
}

template <typename V>
HE_INLINE void qk_tile(const float* q, const float* kt, float* s, int64_t rows, int64_t Dp, float scale) {
  constexpr int MR = Blocking<V>::kRows;
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) qk_columns<V, MR>(q + r * Dp, kt, s + r * kKeyTile, Dp, scale);
  for (; r < rows; ++r) qk_columns<V, 1>(q + r * Dp, kt, s + r * kKeyTile, Dp, scale);
}

template <typename V>
HE_INLINE void pv_tile(const float* p, const float* v, int64_t n, float* o, int64_t rows, int64_t Dp) {
  constexpr int MR = Blocking<V>::kRows;
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) pv_columns<V, MR>(p + r * kKeyTile, v, n, o + r * Dp, Dp);
  for (; r < rows; ++r) pv_columns<V, 1>(p + r * kKeyTile, v, n, o + r * Dp, Dp);
}

// Rows [rows, D] (row stride src_stride) -> fp32 [rows, Dp], zero padded.
template <typename T>
HE_INLINE void pack_rows(const T* src, int64_t src_stride, int64_t rows, int64_t D, int64_t Dp, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < D; ++d) dst[r * Dp + d] = to_float(src[r * src_stride + d]);
    std::fill(dst + r * Dp + D, dst + (r + 1) * Dp, 0.f);
  }
}

// kt[d0 + c, j0 + r] = x[r][c] for 8 rows x of 8 keys' elements d0..d0+8: an 8 x 8 transpose in
// three rounds of two-source shuffles.
HE_INLINE void store_transposed8(const f32x8 (&x)[8], float* kt) {
  f32x8 a[8], b[8];
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    a[2 * i + 1] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h) {
      b[4 * i + 2 * h] = __builtin_shufflevector(a[4 * i + h], a[4 * i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      b[4 * i + 2 * h + 1] = __builtin_shufflevector(a[4 * i + h], a[4 * i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int c = 0; c < 4; ++c) {
    storev(kt + c * kKeyTile, __builtin_shufflevector(b[c], b[c + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    storev(kt + (c + 4) * kKeyTile, __builtin_shufflevector(b[c], b[c + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

// n keys [n, D] (row stride src_stride) -> fp32 kt[Dp, kKeyTile], zero padded. Whole 8 x 8 blocks
// go through registers: element by element, the strided stores cost as much as a quarter of the
// multiplications.
template <typename T>
HE_INLINE void pack_keys_transposed(const T* src, int64_t src_stride, int64_t n, int64_t D, int64_t Dp, float* kt) {
  std::fill(kt, kt + Dp * kKeyTile, 0.f);
  const int64_t n8 = n / 8 * 8, D8 = D / 8 * 8;
  for (int64_t j0 = 0; j0 < n8; j0 += 8)
    for (int64_t d0 = 0; d0 < D8; d0 += 8) {
      f32x8 x[8];
      for (int r = 0; r < 8; ++r) x[r] = loadv<f32x8>(src + (j0 + r) * src_stride + d0);
      store_transposed8(x, kt + d0 * kKeyTile + j0);
    }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = j < n8 ? D8 : 0; d < D; ++d) kt[d * kKeyTile + j] = to_float(src[j * src_stride + d]);
}

int64_t key_tiles(int64_t tokens) { return (tokens + kKeyTile - 1) / kKeyTile; }

// Scratch of one task: o and q [rows, Dp], s [rows, kKeyTile], row max and sum, and the packed K
// and V tiles of a whole sequence.
int64_t scratch_floats(const PrefillParams& p) {
  const int64_t rows = p.tile_tokens * (p.num_heads / p.num_kv_heads), Dp = p.padded_dim;
  return rows * (2 * Dp + kKeyTile + 2) + 2 * key_tiles(p.max_seq_len) * Dp * kKeyTile;
}

// Attention of one query tile against the sequence's keys. K/V tiles are packed on first use (one
// packed tile per kKeyTile keys from seq_begin) and reused by the span's later query tiles.
template <typename T, typename V>
HE_INLINE void query_tile(const PrefillParams& p, const QuerySpan& span, int64_t q_begin, int64_t q_end, int64_t kvh,
                          float* scratch, int64_t& packed) {
  const int64_t group = p.num_heads / p.num_kv_heads, D = p.head_dim, Dp = p.padded_dim;
  const int64_t rows = (q_end - q_begin) * group;
  const int64_t max_rows = p.tile_tokens * group;
  float* o = scratch;
  float* q = o + max_rows * Dp;
  float* s = q + max_rows * Dp;
  float* row_max = s + max_rows * kKeyTile;
  float* row_sum = row_max + max_rows;
  float* kt = row_sum + max_rows;
  float* v = kt + key_tiles(p.max_seq_len) * Dp * kKeyTile;

  // Rows are (token, head in group): the group's heads of one token are adjacent in q and out.
  const T* q_src = static_cast<const T*>(p.q) + q_begin * p.q_stride + kvh * group * D;
  for (int64_t i = 0; i < q_end - q_begin; ++i) pack_rows(q_src + i * p.q_stride, D, group, D, Dp, q + i * group * Dp);
  std::fill(o, o + rows * Dp, 0.f);
  std::fill(row_max, row_max + rows, -INFINITY);
  std::fill(row_sum, row_sum + rows, 0.f);

  const int64_t kv_end = p.causal ? q_end : span.seq_end;
  for (int64_t k0 = span.seq_begin, tile = 0; k0 < kv_end; k0 += kKeyTile, ++tile) {
    const int64_t n = std::min(kKeyTile, kv_end - k0);
    float* kt_tile = kt + tile * Dp * kKeyTile;
    float* v_tile = v + tile * Dp * kKeyTile;
    if (tile >= packed) {  // tiles are visited in order, so this is the next one: pack all its keys
      const int64_t keys = std::min(kKeyTile, span.seq_end - k0);
      pack_keys_transposed(static_cast<const T*>(p.k) + k0 * p.k_stride + kvh * D, p.k_stride, keys, D, Dp, kt_tile);
      pack_rows(static_cast<const T*>(p.v) + k0 * p.v_stride + kvh * D, p.v_stride, keys, D, Dp, v_tile);
      packed = tile + 1;
    }
    if (p.window > 0 && k0 + n <= q_begin - p.window + 1) continue;
    qk_tile<V>(q, kt_tile, s, rows, Dp, p.scale);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t visible = p.causal ? std::min(n, q_begin + r / group - k0 + 1) : n;
      const int64_t behind_window = p.window > 0 ? q_begin + r / group - p.window + 1 - k0 : 0;
      std::fill(s + r * kKeyTile, s + r * kKeyTile + std::clamp<int64_t>(behind_window, 0, n), -INFINITY);
      std::fill(s + r * kKeyTile + std::max<int64_t>(visible, 0), s + (r + 1) * kKeyTile, -INFINITY);
      online_softmax_step<V>(s + r * kKeyTile, kKeyTile, row_max[r], row_sum[r], o + r * Dp, Dp);
    }
    pv_tile<V>(s, v_tile, n, o, rows, Dp);
  }

  T* out = static_cast<T*>(p.out) + (q_begin * p.num_heads + kvh * group) * D;
  for (int64_t r = 0; r < rows; ++r) {
    scale_inplace<V>(o + r * Dp, 1.f / row_sum[r], D);
    T* out_row = out + r / group * p.num_heads * D + r % group * D;
    for (int64_t d = 0; d < D; ++d) out_row[d] = from_float<T>(o[r * Dp + d]);
  }
}

// Worker w takes tasks w, w + workers, ...: every worker gets a share of every sequence (ragged
// lengths stay balanced), and consecutive tasks read neighbouring kv heads of one sequence, whose
// rows share cache lines (kv-head major order ran 1.2x slower on one thread).
template <typename T, typename V>
HE_INLINE void prefill_tasks(const PrefillParams& p, int64_t begin, int64_t end) {
  std::vector<float> scratch(scratch_floats(p));
  for (int64_t worker = begin; worker < end; ++worker)
    for (int64_t task = worker; task < p.num_spans * p.num_kv_heads; task += p.workers) {
      const QuerySpan& span = p.spans[task / p.num_kv_heads];
      int64_t packed = 0;
      for (int64_t q0 = span.q_begin; q0 < span.q_end; q0 += p.tile_tokens)
        query_tile<T, V>(p, span, q0, std::min(q0 + p.tile_tokens, span.q_end), task % p.num_kv_heads,
                         scratch.data(), packed);
    }
}

HE_MULTIVERSION(run_prefill, prefill_tasks, PrefillParams)

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                  double scale, bool causal, int64_t window) {
  check_cpu_shape(q, kOp, "q", 3, "[total_tokens, num_heads, head_dim]");
  check_cpu_shape(k, kOp, "k", 3, "[total_tokens, num_kv_heads, head_dim]");
  check_cpu_shape(v, kOp, "v", 3, "[total_tokens, num_kv_heads, head_dim]");
  check_input(cu_seqlens, kOp, "cu_seqlens", 1, "[batch + 1]");
  check_attention(q, k, v, kOp, "k", "v", scale, window);
  check_int32(cu_seqlens, kOp, "cu_seqlens");
  TORCH_CHECK(k.size(0) == q.size(0), kOp, ": k has ", k.size(0), " tokens but q has ", q.size(0));
  TORCH_CHECK(window == 0 || causal, kOp, ": a window needs causal attention");
}

// cu_seqlens must start at 0, never decrease and end at the token count: then every span is in
// range. Each sequence is cut into up to `parts` spans of whole query tiles.
std::vector<QuerySpan> query_spans(const at::Tensor& cu_seqlens, int64_t total_tokens, int64_t tile_tokens,
                                   int64_t parts) {
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int64_t n = cu_seqlens.numel();
  TORCH_CHECK(n >= 1 && cu[0] == 0, kOp, ": cu_seqlens must start with 0");
  TORCH_CHECK(cu[n - 1] == total_tokens, kOp, ": cu_seqlens must end with the token count ", total_tokens,
              ", got ", cu[n - 1]);
  std::vector<QuerySpan> spans;
  for (int64_t b = 0; b + 1 < n; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], kOp, ": cu_seqlens must be non-decreasing, got cu_seqlens[", b, "] = ", cu[b],
                " > cu_seqlens[", b + 1, "] = ", cu[b + 1]);
    const int64_t tiles = (cu[b + 1] - cu[b] + tile_tokens - 1) / tile_tokens;
    const int64_t tiles_per_span = std::max<int64_t>(1, (tiles + parts - 1) / parts);
    for (int64_t t = cu[b]; t < cu[b + 1]; t += tiles_per_span * tile_tokens)
      spans.push_back({cu[b], cu[b + 1], t, std::min<int64_t>(t + tiles_per_span * tile_tokens, cu[b + 1])});
  }
  return spans;
}

}  // namespace

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, bool causal, double scale, int64_t window) {
  check_inputs(q, k, v, cu_seqlens, scale, causal, window);
  const int64_t group = q.size(1) / k.size(1);
  const int64_t tile_tokens = std::max<int64_t>(1, kRowsPerTile / group);
  // A task packs its sequence's K/V once for all its query tiles: whole sequences per task when
  // there are enough (sequence, kv head) pairs to keep the threads busy, else spans of them.
  const int64_t seqs = std::max<int64_t>(1, cu_seqlens.numel() - 1);
  const int64_t parts = (4 * at::get_num_threads() + seqs * k.size(1) - 1) / (seqs * k.size(1));
  const std::vector<QuerySpan> spans = query_spans(cu_seqlens, q.size(0), tile_tokens, parts);
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  int64_t max_seq_len = 0;
  for (const QuerySpan& span : spans) max_seq_len = std::max(max_seq_len, span.seq_end - span.seq_begin);
  const int64_t num_spans = static_cast<int64_t>(spans.size());
  const int64_t workers = std::min<int64_t>(num_spans * k.size(1), at::get_num_threads());
  const at::Tensor qr = with_contiguous_rows(q), kr = with_contiguous_rows(k), vr = with_contiguous_rows(v);
  const PrefillParams p{qr.data_ptr(), kr.data_ptr(), vr.data_ptr(), out.data_ptr(), spans.data(),
                        qr.stride(0), kr.stride(0), vr.stride(0), num_spans, workers, q.size(1), k.size(1),
                        q.size(2), (q.size(2) + kLanes - 1) / kLanes * kLanes, tile_tokens, max_seq_len, window,
                        causal, static_cast<float>(scale)};
  parallel_run(q.scalar_type(), workers, 1, p, run_prefill<float>, run_prefill<uint16_t>);
  return out;
}

}  // namespace hybrid_engine::cpu
