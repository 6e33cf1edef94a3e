#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace hybrid_engine {

// Raised (as hybrid_engine.OutOfBlocksError) when the free blocks cannot cover a whole call.
struct OutOfBlocks : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Raised (as KeyError) for a sequence id the allocator does not know.
struct UnknownSequence : std::out_of_range {
  using std::out_of_range::out_of_range;
};

// Host-side bookkeeping of a paged KV cache: which physical blocks each sequence owns.
// Blocks are reference counted so forked sequences share their prefix; a shared last block is
// copied on the first write (the copy is reported to the caller, who moves the K/V bytes).
// allocate, append and fork either succeed completely or throw and change nothing.
class BlockAllocator {
 public:
  BlockAllocator(int64_t num_blocks, int64_t block_size);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_blocks_.size()); }

  void allocate(int64_t seq_id, int64_t num_tokens);
  std::tuple<at::Tensor, at::Tensor> append(const std::vector<int64_t>& seq_ids);
  void fork(int64_t parent_id, int64_t child_id);
  void free(int64_t seq_id);
  int64_t num_tokens(int64_t seq_id) const;
  at::Tensor block_table(const std::vector<int64_t>& seq_ids) const;
  int64_t ref_count(int64_t block) const;

 private:
  struct Sequence {
    std::vector<int32_t> blocks;
    int64_t num_tokens = 0;
    int64_t last_append_call = 0;  // detects a sequence listed twice in one append without a hash set
  };

  const Sequence& find(int64_t seq_id) const;
  Sequence& find(int64_t seq_id);
  bool needs_block(const Sequence& seq) const;
  void require_free(int64_t needed, const std::string& what) const;
  int32_t take_block();
  void release_block(int32_t block);

  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<int32_t> free_blocks_;
  std::vector<int32_t> ref_counts_;
  std::unordered_map<int64_t, Sequence> seqs_;
  int64_t append_calls_ = 0;
};

}  // namespace hybrid_engine
