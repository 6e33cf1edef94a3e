"""HybridEngine under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), and on a plain module."""
import pytest
import torch
import transformers

import hybrid_engine
from hybrid_engine.engine import HybridEngine
from hybrid_engine.memory import cache_cpu_blocks, cpu_cache_stats, return_freed_memory, status_bytes
from bench.launch import run_ranks
from test_reshard_zero3 import ZERO3, small_hf_model


def ragged_prompts(seed: int, rows: int, vocab: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = 9
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for row in range(rows):
        pad_len = int(torch.randint(0, width - 1, (1,), generator=g))
        ids[row, :pad_len], mask[row, :pad_len] = pad, 0
    return ids, mask


def gathered_state(engine) -> dict[str, torch.Tensor]:
    """Full training weights (GatheredParameters is a no-op below ZeRO stage 3)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().clone() for n, p in params.items()}


def init_rank(rank: int, device: str) -> torch.device:
    """gloo on CPU ranks; NCCL with one GPU per rank and TF32 off (fp32 parity) on CUDA ranks."""
    import deepspeed

    if device == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", verbose=False)
    return torch.device(device, rank) if device == "cuda" else torch.device("cpu")


def engine_worker(rank: int, world: int, family: str, tp: int, stage: int, device: str = "cpu") -> dict:
    import deepspeed

    place = init_rank(rank, device)
    plain = small_hf_model(family).eval().to(place)  # same seed on every rank: the un-partitioned twin of the actor
    actor = small_hf_model(family).to(place)
    config = {**ZERO3, "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=actor, config=config, model_parameters=actor.parameters())
    he = HybridEngine(engine, tp_size=tp, dtype=torch.float32, report=False)
    pad = plain.config.pad_token_id or 0
    ids, mask = (t.to(place) for t in ragged_prompts(100 + rank, 2 + rank, plain.config.vocab_size, pad))
    options = dict(max_new_tokens=6, min_new_tokens=6, eos_token_id=[], pad_token_id=pad)
    before = gathered_state(engine)
    ours = he.generate(ids, mask, **options, return_logprobs=True)
    expected_logprobs = unpadded_logprobs(plain, ours.sequences, ours.attention_mask, 6)
    unchanged = all(torch.equal(before[n], t) for n, t in gathered_state(engine).items())
    expected_hf = plain.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    expected_single = hybrid_engine.generate(plain, ids, mask, **options).sequences

    loss = engine(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    engine.backward(loss)
    engine.step()
    trained = gathered_state(engine)
    changed = any(not torch.equal(before[n], trained[n]) for n in before)
    plain.load_state_dict(trained, strict=False)
    after_step = he.generate(ids, mask, **options).sequences
    expected_after = hybrid_engine.generate(plain, ids, mask, **options).sequences
    return {"ours": ours.sequences.cpu(), "hf": expected_hf.cpu(), "single": expected_single.cpu(),
            "unchanged": unchanged, "changed": changed, "after_step": after_step.cpu(),
            "expected_after": expected_after.cpu(), "mask_ok": torch.equal(ours.attention_mask[:, :ids.shape[1]], mask),
            "eval_after": he.is_eval, "device": str(he.device), "logprobs": ours.logprobs.cpu(),
            "expected_logprobs": expected_logprobs.cpu()}


def unpadded_logprobs(model, seq: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """log p of each row's last `width` tokens by a transformers forward of the row without its padding."""
    rows = []
    with torch.no_grad():
        for tokens, row_mask in zip(seq, mask.bool()):
            real = tokens[row_mask][None]
            logp = model(real).logits[0, -width - 1:-1].float().log_softmax(-1)
            rows.append(logp.gather(1, real[0, -width:, None])[:, 0])
    return torch.stack(rows)


@pytest.mark.parametrize("family, tp, stage", [("opt", 2, 3), ("opt", 1, 3), ("llama", 2, 3), ("llama", 1, 3),
                                               ("opt", 2, 2)])
def test_greedy_generation_matches_single_process_and_transformers(family, tp, stage):
    """OPT (tied, vocabulary 251) and LLaMA (untied, 257): at tp 2 both tables are split into
    vocabulary slices padded to 126 and 129 rows."""
    check_engine_results(run_ranks(2, engine_worker, family, tp, stage))


def check_engine_results(results: list[dict]) -> None:
    for rank, r in enumerate(results):
        assert r["ours"].shape == (2 + rank, 9 + 6)
        assert torch.equal(r["ours"], r["single"]), f"rank {rank}"
        assert torch.equal(r["ours"], r["hf"]), f"rank {rank}"
        assert r["mask_ok"] and not r["eval_after"]
        assert r["unchanged"], "generate changed the training weights"
        assert r["changed"], "the training step did not change the weights"
        assert torch.equal(r["after_step"], r["expected_after"]), "the second generate did not use the new weights"
        # each token's log p as generated (tp 2: the TP group's union batch, this rank's rows kept)
        torch.testing.assert_close(r["logprobs"], r["expected_logprobs"], atol=2e-5, rtol=1e-5)


def misuse_worker(rank: int, world: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    actor = small_hf_model("opt")
    three_heads = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=50, hidden_size=36, num_hidden_layers=1, ffn_dim=40, num_attention_heads=3))
    errors = {}
    for name, model, tp in (("world", actor, 3), ("heads", three_heads, 2)):
        try:
            HybridEngine(model, tp_size=tp)
        except ValueError as e:
            errors[name] = str(e)
    he = HybridEngine(actor, tp_size=2, report=False)
    ids, mask = ragged_prompts(rank, 2, actor.config.vocab_size, 1)
    try:
        he.generate(ids, mask, max_new_tokens=3 + rank)
    except ValueError as e:
        errors["options"] = str(e)
    return errors


def test_misuse_raises_clear_errors_on_every_rank():
    for errors in run_ranks(2, misuse_worker):
        assert "must be >= 1 and divide the world size 2" in errors["world"]
        assert "attention heads (3)" in errors["heads"]
        assert "options differ across the ranks" in errors["options"]


def test_unsupported_architecture():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture GPT2Config.*supported: OPTConfig"):
        HybridEngine(gpt2)


def memory_cycles(he: HybridEngine, ids: torch.Tensor, mask: torch.Tensor, cycles: int, **options) -> dict:
    """RSS before the first eval(), in eval after generating, and after each train(); the engine's stats."""
    return_freed_memory()
    start, in_eval, after_train = status_bytes(), [], []
    for _ in range(cycles):
        he.eval()
        he.generate(ids, mask, **options)
        in_eval.append(status_bytes())
        he.train()
        after_train.append(status_bytes())
    return {"start": start, "in_eval": in_eval, "after_train": after_train, "stats": dict(he.stats)}


def check_memory(m: dict, margin: float) -> None:
    """train() frees what the stats say the engine holds (all of it but the resharder's exchange
    buffers, which stay by design), within `margin` of it; after train() RSS is back to where it was
    before the first eval() (plus those buffers), and does not grow over the cycles."""
    s = m["stats"]
    held = s["peak_inference_bytes"] - s["reshard_buffer_bytes"]
    assert s["prepacked_weight_bytes"] > 0.9 * s["inference_weight_bytes"], "the prepacked copies are not counted"
    drop = m["in_eval"][-1] - m["after_train"][-1]
    assert (1 - margin) * held < drop < (1 + margin) * held, f"train() freed {drop} bytes, stats say {held} held"
    kept = m["after_train"][-1] - m["start"] - s["reshard_buffer_bytes"]
    assert kept < margin * held, f"{kept} bytes more than before the first eval() stay after train()"
    assert m["after_train"][-1] - m["after_train"][1] < margin * held, "memory grows across cycles"


def memory_actor() -> transformers.OPTForCausalLM:
    """Large enough (about 20 MiB of fp32 weights) that allocator noise is small beside it."""
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=8000, hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4,
        max_position_embeddings=128, init_std=0.3))  # peaked next-token distributions


def release_cycles(rank: int = 0, world: int = 1, cache: bool = False) -> tuple[dict, dict]:
    """memory_cycles of an engine on memory_actor, optionally with hybrid_engine's CPU cache (for the
    rest of the process: call it in a process of its own); the cache's stats."""
    if cache:
        assert cache_cpu_blocks()
    actor = memory_actor()
    ids, mask = ragged_prompts(0, 4, actor.config.vocab_size, actor.config.pad_token_id)
    # Another engine on the same shapes first: oneDNN's kernels and other one-time library state
    # are not the engine's to give back.
    HybridEngine(memory_actor(), report=False).generate(ids, mask, max_new_tokens=4)
    he = HybridEngine(actor, report=False)  # KV cache sized to the batch: all of it is touched
    return memory_cycles(he, ids, mask, 6, max_new_tokens=4), cpu_cache_stats()


def test_train_releases_inference_memory_and_stats_count_it():
    """Stated margin: 10% of the inference memory the stats report (weights, prepacked copies, KV cache)."""
    check_memory(release_cycles()[0], margin=0.1)


def test_train_releases_inference_memory_past_the_cpu_cache():
    """The cache keeps what generation frees step to step, but not what train() drops for good."""
    memory, cache = run_ranks(1, release_cycles, True)[0]
    check_memory(memory, margin=0.1)
    assert cache["hits"] > 0 and cache["live_bytes"] > 0


def readme_worker(rank: int, world: int) -> dict:
    """What the README shows, under ZeRO-3 on 2 ranks with tp 1 and 2: sampling with top_p,
    num_return_sequences > 1, EOS on, a binding KV budget; bf16 greedy; and the memory cycle."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    actor = memory_actor()
    plain = memory_actor().eval()  # the un-partitioned twin (same seed)
    engine, *_ = deepspeed.initialize(model=actor, config=ZERO3, model_parameters=actor.parameters())
    vocab, pad = plain.config.vocab_size, plain.config.pad_token_id
    prompts = [ragged_prompts(100 + r, 2 + r, vocab, pad) for r in range(world)]  # ranks differ in batch size
    ids, mask = prompts[rank]
    block_size, blocks = 4, 6  # a sequence needs up to 5 blocks: rows wait for blocks, some are preempted
    all_ids, all_mask = (torch.cat([p[i] for p in prompts]) for i in (0, 1))
    free_run = hybrid_engine.generate(plain, all_ids, all_mask, max_new_tokens=4, eos_token_id=[]).sequences
    eos = sorted(set(free_run[:, -1].tolist()))  # tokens likely to be sampled around step 4
    options = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.8, num_return_sequences=2,
                   eos_token_id=eos, pad_token_id=pad)
    full_block_bytes = hybrid_engine.PagedKVCache.block_bytes(hybrid_engine.from_hf(plain), block_size)
    results = {}
    for tp in (1, 2):
        he = HybridEngine(engine, tp_size=tp, dtype=torch.float32, kv_cache_bytes=blocks * full_block_bytes // tp,
                          block_size=block_size, report=False)
        he.eval()
        sampled = he.generate(ids, mask, seed=1234 + rank, **options)  # tp 2: rank 0's seed is broadcast
        generator_stats = dict(he.generator.stats)
        he.train()
        group = range(world) if tp == 2 else [rank]
        union_ids, union_mask = (torch.cat([prompts[r][i] for r in group]) for i in (0, 1))
        reference = hybrid_engine.Generator(plain, kv_cache_bytes=blocks * full_block_bytes, block_size=block_size)
        expected = reference.generate(union_ids, union_mask, seed=1234 + group[0], **options)
        first = sum(len(prompts[r][0]) for r in group if r < rank) * 2
        results[f"tp{tp}"] = {
            "sampled": sampled.sequences, "expected": expected.sequences[first:first + 2 * len(ids)],
            "lengths": sampled.generated_lengths, "generator_stats": generator_stats,
            "memory": memory_cycles(he, ids, mask, 3, max_new_tokens=4, eos_token_id=[])}
    bf16 = HybridEngine(engine, tp_size=2, dtype=torch.bfloat16, report=False)
    greedy = bf16.generate(ids, mask, max_new_tokens=1, eos_token_id=[], pad_token_id=pad).sequences
    hf_bf16 = plain.to(torch.bfloat16).generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=1,
                                                pad_token_id=pad)
    results["bf16_first_token_agreement"] = (greedy[:, -1] == hf_bf16[:, -1]).float().mean().item()
    return results


def test_readme_usage_under_zero3_tp1_and_tp2():
    """Sampled tokens equal a single process's with the same seed, budget and batch (for tp 2: the
    TP group's union batch and the seed of its first rank, so the broadcast must reach every rank);
    memory as in the single-process test, margin 15% (gloo and DeepSpeed allocate too)."""
    results = run_ranks(2, readme_worker)
    for rank, r in enumerate(results):
        for tp in ("tp1", "tp2"):
            assert torch.equal(r[tp]["sampled"], r[tp]["expected"]), f"rank {rank} {tp}"
            assert r[tp]["generator_stats"]["prefills"] > 1, "the KV budget never held rows back"
            assert bool((r[tp]["lengths"] < 12).any()), "EOS never ended a row"
            check_memory(r[tp]["memory"], margin=0.15)
        assert r["bf16_first_token_agreement"] >= 0.75
    assert sum(r[tp]["generator_stats"]["preemptions"] for r in results for tp in ("tp1", "tp2")) > 0
