"""Qwen2/Qwen2.5, Qwen3 and Mistral through every layer, against transformers 5 on small random
models: prefill logits (fp32, bf16), greedy generation with an EOS mid-way, saved checkpoints,
PEFT LoRA merged into TP slices, sliding windows shorter than the sequences, and HybridEngine under DeepSpeed ZeRO-3
(where tp 2 covers the column-parallel Q/K/V biases of Qwen2, the replicated q/k norms of Qwen3, and
the vocabulary of 311 split into slices padded to 156 rows, tied in Qwen2, untied in Qwen3 and Mistral)."""
import peft
import pytest
import torch
from test_engine import ragged_prompts as ragged_batch
from test_generation import PAD, eos_emitted_midway, hf_greedy
from test_lora import frozen_state, merged_reference
from test_models import VOCAB, hf_logits, prefill_logits, ragged_prompts
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, Qwen3Config

import hybrid_engine
from bench.launch import run_ranks
from hybrid_engine.engine import HybridEngine
from hybrid_engine.models import empty_model, from_hf, weight_map
from hybrid_engine.reshard import Resharder

SHARED = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=88, num_hidden_layers=2,
              vocab_size=VOCAB, max_position_embeddings=80, initializer_range=0.3)
# Qwen2 tied (as Qwen2.5-0.5B), Qwen3 with head_dim != hidden / heads, Mistral with a window the
# test sequences fit in.


def config_of(cls: type, **fixed):
    return lambda **overrides: cls(**{**SHARED, **fixed, **overrides})


FAMILIES = {
    "qwen2": config_of(Qwen2Config, hidden_size=56, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3": config_of(Qwen3Config, hidden_size=48, head_dim=20, tie_word_embeddings=False),
    "mistral": config_of(MistralConfig, hidden_size=64, sliding_window=64, tie_word_embeddings=False),
}
LENGTHS, WIDTH = [7, 13, 2, 10], 13
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def family_model(family: str, seed: int = 0, **overrides):
    """Random weights, norms and biases included (transformers starts them at 1 and 0, which would
    hide a norm or bias that is loaded into the wrong place or not at all)."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(FAMILIES[family](**overrides))
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return hf.eval()


def packed(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [i[m.bool()] for i, m in zip(ids, mask)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_logits_fp32_and_bf16(family):
    """fp32 within 2e-4; bf16 within 1.5x of what bf16 costs transformers itself (max and mean)."""
    hf = family_model(family)
    ids, mask = ragged_prompts([11, 4, 17, 1], 17)
    exact = hf_logits(hf, ids, mask)
    torch.testing.assert_close(prefill_logits(from_hf(hf), packed(ids, mask)), exact, atol=2e-4, rtol=1e-4)
    ours_err = (prefill_logits(from_hf(hf, dtype=torch.bfloat16), packed(ids, mask)) - exact).abs()
    hf_err = (hf_logits(hf.to(torch.bfloat16), ids, mask) - exact).abs()
    assert ours_err.max() <= 1.5 * hf_err.max() and ours_err.mean() <= 1.5 * hf_err.mean()


@pytest.mark.any_device
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_hf_with_eos_midway(family):
    hf = family_model(family)
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    free_run = hybrid_engine.generate(hf, ids, mask, max_new_tokens=16, eos_token_id=[], pad_token_id=PAD)
    eos = eos_emitted_midway(free_run.sequences, WIDTH)
    out = hybrid_engine.generate(hf, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(out.sequences, hf_greedy(hf, ids, mask, 16, eos=eos))
    assert int(out.generated_lengths.min()) < 16, "no row stopped at the EOS"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_checkpoint_loads(family, tmp_path):
    hf = family_model(family)
    hf.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = ragged_prompts([6, 13], 13)
    ours = prefill_logits(from_hf(loaded), packed(ids, mask))
    torch.testing.assert_close(ours, hf_logits(hf, ids, mask), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_merges_as_merge_and_unload(family):
    model = peft.get_peft_model(family_model(family), peft.LoraConfig(r=4, lora_alpha=12, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would hide any merge error
                param.normal_(std=0.5)
    before = frozen_state(model)
    for tp_rank in range(2):
        targets = dict(empty_model(model.config, tp_rank, 2, None, torch.float32).named_buffers())
        Resharder(model, weight_map(model.config), tp_rank=tp_rank, tp_size=2).reshard(targets)
        expected = merged_reference(model, tp_rank, 2)
        assert targets.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(targets[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("family, overrides", [
    ("mistral", dict(sliding_window=5)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
], ids=["mistral", "qwen2-layer1"])
@pytest.mark.any_device
def test_sliding_window_shorter_than_the_sequences_matches_hf(family, overrides):
    """Windows far shorter than prompt + new tokens (13 + 12), in prefill and in decode; Qwen2
    slides only in the layers from max_window_layers on."""
    hf = family_model(family, **overrides)
    windows = [layer.attn.window for layer in from_hf(hf).layers]
    assert windows == ([5, 5] if family == "mistral" else [None, 6])
    ids, mask = ragged_prompts(LENGTHS, WIDTH, pad=PAD)
    out = hybrid_engine.generate(hf, ids, mask, max_new_tokens=12, min_new_tokens=12, eos_token_id=2, pad_token_id=PAD)
    assert torch.equal(out.sequences, hf_greedy(hf, ids, mask, 12, eos=2, min_new_tokens=12))
    full = hybrid_engine.generate(family_model(family), ids, mask, max_new_tokens=12, eos_token_id=[], pad_token_id=PAD)
    assert not torch.equal(out.sequences, full.sequences), "the window changed nothing: the test cannot fail"


def zero3_families_worker(rank: int, world: int, tp: int) -> dict:
    import deepspeed

    from test_reshard_zero3 import ZERO3

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = {}
    for family in FAMILIES:
        plain = family_model(family)  # same seed on every rank: the un-partitioned twin of the actor
        actor = family_model(family).train()
        engine, *_ = deepspeed.initialize(model=actor, config=ZERO3, model_parameters=actor.parameters())
        he = HybridEngine(engine, tp_size=tp, dtype=torch.float32, report=False)
        ids, mask = ragged_batch(100 + rank, 2 + rank, VOCAB, PAD)  # ranks differ in batch size
        ours = he.generate(ids, mask, max_new_tokens=6, min_new_tokens=6, eos_token_id=2, pad_token_id=PAD)
        results[family] = (ours.sequences, hf_greedy(plain, ids, mask, 6, eos=2, min_new_tokens=6))
    return results


@pytest.mark.parametrize("tp", [1, 2])
def test_hybrid_engine_zero3_matches_transformers(tp):
    """All three families in one 2-rank launch per TP degree (start-up dominates)."""
    for rank, results in enumerate(run_ranks(2, zero3_families_worker, tp)):
        for family, (ours, expected) in results.items():
            assert ours.shape == (2 + rank, 9 + 6)
            assert torch.equal(ours, expected), f"{family}, rank {rank}"
