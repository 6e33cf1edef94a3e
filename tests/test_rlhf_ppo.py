"""Step 3 (rlhf.ppo): DeepSpeed-Chat's flags, checks made before training, the experience against
per-row forwards of the unpadded sequences, both generation paths against each other, one run per
engine configuration (PPO, and the critic-free GRPO and RLOO), and resume against an uninterrupted
run (with a checkpoint killed mid-write).
The models are the synthetic task's tiny OPT, untrained: what these tests check does not need a
trained model (tests/test_rlhf_functional.py trains one and checks that PPO raises the reward)."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from bench.launch import run_ranks
from rlhf import example
from rlhf.args import NO_EFFECT
from rlhf.checkpoint import latest_checkpoint, resolve_resume
from rlhf.ppo_args import build_parser, parse_args
from rlhf.ppo_loop import sequence_masks
from rlhf.rollout import answer_lengths
from rlhf.rlhf_engine import check_models

REQUIRED = ["--data_path", "d", "--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c",
            "--output_dir", "o"]
# DeepSpeed-Chat's step-3 flags, each with a value to pass and the parsed value expected
FLAGS = {
    "data_path": (["x", "y"], ["x", "y"]), "data_split": (["6,2,2"], "6,2,2"), "data_output_path": (["/c"], "/c"),
    "unsupervised_dataset_name": (["u"], "u"), "unsupervised_dataset_config_name": (["cfg"], "cfg"),
    "unsup_coef": (["2.5"], 2.5), "actor_model_name_or_path": (["/a"], "/a"),
    "critic_model_name_or_path": (["/c"], "/c"), "num_padding_at_beginning": (["0"], 0),
    "per_device_generation_batch_size": (["3"], 3), "per_device_training_batch_size": (["5"], 5),
    "generation_batches": (["2"], 2), "ppo_epochs": (["3"], 3), "max_prompt_seq_len": (["33"], 33),
    "max_answer_seq_len": (["44"], 44), "actor_learning_rate": (["0.5"], 0.5), "critic_learning_rate": (["0.25"], 0.25),
    "actor_weight_decay": (["0.1"], 0.1), "critic_weight_decay": (["0.2"], 0.2), "num_train_epochs": (["2"], 2),
    "lr_scheduler_type": (["linear"], "linear"), "gradient_accumulation_steps": (["4"], 4),
    "num_warmup_steps": (["9"], 9), "output_dir": (["/o"], "/o"), "seed": (["11"], 11), "dtype": (["fp32"], "fp32"),
    "offload": ([], True), "offload_reference_model": ([], True), "offload_reward_model": ([], True),
    "actor_zero_stage": (["3"], 3), "critic_zero_stage": (["2"], 2), "enable_hybrid_engine": ([], True),
    "unpin_actor_parameters": ([], True), "release_inference_cache": ([], True), "tp_gather_partition_size": (["4"], 4),
    "actor_gradient_checkpointing": ([], True), "critic_gradient_checkpointing": ([], True),
    "actor_dropout": (["0.05"], 0.05), "critic_dropout": (["0.0"], 0.0), "actor_lora_dim": (["8"], 8),
    "actor_lora_module_name": (["layers."], "layers."), "critic_lora_dim": (["4"], 4),
    "critic_lora_module_name": (["fc"], "fc"), "only_optimize_lora": ([], True),
    "actor_lora_learning_rate": (["0.01"], 0.01), "critic_lora_learning_rate": (["0.02"], 0.02),
    "enable_ema": ([], True), "enable_mixed_precision_lora": ([], True), "compute_fp32_loss": ([], True),
    "enable_tensorboard": ([], True), "tensorboard_path": (["/t"], "/t"), "add_eot_token": ([], True),
    "align_overflow": ([], True), "print_answers": ([], True), "print_answers_interval": (["3"], 3),
    "enable_test_mode": ([], True), "test_stop_step": (["5"], 5), "local_rank": (["1"], 1),
    "preprocessing_num_workers": (["2"], 2),
}
NO_EFFECT_FLAGS = ("num_padding_at_beginning", "offload_reference_model", "offload_reward_model",
                   "unpin_actor_parameters", "release_inference_cache", "tp_gather_partition_size",
                   "enable_mixed_precision_lora", "compute_fp32_loss", "align_overflow", "add_eot_token",
                   "preprocessing_num_workers")


@pytest.mark.parametrize("dashed", [False, True])
def test_every_dschat_step3_flag_in_both_spellings(dashed):
    for name, (values, expected) in FLAGS.items():
        flag = "--" + (name.replace("_", "-") if dashed else name)
        extra = {"only_optimize_lora": ["--actor_lora_dim", "2"], "enable_hybrid_engine": []}.get(name, [])
        args = parse_args(REQUIRED + [flag, *values] + extra)
        assert getattr(args, name) == expected, name


def test_help_defaults_and_no_effect_flags():
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert all(helps.values())
    for name in NO_EFFECT_FLAGS:
        assert helps[name].startswith(NO_EFFECT) and len(helps[name]) > len(NO_EFFECT) + 20, name
    args = parse_args(REQUIRED)
    # DeepSpeed-Chat's PPO constants, and sampling (not greedy) by default
    assert (args.kl_ctl, args.clip_reward_value, args.gamma, args.lam, args.cliprange, args.cliprange_value,
            args.ema_beta, args.unsup_coef) == (0.1, 5.0, 1.0, 0.95, 0.2, 0.2, 0.992, 27.8)
    assert args.do_sample and args.temperature == 1.0 and args.top_p == 1.0 and args.top_k == 0
    assert parse_args(REQUIRED + ["--enable_test_mode", "--test_stop_step", "7"]).max_steps == 7
    assert args.algorithm == "ppo" and args.num_samples_per_prompt == 1
    assert parse_args(REQUIRED + ["--algorithm", "rloo"]).num_samples_per_prompt == 8
    # the actor's old logprobs as sampled only where generation and training forwards agree (fp32)
    hybrid = REQUIRED + ["--enable_hybrid_engine", "--dtype"]
    assert [parse_args(argv).old_logprobs_from for argv in (REQUIRED + ["--dtype", "fp32"], hybrid + ["fp32"],
                                                           hybrid + ["bf16"])] == ["training", "generation", "training"]
    assert parse_args(hybrid + ["bf16", "--old_logprobs_from", "generation"]).old_logprobs_from == "generation"


@pytest.mark.parametrize("flags, match", [
    (["--inference_tp_size", "2"], "--enable_hybrid_engine"),
    (["--old_logprobs_from", "generation"], "--old_logprobs_from generation needs --enable_hybrid_engine"),
    (["--dtype", "fp16"], "fp16"),
    (["--per_device_generation_batch_size", "0"], "--per_device_generation_batch_size"),
    (["--min_answer_seq_len", "300"], "--min_answer_seq_len"),
    (["--only_optimize_lora"], "--only_optimize_lora"),
    (["--temperature", "0"], "--temperature"),
    (["--algorithm", "grpo", "--num_samples_per_prompt", "1"], "--num_samples_per_prompt"),
])
def test_bad_flags_are_refused(flags, match):
    with pytest.raises(ValueError, match=match):
        parse_args(REQUIRED + flags)


def test_sequence_masks_and_answer_lengths_match_a_loop():
    torch.manual_seed(3)
    eos, rows, width = 2, 7, 9
    answers = torch.randint(3, 20, (rows, width))
    for b in range(rows):  # an EOS at a random place in some rows, none in others, pads after it
        if b % 3:
            at = int(torch.randint(0, width, ()))
            answers[b, at], answers[b, at + 1:] = eos, 0
    lengths = answer_lengths(answers, eos)
    for b in range(rows):
        row = answers[b].tolist()
        assert lengths[b] == (row.index(eos) + 1 if eos in row else width)
    prompt_mask = (torch.arange(5)[None] >= torch.randint(0, 5, (rows, 1))).long()
    attention_mask, action_mask = sequence_masks(prompt_mask, lengths, width)
    for b in range(rows):
        expected = [1 if j < lengths[b] else 0 for j in range(width)]
        assert action_mask[b].tolist() == [bool(x) for x in expected]
        assert attention_mask[b].tolist() == prompt_mask[b].tolist() + expected


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> str:
    """Untrained tiny actor and a reward model (random head) from it, and a few hundred records."""
    root = tmp_path_factory.mktemp("ppo")
    example.write_data(str(root / "data"), num_records=400, seed=7)
    example.write_model(str(root / "actor"), size="tiny", seed=7)
    tokenizer = AutoTokenizer.from_pretrained(root / "actor")
    torch.manual_seed(7)
    reward = AutoModelForSequenceClassification.from_pretrained(root / "actor", num_labels=1,
                                                                pad_token_id=tokenizer.pad_token_id)
    reward.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    with open(root / "unsup.txt", "w") as f:
        f.write("\n\n".join(example.make_prompt(__import__("random").Random(i)) + " bread rice cake"
                            for i in range(60)))
    return str(root)


def ppo_argv(task: str, out: str, *extra: str) -> list[str]:
    return ["--data_path", f"{task}/data", "--data_split", "1,1,2", "--data_output_path", f"{task}/cache",
            "--actor_model_name_or_path", f"{task}/actor", "--critic_model_name_or_path", f"{task}/rm",
            "--output_dir", out, "--max_prompt_seq_len", "16", "--max_answer_seq_len", "12",
            "--per_device_generation_batch_size", "6", "--per_device_training_batch_size", "3",
            "--num_warmup_steps", "0", "--actor_learning_rate", "1e-3", "--critic_learning_rate", "1e-3",
            "--eval_prompts", "8", "--dtype", "fp32", *extra]


def test_checks_before_training(task, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(f"{task}/actor")
    args = parse_args(ppo_argv(task, str(tmp_path)))
    check_models(args, tokenizer)  # the good case passes
    with pytest.raises(ValueError, match=r"run step 1 \(python -m rlhf.sft\)"):
        check_models(parse_args(ppo_argv(task, "o", "--actor_model_name_or_path", str(tmp_path / "none"))), tokenizer)
    with pytest.raises(ValueError, match=r"run step 2 \(python -m rlhf.reward\)"):
        check_models(parse_args(ppo_argv(task, "o", "--critic_model_name_or_path", str(tmp_path / "none"))), tokenizer)
    too_long = r"--max_prompt_seq_len \+ --max_answer_seq_len = \d+ exceeds the actor's max_position_embeddings 128"
    with pytest.raises(ValueError, match=too_long):
        check_models(parse_args(ppo_argv(task, "o", "--max_answer_seq_len", "120")), tokenizer)
    other = tmp_path / "other-rm"  # same model, a tokenizer with one more word
    AutoModelForSequenceClassification.from_pretrained(f"{task}/rm").save_pretrained(other)
    changed = AutoTokenizer.from_pretrained(f"{task}/rm")
    changed.add_tokens(["zebra"])
    changed.save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer .* differs from the actor's"):
        check_models(parse_args(ppo_argv(task, "o", "--critic_model_name_or_path", str(other))), tokenizer)


def experience_worker(rank: int, world: int, task: str, out: str) -> dict:
    """One experience through each rollout (greedy, fp32), and the per-row oracle."""
    from dataclasses import asdict

    from hybrid_engine.engine import unwrap
    from rlhf.data import collate_prompts
    from rlhf.distributed import init_distributed
    from rlhf.ppo_args import steps_per_role
    from rlhf.ppo_loop import PPOConfig, generate_experience, new_state
    from rlhf.rlhf_engine import build_rlhf_engine
    from rlhf.rollout import GatherOnce, ZeRO3Generate

    device = init_distributed()
    args = parse_args(ppo_argv(task, out, "--enable_hybrid_engine", "--no-do_sample"))
    tokenizer = AutoTokenizer.from_pretrained(f"{task}/actor")
    models = build_rlhf_engine(args, tokenizer, steps_per_role(args, 4, False), device)
    cfg, state = PPOConfig.from_args(args, tokenizer), new_state(models, args.seed)
    prompts = [tokenizer(example.make_prompt(__import__("random").Random(i)))["input_ids"] for i in range(5)]
    prompts[1] = prompts[1][:4]  # ragged: left padding differs per row
    batch = collate_prompts([{"prompt_ids": torch.tensor(p)} for p in prompts], tokenizer.pad_token_id)
    plain = AutoModelForCausalLM.from_config(unwrap(models.actor).config)
    rollouts = {"hybrid": models.rollout, "hf": ZeRO3Generate(models.actor), "gather_once": GatherOnce(models.actor, plain)}
    result = {name: asdict(generate_experience(models, rollout, batch, cfg, state)) for name, rollout in rollouts.items()}
    return {**result, "prompts": prompts, "gather_s": state.times["gather"],
            "old_logprobs_from": args.old_logprobs_from}


def unpadded_oracle(task: str, exp: dict) -> dict:
    """logprobs, values and scores recomputed row by row from the unpadded sequences with transformers."""
    actor = AutoModelForCausalLM.from_pretrained(f"{task}/actor", dtype=torch.float32).eval()
    critic = AutoModelForSequenceClassification.from_pretrained(f"{task}/rm", dtype=torch.float32).eval()
    out = {"logprobs": [], "values": [], "scores": []}
    with torch.no_grad():
        for b in range(len(exp["seq"])):
            tokens = exp["seq"][b][exp["attention_mask"][b].bool()][None]
            n_answer = int(exp["action_mask"][b].sum())
            logp = actor(tokens).logits[0].float().log_softmax(-1)
            out["logprobs"].append([float(logp[t - 1, tokens[0, t]]) for t in range(tokens.shape[1] - n_answer,
                                                                                   tokens.shape[1])])
            values = critic.score(critic.base_model(tokens).last_hidden_state)[0, :, 0]
            out["values"].append(values[tokens.shape[1] - n_answer - 1: tokens.shape[1] - 1].tolist())
            out["scores"].append(float(values[-1]))
    return out


def test_experience_equals_unpadded_forwards_and_both_generation_paths_agree(task, tmp_path):
    result = run_ranks(1, experience_worker, task, str(tmp_path))[0]
    hybrid, hf = result["hybrid"], result["hf"]
    # greedy fp32: HybridEngine's answers are transformers' answers, token for token, on the ZeRO-3 module
    # and on a plain model gathered once
    for other in (hf, result["gather_once"]):
        assert torch.equal(hybrid["seq"], other["seq"]) and torch.equal(hybrid["action_mask"], other["action_mask"])
    assert result["gather_s"] > 0
    # fp32: the actor's logprobs are recorded as HybridEngine samples, and equal the training model's
    # padded forward (the hf rollout's experience) and the unpadded oracle below
    assert result["old_logprobs_from"] == "generation"
    torch.testing.assert_close(hybrid["logprobs"], hf["logprobs"], atol=2e-5, rtol=1e-5)
    assert hybrid["action_mask"].sum(1).min() > 1 and hybrid["seq"].shape[0] == len(result["prompts"])
    oracle = unpadded_oracle(task, hybrid)
    for b in range(len(hybrid["seq"])):
        mask = hybrid["action_mask"][b]
        for name in ("logprobs", "values"):
            torch.testing.assert_close(hybrid[name][b][mask], torch.tensor(oracle[name][b]), atol=2e-5, rtol=1e-5)
        # the reference is the same SFT weights before any step
        torch.testing.assert_close(hybrid["ref_logprobs"][b][mask], torch.tensor(oracle["logprobs"][b]),
                                   atol=2e-5, rtol=1e-5)
        assert not hybrid["logprobs"][b][~mask].any()  # nothing outside the answer
    torch.testing.assert_close(hybrid["scores"], torch.tensor(oracle["scores"]), atol=2e-5, rtol=1e-5)


def read_log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def config_worker(rank: int, world: int, task: str, out: str, extra: list[str]) -> None:
    from rlhf import ppo
    ppo.main(ppo_argv(task, out, "--max_steps", "2", *extra))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


CONFIGS = {  # together: ZeRO 0 and 3, hybrid engine on and off, TP 1 and 2, LoRA, EMA, PTX
    "zero0-hf-ptx-ema": (1, ["--enable_ema", "--unsupervised_dataset_name", "unsup.txt"]),
    "zero3-hybrid-tp1-lora": (2, ["--actor_zero_stage", "3", "--critic_zero_stage", "3", "--enable_hybrid_engine",
                                  "--actor_lora_dim", "4", "--only_optimize_lora", "--actor_lora_learning_rate", "1e-2"]),
    "zero3-hybrid-tp2-ema": (2, ["--actor_zero_stage", "3", "--critic_zero_stage", "3", "--enable_hybrid_engine",
                                 "--inference_tp_size", "2", "--enable_ema", "--dtype", "bf16",
                                 "--old_logprobs_from", "generation"]),
    "zero3-hf": (2, ["--actor_zero_stage", "3", "--critic_zero_stage", "3"]),
    "grpo-zero3-hybrid": (2, ["--algorithm", "grpo", "--num_samples_per_prompt", "3", "--actor_zero_stage", "3",
                              "--enable_hybrid_engine", "--per_device_generation_batch_size", "2"]),
    "rloo-zero0-hf-sequence": (1, ["--algorithm", "rloo", "--num_samples_per_prompt", "2", "--loss_averaging",
                                   "sequence", "--per_device_generation_batch_size", "3"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_configuration_trains_and_saves(task, tmp_path, name):
    world, extra = CONFIGS[name]
    extra = [f"{task}/{x}" if x == "unsup.txt" else x for x in extra]
    out = str(tmp_path / name)
    run_ranks(world, config_worker, task, out, extra)
    check_trained_and_saved(task, out, extra)


def check_trained_and_saved(task: str, out: str, extra: list[str]) -> None:
    """Two logged steps with the phases the flags ask for, an actor (and critic, EMA) that moved and
    saved under plain transformers names."""
    log = read_log(out)
    train = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and [r["kind"] for r in (log[0], log[-1])] == ["eval", "eval"]
    grouped = "--algorithm" in extra
    phases = {"generation", "experience", "actor_training"} | (set() if grouped else {"critic_training"})
    phases |= {"reshard"} if "--enable_hybrid_engine" in extra else set()
    phases |= {"ema"} if "--enable_ema" in extra else set()
    phases |= {"ptx_training"} if "--unsupervised_dataset_name" in extra else set()
    for record in train:
        assert {k[5:-2] for k in record if k.startswith("time_") and k != "time_total_s"} == phases
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))
        assert record["answer_length"] > 1 and record["rss_bytes_max_rank"] > 0
        assert ("ptx_loss" in record) == ("--unsupervised_dataset_name" in extra)
        assert ("critic_loss" in record) != grouped and ("frac_reward_zero_std" in record) == grouped
        assert ("kv_peak_blocks" in record) == ("--enable_hybrid_engine" in extra)
    start = load_file(f"{task}/actor/model.safetensors")
    actor = load_file(f"{out}/actor/model.safetensors")
    assert set(actor) == set(start)  # plain transformers names, LoRA merged away
    assert max_diff(actor, start) > 1e-4  # the actor trained
    if grouped:  # no critic is built, trained or saved
        assert not os.path.exists(f"{out}/critic")
    else:
        assert max_diff(load_file(f"{out}/critic/model.safetensors"), load_file(f"{task}/rm/model.safetensors")) > 1e-4
    if "--enable_ema" in extra:  # two steps of beta 0.992: the EMA moved, by far less than the actor
        ema = load_file(f"{out}/actor_ema/model.safetensors")
        assert 0 < max_diff(ema, start) < 0.1 * max_diff(actor, start)
    AutoModelForCausalLM.from_pretrained(f"{out}/actor")  # loads with transformers alone


RESUME = {  # world, flags
    "ppo": (2, ["--actor_zero_stage", "3", "--critic_zero_stage", "3", "--enable_hybrid_engine", "--enable_ema",
                "--unsupervised_dataset_name", "unsup.txt"]),
    "grpo": (1, ["--algorithm", "grpo", "--num_samples_per_prompt", "2", "--enable_hybrid_engine", "--enable_ema"]),
}


def resume_worker(rank: int, world: int, task: str, root: str, flags: list[str]) -> None:
    from rlhf import ppo
    argv = ["--max_steps", "4", "--save_steps", "2", *[f"{task}/{f}" if f == "unsup.txt" else f for f in flags]]
    ppo.main(ppo_argv(task, f"{root}/uninterrupted", *argv))
    save = torch.save

    def killed_at_step4(obj, path, *args, **kwargs):  # every rank dies after DeepSpeed wrote its files
        if ".tmp-step4" in str(path) and str(path).endswith(f"rank{rank}.pt"):
            raise KeyboardInterrupt("killed while writing the step-4 checkpoint")
        return save(obj, path, *args, **kwargs)
    torch.save = killed_at_step4
    try:
        ppo.main(ppo_argv(task, f"{root}/resumed", *argv))
    except KeyboardInterrupt:
        pass
    finally:
        torch.save = save
    assert sorted(os.listdir(f"{root}/resumed/checkpoints")) == [".tmp-step4", "step2"]
    ppo.main(ppo_argv(task, f"{root}/resumed", *argv, "--resume_from", "auto"))


@pytest.mark.parametrize("algorithm", list(RESUME))
def test_resume_equals_an_uninterrupted_run_and_skips_a_half_written_checkpoint(task, tmp_path, algorithm):
    world, flags = RESUME[algorithm]
    run_ranks(world, resume_worker, task, str(tmp_path), flags)
    whole = [r for r in read_log(str(tmp_path / "uninterrupted")) if r["kind"] == "train"]
    resumed = [r for r in read_log(str(tmp_path / "resumed")) if r["kind"] == "train"]
    # the killed run logged steps 1-4 but its step-4 checkpoint stayed .tmp: the resumed run redid 3 and 4
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 3, 4]
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["step2", "step4"]
    keys = ("actor_loss", "reward_mean", "kl_ref", "answer_length")
    keys += ("critic_loss", "ptx_loss") if algorithm == "ppo" else ("kl_k3", "advantage_abs_mean")
    for a, b in zip(whole[2:], resumed[4:]):
        for key in keys:
            assert a[key] == b[key], (key, a, b)
    for model in ("actor", "actor_ema") + (("critic",) if algorithm == "ppo" else ()):
        assert max_diff(load_file(f"{tmp_path}/uninterrupted/{model}/model.safetensors"),
                        load_file(f"{tmp_path}/resumed/{model}/model.safetensors")) == 0, model


def test_latest_checkpoint_ignores_unfinished_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step2", "step10", ".tmp-step12", "step3-notes"):
        (root / name).mkdir(parents=True)
    (root / "step10" / "rank0.pt").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)) == str(root / "step10")
    assert resolve_resume("auto", str(tmp_path)) == str(root / "step10")
    assert resolve_resume("auto", str(tmp_path / "empty")) is None
    with pytest.raises(ValueError, match="not a step-3 checkpoint"):
        resolve_resume(str(root / "step2"), str(tmp_path))
