"""HybridEngine under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), and on a plain module."""
import pytest
import torch
import transformers

import hybrid_engine
from hybrid_engine.engine import HybridEngine
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


def engine_worker(rank: int, world: int, family: str, tp: int, stage: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    plain = small_hf_model(family).eval()  # same seed on every rank: the un-partitioned twin of the actor
    actor = small_hf_model(family)
    config = {**ZERO3, "zero_optimization": {"stage": stage}}
    engine, *_ = deepspeed.initialize(model=actor, config=config, model_parameters=actor.parameters())
    he = HybridEngine(engine, tp_size=tp, dtype=torch.float32, report=False)
    pad = plain.config.pad_token_id or 0
    ids, mask = ragged_prompts(100 + rank, 2 + rank, plain.config.vocab_size, pad)  # ranks differ in batch size
    options = dict(max_new_tokens=6, min_new_tokens=6, eos_token_id=[], pad_token_id=pad)
    before = gathered_state(engine)
    ours = he.generate(ids, mask, **options)
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
    return {"ours": ours.sequences, "hf": expected_hf, "single": expected_single, "unchanged": unchanged,
            "changed": changed, "after_step": after_step, "expected_after": expected_after,
            "mask_ok": torch.equal(ours.attention_mask[:, :ids.shape[1]], mask), "eval_after": he.is_eval}


@pytest.mark.parametrize("family, tp, stage", [("opt", 2, 3), ("opt", 1, 3), ("llama", 2, 3), ("opt", 2, 2)])
def test_greedy_generation_matches_single_process_and_transformers(family, tp, stage):
    for rank, r in enumerate(run_ranks(2, engine_worker, family, tp, stage)):
        assert r["ours"].shape == (2 + rank, 9 + 6)
        assert torch.equal(r["ours"], r["single"]), f"rank {rank}"
        assert torch.equal(r["ours"], r["hf"]), f"rank {rank}"
        assert r["mask_ok"] and not r["eval_after"]
        assert r["unchanged"], "generate changed the training weights"
        assert r["changed"], "the training step did not change the weights"
        assert torch.equal(r["after_step"], r["expected_after"]), "the second generate did not use the new weights"


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


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_train_releases_inference_memory_and_cycles_do_not_grow():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, ffn_dim=1024,
                                    num_attention_heads=4, max_position_embeddings=128)
    actor = transformers.OPTForCausalLM(config)
    he = HybridEngine(actor, report=False, kv_cache_bytes=16 << 20)
    ids, mask = ragged_prompts(0, 4, config.vocab_size, config.pad_token_id)
    rss_after_train = []
    for _ in range(20):
        he.eval()
        he.generate(ids, mask, max_new_tokens=4)
        in_eval = rss_bytes()
        he.train()
        rss_after_train.append(rss_bytes())
    # Every byte of the weights was written, so all of it is resident; the KV cache is freed too, but
    # only the pages generation touched were ever resident.
    weight_bytes = he.stats["inference_weight_bytes"]
    assert weight_bytes > 16 << 20
    assert in_eval - rss_after_train[-1] > 0.9 * weight_bytes, "train() did not give the inference memory back"
    assert rss_after_train[-1] - rss_after_train[4] < 0.1 * weight_bytes, "memory grows across cycles"
