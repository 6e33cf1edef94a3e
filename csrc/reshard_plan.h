#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace hybrid_engine {

enum class Split : int64_t { kReplicated = 0, kColumn = 1, kRow = 2 };

// Rows of a column-parallel slice: ceil(rows / tp_size), so that rank j holds source rows
// [j * slice, (j + 1) * slice) cut at `rows`. Rows not divisible by tp_size only occur for a
// vocabulary padded to a multiple of tp_size (as vLLM pads it); the padding is never written.
inline int64_t column_slice_rows(int64_t rows, int64_t tp_size) { return (rows + tp_size - 1) / tp_size; }

// One source tensor of the training model, viewed as [rows, cols] (1-D tensors: cols = 1), and
// where its tensor-parallel slice lands: tensor dst_tensor, starting at dst_row of that rank's
// packed inference tensor (packed tensors concatenate their sources' slices along dim 0).
// Only rows [row_begin, row_end) of the slice are moved, so that a tensor larger than a bucket
// can be spread over several buckets.
struct SourceLayout {
  int64_t rows;
  int64_t cols;
  Split split;
  int64_t dst_tensor;
  int64_t dst_row;
  int64_t row_begin;
  int64_t row_end;
};

// A run of elements copied from one rank's ZeRO-3 shard of source `source` into one rank's
// inference tensor `dst_tensor`: src_offset is in the shard, dst_offset in the (flat) tensor.
struct Segment {
  int64_t source;
  int64_t src_offset;
  int64_t dst_tensor;
  int64_t dst_offset;
  int64_t length;
};

// What one rank sends, receives and copies locally when the ZeRO-3 layout (each source flattened,
// padded to a multiple of world_size, rank r holding [r*c, (r+1)*c), c = ceil(numel/world_size))
// becomes the tensor-parallel layout (TP groups are the contiguous ranks [g*t, (g+1)*t); rank d
// holds TP slice d % t). Every rank builds the same plan, so a sender's order of segments per
// peer is the receiver's order: pack and unpack need no metadata on the wire.
class ReshardPlan {
 public:
  ReshardPlan(std::vector<SourceLayout> sources, int64_t world_size, int64_t tp_size, int64_t rank);

  at::Tensor send_counts() const;  // int64 [world_size], elements, 0 for this rank itself
  at::Tensor recv_counts() const;
  int64_t shard_numel(int64_t source) const;
  const std::vector<Segment>& sends(int64_t peer) const { return sends_.at(peer); }
  const std::vector<Segment>& recvs(int64_t peer) const { return recvs_.at(peer); }
  const std::vector<Segment>& local() const { return local_; }

  // send: 1-D, any float dtype (converted while packing), sum(send_counts) elements, peers in rank order.
  void pack(const std::vector<at::Tensor>& shards, at::Tensor& send) const;
  // recv: 1-D, laid out like the peers' send buffers; dsts: inference tensors (any float dtype).
  void unpack(const at::Tensor& recv, std::vector<at::Tensor>& dsts) const;
  void copy_local(const std::vector<at::Tensor>& shards, std::vector<at::Tensor>& dsts) const;

 private:
  struct Run {
    int64_t start, length, dst_offset;
  };
  std::vector<Run> needed_runs(const SourceLayout& s, int64_t tp_rank) const;
  void add_segments(int64_t source, int64_t dst_rank, bool keep_all_src);
  void check_shards(const std::vector<at::Tensor>& shards) const;
  void check_dsts(const std::vector<at::Tensor>& dsts) const;

  std::vector<SourceLayout> sources_;
  int64_t world_size_, tp_size_, rank_;
  std::vector<std::vector<Segment>> sends_, recvs_;
  std::vector<Segment> local_;
};

}  // namespace hybrid_engine
