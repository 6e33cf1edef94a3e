#include "reshard_plan.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

namespace hybrid_engine {

namespace {

struct Copy {
  const char* src;
  int64_t dst_tensor;
  int64_t dst_offset;
  int64_t length;
};

void append_merged(std::vector<Segment>& segments, const Segment& s) {
  if (!segments.empty()) {
    Segment& last = segments.back();
    if (last.source == s.source && last.dst_tensor == s.dst_tensor && last.src_offset + last.length == s.src_offset &&
        last.dst_offset + last.length == s.dst_offset) {
      last.length += s.length;
      return;
    }
  }
  segments.push_back(s);
}

template <typename Src, typename Dst>
void convert(const Src* src, Dst* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Dst>(static_cast<float>(src[i]));
}

template <typename Src>
void convert_to(const Src* src, at::Tensor& dst, int64_t offset, int64_t n) {
  switch (dst.scalar_type()) {
    case at::kFloat: return convert(src, dst.data_ptr<float>() + offset, n);
    case at::kBFloat16: return convert(src, dst.data_ptr<at::BFloat16>() + offset, n);
    case at::kHalf: return convert(src, dst.data_ptr<at::Half>() + offset, n);
    default: TORCH_CHECK(false, "reshard: inference tensors must be float32, bfloat16 or float16, got ", dst.scalar_type());
  }
}

void convert_run(const char* src, at::ScalarType src_type, at::Tensor& dst, int64_t offset, int64_t n) {
  if (src_type == dst.scalar_type()) {
    std::memcpy(static_cast<char*>(dst.data_ptr()) + offset * dst.element_size(), src, n * dst.element_size());
    return;
  }
  switch (src_type) {
    case at::kFloat: return convert_to(reinterpret_cast<const float*>(src), dst, offset, n);
    case at::kBFloat16: return convert_to(reinterpret_cast<const at::BFloat16*>(src), dst, offset, n);
    case at::kHalf: return convert_to(reinterpret_cast<const at::Half*>(src), dst, offset, n);
    default: TORCH_CHECK(false, "reshard: shards must be float32, bfloat16 or float16, got ", src_type);
  }
}

void run_copies(const std::vector<Copy>& copies, at::ScalarType src_type, std::vector<at::Tensor>& dsts) {
  at::parallel_for(0, static_cast<int64_t>(copies.size()), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Copy& c = copies[i];
      convert_run(c.src, src_type, dsts[c.dst_tensor], c.dst_offset, c.length);
    }
  });
}

}  // namespace

ReshardPlan::ReshardPlan(std::vector<SourceLayout> sources, int64_t world_size, int64_t tp_size, int64_t rank)
    : sources_(std::move(sources)), world_size_(world_size), tp_size_(tp_size), rank_(rank) {
  TORCH_CHECK(world_size >= 1 && tp_size >= 1 && world_size % tp_size == 0,
              "reshard: tp_size (", tp_size, ") must be >= 1 and divide world_size (", world_size, ")");
  TORCH_CHECK(rank >= 0 && rank < world_size, "reshard: rank ", rank, " is outside [0, ", world_size, ")");
  for (size_t i = 0; i < sources_.size(); ++i) {
    const SourceLayout& s = sources_[i];
    TORCH_CHECK(s.rows >= 1 && s.cols >= 1, "reshard: source ", i, " has shape [", s.rows, ", ", s.cols, "]");
    TORCH_CHECK(s.split != Split::kRow || s.cols % tp_size == 0, "reshard: source ", i, " is row-parallel but its ",
                s.cols, " columns are not divisible by tp_size ", tp_size);
    TORCH_CHECK(s.dst_tensor >= 0 && s.dst_row >= 0, "reshard: source ", i, " has a negative destination");
    const int64_t slice_rows = s.split == Split::kColumn ? column_slice_rows(s.rows, tp_size) : s.rows;
    TORCH_CHECK(0 <= s.row_begin && s.row_begin < s.row_end && s.row_end <= slice_rows, "reshard: source ", i,
                " row range [", s.row_begin, ", ", s.row_end, ") is outside its slice's ", slice_rows, " rows");
  }
  sends_.resize(world_size);
  recvs_.resize(world_size);
  for (int64_t i = 0; i < static_cast<int64_t>(sources_.size()); ++i) {
    for (int64_t d = 0; d < world_size; ++d) add_segments(i, d, d == rank);
  }
}

int64_t ReshardPlan::shard_numel(int64_t source) const {
  const SourceLayout& s = sources_.at(source);
  return (s.rows * s.cols + world_size_ - 1) / world_size_;
}

// The flat element runs of rows [row_begin, row_end) of the slice TP rank tp_rank needs, and
// where each lands.
std::vector<ReshardPlan::Run> ReshardPlan::needed_runs(const SourceLayout& s, int64_t tp_rank) const {
  const int64_t rows = s.row_end - s.row_begin;
  switch (s.split) {
    case Split::kReplicated:
      return {{s.row_begin * s.cols, rows * s.cols, (s.dst_row + s.row_begin) * s.cols}};
    case Split::kColumn: {
      // A padded slice (the last ranks' of a vocabulary) holds fewer source rows, maybe none.
      const int64_t first = tp_rank * column_slice_rows(s.rows, tp_size_) + s.row_begin;
      const int64_t present = std::min(rows, s.rows - first);
      if (present <= 0) return {};
      return {{first * s.cols, present * s.cols, (s.dst_row + s.row_begin) * s.cols}};
    }
    case Split::kRow: {
      int64_t cols = s.cols / tp_size_;
      std::vector<Run> runs;
      runs.reserve(rows);
      for (int64_t r = s.row_begin; r < s.row_end; ++r) runs.push_back({r * s.cols + tp_rank * cols, cols, (s.dst_row + r) * cols});
      return runs;
    }
  }
  TORCH_CHECK(false, "reshard: unknown split");
}

// Segments of `source` that rank dst_rank needs: all of them when dst_rank is this rank (received
// or local), otherwise only those cut from this rank's own shard (sent).
void ReshardPlan::add_segments(int64_t source, int64_t dst_rank, bool keep_all_src) {
  const int64_t c = shard_numel(source);
  for (const Run& run : needed_runs(sources_[source], dst_rank % tp_size_)) {
    int64_t first = keep_all_src ? run.start / c : rank_;
    int64_t last = keep_all_src ? (run.start + run.length - 1) / c : rank_;
    for (int64_t s = first; s <= last; ++s) {
      int64_t begin = std::max(run.start, s * c), end = std::min(run.start + run.length, (s + 1) * c);
      if (begin >= end) continue;
      Segment seg{source, begin - s * c, sources_[source].dst_tensor, run.dst_offset + (begin - run.start), end - begin};
      if (dst_rank != rank_) {
        append_merged(sends_[dst_rank], seg);
      } else if (s == rank_) {
        append_merged(local_, seg);
      } else {
        append_merged(recvs_[s], seg);
      }
    }
  }
}

at::Tensor ReshardPlan::send_counts() const {
  at::Tensor counts = at::zeros({world_size_}, at::kLong);
  for (int64_t p = 0; p < world_size_; ++p) {
    for (const Segment& s : sends_[p]) counts[p] += s.length;
  }
  return counts;
}

at::Tensor ReshardPlan::recv_counts() const {
  at::Tensor counts = at::zeros({world_size_}, at::kLong);
  for (int64_t p = 0; p < world_size_; ++p) {
    for (const Segment& s : recvs_[p]) counts[p] += s.length;
  }
  return counts;
}

void ReshardPlan::check_shards(const std::vector<at::Tensor>& shards) const {
  TORCH_CHECK(shards.size() == sources_.size(), "reshard: expected ", sources_.size(), " shards, got ", shards.size());
  for (size_t i = 0; i < shards.size(); ++i) {
    const at::Tensor& t = shards[i];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == 1, "reshard: shard ", i,
                " must be a contiguous 1-D CPU tensor");
    TORCH_CHECK(t.scalar_type() == shards[0].scalar_type(), "reshard: all shards must share one dtype");
    TORCH_CHECK(t.numel() >= shard_numel(i), "reshard: shard ", i, " has ", t.numel(), " elements, the ZeRO-3 layout gives ",
                shard_numel(i), " (ceil(numel / world_size))");
  }
}

void ReshardPlan::check_dsts(const std::vector<at::Tensor>& dsts) const {
  for (size_t i = 0; i < sources_.size(); ++i) {
    const SourceLayout& s = sources_[i];
    TORCH_CHECK(s.dst_tensor < static_cast<int64_t>(dsts.size()), "reshard: source ", i, " targets inference tensor ",
                s.dst_tensor, " but only ", dsts.size(), " were given");
    const at::Tensor& t = dsts[s.dst_tensor];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "reshard: inference tensor ", s.dst_tensor,
                " must be a contiguous CPU tensor");
    int64_t rows = s.split == Split::kColumn ? column_slice_rows(s.rows, tp_size_) : s.rows;
    int64_t cols = s.split == Split::kRow ? s.cols / tp_size_ : s.cols;
    TORCH_CHECK((s.dst_row + rows) * cols <= t.numel(), "reshard: inference tensor ", s.dst_tensor, " (", t.numel(),
                " elements) is too small for source ", i, " at row ", s.dst_row);
  }
}

void ReshardPlan::pack(const std::vector<at::Tensor>& shards, at::Tensor& send) const {
  check_shards(shards);
  const int64_t total = send_counts().sum().item<int64_t>();
  TORCH_CHECK(send.device().is_cpu() && send.is_contiguous() && send.dim() == 1 && send.numel() >= total,
              "reshard: send buffer must be a contiguous 1-D CPU tensor of at least ", total, " elements");
  if (shards.empty()) return;
  const int64_t elem = shards[0].element_size();
  std::vector<Copy> copies;
  int64_t offset = 0;
  for (const auto& peer : sends_) {
    for (const Segment& s : peer) {
      copies.push_back({static_cast<const char*>(shards[s.source].data_ptr()) + s.src_offset * elem, 0, offset, s.length});
      offset += s.length;
    }
  }
  std::vector<at::Tensor> out{send};
  run_copies(copies, shards[0].scalar_type(), out);
}

void ReshardPlan::unpack(const at::Tensor& recv, std::vector<at::Tensor>& dsts) const {
  check_dsts(dsts);
  const int64_t total = recv_counts().sum().item<int64_t>();
  TORCH_CHECK(recv.device().is_cpu() && recv.is_contiguous() && recv.dim() == 1 && recv.numel() >= total,
              "reshard: receive buffer must be a contiguous 1-D CPU tensor of at least ", total, " elements");
  const int64_t elem = recv.element_size();
  const char* in = static_cast<const char*>(recv.data_ptr());
  std::vector<Copy> copies;
  for (const auto& peer : recvs_) {
    for (const Segment& s : peer) {
      copies.push_back({in, s.dst_tensor, s.dst_offset, s.length});
      in += s.length * elem;
    }
  }
  run_copies(copies, recv.scalar_type(), dsts);
}

void ReshardPlan::copy_local(const std::vector<at::Tensor>& shards, std::vector<at::Tensor>& dsts) const {
  check_shards(shards);
  check_dsts(dsts);
  if (shards.empty()) return;
  const int64_t elem = shards[0].element_size();
  std::vector<Copy> copies;
  for (const Segment& s : local_) {
    copies.push_back({static_cast<const char*>(shards[s.source].data_ptr()) + s.src_offset * elem, s.dst_tensor,
                      s.dst_offset, s.length});
  }
  run_copies(copies, shards[0].scalar_type(), dsts);
}

}  // namespace hybrid_engine
