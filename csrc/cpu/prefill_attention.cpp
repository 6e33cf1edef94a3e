// Variable-length (packed) prefill attention on the CPU, flash style.
//
// A task is (kv head, query tile of one sequence). Its query rows are the tile's tokens times the
// kv head's GQA group, packed to fp32; key/value tiles of kKeyTile tokens are packed to fp32
// (keys transposed) and multiplied with register-blocked micro-kernels. Softmax is online per key
// tile with fp32 running max/sum/accumulator, so no score matrix larger than
// [tile rows, kKeyTile] ever exists. Causal masking aligns each query with the same position in
// its own sequence; key tiles entirely in a query tile's future are skipped.
#include <algorithm>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace hybrid_engine::cpu {
namespace {

constexpr const char* kOp = "prefill_attention";
constexpr int64_t kKeyTile = 64;        // keys per tile: 4 vectors of 16 lanes
constexpr int64_t kRowsPerTile = 64;    // query rows (tokens x group) a tile aims for
constexpr int kMicroRows = 4;           // rows of a micro-kernel: 4 x 4 accumulators fit in registers

struct QueryTile {
  int64_t seq_begin, seq_end, q_begin, q_end;
};

struct PrefillParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const QueryTile* tiles;
  int64_t num_tiles, num_heads, num_kv_heads, head_dim, padded_dim, tile_tokens;
  bool causal;
  float scale;
};

// s[MR, kKeyTile] = q[MR, Dp] @ kt[Dp, kKeyTile]
template <int MR>
HE_INLINE void qk_micro(const float* q, const float* kt, float* s, int64_t Dp) {
  f32x16 c[MR][4] = {};
  for (int64_t d = 0; d < Dp; ++d) {
    const float* k = kt + d * kKeyTile;
    const f32x16 k0 = load16(k), k1 = load16(k + 16), k2 = load16(k + 32), k3 = load16(k + 48);
    for (int i = 0; i < MR; ++i) {
      const float a = q[i * Dp + d];
      c[i][0] += a * k0;
      c[i][1] += a * k1;
      c[i][2] += a * k2;
      c[i][3] += a * k3;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int x = 0; x < 4; ++x) store16(s + i * kKeyTile + x * 16, c[i][x]);
}

// o[MR, NV * 16] += p[MR, n] @ v[n, NV * 16]  (p row stride kKeyTile, v and o row stride Dp)
template <int MR, int NV>
HE_INLINE void pv_micro(const float* p, const float* v, int64_t n, float* o, int64_t Dp) {
  f32x16 c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int x = 0; x < NV; ++x) c[i][x] = load16(o + i * Dp + x * 16);
  for (int64_t j = 0; j < n; ++j) {
    f32x16 vj[NV];
    for (int x = 0; x < NV; ++x) vj[x] = load16(v + j * Dp + x * 16);
    for (int i = 0; i < MR; ++i) {
      const float a = p[i * kKeyTile + j];
      for (int x = 0; x < NV; ++x) c[i][x] += a * vj[x];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int x = 0; x < NV; ++x) store16(o + i * Dp + x * 16, c[i][x]);
}

template <int MR>
HE_INLINE void pv_columns(const float* p, const float* v, int64_t n, float* o, int64_t Dp) {
  int64_t c0 = 0;
  for (; c0 + 64 <= Dp; c0 += 64) pv_micro<MR, 4>(p, v + c0, n, o + c0, Dp);
  for (; c0 < Dp; c0 += 16) pv_micro<MR, 1>(p, v + c0, n, o + c0, Dp);
}

HE_INLINE void qk_tile(const float* q, const float* kt, float* s, int64_t rows, int64_t Dp) {
  int64_t r = 0;
  for (; r + kMicroRows <= rows; r += kMicroRows) qk_micro<kMicroRows>(q + r * Dp, kt, s + r * kKeyTile, Dp);
  for (; r < rows; ++r) qk_micro<1>(q + r * Dp, kt, s + r * kKeyTile, Dp);
}

HE_INLINE void pv_tile(const float* p, const float* v, int64_t n, float* o, int64_t rows, int64_t Dp) {
  int64_t r = 0;
  for (; r + kMicroRows <= rows; r += kMicroRows) pv_columns<kMicroRows>(p + r * kKeyTile, v, n, o + r * Dp, Dp);
  for (; r < rows; ++r) pv_columns<1>(p + r * kKeyTile, v, n, o + r * Dp, Dp);
}

// Rows of [tokens, heads, D] storage -> fp32 [rows, Dp] (zero padded), scaled.
template <typename T>
HE_INLINE void pack_rows(const T* src, int64_t src_stride, int64_t rows, int64_t D, int64_t Dp, float scale,
                         float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < D; ++d) dst[r * Dp + d] = to_float(src[r * src_stride + d]) * scale;
    std::fill(dst + r * Dp + D, dst + (r + 1) * Dp, 0.f);
  }
}

// n keys [n, D] (row stride src_stride) -> fp32 kt[Dp, kKeyTile], zero padded.
template <typename T>
HE_INLINE void pack_keys_transposed(const T* src, int64_t src_stride, int64_t n, int64_t D, int64_t Dp, float* kt) {
  std::fill(kt, kt + Dp * kKeyTile, 0.f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * kKeyTile + j] = to_float(src[j * src_stride + d]);
}

int64_t scratch_floats(const PrefillParams& p) {
  const int64_t rows = p.tile_tokens * (p.num_heads / p.num_kv_heads), Dp = p.padded_dim;
  return rows * (2 * Dp + kKeyTile + 2) + 2 * Dp * kKeyTile;
}

template <typename T>
HE_INLINE void prefill_task(const PrefillParams& p, const QueryTile& tile, int64_t kvh, float* scratch) {
  const int64_t group = p.num_heads / p.num_kv_heads, D = p.head_dim, Dp = p.padded_dim;
  const int64_t rows = (tile.q_end - tile.q_begin) * group, kv_stride = p.num_kv_heads * D;
  float* q = scratch;
  float* o = q + rows * Dp;
  float* s = o + rows * Dp;
  float* kt = s + rows * kKeyTile;
  float* v = kt + Dp * kKeyTile;
  float* row_max = v + kKeyTile * Dp;
  float* row_sum = row_max + rows;

  // Rows are (token, head in group): the group's heads of one token are adjacent in q and out.
  const int64_t token_stride = p.num_heads * D, tokens = tile.q_end - tile.q_begin;
  const T* q_src = static_cast<const T*>(p.q) + (tile.q_begin * p.num_heads + kvh * group) * D;
  for (int64_t i = 0; i < tokens; ++i) pack_rows(q_src + i * token_stride, D, group, D, Dp, p.scale, q + i * group * Dp);
  std::fill(o, o + rows * Dp, 0.f);
  std::fill(row_max, row_max + rows, -INFINITY);
  std::fill(row_sum, row_sum + rows, 0.f);

  const int64_t kv_end = p.causal ? tile.q_end : tile.seq_end;
  for (int64_t k0 = tile.seq_begin; k0 < kv_end; k0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, kv_end - k0);
    const int64_t kv_offset = (k0 * p.num_kv_heads + kvh) * D;
    pack_keys_transposed(static_cast<const T*>(p.k) + kv_offset, kv_stride, n, D, Dp, kt);
    pack_rows(static_cast<const T*>(p.v) + kv_offset, kv_stride, n, D, Dp, 1.0f, v);
    qk_tile(q, kt, s, rows, Dp);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t visible = p.causal ? std::min(n, tile.q_begin + r / group - k0 + 1) : n;
      std::fill(s + r * kKeyTile + std::max<int64_t>(visible, 0), s + (r + 1) * kKeyTile, -INFINITY);
      online_softmax_step(s + r * kKeyTile, kKeyTile, row_max[r], row_sum[r], o + r * Dp, Dp);
    }
    pv_tile(s, v, n, o, rows, Dp);
  }

  T* out = static_cast<T*>(p.out) + (tile.q_begin * p.num_heads + kvh * group) * D;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d)
      out[r / group * token_stride + r % group * D + d] = from_float<T>(o[r * Dp + d] / row_sum[r]);
}

template <typename T>
HE_INLINE void prefill_range(const PrefillParams& p, int64_t begin, int64_t end) {
  std::vector<float> scratch(scratch_floats(p));
  for (int64_t task = begin; task < end; ++task)  // kv-head major: causal tiles of all costs per thread
    prefill_task<T>(p, p.tiles[task % p.num_tiles], task / p.num_tiles, scratch.data());
}

HE_MULTIVERSION(run_prefill, prefill_range, PrefillParams)

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                  double scale) {
  check_input(q, kOp, "q", 3, "[total_tokens, num_heads, head_dim]");
  check_input(k, kOp, "k", 3, "[total_tokens, num_kv_heads, head_dim]");
  check_input(v, kOp, "v", 3, "[total_tokens, num_kv_heads, head_dim]");
  check_input(cu_seqlens, kOp, "cu_seqlens", 1, "[batch + 1]");
  check_float_dtype(q, kOp, "q");
  check_same_dtype(k, q, kOp, "k", "q");
  check_same_dtype(v, q, kOp, "v", "q");
  check_int32(cu_seqlens, kOp, "cu_seqlens");
  TORCH_CHECK(v.sizes() == k.sizes(), kOp, ": v shape ", v.sizes(), " must equal k shape ", k.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), kOp, ": k has ", k.size(0), " tokens but q has ", q.size(0));
  TORCH_CHECK(k.size(2) == q.size(2), kOp, ": head_dim of k (", k.size(2), ") must equal head_dim of q (",
              q.size(2), ")");
  check_gqa(q.size(1), k.size(1), kOp);
  TORCH_CHECK(std::isfinite(scale), kOp, ": scale must be finite, got ", scale);
}

// cu_seqlens must start at 0, never decrease and end at the token count: then every tile is in range.
std::vector<QueryTile> query_tiles(const at::Tensor& cu_seqlens, int64_t total_tokens, int64_t tile_tokens) {
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int64_t n = cu_seqlens.numel();
  TORCH_CHECK(n >= 1 && cu[0] == 0, kOp, ": cu_seqlens must start with 0");
  TORCH_CHECK(cu[n - 1] == total_tokens, kOp, ": cu_seqlens must end with the token count ", total_tokens,
              ", got ", cu[n - 1]);
  std::vector<QueryTile> tiles;
  for (int64_t b = 0; b + 1 < n; ++b) {
    TORCH_CHECK(cu[b + 1] >= cu[b], kOp, ": cu_seqlens must be non-decreasing, got cu_seqlens[", b, "] = ", cu[b],
                " > cu_seqlens[", b + 1, "] = ", cu[b + 1]);
    for (int64_t t = cu[b]; t < cu[b + 1]; t += tile_tokens)
      tiles.push_back({cu[b], cu[b + 1], t, std::min<int64_t>(t + tile_tokens, cu[b + 1])});
  }
  return tiles;
}

}  // namespace

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, bool causal, double scale) {
  check_inputs(q, k, v, cu_seqlens, scale);
  const int64_t group = q.size(1) / k.size(1);
  const int64_t tile_tokens = std::max<int64_t>(1, kRowsPerTile / group);
  const std::vector<QueryTile> tiles = query_tiles(cu_seqlens, q.size(0), tile_tokens);
  at::Tensor out = at::empty_like(q);
  if (q.numel() == 0) return out;
  const PrefillParams p{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), tiles.data(),
                        static_cast<int64_t>(tiles.size()), q.size(1), k.size(1), q.size(2),
                        (q.size(2) + kLanes - 1) / kLanes * kLanes, tile_tokens, causal,
                        static_cast<float>(scale)};
  parallel_run(q.scalar_type(), p.num_tiles * p.num_kv_heads, 1, p, run_prefill<float>, run_prefill<uint16_t>);
  return out;
}

}  // namespace hybrid_engine::cpu
