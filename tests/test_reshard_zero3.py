"""Resharding under real DeepSpeed ZeRO-3 on 2 and 4 CPU ranks (gloo), against GatheredParameters."""
import math

import pytest
import torch
import transformers

from hybrid_engine.models import from_hf
from hybrid_engine.models.registry import empty_model, weight_map
from hybrid_engine.reshard import Resharder, new_tp_group
from bench.launch import run_ranks

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
         "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}


def small_hf_model(family: str) -> transformers.PreTrainedModel:
    """Odd sizes on purpose: vocab and hidden are not multiples of the world size."""
    torch.manual_seed(0)
    if family == "opt":
        config = transformers.OPTConfig(vocab_size=251, hidden_size=70, num_hidden_layers=2, ffn_dim=138,
                                        num_attention_heads=2, max_position_embeddings=64)
        return transformers.OPTForCausalLM(config)
    config = transformers.LlamaConfig(vocab_size=257, hidden_size=40, intermediate_size=94, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def tp_slice(full: torch.Tensor, split: str, tp_rank: int, tp: int) -> torch.Tensor:
    return {"replicated": full, "column": full.chunk(tp, 0)[tp_rank],
            "row": full.chunk(tp, -1)[tp_rank] if full.dim() > 1 else full}[split]


def padded_slice(full: torch.Tensor, source, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's slice, NaN (as the targets start) in the rows a padded vocabulary slice lacks."""
    piece = tp_slice(full, source.split, tp_rank, tp)
    padding = torch.full((source.shard_shape(tp)[0] - piece.shape[0],) + piece.shape[1:], float("nan"))
    return torch.cat([piece, padding])


def analytic_minimum(wmap, world: int, rank: int, tp: int, element_size: int) -> int:
    """Elements of this rank's TP slices that lie outside its own ZeRO-3 range, in bytes."""
    total = 0
    for sources in wmap.values():
        for s in sources:
            numel = math.prod(s.shape)
            c = -(-numel // world)
            index = tp_slice(torch.arange(numel).view(s.shape), s.split, rank % tp, tp).flatten()
            total += int(((index < rank * c) | (index >= (rank + 1) * c)).sum())
    return total * element_size


def zero3_worker(rank: int, world: int, family: str, tp: int, dtype: torch.dtype, backend: str) -> dict:
    import deepspeed

    from hybrid_engine import kernels

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    hf = small_hf_model(family)
    engine, *_ = deepspeed.initialize(model=hf, config=ZERO3, model_parameters=hf.parameters())
    config, wmap = hf.config, weight_map(hf.config)
    model = empty_model(config, rank % tp, tp, new_tp_group(tp), dtype)
    targets = dict(model.named_buffers())
    resharder = Resharder(engine.module, wmap, tp_rank=rank % tp, tp_size=tp, bucket_bytes=8 << 10)
    for target in targets.values():
        target.fill_(float("nan"))
    with kernels.use_backend(backend):  # "triton": the GPU executor, through the interpreter
        first = resharder.reshard(targets).bytes_received
        second = resharder.reshard(targets).bytes_received
    params = dict(engine.module.named_parameters(remove_duplicate=False))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        full = {name: p.detach().clone() for name, p in params.items()}
    mismatched = [name for name, sources in wmap.items()
                  if not torch.allclose(targets[name], torch.cat([padded_slice(full[s.name], s, rank % tp, tp)
                                                                  for s in sources]).to(dtype),
                                        rtol=0, atol=0, equal_nan=True)]
    element_size = min(torch.finfo(dtype).bits, 32) // 8
    return {"mismatched": mismatched, "received": (first, second), "buckets": resharder.stats.buckets,
            "peak_buffer_bytes": resharder.stats.peak_buffer_bytes, "largest_source_bytes": max(
                math.prod(s.shape) * 4 for sources in wmap.values() for s in sources),
            "minimum": analytic_minimum(wmap, world, rank, tp, element_size)}


@pytest.mark.parametrize("family, world, tp, dtype, backend", [
    ("opt", 2, 2, torch.float32, "auto"), ("opt", 2, 1, torch.bfloat16, "auto"), ("llama", 2, 2, torch.bfloat16, "auto"),
    ("llama", 4, 2, torch.float32, "auto"), ("opt", 2, 2, torch.float32, "triton"),
])
def test_zero3_reshard_equals_gathered_slices(family, world, tp, dtype, backend):
    for rank, r in enumerate(run_ranks(world, zero3_worker, family, tp, dtype, backend)):
        assert r["mismatched"] == [], f"rank {rank}"
        assert r["buckets"] > 1
        # Send + receive buffers of one 8 KiB bucket, though the largest tensor is several times that.
        assert r["largest_source_bytes"] > 4 * (8 << 10) and r["peak_buffer_bytes"] <= 2 * (8 << 10)
        assert r["received"] == (r["minimum"], r["minimum"]), f"rank {rank}"


def tp2_formula(wmap) -> tuple[int, int, int]:
    """World 2, tp 2, elements a rank receives, from the shapes alone: ZeRO-3 gives each rank the
    half of every flattened tensor that a column-parallel slice is, so it receives nothing of the
    column-parallel ones, a quarter of each row-parallel weight (half of each row, half of those
    rows held), the other half of each replicated tensor. Returns (that sum, slack: an element of
    each tensor for rounding and a row of each row-parallel or padded one, where a shard boundary
    may cut a row, the vocabulary tables' half that every rank received while they were replicated)."""
    share = {"column": 0, "row": 1 / 4, "replicated": 1 / 2}
    sources = [s for entry in wmap.values() for s in entry]
    expected = sum(math.prod(s.shape) * share[s.split] for s in sources)
    slack = sum(math.prod(s.shape[1:]) if s.padded or s.split == "row" else 1 for s in sources)
    return round(expected), slack, sum(math.prod(s.shape) // 2 for s in sources if s.padded)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_tp2_reshard_receives_no_vocabulary_rows(family):
    """Vocabulary-parallel embeddings and LM heads (OPT tied, vocab 251; LLaMA untied, vocab 257):
    received bytes per rank = the formula of tp2_formula within its slack, where replicated tables
    added half of each table to every rank."""
    wmap = weight_map(small_hf_model(family).config)
    expected, slack, vocab_half = tp2_formula(wmap)
    assert vocab_half > 10 * slack, "the test cannot tell sharded tables from replicated ones"
    for rank, r in enumerate(run_ranks(2, zero3_worker, family, 2, torch.float32, "auto")):
        assert abs(r["received"][0] - 4 * expected) <= 4 * slack, f"rank {rank}: {r['received'][0]} bytes"


@pytest.mark.parametrize("tp", [1, 2])
def test_whole_weights_are_sliced_locally(tp):
    hf = small_hf_model("opt")
    for tp_rank in range(tp):
        model = empty_model(hf.config, tp_rank, tp, None, torch.float32)
        targets = dict(model.named_buffers())
        stats = Resharder(hf, weight_map(hf.config), tp_rank=tp_rank, tp_size=tp).reshard(targets)
        expected = dict(from_hf(hf, tp_rank=tp_rank, tp_size=tp).named_buffers())
        assert stats.bytes_received == 0
        assert all(torch.equal(targets[n], expected[n]) for n in expected)


def test_missing_parameter_is_a_clear_error():
    hf = small_hf_model("opt")
    wmap = weight_map(hf.config)
    name = next(iter(wmap))
    broken = {**wmap, name: [type(s)(s.name + ".missing", s.shape, s.split) for s in wmap[name]]}

    class FakeZero3(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(2))
            self.w.ds_tensor = self.w.data

    with pytest.raises(ValueError, match="has no parameter"):
        Resharder(FakeZero3(), broken, tp_rank=0, tp_size=1)
