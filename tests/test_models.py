"""Inference models against transformers 5 on tiny random models: prefill logits, the weight map,
tensor-parallel slicing (two ranks simulated with threads), checkpoint loading, registry."""
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from hybrid_engine.generation import Generator
from hybrid_engine.kv_cache import PagedKVCache
from hybrid_engine.models import (AttentionBatch, TensorParallel, empty_model, from_hf, model_class, packed_shape,
                                  weight_map)
from hybrid_engine.models.layers import VocabParallelEmbedding

VOCAB = 311

# Odd sizes everywhere; init_std 0.3 so that greedy decoding does not just repeat one token.
CONFIGS = {
    "opt_pre": lambda: OPTConfig(hidden_size=72, num_attention_heads=4, ffn_dim=100, num_hidden_layers=2,
                                 vocab_size=VOCAB, max_position_embeddings=80, init_std=0.3),
    "opt_post": lambda: OPTConfig(hidden_size=72, num_attention_heads=4, ffn_dim=100, num_hidden_layers=3,
                                  vocab_size=VOCAB, max_position_embeddings=80, init_std=0.3,
                                  do_layer_norm_before=False),
    "opt_proj": lambda: OPTConfig(hidden_size=80, num_attention_heads=4, ffn_dim=96, num_hidden_layers=2,
                                  vocab_size=VOCAB, max_position_embeddings=80, init_std=0.3,
                                  do_layer_norm_before=False, word_embed_proj_dim=48),
    "llama_gqa": lambda: LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=88, num_hidden_layers=2, vocab_size=VOCAB,
                                     max_position_embeddings=80, initializer_range=0.3, tie_word_embeddings=False),
    "llama_tied": lambda: LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                      intermediate_size=88, num_hidden_layers=2, vocab_size=VOCAB,
                                      max_position_embeddings=80, initializer_range=0.3, tie_word_embeddings=True,
                                      attention_bias=True),
}
ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 20, "rope_theta": 10000.0},
}


def hf_model(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    cls = OPTForCausalLM if isinstance(config, OPTConfig) else LlamaForCausalLM
    return cls(config).eval()


def ragged_prompts(lengths: list[int], width: int, seed: int = 1, pad: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts (token ids from 3 up: 0-2 are OPT's specials)."""
    g = torch.Generator().manual_seed(seed)  # on the host: the same prompts on every --device
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=g, device="cpu").to(torch.get_default_device())
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad), mask


@torch.inference_mode()
def prefill_logits(model, prompts: list[torch.Tensor], block_size: int = 5) -> torch.Tensor:
    """Our logits for every token of the packed prompts [sum of lengths, V]."""
    lens = [len(p) for p in prompts]
    cache = PagedKVCache.for_model(model, num_blocks=sum(-(-n // block_size) for n in lens), block_size=block_size)
    slots, positions = [], []
    for seq, n in enumerate(lens):
        cache.allocator.allocate(seq, n)
        table = cache.allocator.block_table([seq])[0].long()
        pos = torch.arange(n)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        positions.append(pos)
    cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    batch = AttentionBatch(torch.cat(slots), cu_seqlens=cu_seqlens)
    hidden = model(torch.cat(prompts), torch.cat(positions), batch, cache.layers)
    return model.compute_logits(hidden).float()


def hf_logits(hf, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF logits of the real (unmasked) tokens of a left-padded batch, packed like ours."""
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits.float()[mask.bool()]


def check_prefill(hf, dtype, atol, rtol):
    ids, mask = ragged_prompts([11, 4, 17, 1], 17)
    model = from_hf(hf, dtype=dtype)
    ours = prefill_logits(model, [i[m.bool()] for i, m in zip(ids, mask)])
    torch.testing.assert_close(ours, hf_logits(hf, ids, mask), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_logits_match_hf_fp32(name):
    check_prefill(hf_model(name), torch.float32, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["opt_proj", "llama_gqa"])
def test_prefill_logits_bf16_as_close_as_hf_bf16(name):
    """bf16 tolerance is what bf16 costs HF itself: our error against the fp32 logits stays within
    1.5x of HF-in-bf16's error (max and mean)."""
    hf = hf_model(name)
    ids, mask = ragged_prompts([11, 4, 17, 1], 17)
    exact = hf_logits(hf, ids, mask)
    ours = prefill_logits(from_hf(hf, dtype=torch.bfloat16), [i[m.bool()] for i, m in zip(ids, mask)])
    theirs = hf_logits(hf.to(torch.bfloat16), ids, mask)
    ours_err, hf_err = (ours - exact).abs(), (theirs - exact).abs()
    assert ours_err.max() <= 1.5 * hf_err.max()
    assert ours_err.mean() <= 1.5 * hf_err.mean()


@pytest.mark.parametrize("rope", list(ROPE))
def test_rope_scaling_matches_hf(rope):
    check_prefill(hf_model("llama_gqa", rope_parameters=ROPE[rope]), torch.float32, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("rope", ["linear", "llama3", "yarn"])
def test_rope_scaling_past_the_original_positions_matches_hf(rope):
    """Prompts of 37 tokens, past every type's original_max_position_embeddings (12 to 20), where
    the scaled frequencies must differ from the unscaled ones, against transformers' model output."""
    params = {"original_max_position_embeddings": 12, **ROPE[rope]}
    hf, unscaled = hf_model("llama_gqa", rope_parameters=params), hf_model("llama_gqa")
    ids, mask = ragged_prompts([37, 30], 37, seed=4)
    expected = hf_logits(hf, ids, mask)
    assert not torch.allclose(expected, hf_logits(unscaled, ids, mask), atol=1e-2), "scaling had no effect"
    torch.testing.assert_close(prefill_logits(from_hf(hf), [i[m.bool()] for i, m in zip(ids, mask)]), expected,
                               atol=2e-4, rtol=1e-4)


def test_dynamic_rope_up_to_the_last_position_and_refused_past_it():
    """transformers rescales "dynamic" frequencies only for sequences longer than
    max_position_embeddings (its original length; original_max_position_embeddings is ignored):
    up to that length ours equals its model output, and the generator refuses anything longer
    rather than run with unscaled frequencies."""
    hf = hf_model("llama_gqa", rope_parameters={"original_max_position_embeddings": 12, **ROPE["dynamic"]},
                  max_position_embeddings=40)
    ids, mask = ragged_prompts([40, 23], 40, seed=4)
    model = from_hf(hf)
    torch.testing.assert_close(prefill_logits(model, [i[m.bool()] for i, m in zip(ids, mask)]),
                               hf_logits(hf, ids, mask), atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="max_new_tokens=1 after a prompt of 40 tokens exceeds the model's 40"):
        Generator(model).generate(ids, mask, max_new_tokens=1)


def test_unsupported_rope_type_raises():
    hf = hf_model("llama_gqa")
    hf.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="longrope.*supported: default, linear"):
        from_hf(hf)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weight_map_covers_model_and_checkpoint(name):
    hf = hf_model(name)
    wmap = weight_map(hf.config)
    model = empty_model(hf.config, tp_rank=1, tp_size=2, dtype=torch.bfloat16)
    assert set(wmap) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert tuple(tensor.shape) == packed_shape(wmap[name], 2) and tensor.dtype == torch.bfloat16
    hf_state = hf.state_dict()
    for sources in wmap.values():
        for source in sources:
            assert tuple(hf_state[source.name].shape) == source.shape


def test_packed_qkv_layout():
    """Rank j of 2 holds [q_j; k_j; v_j] with GQA sizes."""
    hf = hf_model("llama_gqa")
    attn = hf.model.layers[1].self_attn
    qkv = from_hf(hf, tp_rank=1, tp_size=2).state_dict()["layers.1.attn.qkv.weight"]
    q, kv = attn.q_proj.weight.shape[0] // 2, attn.k_proj.weight.shape[0] // 2
    torch.testing.assert_close(qkv, torch.cat([attn.q_proj.weight[q:], attn.k_proj.weight[kv:],
                                               attn.v_proj.weight[kv:]]), rtol=0, atol=0)


class ThreadGroup:
    """A stand-in process group: ranks are threads, collectives go through shared memory."""

    def __init__(self, size: int):
        self.size, self.barrier, self.parts = size, threading.Barrier(size, timeout=60), [None] * size

    def rank_handle(self, rank: int):
        return (self, rank)


def exchange(group, value):
    """Every rank's tensor (or object), in rank order."""
    shared, rank = group
    shared.parts[rank] = value.clone() if isinstance(value, torch.Tensor) else value
    shared.barrier.wait()
    parts = list(shared.parts)
    shared.barrier.wait()
    return parts


def thread_all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
    parts = exchange(group, tensor)
    if op == torch.distributed.ReduceOp.MAX:
        tensor.copy_(torch.stack(parts).amax(0))
    elif op == torch.distributed.ReduceOp.SUM:
        tensor.copy_(sum(parts))
    else:
        raise NotImplementedError(f"thread_all_reduce: {op}")


def thread_all_gather_object(object_list, obj, group=None):
    object_list[:] = exchange(group, obj)


def thread_all_gather(tensor_list, tensor, group=None, async_op=False):
    for out, part in zip(tensor_list, exchange(group, tensor)):
        out.copy_(part)


def on_threads(size: int, rank_main, monkeypatch) -> list:
    """rank_main(rank, group handle) on `size` threads whose collectives go through a ThreadGroup."""
    monkeypatch.setattr(torch.distributed, "all_reduce", thread_all_reduce)
    monkeypatch.setattr(torch.distributed, "all_gather", thread_all_gather)
    monkeypatch.setattr(torch.distributed, "all_gather_object", thread_all_gather_object)
    group, results = ThreadGroup(size), [None] * size

    def run(rank):
        results[rank] = rank_main(rank, group.rank_handle(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("name", ["opt_post", "llama_gqa", "llama_tied"])
def test_tensor_parallel_two_ranks_match_one(name, monkeypatch):
    """Each rank loads its slices through the weight map (the odd vocabulary of 311 padded to 312,
    tied and untied heads); with the row-parallel partial sums and the embedding lookups all-reduced
    and the logits gathered, both ranks' logits equal the unsliced model's."""
    hf = hf_model(name)
    ids, mask = ragged_prompts([9, 3, 14], 14)
    prompts = [i[m.bool()] for i, m in zip(ids, mask)]
    expected = prefill_logits(from_hf(hf), prompts)
    results = on_threads(2, lambda rank, group: prefill_logits(
        from_hf(hf, tp_rank=rank, tp_size=2, tp_group=group), prompts), monkeypatch)
    for logits in results:
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("vocab, tp", [(311, 2), (311, 3), (5, 4), (12, 3)])
def test_vocab_parallel_lookup_and_logits_equal_unsharded(vocab, tp, monkeypatch):
    """Random table, ids and hidden states: the masked lookup summed over the ranks equals
    F.embedding on the whole table, the gathered logits equal hidden @ table^T cut to the vocabulary,
    and the log-probabilities reduced over the ranks equal its log_softmax at random targets (5 ids
    over 4 ranks: the last rank holds no row at all, only padding, which must not enter the sum)."""
    torch.manual_seed(vocab + tp)
    dim = 24
    table = torch.randn(vocab, dim)
    ids, hidden, targets = torch.randint(0, vocab, (37,)), torch.randn(9, dim), torch.randint(0, vocab, (9,))
    rows = -(-vocab // tp)

    def rank_main(rank, group):
        factory = {"dtype": torch.float32, "device": "cpu"}
        layer = VocabParallelEmbedding(vocab, dim, TensorParallel(rank, tp, group), factory)
        piece = table[rank * rows:(rank + 1) * rows]
        layer.weight[:len(piece)] = piece
        return layer.weight.shape[0], layer(ids), layer.logits(hidden, None), layer.logprobs(hidden, targets, None)

    for shard_rows, embedded, logits, logprobs in on_threads(tp, rank_main, monkeypatch):
        assert shard_rows == rows
        torch.testing.assert_close(embedded, torch.nn.functional.embedding(ids, table), rtol=0, atol=0)
        torch.testing.assert_close(logits, hidden @ table.T, rtol=1e-5, atol=1e-5)
        expected = (hidden @ table.T).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_needs_divisible_heads():
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by tp_size=4"):
        from_hf(hf_model("llama_gqa"), tp_rank=0, tp_size=4)


def test_from_hf_on_saved_checkpoint(tmp_path):
    hf = hf_model("opt_proj")
    hf.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = ragged_prompts([6, 13], 13)
    ours = prefill_logits(from_hf(loaded), [i[m.bool()] for i, m in zip(ids, mask)])
    torch.testing.assert_close(ours, hf_logits(hf, ids, mask), atol=2e-4, rtol=1e-4)


def test_from_state_dict_and_config():
    hf = hf_model("llama_tied")
    model = from_hf(hf.state_dict(), hf.config, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.state_dict()["layers.0.mlp.up.weight"].dtype == torch.bfloat16


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(ValueError, match="GPT2Config.*supported: OPTConfig.*LlamaConfig"):
        model_class(GPT2Config())


def test_fp16_rejected_on_cpu():
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        from_hf(hf_model("opt_pre"), dtype=torch.float16)


def test_missing_checkpoint_tensor_is_named():
    hf = hf_model("opt_pre")
    state = dict(hf.state_dict())
    del state["model.decoder.layers.1.fc2.weight"]
    with pytest.raises(ValueError, match="layers.1.fc2.weight"):
        from_hf(state, hf.config)
