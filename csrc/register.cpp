// The one registration file of hybrid_engine._C: Python classes through pybind11, tensor ops
// through TORCH_LIBRARY (torch.ops.hybrid_engine.*).
#include <torch/extension.h>

#include "block_allocator.h"
#include "cpu_cache.h"
#include "reshard_plan.h"
#include "cpu/ops.h"
#include "cpu/thread_pool.h"
#include "cpu/vec.h"

namespace py = pybind11;
using hybrid_engine::BlockAllocator;
using hybrid_engine::ReshardPlan;

namespace {

// Sequence ids arrive once per decode step for the whole batch: read a list or tuple of ints with
// the CPython fast accessors (pybind11's generic caster costs more than the allocator itself),
// take an int64 tensor as it is, and leave any other sequence to pybind11.
std::vector<int64_t> seq_ids_from(py::handle ids) {
  if (PyList_Check(ids.ptr()) || PyTuple_Check(ids.ptr())) {
    PyObject* fast = ids.ptr();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject** items = PySequence_Fast_ITEMS(fast);
    std::vector<int64_t> out(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      out[i] = PyLong_AsLongLong(items[i]);
      if (out[i] == -1 && PyErr_Occurred()) throw py::error_already_set();
    }
    return out;
  }
  if (THPVariable_Check(ids.ptr())) {
    at::Tensor t = THPVariable_Unpack(ids.ptr());
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.device().is_cpu(),
                "seq_ids as a tensor must be a 1-D int64 CPU tensor, got ", t.dim(), "-D ", t.scalar_type(), " on ", t.device());
    t = t.contiguous();
    return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
  }
  try {
    if (!PyUnicode_Check(ids.ptr()) && !PyBytes_Check(ids.ptr())) return ids.cast<std::vector<int64_t>>();
  } catch (const py::cast_error&) {
  }
  throw py::type_error("seq_ids must be a sequence of ints or a 1-D int64 tensor, got " +
                       std::string(py::str(py::type::of(ids).attr("__name__"))));
}

hybrid_engine::Split split_from(const std::string& name) {
  if (name == "replicated") return hybrid_engine::Split::kReplicated;
  if (name == "column") return hybrid_engine::Split::kColumn;
  if (name == "row") return hybrid_engine::Split::kRow;
  throw py::value_error("split must be 'replicated', 'column' or 'row', got '" + name + "'");
}

// (rows, cols, split, dst_tensor, dst_row[, row_begin, row_end]); without a row range, the whole slice.
hybrid_engine::SourceLayout layout_from(const py::tuple& t) {
  if (t.size() != 5 && t.size() != 7) {
    throw py::value_error("a source is (rows, cols, split, dst_tensor, dst_row[, row_begin, row_end]), got " +
                          std::to_string(t.size()) + " fields");
  }
  auto field = [&](size_t i) { return t[i].cast<int64_t>(); };
  hybrid_engine::Split split = split_from(t[2].cast<std::string>());
  int64_t row_end = t.size() == 7 ? field(6) : -1;
  return {field(0), field(1), split, field(3), field(4), t.size() == 7 ? field(5) : 0, row_end};
}

ReshardPlan make_plan(const std::vector<py::tuple>& sources, int64_t world_size, int64_t tp_size, int64_t rank) {
  std::vector<hybrid_engine::SourceLayout> layouts;
  for (const py::tuple& source : sources) {
    hybrid_engine::SourceLayout layout = layout_from(source);
    if (layout.row_end < 0) {  // the whole slice: all rows, or a 1/tp_size share for column-parallel sources
      layout.row_end = layout.split == hybrid_engine::Split::kColumn
                           ? hybrid_engine::column_slice_rows(layout.rows, tp_size) : layout.rows;
    }
    layouts.push_back(layout);
  }
  return ReshardPlan(std::move(layouts), world_size, tp_size, rank);
}

py::list segment_tuples(const std::vector<hybrid_engine::Segment>& segments) {
  py::list out;
  for (const auto& s : segments) out.append(py::make_tuple(s.source, s.src_offset, s.dst_tensor, s.dst_offset, s.length));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hybrid_engine compiled extension";

  static py::exception<hybrid_engine::OutOfBlocks> out_of_blocks(m, "OutOfBlocksError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const hybrid_engine::OutOfBlocks& e) {
      py::set_error(out_of_blocks, e.what());
    } catch (const hybrid_engine::UnknownSequence& e) {
      py::set_error(PyExc_KeyError, e.what());
    }
  });

  m.def("cpu_isa_variants_run", [] {
    const int mask = hybrid_engine::cpu::isa_variants_run().load();
    const char* isa_names[] = {"baseline", "avx2", "avx512"};  // in the order of hybrid_engine::cpu::Isa
    std::vector<std::string> names;
    for (int isa = 0; isa < 3; ++isa) {
      if (mask & (1 << isa)) names.push_back(isa_names[isa]);
    }
    return names;
  }, "Instruction-set variants (baseline, avx2, avx512) that the CPU kernels have run in this process.");
  m.def("install_cpu_cache", &hybrid_engine::install_cpu_cache, py::arg("headroom"),
        "Puts hybrid_engine's cache of large blocks in front of PyTorch's CPU allocator (see csrc/cpu_cache.h).");
  m.def("hand_back_frees", &hybrid_engine::hand_back_frees, py::arg("on"),
        "While on, CPU blocks freed go back to the system instead of the cache.");
  m.def("cpu_cache_installed", &hybrid_engine::cpu_cache_installed);
  m.def("limit_cpu_cache", &hybrid_engine::limit_cpu_cache, py::arg("max_cached_bytes"),
        "Bounds the bytes the installed CPU cache keeps; beyond them, freed blocks go back to the system.");
  m.def("reserve_free_memory", &hybrid_engine::reserve_free_memory, py::arg("bytes"),
        "The machine's available memory (MemAvailable) below which a request the CPU cache cannot serve first "
        "hands every cached block back (default: 1/16 of the machine's memory).");
  m.def("empty_cpu_cache", &hybrid_engine::empty_cpu_cache, "Frees the cached CPU blocks; a new peak window.");
  m.def("cpu_cache_stats", [] {
    const hybrid_engine::CpuCacheStats s = hybrid_engine::cpu_cache_stats();
    return py::dict(py::arg("live_bytes") = s.live_bytes, py::arg("cached_bytes") = s.cached_bytes,
                    py::arg("peak_live_bytes") = s.peak_live_bytes, py::arg("hits") = s.hits, py::arg("misses") = s.misses,
                    py::arg("system_bytes") = s.system_bytes, py::arg("evicted_bytes") = s.evicted_bytes,
                    py::arg("pressure_evictions") = s.pressure_evictions);
  }, "Bytes live, cached and at peak, and requests served by the cache (hits) or the system (misses).");
  m.def("set_cpu_spin_microseconds", &hybrid_engine::cpu::set_spin_microseconds, py::arg("microseconds"),
        "How long the CPU kernels' worker threads spin for their next job before they sleep (0: sleep at once).");
  m.def("cpu_spin_microseconds", &hybrid_engine::cpu::spin_microseconds);
  m.def("cpu_parallel_for_chunks", &hybrid_engine::cpu::parallel_for_chunks, py::arg("n"), py::arg("grain"),
        py::arg("fail_at") = -1,
        "For tests: the (begin, end, thread) of each chunk the CPU kernels' parallel_for runs for [0, n), thread 0 "
        "being the caller; the chunk holding index fail_at raises.");
  m.def("packed_linear_supported", [](bool bf16) {
    return hybrid_engine::cpu::packed_linear_supported(bf16 ? at::kBFloat16 : at::kFloat);
  }, py::arg("bf16"), "Whether this CPU has a packed_linear kernel for bfloat16 (else float32) inputs.");

  py::class_<BlockAllocator>(m, "BlockAllocator", "Paged KV-cache block allocator (see hybrid_engine.BlockAllocator).")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("block_size", &BlockAllocator::block_size)
      .def_property_readonly("num_free_blocks", &BlockAllocator::num_free_blocks)
      .def("allocate", &BlockAllocator::allocate, py::arg("seq_id"), py::arg("num_tokens"),
           "Reserve ceil(num_tokens / block_size) blocks for a new sequence's first tokens.")
      .def("append", [](BlockAllocator& a, py::handle ids) { return a.append(seq_ids_from(ids)); }, py::arg("seq_ids"),
           "One new token per sequence: returns (slots int64 [n], copies int64 [k, 2] of (src, dst) blocks to copy first).")
      .def("fork", &BlockAllocator::fork, py::arg("parent_id"), py::arg("child_id"),
           "The child shares all of the parent's blocks (reference counted, copy-on-write).")
      .def("free", &BlockAllocator::free, py::arg("seq_id"), "Give the sequence's blocks back.")
      .def("num_tokens", &BlockAllocator::num_tokens, py::arg("seq_id"))
      .def("block_table", [](const BlockAllocator& a, py::handle ids) { return a.block_table(seq_ids_from(ids)); }, py::arg("seq_ids"),
           "int32 [n, max blocks among them], padded with -1.")
      .def("ref_count", &BlockAllocator::ref_count, py::arg("block"), "How many sequences hold this block.");

  py::class_<ReshardPlan>(m, "ReshardPlan",
                          "Copy plan of one rank from the ZeRO-3 layout to tensor-parallel slices (see hybrid_engine.reshard).")
      .def(py::init(&make_plan), py::arg("sources"), py::arg("world_size"), py::arg("tp_size"), py::arg("rank"),
           "sources: list of (rows, cols, split, dst_tensor, dst_row[, row_begin, row_end]), split in "
           "{'replicated', 'column', 'row'}; the row range (of the rank's slice) defaults to all of it.")
      .def("send_counts", &ReshardPlan::send_counts, "int64 [world_size]: elements this rank sends to each peer.")
      .def("recv_counts", &ReshardPlan::recv_counts, "int64 [world_size]: elements this rank receives from each peer.")
      .def("shard_numel", &ReshardPlan::shard_numel, py::arg("source"))
      .def("sends", [](const ReshardPlan& p, int64_t peer) { return segment_tuples(p.sends(peer)); }, py::arg("peer"),
           "(source, src_offset, dst_tensor, dst_offset, length) segments sent to peer, in wire order.")
      .def("recvs", [](const ReshardPlan& p, int64_t peer) { return segment_tuples(p.recvs(peer)); }, py::arg("peer"))
      .def("local", [](const ReshardPlan& p) { return segment_tuples(p.local()); })
      .def("pack", &ReshardPlan::pack, py::arg("shards"), py::arg("send"),
           "Copy the segments for every peer out of this rank's shards into send, peers in rank order.")
      .def("unpack", &ReshardPlan::unpack, py::arg("recv"), py::arg("dsts"),
           "Copy received segments into the inference tensors, converting dtype.")
      .def("copy_local", &ReshardPlan::copy_local, py::arg("shards"), py::arg("dsts"),
           "Copy the segments this rank holds and needs itself.");
}

// Tensor ops: schemas (the contract hybrid_engine.kernels dispatches to) and their CPU kernels.
TORCH_LIBRARY(hybrid_engine, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale, int window=0) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, bool causal, float scale, "
        "int window=0) -> Tensor");
  m.def("add_norm(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps, bool rms) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed, int out_features, Tensor? bias, bool relu) -> Tensor");
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(hybrid_engine, CPU, m) {
  m.impl("decode_attention", &hybrid_engine::cpu::decode_attention);
  m.impl("prefill_attention", &hybrid_engine::cpu::prefill_attention);
  m.impl("add_norm", &hybrid_engine::cpu::add_norm);
  m.impl("silu_and_mul", &hybrid_engine::cpu::silu_and_mul);
  m.impl("pack_linear_weight", &hybrid_engine::cpu::pack_linear_weight);
  m.impl("packed_linear", &hybrid_engine::cpu::packed_linear);
  m.impl("write_kv", &hybrid_engine::cpu::write_kv);
}
