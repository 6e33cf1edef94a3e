#include "block_allocator.h"

#include <limits>

namespace hybrid_engine {

namespace {

std::string seq_name(int64_t seq_id) { return "sequence " + std::to_string(seq_id); }

}  // namespace

BlockAllocator::BlockAllocator(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks < 1 || num_blocks > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("num_blocks must be in [1, 2^31 - 1], got " + std::to_string(num_blocks));
  }
  if (block_size < 1) {
    throw std::invalid_argument("block_size must be >= 1, got " + std::to_string(block_size));
  }
  // Popped from the back, so block 0 is handed out first and a freed block is reused at once.
  free_blocks_.resize(num_blocks);
  for (int64_t i = 0; i < num_blocks; ++i) free_blocks_[i] = static_cast<int32_t>(num_blocks - 1 - i);
  ref_counts_.assign(num_blocks, 0);
}

const BlockAllocator::Sequence& BlockAllocator::find(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw UnknownSequence("unknown " + seq_name(seq_id));
  return it->second;
}

BlockAllocator::Sequence& BlockAllocator::find(int64_t seq_id) {
  return const_cast<Sequence&>(static_cast<const BlockAllocator*>(this)->find(seq_id));
}

// The next token needs a fresh block when the last one is full, or a private copy when it is shared.
bool BlockAllocator::needs_block(const Sequence& seq) const {
  if (seq.num_tokens % block_size_ == 0) return true;
  return ref_counts_[seq.blocks.back()] > 1;
}

void BlockAllocator::require_free(int64_t needed, const std::string& what) const {
  if (needed > num_free_blocks()) {
    throw OutOfBlocks(what + " needs " + std::to_string(needed) + " blocks but only " +
                      std::to_string(num_free_blocks()) + " of " + std::to_string(num_blocks_) + " are free");
  }
}

int32_t BlockAllocator::take_block() {
  int32_t block = free_blocks_.back();
  free_blocks_.pop_back();
  ref_counts_[block] = 1;
  return block;
}

void BlockAllocator::release_block(int32_t block) {
  if (--ref_counts_[block] == 0) free_blocks_.push_back(block);
}

void BlockAllocator::allocate(int64_t seq_id, int64_t num_tokens) {
  if (num_tokens < 0) {
    throw std::invalid_argument("num_tokens must be >= 0, got " + std::to_string(num_tokens));
  }
  if (seqs_.count(seq_id)) throw std::invalid_argument(seq_name(seq_id) + " is already allocated");
  int64_t needed = (num_tokens + block_size_ - 1) / block_size_;
  require_free(needed, "allocate(" + seq_name(seq_id) + ", " + std::to_string(num_tokens) + " tokens)");
  Sequence seq;
  seq.num_tokens = num_tokens;
  seq.blocks.reserve(needed);
  for (int64_t i = 0; i < needed; ++i) seq.blocks.push_back(take_block());
  seqs_.emplace(seq_id, std::move(seq));
}

std::tuple<at::Tensor, at::Tensor> BlockAllocator::append(const std::vector<int64_t>& seq_ids) {
  const int64_t n = static_cast<int64_t>(seq_ids.size());
  std::vector<Sequence*> seqs(n);
  const int64_t call = ++append_calls_;
  int64_t needed = 0;
  for (int64_t i = 0; i < n; ++i) {
    seqs[i] = &find(seq_ids[i]);
    if (seqs[i]->last_append_call == call) {
      throw std::invalid_argument("append: " + seq_name(seq_ids[i]) + " is listed more than once");
    }
    seqs[i]->last_append_call = call;
    needed += needs_block(*seqs[i]);
  }
  require_free(needed, "append(" + std::to_string(n) + " sequences)");

  at::Tensor slots = at::empty({n}, at::kLong);
  std::vector<int64_t> copies;
  int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    Sequence& seq = *seqs[i];
    int64_t offset = seq.num_tokens % block_size_;
    if (offset == 0) {
      seq.blocks.push_back(take_block());
    } else if (ref_counts_[seq.blocks.back()] > 1) {
      int32_t shared = seq.blocks.back();
      int32_t own = take_block();
      release_block(shared);
      seq.blocks.back() = own;
      copies.push_back(shared);
      copies.push_back(own);
    }
    slot[i] = static_cast<int64_t>(seq.blocks.back()) * block_size_ + offset;
    seq.num_tokens += 1;
  }
  int64_t num_copies = static_cast<int64_t>(copies.size()) / 2;
  at::Tensor copy_pairs = at::empty({num_copies, 2}, at::kLong);
  std::copy(copies.begin(), copies.end(), copy_pairs.data_ptr<int64_t>());
  return {slots, copy_pairs};
}

void BlockAllocator::fork(int64_t parent_id, int64_t child_id) {
  const Sequence& parent = find(parent_id);
  if (seqs_.count(child_id)) {
    throw std::invalid_argument("fork: child " + seq_name(child_id) + " already exists");
  }
  for (int32_t block : parent.blocks) ref_counts_[block] += 1;
  Sequence child = parent;
  seqs_.emplace(child_id, std::move(child));
}

void BlockAllocator::free(int64_t seq_id) {
  Sequence& seq = find(seq_id);
  for (int32_t block : seq.blocks) release_block(block);
  seqs_.erase(seq_id);
}

int64_t BlockAllocator::num_tokens(int64_t seq_id) const { return find(seq_id).num_tokens; }

at::Tensor BlockAllocator::block_table(const std::vector<int64_t>& seq_ids) const {
  const int64_t n = static_cast<int64_t>(seq_ids.size());
  std::vector<const Sequence*> seqs(n);
  int64_t width = 0;
  for (int64_t i = 0; i < n; ++i) {
    seqs[i] = &find(seq_ids[i]);
    width = std::max<int64_t>(width, seqs[i]->blocks.size());
  }
  at::Tensor table = at::full({n, width}, -1, at::kInt);
  int32_t* row = table.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i, row += width) {
    std::copy(seqs[i]->blocks.begin(), seqs[i]->blocks.end(), row);
  }
  return table;
}

int64_t BlockAllocator::ref_count(int64_t block) const {
  if (block < 0 || block >= num_blocks_) {
    throw std::out_of_range("block " + std::to_string(block) + " is outside [0, " + std::to_string(num_blocks_) + ")");
  }
  return ref_counts_[block];
}

}  // namespace hybrid_engine
