// CPU attention ops of hybrid_engine._C (registered in csrc/register.cpp as torch.ops.hybrid_engine.*).
// Shapes are the contract of hybrid_engine.kernels; the plain-torch oracle is
// hybrid_engine/kernels/reference.py.
#pragma once

#include <ATen/ATen.h>

namespace hybrid_engine::cpu {

// q [B, H, D]; k_cache/v_cache [num_blocks, block_size, KVH, D]; block_tables int32 [B, max_blocks]
// (-1 padded); context_lens int32 [B] (>= 1). Returns [B, H, D] in q's dtype.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale);

// Packed variable-length batch: q [T, H, D], k/v [T, KVH, D], cu_seqlens int32 [B + 1]; causal masks
// within each sequence. Returns [T, H, D] in q's dtype.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& cu_seqlens, bool causal, double scale);

// Shared argument checks: every message names the op and the argument.
inline void check_input(const at::Tensor& t, const char* op, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", shape, ", got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous())");
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
}

inline void check_int32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
}

inline void check_gqa(int64_t num_heads, int64_t num_kv_heads, const char* op) {
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, op, ": num_heads (", num_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
}

}  // namespace hybrid_engine::cpu
