"""hybrid_engine.integrations.trl: TRL's GRPOTrainer and RLOOTrainer generating through HybridEngine.

The oracle is TRL's own generation (its transformers path, `_generate_single_turn` of trl.GRPOTrainer or
trl.RLOOTrainer) called on the same trainer, so on the same weights and prompts: greedy, fp32, ragged prompts,
random weights, and two EOS ids so that some completions end early and others run to the limit."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from transformers import TrainerCallback

trl = pytest.importorskip("trl")

from bench.launch import run_ranks  # noqa: E402
from hybrid_engine.distributed import free_port  # noqa: E402
from hybrid_engine.integrations.trl import HybridGRPOTrainer, HybridRLOOTrainer  # noqa: E402
from rlhf.example import TOPIC_WORDS, make_base_model, make_prompt, make_tokenizer  # noqa: E402

TRAINERS = {"grpo": (HybridGRPOTrainer, trl.GRPOConfig), "rloo": (HybridRLOOTrainer, trl.RLOOConfig)}
SECOND_EOS = "nebula"  # a word the random model below says often: completions that say it end there
ZERO3 = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto"}


def saved_model(directory: str, seed: int = 1, peaked: bool = True) -> str:
    """The example task's tokenizer and tiny OPT, saved (TRL reloads the reference model from the path).
    peaked: larger random weights, so that greedy completions depend on the prompt, and a second EOS."""
    tokenizer = make_tokenizer()
    model = make_base_model(tokenizer, "tiny", seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters() if peaked else ():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.1) + ("norm.weight" in name))
    if peaked:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(SECOND_EOS)]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def ragged_prompts(n: int, seed: int) -> list[str]:
    """Prompts of 7-17 tokens: the task's frame plus 0-10 random words."""
    rng, words = random.Random(seed), [w for ws in TOPIC_WORDS.values() for w in ws]
    return [make_prompt(rng) + "".join(" " + rng.choice(words) for _ in range(rng.randint(0, 10))) for _ in range(n)]


def config(kind: str, out: str, **overrides):
    """CPU settings (use_cpu: see the integration's docstring), greedy, no logging to services."""
    settings = dict(output_dir=out, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
                    num_generations=3, per_device_train_batch_size=6, max_completion_length=10, disable_tqdm=True,
                    generation_kwargs={"do_sample": False})
    return TRAINERS[kind][1](**{**settings, **overrides})


def zero_reward(completions, **kwargs) -> list[float]:
    return [0.0] * len(completions)


def make_trainer(kind: str, path: str, out: str, hybrid_engine: dict | None = None, reward=zero_reward,
                 peft_config=None, **overrides):
    prompts = ragged_prompts(24, seed=0)
    return TRAINERS[kind][0](model=path, reward_funcs=reward, args=config(kind, out, **overrides),
                             train_dataset=trl_dataset(prompts), processing_class=make_tokenizer(),
                             peft_config=peft_config, hybrid_engine=hybrid_engine)


def trl_dataset(prompts: list[str]):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": prompts})


def trl_completions(kind: str, trainer, prompts: list[str], num_generations: int) -> list[list[int]]:
    """The oracle: TRL's own transformers generation on the trainer's model."""
    prompt_ids = trainer._tokenize_prompts(prompts)[0]
    if kind == "grpo":
        return trl.GRPOTrainer._generate_single_turn(trainer, prompt_ids, None, {}, num_generations)[0]
    return trl.RLOOTrainer._generate_single_turn(trainer, prompt_ids, None, {})


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int, params=None) -> None:
    """Change the weights as a training step would."""
    g = torch.Generator().manual_seed(seed)
    for p in params if params is not None else model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)


def randomise_lora(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """PEFT starts B at zero, which would hide a missing merge."""
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    perturb(model, 7, [p for p in adapters if p.abs().sum() == 0])
    return adapters


@pytest.mark.parametrize("kind, lora", [("grpo", False), ("rloo", False), ("grpo", True)])
def test_greedy_completions_equal_trl_and_follow_the_weights(kind, lora, tmp_path):
    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]) if lora else None
    trainer = make_trainer(kind, saved_model(str(tmp_path / "model")), str(tmp_path / "out"),
                           {"dtype": torch.float32, "block_size": 4}, peft_config=lora_config)
    adapters = randomise_lora(trainer.model) if lora else None
    trainer.model.train()  # as in a training step: the metrics go under "train"
    prompts = ragged_prompts(4, seed=5)
    grouped = [p for p in prompts for _ in range(3)]  # as TRL repeats them: each generated once, forked 3 ways
    split = grouped[2:-1]  # a batch that starts and ends inside a group (TRL's split across ranks)
    results = []
    for step in range(2):  # weights changed in between, as by a training step: no stale copy may serve them
        for batch, groups in ((grouped, 3), (split, 1)):
            ours = trainer._generate(batch)[1]
            results.append((ours, trl_completions(kind, trainer, batch, groups)))
        perturb(trainer.model, step, adapters)
    for ours, expected in results:
        assert ours == expected
    first, eos_ids = results[0][0], set(trainer.eos_token_ids)
    assert any(c[-1] in eos_ids for c in first) and any(len(c) == 10 and c[-1] not in eos_ids for c in first)
    assert results[0][0] != results[2][0], "the perturbation did not change the completions: the check is vacuous"
    metrics = trainer._metrics["train"]
    assert all(metrics[f"hybrid_engine/{k}"] and min(metrics[f"hybrid_engine/{k}"]) > 0
               for k in ("generation_seconds", "tokens_per_second", "reshard_seconds", "memory_bytes"))
    # full groups of 3 share each prompt's full 4-token KV blocks; the split batch (gcd 1) has nothing to share
    shared = metrics["hybrid_engine/kv_prompt_blocks_shared"]
    assert shared[0] == sum(2 * (len(ids) // 4) for ids in trainer._tokenize_prompts(prompts)[0]) and shared[1] == 0
    assert metrics["hybrid_engine/reshard_bytes"] == [0.0] * 4  # one process: nothing moves between ranks


def colour_reward(completions, **kwargs) -> list[float]:
    """The fraction of an answer's words that are colours: 10 of the 113 tokens, so about 0.09 by chance."""
    return [sum(w in TOPIC_WORDS["colors"] for w in c.split()) / max(len(c.split()), 1) for c in completions]


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_rewards_rise(kind, tmp_path):
    """Sampling at temperature 1 from the example's random tiny OPT, 8 answers per prompt, 30 steps, no KL
    penalty (RLOO's default beta 0.05 holds plain TRL and ours alike near 0.4-0.5 after 30 steps).
    Stated thresholds: the first 3 steps' mean reward below 0.2 (chance level), the last 5 steps' above 0.8."""
    trainer = make_trainer(kind, saved_model(str(tmp_path / "model"), peaked=False), str(tmp_path / "out"), reward=colour_reward,
                           num_generations=8, per_device_train_batch_size=32, max_completion_length=12,
                           learning_rate=1e-2, max_steps=30, generation_kwargs=None, seed=0, beta=0.0)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 30
    print(f"{kind} reward by step: {[round(r, 2) for r in rewards]}")
    assert sum(rewards[:3]) / 3 < 0.2 and sum(rewards[-5:]) / 5 > 0.8, rewards
    assert all(f"hybrid_engine/{k}" in trainer.state.log_history[0] for k in ("generation_seconds", "memory_bytes"))


@pytest.mark.parametrize("overrides, hybrid_engine, named", [
    ({"use_vllm": True}, None, "use_vllm=True"),
    ({"min_p": 0.1}, None, "min_p=0.1"),
    ({"repetition_penalty": 1.2}, None, "repetition_penalty=1.2"),
    ({"generation_kwargs": {"num_beams": 2, "no_repeat_ngram_size": 3}}, None, "no_repeat_ngram_size=3"),
    ({"cache_implementation": "static"}, None, "cache_implementation='static'"),
    ({}, {"tp": 2}, "unknown option(s) ['tp']"),
    ({}, {"tp_size": 2}, "tp_size=2 must be >= 1 and divide the world size 1"),
    ({"cast_lm_head_to_fp32": True}, None, "cast_lm_head_to_fp32=True"),
])
def test_refused_options_name_themselves(overrides, hybrid_engine, named, tmp_path):
    with pytest.raises(ValueError) as error:
        make_trainer("grpo", saved_model(str(tmp_path / "model")), str(tmp_path / "out"), hybrid_engine, **overrides)
    assert named in str(error.value)


def test_checkpoint_generation_config_is_read(tmp_path):
    """transformers fills what TRL leaves unset from the checkpoint's generation_config.json: so do we."""
    path = saved_model(str(tmp_path / "model"))
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(path)
    generation.do_sample, generation.min_new_tokens, generation.min_p = True, 4, 0.05
    generation.save_pretrained(path)
    with pytest.raises(ValueError, match="min_p=0.05"):
        make_trainer("rloo", path, str(tmp_path / "out"))
    generation.min_p = None
    generation.save_pretrained(path)
    assert make_trainer("rloo", path, str(tmp_path / "out")).sampling["min_new_tokens"] == 4


class Perturb(TrainerCallback):
    """After each step, change the weights through DeepSpeed (whole on rank 0, then partitioned again): the
    next generation must see the change."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            perturb(model, state.global_step, params)


def ranks_worker(rank: int, world: int, kind: str, tp: int, lora: bool, path: str, out: str) -> dict:
    """Greedy GRPO / RLOO steps under ZeRO-3 on 2 ranks; TRL's own generation is the reward function's oracle
    at every step (same shards, same prompts). 3 prompts x 2 answers a step: each rank gets 3 rows, so one
    group is split across the ranks. With LoRA, B leaves zero at the first perturbation."""
    steps, holder = [], {}

    def oracle_reward(prompts, completions, completion_ids, **kwargs):
        trainer = holder["trainer"]
        steps.append((completion_ids, trl_completions(kind, trainer, prompts, 2)))
        return [0.0] * len(completions)

    lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]) if lora else None
    trainer = make_trainer(kind, path, out, {"tp_size": tp, "dtype": torch.float32}, reward=oracle_reward,
                           peft_config=lora_config, num_generations=2, per_device_train_batch_size=3, max_steps=3,
                           deepspeed=ZERO3)
    holder["trainer"] = trainer
    trainer.add_callback(Perturb())
    trainer.train()
    return {"steps": steps, "world": trainer.accelerator.num_processes, "wrapped": type(trainer.hybrid.actor).__name__,
            "log": trainer.state.log_history, "tp": trainer.hybrid.tp_size}


@pytest.mark.parametrize("kind, tp, lora", [("grpo", 2, False), ("rloo", 1, True)])
def test_two_ranks_zero3_greedy_equal_trl_at_every_step(kind, tp, lora, tmp_path):
    path = saved_model(str(tmp_path / "model"))
    for rank, r in enumerate(run_ranks(2, ranks_worker, kind, tp, lora, path, str(tmp_path / "out"))):
        assert (r["world"], r["wrapped"], r["tp"]) == (2, "DeepSpeedEngine", tp)
        assert len(r["steps"]) == 3
        for step, (ours, expected) in enumerate(r["steps"]):
            assert ours == expected, f"rank {rank} step {step}"
        assert r["steps"][0][0] != r["steps"][2][0], "the weights' changes did not reach the completions"
        logged = [h for h in r["log"] if "hybrid_engine/reshard_bytes" in h]
        assert len(logged) == 3 and all(h["hybrid_engine/reshard_bytes"] > 0 for h in logged)  # ZeRO-3 shards moved


def misconfigured_worker(rank: int, world: int, path: str, out: str) -> list[str]:
    """Two launches' worth of mistakes in one: without use_cpu accelerate sees a world of 1 on each rank of a
    gloo world of 2 (each rank would train alone); fsdp is not what hybrid_engine reshards."""
    from accelerate.state import AcceleratorState

    messages = []
    for overrides in ({"use_cpu": False}, {"fsdp": "full_shard"}):
        try:
            make_trainer("grpo", path, out, None, per_device_train_batch_size=3, **overrides)
            messages.append("built")
        except ValueError as e:
            messages.append(str(e))
        AcceleratorState._reset_state(reset_partial_state=True)
    return messages


def test_distributed_misconfigurations_are_refused(tmp_path):
    path = saved_model(str(tmp_path / "model"))
    for alone, fsdp in run_ranks(2, misconfigured_worker, path, str(tmp_path / "out")):
        assert alone.startswith("torch.distributed has 2 ranks but accelerate runs this trainer on 1") and \
            "use_cpu=True" in alone
        assert fsdp.startswith("fsdp: hybrid_engine reshards DeepSpeed")


LAUNCHED = """import json, os, sys
sys.path.insert(0, {tests!r})
import test_trl
trainer = test_trl.make_trainer("grpo", sys.argv[1], sys.argv[2], {{"tp_size": 2}}, num_generations=2,
                                per_device_train_batch_size=2, max_steps=2, deepspeed=test_trl.ZERO3)
trainer.train()
logged = [h for h in trainer.state.log_history if "hybrid_engine/reshard_bytes" in h]
result = {{"world": trainer.accelerator.num_processes, "wrapped": type(trainer.hybrid.actor).__name__, "log": logged}}
with open(os.path.join(sys.argv[2], os.environ["RANK"] + ".json"), "w") as f:
    json.dump(result, f)
"""


def test_accelerate_launch_two_cpu_processes(tmp_path):
    """The command a user runs (README): `accelerate launch --multi_gpu --num_processes 2` starts 2 CPU
    processes that form one gloo world with use_cpu=True (`--cpu` would start only one)."""
    script, out = tmp_path / "train.py", tmp_path / "out"
    script.write_text(LAUNCHED.format(tests=str(Path(__file__).parent)))
    out.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(script), saved_model(str(tmp_path / "model")), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"{rank}.json").read_text()) for rank in range(2)]
    for r in ranks:
        assert (r["world"], r["wrapped"], len(r["log"])) == (2, "DeepSpeedEngine", 2)
        assert all(h["hybrid_engine/reshard_bytes"] > 0 and h["hybrid_engine/tokens_per_second"] > 0 for h in r["log"])
    ours = [[{k: v for k, v in h.items() if k.startswith("hybrid_engine/")} for h in r["log"]] for r in ranks]
    assert ours[0] == ours[1]  # reduced over the ranks: every rank logs the same figures
