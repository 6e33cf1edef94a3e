// New keys and values into the paged caches: each token's [KVH, D] row is one memcpy to its slot.
// A decode step writes a few KB per layer; torch's masked index_copy_ path (a mask for slot -1, a
// nonzero, two gathers, two index_copy_) costs six ops of dispatch for it, in every layer.
#include <cstring>

#include "ops.h"

namespace hybrid_engine::cpu {
namespace {

constexpr const char* kOp = "write_kv";

template <typename Index>
void copy_rows(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
               const Index* slots) {
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t row_bytes = k_cache.size(2) * k_cache.size(3) * k_cache.element_size();
  const auto* k = static_cast<const char*>(key.data_ptr());
  const auto* v = static_cast<const char*>(value.data_ptr());
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size(), v_stride = value.stride(0) * value.element_size();
  for (int64_t t = 0; t < key.size(0); ++t) {  // check every slot before writing any
    TORCH_CHECK_VALUE(slots[t] >= -1 && slots[t] < num_slots, kOp, ": slots[", t, "] = ", slots[t],
                      " must be -1 (skip) or in [0, ", num_slots, ")");
  }
  // Rows per task: a decode step's few rows stay on one thread (waking another costs more than the copy).
  parallel_for(0, key.size(0), 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      std::memcpy(kc + slots[t] * row_bytes, k + t * k_stride, row_bytes);
      std::memcpy(vc + slots[t] * row_bytes, v + t * v_stride, row_bytes);
    }
  });
}

}  // namespace

void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slots) {
  check_input(k_cache, kOp, "k_cache", 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  check_input(v_cache, kOp, "v_cache", 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), kOp, ": v_cache shape ", v_cache.sizes(),
              " must equal k_cache shape ", k_cache.sizes());
  for (const auto& [t, name] : {std::pair{&key, "key"}, std::pair{&value, "value"}}) {
    TORCH_CHECK(t->device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got device ", t->device());
    TORCH_CHECK(t->dim() == 3 && t->size(1) == k_cache.size(2) && t->size(2) == k_cache.size(3), kOp, ": ", name,
                " must be [tokens, num_kv_heads, head_dim] matching k_cache ", k_cache.sizes(), ", got ", t->sizes());
    check_same_dtype(*t, k_cache, kOp, name, "k_cache");
  }
  check_input(slots, kOp, "slots", 1, "[tokens]");
  TORCH_CHECK(slots.size(0) == key.size(0) && value.size(0) == key.size(0), kOp, ": key, value and slots must have ",
              "one entry per token, got ", key.size(0), ", ", value.size(0), " and ", slots.size(0));
  const at::Tensor k = with_contiguous_rows(key), v = with_contiguous_rows(value);
  if (slots.scalar_type() == at::kLong) {
    copy_rows(k, v, k_cache, v_cache, slots.data_ptr<int64_t>());
  } else {
    check_int32(slots, kOp, "slots");
    copy_rows(k, v, k_cache, v_cache, slots.data_ptr<int32_t>());
  }
}

}  // namespace hybrid_engine::cpu
