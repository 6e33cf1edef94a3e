"""The four models of step 3 (and the actor's EMA), built as DeepSpeed-Chat's DeepSpeedRLHFEngine
builds them: a trained actor and critic, a frozen reference copy of the SFT actor and a frozen
reward model; and the actor's rollout (rlhf.rollout): `HybridEngine` with --enable_hybrid_engine,
else transformers' `generate` on the DeepSpeed module (DeepSpeed-Chat without its hybrid engine).
With --enable_hybrid_engine the frozen models are converted once into the inference layout at the
engine's TP degree and score packed sequences (hybrid_engine.scoring); without it they are DeepSpeed
inference engines (ZeRO-3 when their trained twin is) on padded batches, as in DeepSpeed-Chat.

Every check that can fail is made before the first model is loaded: a missing step-1/2 output, a
critic whose tokenizer differs from the actor's, answers longer than the models' positions."""
import argparse
import json
import os
from dataclasses import dataclass

import deepspeed
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from hybrid_engine import HybridEngine
from hybrid_engine.capability import DTYPES
from hybrid_engine.scoring import Scorer
from rlhf.engines import ZERO3_LIMITS, build_engine
from rlhf.forwards import PaddedScorer
from rlhf.distributed import rank
from rlhf.hf_models import check_positions, has_tokenizer, load_config, prepare_model
from rlhf.reward_model import load_dschat_reward, load_reward_model
from rlhf.rollout import Generate, HybridGenerate, ZeRO3Generate

ROLE_STEP = {"actor": "step 1 (python -m rlhf.sft)", "critic": "step 2 (python -m rlhf.reward)"}


@dataclass
class RLHFEngine:
    actor: nn.Module            # DeepSpeed engine
    ref: Scorer | PaddedScorer  # frozen: token_logprobs (rlhf.forwards)
    critic: nn.Module | None    # DeepSpeed engine; None for the critic-free algorithms
    reward: Scorer | PaddedScorer  # frozen: end_values
    actor_ema: nn.Module | None
    rollout: Generate           # how the actor generates
    tokenizer: object


def role_args(args: argparse.Namespace, role: str) -> argparse.Namespace:
    """The step-1/2 settings (rlhf.engines / rlhf.hf_models names) of the actor or the critic from the step-3 flags."""
    get = lambda name: getattr(args, f"{role}_{name}")  # noqa: E731
    return argparse.Namespace(
        zero_stage=get("zero_stage"), learning_rate=get("learning_rate"), weight_decay=get("weight_decay"),
        lora_dim=get("lora_dim"), lora_module_name=get("lora_module_name"), lora_learning_rate=get("lora_learning_rate"),
        gradient_checkpointing=get("gradient_checkpointing"), dropout=get("dropout"),
        only_optimize_lora=args.only_optimize_lora, dtype=args.dtype, offload=args.offload,
        per_device_train_batch_size=args.per_device_training_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, lr_scheduler_type=args.lr_scheduler_type,
        num_warmup_steps=args.num_warmup_steps)


def check_checkpoint(path: str, role: str) -> None:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--{role}_model_name_or_path {path!r}: no model there (config.json missing); "
                         f"run {ROLE_STEP[role]} first, or point the flag at its --output_dir")


def actor_tokenizer(path: str):
    if not has_tokenizer(path):
        raise ValueError(f"--actor_model_name_or_path {path!r} has no tokenizer (no tokenizer_config.json or "
                         "tokenizer.json; DeepSpeed-Chat's save_hf_format writes none under transformers 5): save the "
                         "base model's there, AutoTokenizer.from_pretrained(BASE).save_pretrained(DIR)")
    return AutoTokenizer.from_pretrained(path)


def check_vocab_file(actor_tokenizer, critic_path: str) -> None:
    """A critic saved without a tokenizer may still carry the vocab.json save_vocabulary wrote: it must map
    every token to the actor's id."""
    path = os.path.join(critic_path, "vocab.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        vocab = json.load(f)
    actor_vocab = actor_tokenizer.get_vocab()
    differ = sorted(token for token, i in vocab.items() if actor_vocab.get(token) != i)
    if differ:
        raise ValueError(f"the critic's vocabulary ({path}) differs from the actor's tokenizer "
                         f"({actor_tokenizer.name_or_path}) for {len(differ)} of {len(vocab)} tokens (e.g. "
                         f"{differ[0]!r}): the critic and reward model would read the actor's token ids as other words")


def check_tokenizers(actor_tokenizer, critic_path: str) -> None:
    """The critic and the reward model score the actor's token ids: their vocabularies must be the same.
    A critic without a tokenizer (as DeepSpeed-Chat's step 2 saves it) reads them with the actor's, as
    DeepSpeed-Chat's step 3 does."""
    if not has_tokenizer(critic_path):
        check_vocab_file(actor_tokenizer, critic_path)
        if rank() == 0:
            print(f"the critic ({critic_path}) has no tokenizer files, as DeepSpeed-Chat's step 2 saves it: it reads "
                  "the actor's token ids with the actor's tokenizer, as DeepSpeed-Chat's step 3 does", flush=True)
        return
    critic_tokenizer = AutoTokenizer.from_pretrained(critic_path)
    if critic_tokenizer.get_vocab() != actor_tokenizer.get_vocab():
        raise ValueError(f"the critic's tokenizer ({critic_path}) differs from the actor's "
                         f"({actor_tokenizer.name_or_path}): the critic and reward model would read the actor's "
                         "token ids as other words; train the reward model from the same tokenizer")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(critic_tokenizer, name) != getattr(actor_tokenizer, name):
            raise ValueError(f"the critic's tokenizer has {name} {getattr(critic_tokenizer, name)}, "
                             f"the actor's {getattr(actor_tokenizer, name)}")


def check_models(args: argparse.Namespace, tokenizer) -> None:
    """Everything about the two checkpoints that would otherwise fail mid-training."""
    check_checkpoint(args.actor_model_name_or_path, "actor")
    check_checkpoint(args.critic_model_name_or_path, "critic")
    check_tokenizers(tokenizer, args.critic_model_name_or_path)
    length = args.max_prompt_seq_len + args.max_answer_seq_len
    for role in ("actor", "critic"):
        path = getattr(args, f"{role}_model_name_or_path")
        config = AutoConfig.from_pretrained(path)
        check_positions(config, path, role, "--max_prompt_seq_len + --max_answer_seq_len", length)
        if config.vocab_size < len(tokenizer):
            raise ValueError(f"the {role} ({path}) has {config.vocab_size} embedding rows, fewer than the "
                             f"{len(tokenizer)} tokens of the actor's tokenizer")


def load_actor(args: argparse.Namespace, dtype: torch.dtype) -> PreTrainedModel:
    path = args.actor_model_name_or_path
    return AutoModelForCausalLM.from_pretrained(path, config=load_config(path, args.actor_dropout), dtype=dtype)


def load_critic(path: str, pad_token_id: int, dropout: float | None = None) -> PreTrainedModel:
    """Our sequence-classification checkpoint, or a DeepSpeed-Chat step-2 pytorch_model.bin."""
    config = load_config(path, dropout)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        dschat = os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(dschat):
            return load_dschat_reward(dschat, config, pad_token_id)
    return load_reward_model(path, config, pad_token_id)


def eval_config(zero_stage: int, dtype: str) -> dict:
    # persistence threshold 0: every parameter lives only as its partition (the EMA is updated there)
    return {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9,
            "zero_optimization": {"stage": zero_stage, "stage3_param_persistence_threshold": 0, **ZERO3_LIMITS},
            "bf16": {"enabled": dtype == "bf16"}, "fp16": {"enabled": dtype == "fp16"}}


def frozen(model: PreTrainedModel, zero_stage: int, dtype: str, device: torch.device) -> nn.Module:
    """A model that only runs forwards: partitioned like its trained twin under ZeRO-3, else plain."""
    model.requires_grad_(False).eval()
    if zero_stage != 3:
        return model.to(device, DTYPES[dtype])
    engine, *_ = deepspeed.initialize(model=model, config=eval_config(zero_stage, dtype))
    engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    return engine


def build_rlhf_engine(args: argparse.Namespace, tokenizer, steps: dict[str, int], device: torch.device) -> RLHFEngine:
    """steps: optimizer steps of the run per trained role ("actor", "critic"), the schedules' length."""
    actor_args, critic_args = role_args(args, "actor"), role_args(args, "critic")
    # In --dtype, not fp32: DeepSpeed casts a bf16/fp16 run's parameters to that dtype before partitioning
    # them and builds its fp32 master weights from the cast values (deepspeed 0.19.8,
    # DeepSpeedEngine._configure_distributed_model), so an fp32 load would only double the loading peak.
    actor = build_engine(prepare_model(load_actor(args, DTYPES[args.dtype]).to(device), actor_args), actor_args,
                         steps["actor"])
    ema = None
    if args.enable_ema:  # the actor's shape (LoRA included), so the update is tensor by tensor
        # in fp32 whatever --dtype: a bf16 EMA would round most updates of (1 - beta) * delta away
        ema = frozen(prepare_model(load_actor(args, torch.float32), actor_args), args.actor_zero_stage, "fp32", device)
    pad = tokenizer.pad_token_id
    critic = None
    if args.algorithm == "ppo":
        critic_model = load_critic(args.critic_model_name_or_path, pad, args.critic_dropout).to(device)
        critic = build_engine(prepare_model(critic_model, critic_args), critic_args, steps["critic"])
    if not args.enable_hybrid_engine:
        ref = PaddedScorer(frozen(load_actor(args, DTYPES[args.dtype]), args.actor_zero_stage, args.dtype, device))
        reward = PaddedScorer(frozen(load_critic(args.critic_model_name_or_path, pad), args.critic_zero_stage,
                                     args.dtype, device))
        return RLHFEngine(actor, ref, critic, reward, ema, ZeRO3Generate(actor), tokenizer)
    hybrid = HybridEngine(actor, tp_size=args.inference_tp_size, dtype=DTYPES[args.dtype], report=False)
    ref = inference_scorer(load_actor(args, DTYPES[args.dtype]), hybrid)
    reward = inference_scorer(load_critic(args.critic_model_name_or_path, pad), hybrid)
    rollout = HybridGenerate(hybrid, logprobs=args.old_logprobs_from == "generation")
    return RLHFEngine(actor, ref, critic, reward, ema, rollout, tokenizer)


def inference_scorer(model: PreTrainedModel, hybrid: HybridEngine) -> Scorer:
    """A frozen model in the inference layout, sliced over the hybrid engine's TP group, for good: it
    never trains, so its transformers copy is dropped once converted (no ZeRO-3 partition, no gathers)."""
    return Scorer.from_hf(model, dtype=hybrid.dtype, tp_rank=hybrid.tp_rank,
                          tp_size=hybrid.tp_size, tp_group=hybrid.tp_group, device=hybrid.device)
