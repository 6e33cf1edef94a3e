"""The generation loop against transformers' generate on tiny random models: greedy token equality,
EOS and padding layout, forks, preemption under a KV budget, sampling, bad inputs."""
import pytest
import torch
from test_models import CONFIGS, VOCAB, hf_model, hf_logits, ragged_prompts
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import hybrid_engine
from hybrid_engine import Generator, from_hf
from hybrid_engine.kernels import reference
from hybrid_engine.models import load_weights, prepack, weight_map
from hybrid_engine.sampling import filter_logits

PAD = 1
LENGTHS, WIDTH = [7, 13, 2, 10], 13


def hf_greedy(hf, ids, mask, new_tokens: int, eos, min_new_tokens: int = 0) -> torch.Tensor:
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                      min_new_tokens=min_new_tokens, eos_token_id=eos, pad_token_id=PAD)
    # transformers stops when every row is done; ours always has max_new_tokens columns.
    return torch.nn.functional.pad(out, (0, ids.shape[1] + new_tokens - out.shape[1]), value=PAD)


@pytest.mark.any_device
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_hf_on_ragged_prompts(name):
    hf = hf_model(name)
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    out = hybrid_engine.generate(hf, ids, mask, max_new_tokens=20, min_new_tokens=20, eos_token_id=2,
                                 pad_token_id=PAD)
    expected = hf_greedy(hf, ids, mask, 20, eos=2, min_new_tokens=20)
    assert torch.equal(out.sequences, expected)
    assert torch.equal(out.generated_lengths, torch.full((len(LENGTHS),), 20))
    assert torch.equal(out.attention_mask, torch.cat([mask, torch.ones(len(LENGTHS), 20, dtype=mask.dtype)], 1))


def eos_emitted_midway(sequences: torch.Tensor, width: int) -> int:
    """A token greedy decoding emits in row 0 around step 4 but not before: a mid-sequence EOS."""
    new = sequences[0, width:].tolist()
    return next(t for i, t in enumerate(new) if i >= 3 and t not in new[:i])


@pytest.mark.any_device
@pytest.mark.parametrize("name", ["opt_post", "llama_gqa"])
def test_eos_midway_pads_like_hf(name):
    hf = hf_model(name)
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    free_run = hybrid_engine.generate(hf, ids, mask, max_new_tokens=16, eos_token_id=[], pad_token_id=PAD)
    eos = [eos_emitted_midway(free_run.sequences, WIDTH), 2]
    out = hybrid_engine.generate(hf, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD)
    expected = hf_greedy(hf, ids, mask, 16, eos=eos)
    assert torch.equal(out.sequences, expected)
    lengths = out.generated_lengths
    assert 4 <= lengths[0] < 16
    new_mask = out.attention_mask[:, WIDTH:]
    assert torch.equal(new_mask.sum(1), lengths)
    assert bool((out.sequences[:, WIDTH:][new_mask == 0] == PAD).all())


def test_min_new_tokens_holds_back_eos():
    hf = hf_model("llama_tied")
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    free_run = hybrid_engine.generate(hf, ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD)
    eos = free_run.sequences[0, WIDTH + 1].item()
    out = hybrid_engine.generate(hf, ids, mask, max_new_tokens=12, min_new_tokens=5, eos_token_id=eos,
                                 pad_token_id=PAD)
    assert torch.equal(out.sequences, hf_greedy(hf, ids, mask, 12, eos=eos, min_new_tokens=5))
    assert bool((out.generated_lengths >= 5).all())


def test_eos_before_and_after_min_new_tokens_per_row():
    """EOS is the greedy choice of some rows before min_new_tokens (held back) and of others after
    it (they stop early), with prompts of different lengths: token for token as HF."""
    hf = hf_model("opt_post")
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    free_run = hybrid_engine.generate(hf, ids, mask, max_new_tokens=14, eos_token_id=[], pad_token_id=PAD)
    new = free_run.sequences[:, WIDTH:]
    # Rows 0 and 2 would emit EOS at steps 1 and 2 (before the minimum of 4); rows 1 and 3 at 6 and 9.
    eos = sorted({int(new[0, 1]), int(new[1, 6]), int(new[2, 2]), int(new[3, 9])} - {PAD})
    out = hybrid_engine.generate(hf, ids, mask, max_new_tokens=14, min_new_tokens=4, eos_token_id=eos,
                                 pad_token_id=PAD)
    assert torch.equal(out.sequences, hf_greedy(hf, ids, mask, 14, eos=eos, min_new_tokens=4))
    lengths = out.generated_lengths
    assert bool((lengths >= 4).all())
    assert int((lengths < 14).sum()) >= 2, "EOS after min_new_tokens never won: nothing tested"
    ended = out.sequences[torch.arange(len(lengths)), WIDTH + lengths - 1]
    assert all(int(t) in eos for t, n in zip(ended, lengths) if n < 14)


@pytest.mark.any_device
def test_num_return_sequences_greedy_equals_repeated_prompts():
    hf = hf_model("opt_pre")
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    generator = Generator(hf, block_size=4)
    forked = generator.generate(ids, mask, max_new_tokens=10, num_return_sequences=3, eos_token_id=2,
                                pad_token_id=PAD)
    repeated = generator.generate(ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), max_new_tokens=10,
                                  eos_token_id=2, pad_token_id=PAD)
    assert torch.equal(forked.sequences, repeated.sequences)


def test_forked_samples_share_the_prompt_blocks():
    """G samples of a 10-token prompt in blocks of 4: the 2 full prompt blocks are held once, the
    partial third is copied on write per sample; G separate copies would hold every block G times."""
    hf = hf_model("opt_pre")
    ids, mask = ragged_prompts([10], 10, pad=PAD)
    generator = Generator(hf, block_size=4)
    g, new_tokens = 4, 3  # contexts reach 10 + 3 - 1 = 12 tokens: 3 blocks per sample
    generator.generate(ids, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_return_sequences=g,
                       do_sample=True, seed=0)
    assert generator.stats["peak_blocks"] == 2 + g and generator.stats["prompt_blocks_shared"] == 2 * (g - 1)
    generator.generate(ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=True, seed=0)
    assert generator.stats["peak_blocks"] == 3 * g and generator.stats["prompt_blocks_shared"] == 0


def test_forked_samples_follow_their_own_prefix():
    """Samples forked from one prompt (whose last block is shared, then copied on write) each pick
    tokens among the top 2 of the HF model run on that sample's own full sequence."""
    hf = hf_model("llama_gqa")
    ids, mask = ragged_prompts([6, 9], 9, pad=PAD)  # not multiples of the block size
    out = Generator(hf, block_size=4).generate(ids, mask, max_new_tokens=8, do_sample=True, top_k=2,
                                               num_return_sequences=4, eos_token_id=[], seed=3)
    rows = out.sequences
    assert len({tuple(r) for r in rows[:4].tolist()}) > 1, "samples did not diverge: nothing tested"
    logits = hf(input_ids=rows, attention_mask=out.attention_mask).logits
    top2 = logits[:, 9 - 1:-1].topk(2, dim=-1).indices
    assert bool((top2 == rows[:, 9:, None]).any(-1).all())


@pytest.mark.any_device
def test_tiny_kv_budget_preempts_and_matches_unconstrained():
    hf = hf_model("opt_post")
    ids, mask = ragged_prompts(LENGTHS * 2, WIDTH, pad=PAD)
    options = dict(max_new_tokens=18, min_new_tokens=18, eos_token_id=2, pad_token_id=PAD)
    free = Generator(hf, block_size=4).generate(ids, mask, **options)
    model = from_hf(hf)
    block_bytes = hybrid_engine.PagedKVCache.block_bytes(model, 4)
    tight = Generator(model, kv_cache_bytes=14 * block_bytes, block_size=4)  # one sequence needs 8 blocks
    out = tight.generate(ids, mask, **options)
    assert tight.stats["preemptions"] > 0
    assert torch.equal(out.sequences, free.sequences)
    assert tight.cache.allocator.num_free_blocks == tight.cache.num_blocks


def logprobs_of_rows(hf, out) -> torch.Tensor:
    """log p of each generated token by a transformers forward of its row without padding; 0 after its end."""
    expected = torch.zeros(out.logprobs.shape)
    with torch.no_grad():
        rows = zip(out.sequences, out.attention_mask.bool(), out.generated_lengths.tolist())
        for b, (row, mask, n) in enumerate(rows):
            real = row[mask]
            logp = hf(real[None]).logits[0].float().log_softmax(-1)
            expected[b, :n] = logp[len(real) - n - 1:-1].gather(1, real[-n:, None])[:, 0]
    return expected


@pytest.mark.parametrize("name", ["opt_post", "llama_gqa"])
def test_logprobs_as_sampled_equal_a_forward_of_each_row(name):
    """return_logprobs: each token's log p under the model's own logits (not under the temperature / top-p
    distribution it was drawn from), through forks, EOS, min_new_tokens and preemption by a tight KV budget."""
    hf = hf_model(name)
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    model = from_hf(hf)
    options = dict(max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9, num_return_sequences=2,
                   pad_token_id=PAD, seed=5)
    free_run = Generator(model, block_size=4).generate(ids, mask, eos_token_id=[], **options)
    eos = free_run.sequences[:, WIDTH + 2:].flatten().bincount().topk(3).indices.tolist()  # tokens it samples often
    tight = Generator(model, kv_cache_bytes=6 * hybrid_engine.PagedKVCache.block_bytes(model, 4), block_size=4)
    out = tight.generate(ids, mask, eos_token_id=eos, min_new_tokens=2, return_logprobs=True, **options)
    assert tight.stats["preemptions"] > 0 and bool((out.generated_lengths < 12).any())
    torch.testing.assert_close(out.logprobs, logprobs_of_rows(hf, out), atol=2e-5, rtol=1e-5)
    assert bool((out.logprobs[:, :2] < 0).all())  # min_new_tokens: the first two tokens are never EOS, all scored
    assert free_run.logprobs is None


def test_sequence_larger_than_budget_fails_before_work():
    model = from_hf(hf_model("opt_pre"))
    generator = Generator(model, kv_cache_bytes=3 * hybrid_engine.PagedKVCache.block_bytes(model, 4), block_size=4)
    ids, mask = ragged_prompts([10], 10)
    with pytest.raises(ValueError, match="KV cache budget holds 3 blocks.*needs 5"):
        generator.generate(ids, mask, max_new_tokens=10)


def test_generator_reuses_its_cache():
    generator = Generator(hf_model("llama_tied"))
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    first = generator.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    cache = generator.cache
    second = generator.generate(ids[:2], mask[:2], max_new_tokens=6, eos_token_id=[])
    assert generator.cache is cache
    assert torch.equal(second.sequences, first.sequences[:2])
    generator.free_cache()
    third = generator.generate(ids[:2], mask[:2], max_new_tokens=6, eos_token_id=[])
    assert torch.equal(third.sequences, first.sequences[:2])


@pytest.mark.any_device
def test_sampling_reproducible_with_seed_and_generator():
    hf = hf_model("opt_proj")
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    generator = Generator(hf)
    options = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.9, eos_token_id=[])
    a = generator.generate(ids, mask, seed=7, **options).sequences
    b = generator.generate(ids, mask, generator=torch.Generator(ids.device).manual_seed(7), **options).sequences
    c = generator.generate(ids, mask, seed=8, **options).sequences
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a trainer's host generator drives a model on any device: it seeds one there and advances
    host = [torch.Generator().manual_seed(3) for _ in range(2)]
    d, e = (generator.generate(ids, mask, generator=g, **options).sequences for g in host)
    assert torch.equal(d, e)
    assert not torch.equal(generator.generate(ids, mask, generator=host[0], **options).sequences, d)


def test_bf16_greedy_follows_hf_bf16_for_a_few_tokens():
    """bf16 rounding differs between implementations, so only the first tokens must agree."""
    hf = hf_model("llama_gqa")
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    out = hybrid_engine.generate(from_hf(hf, dtype=torch.bfloat16), ids, mask, max_new_tokens=3, eos_token_id=[])
    expected = hf_greedy(hf.to(torch.bfloat16), ids, mask, 3, eos=None)
    assert torch.equal(out.sequences[:, :WIDTH], expected[:, :WIDTH])
    assert (out.sequences[:, WIDTH:] == expected[:, WIDTH:]).float().mean() >= 0.9


def fixed_logits_model(logits: torch.Tensor):
    """A LLaMA whose next-token logits are `logits` [V] whatever the prompt: attention and MLP
    outputs are zeroed and every token embeds alike, so the last hidden state is one constant h,
    and the LM head maps h to the logits."""
    hf = hf_model("llama_gqa")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf.model.embed_tokens.weight.copy_(hf.model.embed_tokens.weight[5].expand_as(hf.model.embed_tokens.weight))
        h = hf.model(input_ids=torch.tensor([[5]])).last_hidden_state[0, -1]
        hf.lm_head.weight.copy_(torch.outer(logits, h) / h.dot(h))
    return hf


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probs, tokens expecting fewer than 5 draws pooled in one bin."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), statistic / 2))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.6, 0, 0.8), (1.7, 0, 1.0), (1.3, 12, 0.95)])
def test_sampled_tokens_follow_temperature_and_top_p(temperature, top_k, top_p):
    """Generator.generate's sampled tokens, on a model with fixed next-token logits, against the
    distribution HF's warpers define: none outside the kept support, and counts that pass a
    chi-square test at p = 1e-4 (the false-failure rate of a random seed; the seed is fixed, so the
    test is deterministic). 2240 draws tell temperature 1 from 0.6 or 1.7 with p far below 1e-4."""
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(11)) * 2
    hf = fixed_logits_model(logits)
    ids, mask = ragged_prompts([3, 6, 1, 5], 6, pad=PAD)
    out = Generator(hf).generate(ids, mask, max_new_tokens=35, do_sample=True, temperature=temperature,
                                 top_k=top_k, top_p=top_p, num_return_sequences=16, eos_token_id=[], seed=5)
    with torch.no_grad():
        model_logits = hf(input_ids=ids[:1, -1:]).logits[0, -1:]
    scores = model_logits / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)[0]
    counts = torch.bincount(out.sequences[:, 6:].flatten(), minlength=VOCAB)
    assert int(counts[scores == float("-inf")].sum()) == 0, "sampled a token that top-k/top-p filters out"
    assert chi_square_p_value(counts, scores.softmax(-1)) > 1e-4


def tied_rows(first: int, size: int, rows: int = 4, seed: int = 0) -> torch.Tensor:
    """[rows, VOCAB] logits: one random row whose tokens ranked first..first+size-1 (0: the top) are
    tied, and shuffles of it (the tied group sits at other positions in each row)."""
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(VOCAB, generator=g) * 2
    tied = row.argsort(descending=True)[first:first + size]
    row[tied] = row[tied[0]].item()
    return torch.stack([row] + [row[torch.randperm(VOCAB, generator=g)] for _ in range(rows - 1)])


def top_p_inside_tie(logits: torch.Tensor, first: int) -> float:
    """A top_p whose cut falls in the middle of the tied group that starts at rank `first`."""
    probs = logits[0].softmax(-1).sort(descending=True).values
    return float(probs[:first].sum() + 1.5 * probs[first])


@pytest.mark.parametrize("first,size,top_k,top_p_at_tie", [(3, 4, 5, False), (0, 3, 2, False), (4, 5, 0, True),
                                                           (2, 6, 5, True)])
def test_ties_at_the_top_k_and_top_p_cuts_kept_like_hf(first, size, top_k, top_p_at_tie):
    """A tied group straddling the k-th token (HF keeps all of it) or the top-p cut (HF keeps part)."""
    logits = tied_rows(first, size)
    after_top_k = TopKLogitsWarper(top_k)(None, logits.clone()) if top_k else logits.clone()
    if top_k:
        kept_by_k = torch.isfinite(after_top_k).sum(-1)
        assert bool((kept_by_k == max(top_k, first + size)).all()), "the tie was not at the k-th token"
    top_p = top_p_inside_tie(after_top_k, first) if top_p_at_tie else 1.0
    expected = TopPLogitsWarper(top_p)(None, after_top_k) if top_p < 1 else after_top_k
    kept = torch.isfinite(filter_logits(logits, top_k, top_p))
    assert torch.equal(kept, torch.isfinite(expected))
    if top_p_at_tie:
        tied_kept = kept.sum(-1) - first
        assert bool(((tied_kept > 0) & (tied_kept < size)).all()), "the cut was not inside the tie"


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (5, 1.0), (0, 0.5), (0, 0.93), (7, 0.8), (400, 0.3)])
def test_filtering_keeps_what_hf_warpers_keep(top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(6, VOCAB, generator=g) * 3
    logits[0, :20] = logits[0, 0]  # ties at the boundary
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(expected))
    assert torch.equal(ours[torch.isfinite(ours)], logits[torch.isfinite(ours)])


BAD_INPUTS = {
    "empty batch": (dict(input_ids=torch.zeros(0, 5, dtype=torch.long)), "input_ids"),
    "float ids": (dict(input_ids=torch.rand(2, 5)), "input_ids"),
    "mask shape": (dict(attention_mask=torch.ones(2, 4, dtype=torch.long)), "attention_mask"),
    "all padding row": (dict(attention_mask=torch.tensor([[0] * 5, [1] * 5])), "attention_mask"),
    "right padding": (dict(attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5])), "attention_mask"),
    "token id": (dict(input_ids=torch.tensor([[3, 4, 5, VOCAB, 6], [3] * 5])), "input_ids"),
    "negative token": (dict(input_ids=torch.tensor([[3, 4, 5, -1, 6], [3] * 5])), "input_ids"),
    "prompt too long": (dict(input_ids=torch.full((2, 81), 5), attention_mask=torch.ones(2, 81, dtype=torch.long)),
                        "input_ids"),
    "too many new tokens": (dict(max_new_tokens=76), "max_new_tokens"),
    "zero new tokens": (dict(max_new_tokens=0), "max_new_tokens"),
    "min above max": (dict(max_new_tokens=3, min_new_tokens=4), "min_new_tokens"),
    "top_p zero": (dict(do_sample=True, top_p=0.0), "top_p"),
    "top_p above one": (dict(do_sample=True, top_p=1.5), "top_p"),
    "temperature zero": (dict(do_sample=True, temperature=0.0), "temperature"),
    "negative top_k": (dict(do_sample=True, top_k=-1), "top_k"),
    "no samples": (dict(num_return_sequences=0), "num_return_sequences"),
    "eos out of vocab": (dict(eos_token_id=[2, VOCAB + 5]), "eos_token_id"),
}


@pytest.fixture(scope="module")
def small_generator():
    return Generator(hf_model("opt_pre"))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_it(case, small_generator):
    overrides, argument = BAD_INPUTS[case]
    kwargs = dict(input_ids=torch.full((2, 5), 5), attention_mask=torch.ones(2, 5, dtype=torch.long),
                  max_new_tokens=4)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=argument):
        small_generator.generate(**kwargs)
    assert small_generator.cache is None or \
        small_generator.cache.allocator.num_free_blocks == small_generator.cache.num_blocks


def test_prefill_logits_of_generate_match_hf_forward():
    """The first token comes from the packed prefill's last positions: same as HF's argmax."""
    hf = hf_model("opt_proj")
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    out = hybrid_engine.generate(hf, ids, mask, max_new_tokens=1, eos_token_id=[])
    last = hf_logits(hf, ids, mask)[mask.sum(1).cumsum(0) - 1]
    assert torch.equal(out.sequences[:, -1], last.argmax(-1))


def test_kv_cache_sized_from_bytes_or_fraction(monkeypatch):
    model = from_hf(hf_model("llama_gqa"))
    monkeypatch.setattr(hybrid_engine.kv_cache, "available_memory", lambda device: 10**7)
    block_bytes = hybrid_engine.PagedKVCache.block_bytes(model, 8)
    assert block_bytes == 2 * 2 * 8 * 2 * 16 * 4  # k and v, layers, block, kv heads, head_dim, fp32
    cache = hybrid_engine.PagedKVCache.for_model(model, memory_bytes=5 * block_bytes + 7, block_size=8)
    assert cache.num_blocks == 5 and tuple(cache.k.shape) == (2, 5, 8, 2, 16)
    assert Generator(model, kv_cache_fraction=0.5, block_size=8).cache.num_blocks == 10**7 // 2 // block_bytes
    with pytest.raises(ValueError, match="memory_fraction"):
        Generator(model, kv_cache_fraction=1.5)
    with pytest.raises(ValueError, match="holds no KV block"):
        Generator(model, kv_cache_bytes=block_bytes - 1, block_size=8)


def test_prepacked_weights_follow_in_place_updates():
    """The resharder rewrites weights in place between generate calls: the prepacked copies must
    never serve the old ones."""
    first, second = hf_model("opt_proj", seed=0), hf_model("opt_proj", seed=5)
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    options = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=PAD)
    model = from_hf(first)
    generator = Generator(model)
    assert model.packed_lm_head is not None
    assert torch.equal(generator.generate(ids, mask, **options).sequences, hf_greedy(first, ids, mask, 8, eos=None))
    with torch.no_grad():
        load_weights(model.state_dict(), weight_map(second.config), second.state_dict(), 0, 1)
    assert torch.equal(generator.generate(ids, mask, **options).sequences, hf_greedy(second, ids, mask, 8, eos=None))
    unpacked = Generator(model, prepack_weights=False).generate(ids, mask, **options)
    assert model.packed_lm_head is None
    assert torch.equal(unpacked.sequences, hf_greedy(second, ids, mask, 8, eos=None))


def test_prepacked_weights_follow_replaced_tensors():
    hf = hf_model("llama_gqa")
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    model = from_hf(hf)
    generator = Generator(model)
    before = generator.generate(ids, mask, max_new_tokens=6, eos_token_id=[]).sequences
    head = model.lm_head
    replacement = head.weight.flip(0).contiguous()
    with torch.no_grad():
        while replacement._version < head.weight._version:
            replacement.mul_(1)  # the same version number as the old tensor: only identity tells them apart
    head.weight = replacement
    after = generator.generate(ids, mask, max_new_tokens=6, eos_token_id=[]).sequences
    assert not torch.equal(after, before)
    assert torch.equal(after, Generator(model, prepack_weights=False).generate(ids, mask, max_new_tokens=6,
                                                                               eos_token_id=[]).sequences)


def test_packed_row_counts_are_bucketed_and_products_unchanged():
    """oneDNN keeps a primitive per row count: above 128 rows, counts are rounded up to at most 8 per
    doubling (48 from 129 to 8192) and by at most 12.5%; the padded product's rows are the product's."""
    buckets = [prepack.bucket_rows(m) for m in range(1, 8193)]
    assert buckets[:128] == list(range(1, 129))
    assert all(m <= b <= 1.125 * m for m, b in zip(range(1, 8193), buckets))
    assert buckets == sorted(buckets) and len(set(buckets[128:])) == 48
    if not prepack.available(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this CPU cannot pack bf16 weights")
    torch.manual_seed(0)
    x, weight, bias = torch.randn(301, 40), torch.randn(72, 40), torch.randn(72)
    packed = prepack.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), "relu", prepack.PackedWeight())
    exact = torch.relu(x.bfloat16().float() @ weight.bfloat16().float().T + bias.bfloat16().float())
    assert packed.shape == (301, 72) and packed.is_contiguous()
    torch.testing.assert_close(packed.float(), exact, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacking_follows_the_capability_probe(dtype):
    """Weights are prepacked exactly in the dtypes this CPU can pack: into panels for our kernel where
    it has one (fp32 with AVX2, bf16 with AVX-512 BF16 and no AMX), else oneDNN's layout where oneDNN
    can pack the dtype (bf16 cannot be on AVX2-only CPUs, where packing raised); generation runs
    either way."""
    hf = hf_model("opt_proj")
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    model = from_hf(hf, dtype=dtype)
    out = Generator(model).generate(ids, mask, max_new_tokens=3, eos_token_id=[], pad_token_id=PAD)
    cpu = torch.device("cpu")
    panels = hybrid_engine._C.packed_linear_supported(dtype == torch.bfloat16) and not (
        dtype == torch.bfloat16 and "amx_tile" in hybrid_engine.device_caps().features)
    assert prepack.panels_used(cpu, dtype) == panels
    assert (model.packed_lm_head is not None) == (panels or hybrid_engine.device_caps().can_prepack(dtype))
    if model.packed_lm_head is not None:
        assert model.packed_lm_head.tensor is not None  # packed on the first forward
        assert model.packed_lm_head.panels == panels
    assert torch.equal(out.sequences[:, :WIDTH], ids)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_of_every_activation_and_shape(activation, dtype):
    """prepack.linear through the packed weight (whichever layout this CPU uses) equals the plain
    product for every activation, rows of [..., K] inputs, and a weight refilled in place."""
    if not prepack.available(torch.device("cpu"), dtype):
        pytest.skip(f"this CPU cannot pack {dtype} weights")
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 40).to(dtype), torch.randn(35, 40).to(dtype), torch.randn(35).to(dtype)
    packed = prepack.PackedWeight()
    for _ in range(2):
        out = prepack.linear(x, weight, bias, activation, packed)
        exact = reference.linear_act(x, weight, bias, activation)
        assert out.shape == (2, 5, 35) and out.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), exact.float(), atol=tol * exact.float().abs().max().item(), rtol=tol)
        weight.copy_(torch.randn(35, 40))
