// CPU ops of hybrid_engine._C (registered in csrc/register.cpp as torch.ops.hybrid_engine.*).
// Shapes are the contract of hybrid_engine.kernels; the plain-torch oracle is
// hybrid_engine/kernels/reference.py.
//
// Which ops have a C++ kernel was decided by measurement against plain torch in the native dtype
// (hybrid_engine.kernels.native; 2 vCPUs shared with other jobs, OMP_WAIT_POLICY=PASSIVE, median of
// paired alternating calls, torch time / C++ time, > 1 means C++ is faster):
//   add_norm rms   [16, 2048]  fp32 1.8x  bf16 2.2x    [4096, 2048]  fp32 2.0x  bf16 10x
//   add_norm layer [16, 2048]  fp32 1.2x  bf16 1.3x    [4096, 2048]  fp32 1.1x  bf16 1.5x
//   silu_and_mul   [16, 11008] fp32 1.6x  bf16 1.4x    [4096, 11008] fp32 1.3x  bf16 1.1x
// (torch 2.13's CPU rms_norm is unfused, and every torch variant pays a separate residual add
// or silu pass over memory.) write_kv is one C++ call instead of torch's six-op masked index_copy_ path (OPT-1.3b
// bf16 decode, batch 4: 5.4 ms of a 240 ms step went to it, 2026-12-01); copy_blocks stays plain torch
// (it runs only at copy-on-write). linear_act stays torch: the GEMM
// dominates and torch's MKL/oneDNN GEMM is the fastest available.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "thread_pool.h"

namespace hybrid_engine::cpu {

// q [B, H, D]; k_cache/v_cache [num_blocks, block_size, KVH, D]; block_tables int32 [B, max_blocks]
// (-1 padded); context_lens int32 [B] (>= 1); window > 0: only the last `window` tokens are seen.
// Returns [B, H, D] in q's dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            int64_t window);

// Packed variable-length batch: q [T, H, D], k/v [T, KVH, D] (any strides: views of a fused
// projection are read in place), cu_seqlens int32 [B + 1]; causal masks within each sequence;
// window > 0 (causal only) also hides keys window or more positions behind the query
// (sliding-window attention). Returns [T, H, D] in q's dtype.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, bool causal, double scale, int64_t window);

// key, value [T, KVH, D] (rows contiguous inside, any token stride) into k_cache/v_cache
// [num_blocks, block_size, KVH, D] (same dtype, contiguous, written in place) at slots int64 or
// int32 [T] (block * block_size + offset); slot -1 is skipped.
void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slots);

// LayerNorm (rms = false: (h - mean) / std * weight + bias) or RMSNorm (rms = true:
// h / rms * weight) of h = x + residual, with h rounded to x's dtype (it is the next residual).
// x, residual [..., N]; weight, bias [N] (float32 or x's dtype; bias optional). Returns
// (out, new_residual); without a residual, new_residual is an empty tensor (it would be x).
std::tuple<at::Tensor, at::Tensor> add_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                            double eps, bool rms);

// x [..., 2I] -> silu(x[..., :I]) * x[..., I:].
at::Tensor silu_and_mul(const at::Tensor& x);

// weight [N, K] (float32 or bfloat16) -> its panels for packed_linear: [panels, K steps, columns,
// k per step] with 16 columns per panel (8 for float32 on AVX2), N padded to 16, k per step 1 for
// float32 and 2 for bfloat16 (K padded to even), zero-padded.
at::Tensor pack_linear_weight(const at::Tensor& weight);

// relu?(x W^T + bias) for x [M, K] with W packed by pack_linear_weight; bias [out_features] in any
// float dtype; returns [M, out_features] in x's dtype. Refused where packed_linear_supported is false.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                         const c10::optional<at::Tensor>& bias, bool relu);

// Whether this CPU runs packed_linear in dtype: float32 with AVX2 and FMA, bfloat16 with AVX-512 BF16.
bool packed_linear_supported(at::ScalarType dtype);

// Shared argument checks: every message names the op and the argument.
inline void check_cpu_shape(const at::Tensor& t, const char* op, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", shape, ", got shape ", t.sizes());
}
inline void check_input(const at::Tensor& t, const char* op, const char* name, int64_t dim, const char* shape) {
  check_cpu_shape(t, op, name, dim, shape);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
}

// t [T, heads, D] itself when each token's [heads, D] is contiguous (a view split from a fused
// projection is), else a contiguous copy: kernels reading such rows take any token stride.
inline at::Tensor with_contiguous_rows(const at::Tensor& t) {
  return t.stride(2) == 1 && t.stride(1) == t.size(2) ? t : t.contiguous();
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name,
                             const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have ", like_name, "'s dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
}

inline void check_int32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
}

inline void check_gqa(int64_t num_heads, int64_t num_kv_heads, const char* op) {
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, op, ": num_heads (", num_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
}

// An attention op's q [..., H, D] with its keys k and values v [..., KVH, D] (named k_name, v_name):
// one float dtype, keys and values alike, the same head_dim, whole groups of query heads per KV head,
// a finite scale and a window >= 0 (0: none).
inline void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op,
                            const char* k_name, const char* v_name, double scale, int64_t window) {
  check_float_dtype(q, op, "q");
  check_same_dtype(k, q, op, k_name, "q");
  check_same_dtype(v, q, op, v_name, "q");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": ", v_name, " shape ", v.sizes(), " must equal ", k_name, " shape ",
              k.sizes());
  TORCH_CHECK(k.size(-1) == q.size(-1), op, ": head_dim of ", k_name, " (", k.size(-1),
              ") must equal head_dim of q (", q.size(-1), ")");
  check_gqa(q.size(-2), k.size(-2), op);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0: none), got ", window);
}

// Rows per task for row-wise elementwise kernels: ~32K elements, so a small decode batch stays
// on one thread (waking another costs microseconds) and a prefill batch splits.
inline int64_t rows_per_task(int64_t row_elements) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(row_elements, 1));
}

// Runs a kernel over tasks [0, n) on the kernels' threads (thread_pool.h), as many as torch's intra-op
// threads, instantiated for the storage type of dtype: float for float32, uint16_t for bfloat16.
template <typename Params>
void parallel_run(at::ScalarType dtype, int64_t n, int64_t grain, const Params& p,
                  void (*f32)(const Params&, int64_t, int64_t), void (*bf16)(const Params&, int64_t, int64_t)) {
  parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    (dtype == at::kBFloat16 ? bf16 : f32)(p, begin, end);
  });
}

}  // namespace hybrid_engine::cpu
