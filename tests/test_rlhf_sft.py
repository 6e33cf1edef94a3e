"""SFT plumbing: DeepSpeed-Chat flags in both spellings, AdamW groups, the causal-LM loss, clear
errors, and Hugging Face checkpoints (ZeRO 0 and 3, LoRA on and off) that reload with transformers
alone and give the outputs the trained model gave."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, OPTConfig, OPTForCausalLM

from bench.launch import run_ranks
from hybrid_engine.capability import choose_dtype
from rlhf import example
from rlhf.args import NO_EFFECT
from rlhf.engines import ds_config, param_groups
from rlhf.hf_models import apply_lora, load_config
from rlhf.reward import build_parser as reward_parser, parse_args as reward_args
from rlhf.sft import build_parser, parse_args
from rlhf.supervised import token_nll

REQUIRED = ["--data_path", "d", "--model_name_or_path", "m", "--output_dir", "o"]
# every DeepSpeed-Chat step-1/2 flag with a value to pass and the parsed value expected
FLAGS = {
    "data_path": (["a", "b"], ["a", "b"]), "data_split": (["6,2,2"], "6,2,2"),
    "data_output_path": (["/c"], "/c"), "model_name_or_path": (["/m"], "/m"),
    "per_device_train_batch_size": (["3"], 3), "per_device_eval_batch_size": (["5"], 5),
    "max_seq_len": (["77"], 77), "learning_rate": (["0.25"], 0.25), "weight_decay": (["0.1"], 0.1),
    "num_train_epochs": (["2"], 2), "gradient_accumulation_steps": (["4"], 4),
    "lr_scheduler_type": (["linear"], "linear"), "num_warmup_steps": (["9"], 9), "seed": (["11"], 11),
    "zero_stage": (["3"], 3), "dtype": (["fp32"], "fp32"), "offload": ([], True),
    "gradient_checkpointing": ([], True), "dropout": (["0.05"], 0.05), "lora_dim": (["8"], 8),
    "lora_module_name": (["layers."], "layers."), "only_optimize_lora": ([], True),
    "lora_learning_rate": (["0.01"], 0.01), "compute_fp32_loss": ([], True), "eval_interval": (["7"], 7),
    "eval_iters": (["13"], 13), "sft_only_data_path": (["s"], ["s"]), "output_dir": (["/o"], "/o"),
    "enable_tensorboard": ([], True), "tensorboard_path": (["/t"], "/t"), "print_loss": ([], True),
    "local_rank": (["1"], 1),
}


@pytest.mark.parametrize("dashed", [False, True])
def test_every_dschat_flag_in_both_spellings(dashed):
    for name, (values, expected) in FLAGS.items():
        flag = "--" + (name.replace("_", "-") if dashed else name)
        args = parse_args(REQUIRED + [flag, *values] + (["--lora_dim", "2"] if name == "only_optimize_lora" else []))
        assert getattr(args, name) == expected, name
    assert reward_args(REQUIRED + ["--num-padding-at-beginning" if dashed else "--num_padding_at_beginning", "0"]
                       ).num_padding_at_beginning == 0


def test_help_and_defaults():
    helps = {a.dest: a.help for a in reward_parser()._actions}
    assert all(helps.values())
    for name in ("num_padding_at_beginning", "compute_fp32_loss"):
        assert helps[name].startswith(NO_EFFECT) and len(helps[name]) > len(NO_EFFECT) + 20
    assert "auto (default)" in helps["dtype"] and "refused on a CPU" in helps["dtype"]
    assert "no effect there" in helps["offload"]
    assert "default: on" in {a.dest: a.help for a in build_parser()._actions}["mask_prompt"]
    args = parse_args(REQUIRED)
    assert args.dtype == choose_dtype("auto").name and args.mask_prompt and not parse_args(REQUIRED + ["--no-mask-prompt"]).mask_prompt


def test_bad_flags_are_refused():
    with pytest.raises(ValueError, match="fp16"):
        parse_args(REQUIRED + ["--dtype", "fp16"])
    with pytest.raises(ValueError, match="--only_optimize_lora"):
        parse_args(REQUIRED + ["--only_optimize_lora"])
    with pytest.raises(ValueError, match="--gradient_accumulation_steps"):
        parse_args(REQUIRED + ["--gradient_accumulation_steps", "0"])


def tiny_model() -> OPTForCausalLM:
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    ffn_dim=24, max_position_embeddings=32, word_embed_proj_dim=16))


@pytest.mark.parametrize("lora", [False, True])
def test_param_groups(lora):
    model = tiny_model()
    if lora:
        model = apply_lora(model, 4, "decoder.layers.", only_optimize_lora=False)
    groups = param_groups(model, weight_decay=0.1, lora_learning_rate=0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    plain = [names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert plain and all(n.endswith("bias") or "layer_norm" in n for n in plain)
    assert all(not n.endswith("bias") and "layer_norm" not in n for n in decayed)
    lora_group = [g for g in groups if "lr" in g]
    assert bool(lora_group) == lora and all("lora_" in names[id(p)] for g in lora_group for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_only_optimize_lora_freezes_the_rest():
    model = apply_lora(tiny_model(), 4, "self_attn", only_optimize_lora=True)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and "self_attn" in n for n in trained)
    with pytest.raises(ValueError, match="--lora_module_name"):
        apply_lora(tiny_model(), 4, "no_such_layer", only_optimize_lora=False)


def test_offloaded_optimizer_states_keep_deepspeeds_cpu_adam(monkeypatch):
    runs = [(parse_args(REQUIRED + ["--zero_stage", "3", *offload]), expected)
            for offload, expected in (([], {"torch_adam": True, "fused": True}), (["--offload"], {}))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --offload moves states off a GPU only
    for args, expected in runs:
        config = ds_config(args, world=1)
        assert {k: v for k, v in config["optimizer"]["params"].items() if k in ("torch_adam", "fused")} == expected
        assert ("offload_optimizer" in config["zero_optimization"]) == args.offload


def test_token_nll_is_the_transformers_loss():
    model = tiny_model().eval()  # no dropout: both losses see the same logits
    ids = torch.randint(1, 61, (3, 9))
    labels = ids.masked_fill(torch.rand(3, 9) < 0.3, -100)
    nll, count = token_nll(model(input_ids=ids).logits, labels)
    torch.testing.assert_close(nll / count, model(input_ids=ids, labels=labels).loss)


def test_model_errors(tmp_path):
    with pytest.raises(ValueError, match="--model_name_or_path"):
        load_config(str(tmp_path / "missing"))
    tiny_model().config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--max_seq_len = 64 exceeds the model's max_position_embeddings 32"):
        load_config(str(tmp_path), max_seq_len=64)
    assert load_config(str(tmp_path), dropout=0.3, max_seq_len=32).attention_dropout == 0.3


def roundtrip_worker(rank: int, world: int, stage: int, dtype: str, out: str, runs: list) -> dict:
    """Train 2 steps under ZeRO `stage`, save, reload with transformers alone: max output difference
    for each (causal LM "lm" or reward model "rm", LoRA rank) in runs."""
    from rlhf.distributed import init_distributed
    from rlhf.engines import build_engine
    from rlhf.hf_models import prepare_model, save_hf
    from rlhf.reward_model import load_reward_model, reward_scores
    init_distributed()
    tokenizer = example.make_tokenizer()
    base = f"{out}/base"
    if rank == 0:
        example.make_base_model(tokenizer, "tiny").save_pretrained(base)
    torch.distributed.barrier()
    diffs = {}
    for kind, lora in runs:
        args = parse_args(REQUIRED + ["--zero_stage", str(stage), "--dtype", dtype, "--lora_dim", str(lora),
                                      "--learning_rate", "0.01", "--lora_learning_rate", "0.05",
                                      "--per_device_train_batch_size", "2"])
        model = (AutoModelForCausalLM.from_pretrained(base) if kind == "lm" else
                 load_reward_model(base, load_config(base), tokenizer.pad_token_id))
        engine = build_engine(prepare_model(model, args), args, num_training_steps=4)
        # torch's fused AdamW, as on a GPU (DeepSpeed's FusedAdam would need an nvcc build there)
        assert type(engine.basic_optimizer) is torch.optim.AdamW and engine.basic_optimizer.defaults["fused"]
        torch.manual_seed(rank)
        ids, mask = torch.randint(4, len(tokenizer), (2, 11)), torch.ones(2, 11, dtype=torch.long)
        mask[1, 7:] = 0
        ids[1, 7:] = tokenizer.pad_token_id
        outputs = (lambda m: m(input_ids=ids, attention_mask=mask).logits * mask[..., None]) if kind == "lm" else \
            (lambda m: reward_scores(m, ids, mask))
        for _ in range(2):
            engine.backward(outputs(engine.module).float().pow(2).mean())
            engine.step()
        engine.eval()
        with torch.no_grad():
            before = outputs(engine.module).float()
            save_hf(engine, tokenizer, f"{out}/{kind}{lora}")
            after_save = outputs(engine.module).float()  # the training model is untouched
        cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
        with torch.no_grad():
            reloaded = outputs(cls.from_pretrained(f"{out}/{kind}{lora}").eval()).float()
        diffs[f"{kind}{lora}"] = ((reloaded - before).abs().max().item(), (after_save - before).abs().max().item(),
                                  before.abs().max().item())
    return diffs


@pytest.mark.parametrize("stage, world, dtype, runs", [
    (0, 1, "fp32", [("lm", 0), ("lm", 4), ("rm", 0), ("rm", 4)]), (3, 2, "bf16", [("lm", 4), ("rm", 0)])])
def test_checkpoint_roundtrip(tmp_path, stage, world, dtype, runs):
    for diffs in run_ranks(world, roundtrip_worker, stage, dtype, str(tmp_path), runs):
        for name, (reload_diff, untouched_diff, scale) in diffs.items():
            # merging LoRA into a bf16 weight rounds it once: a few bf16 ulps of the outputs
            tolerance = 1e-5 if dtype == "fp32" else 2e-2 * scale
            assert reload_diff <= tolerance and untouched_diff == 0, (name, reload_diff, untouched_diff)


def sft_run_worker(rank: int, world: int, root: str) -> list[dict]:
    import json

    from rlhf import sft
    example.write_data(f"{root}/data", num_records=75, seed=5)
    example.write_model(f"{root}/base", size="tiny", seed=5)
    sft.main(["--data-path", f"{root}/data", "--data-split", "1,0,0", "--data-output-path", f"{root}/cache",
              "--model-name-or-path", f"{root}/base", "--output-dir", f"{root}/out", "--max-seq-len", "64",
              "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "3", "--num-train-epochs", "2",
              "--eval-interval", "5", "--eval-iters", "1", "--enable-tensorboard", "--tensorboard-path", f"{root}/tb",
              "--print-loss", "--dtype", "fp32", "--gradient-checkpointing", "--lora-dim", "2", "--dropout", "0.0"])
    with open(f"{root}/out/log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_sft_run_log_and_accumulation_across_epochs(tmp_path):
    """68 train records = 17 micro batches per epoch; accumulating 3 gives 34 // 3 = 11 optimizer steps
    over 2 epochs (one window spans the epoch boundary), evals at 0, 5, 10 and after each epoch (5, 11)."""
    records = run_ranks(1, sft_run_worker, str(tmp_path))[0]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    evals = [r["step"] for r in records if r["kind"] == "eval"]
    assert steps == list(range(1, 12)) and evals == [0, 5, 5, 10, 11], (steps, evals)
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in records if r["kind"] == "train")
    assert os.listdir(tmp_path / "tb") and AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
