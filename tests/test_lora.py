"""LoRA (PEFT) actors: the inference weights hold W + scale * B @ A; the training weights stay as they are."""
import copy

import peft
import pytest
import torch

from hybrid_engine.engine import HybridEngine
from hybrid_engine.models import from_hf
from hybrid_engine.models.registry import empty_model, weight_map
from hybrid_engine.reshard import Resharder
from bench.launch import run_ranks
from test_engine import ragged_prompts
from test_reshard_zero3 import ZERO3, small_hf_model

TARGETS = {"opt": ["q_proj", "v_proj", "out_proj", "fc1", "fc2"],
           "llama": ["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "lm_head"]}  # lm_head: a padded vocabulary


def lora_model(family: str) -> peft.PeftModel:
    model = peft.get_peft_model(small_hf_model(family), peft.LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS[family]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, which would hide any merge error
                param.normal_(std=0.5)
    return model.eval()


def merged_reference(model: peft.PeftModel, tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(model).merge_and_unload()
    return dict(from_hf(merged, tp_rank=tp_rank, tp_size=tp).named_buffers())


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family, tp", [("opt", 1), ("opt", 2), ("llama", 2)])
def test_merged_weights_equal_peft_merge_and_training_weights_unchanged(family, tp):
    model = lora_model(family)
    before = frozen_state(model)
    for tp_rank in range(tp):
        targets = dict(empty_model(model.config, tp_rank, tp, None, torch.float32).named_buffers())
        Resharder(model, weight_map(model.config), tp_rank=tp_rank, tp_size=tp).reshard(targets)
        expected = merged_reference(model, tp_rank, tp)
        assert targets.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(targets[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_unsupported_adapters_raise():
    model = peft.get_peft_model(small_hf_model("opt"), peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="LoRA on embeddings is not supported"):
        Resharder(model, weight_map(model.config), tp_rank=0, tp_size=1)


def lora_zero3_worker(rank: int, world: int, tp: int) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    reference = lora_model("opt")
    actor = lora_model("opt")
    engine, *_ = deepspeed.initialize(model=actor, config=ZERO3,
                                      model_parameters=[p for p in actor.parameters() if p.requires_grad])
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        before = {n: p.detach().clone() for n, p in params.items()}
    he = HybridEngine(engine, tp_size=tp, dtype=torch.float32, report=False)
    he.eval()
    got = {n: b.clone() for n, b in he.model.named_buffers()}
    ids, mask = ragged_prompts(7 + rank, 2, reference.config.vocab_size, reference.config.pad_token_id)
    ours = he.generate(ids, mask, max_new_tokens=5, min_new_tokens=5, eos_token_id=[]).sequences
    he.train()
    with deepspeed.zero.GatheredParameters(list(params.values())):
        unchanged = all(torch.equal(before[n], p) for n, p in params.items())
    merged = copy.deepcopy(reference).merge_and_unload()
    expected = merged_reference(reference, rank % tp, tp)
    hf = merged.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=5, min_new_tokens=5)
    max_error = max((got[n] - expected[n]).abs().max().item() for n in expected)
    return {"max_error": max_error, "unchanged": unchanged, "tokens_equal": torch.equal(ours, hf)}


def test_lora_under_zero3_tp2():
    for result in run_ranks(2, lora_zero3_worker, 2):
        assert result["max_error"] <= 1e-6
        assert result["unchanged"]
        assert result["tokens_equal"]
