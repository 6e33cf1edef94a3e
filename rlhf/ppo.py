"""Step 3: PPO (or GRPO / RLOO) on the actor from step 1, scored by the reward model from step 2
(python -m rlhf.ppo). This module parses the flags (rlhf.ppo_args), loads the data and the models and
runs the loop of rlhf.ppo_loop, where each iteration is written out in the order it runs; the actor
generates through rlhf.rollout (HybridEngine with --enable_hybrid_engine).
"""
import importlib
import math
import os
from functools import partial

import torch
from torch.utils.data import DataLoader
from transformers import set_seed

from rlhf import cli
from rlhf.checkpoint import resolve_resume
from rlhf.data import build_datasets, collate_prompts
from rlhf.data.loaders import Cycle, make_loader
from rlhf.data.unsupervised import collate_blocks, text_blocks
from rlhf.distributed import init_distributed, rank, world_size
from rlhf.hf_models import save_hf
from rlhf.log import Log
from rlhf.ppo_args import iterations, parse_args, steps_per_role
from rlhf.ppo_loop import PPOConfig, Run, evaluate, new_state, resume, run_iterations
from rlhf.rlhf_engine import actor_tokenizer, build_rlhf_engine, check_checkpoint, check_models


def load_metric(spec: str | None):
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--eval_metric {spec!r}: want module:function ({e})") from None


def eval_loader(evalset, args, collate) -> DataLoader:
    count = min(len(evalset), args.eval_prompts)
    subset = torch.utils.data.Subset(evalset, range(count))
    per_rank = math.ceil(count / world_size())
    return make_loader(subset, min(per_rank, args.per_device_generation_batch_size), collate, False, args.seed)


def load_data(args, tokenizer) -> tuple[DataLoader, Cycle | None, DataLoader]:
    """(prompt loader, PTX text blocks or None, held-out prompt loader)."""
    train, evalset = build_datasets(args.data_path, args.data_split, 3, tokenizer, seed=args.seed,
                                    max_seq_len=args.max_prompt_seq_len, output_path=args.data_output_path,
                                    max_prompt_len=args.max_prompt_seq_len)
    collate = partial(collate_prompts, pad_token_id=tokenizer.pad_token_id)
    loader = make_loader(train, args.per_device_generation_batch_size, collate, True, args.seed)
    unsup = None
    if args.unsupervised_dataset_name:
        blocks = text_blocks(args.unsupervised_dataset_name, args.unsupervised_dataset_config_name, tokenizer,
                             args.max_prompt_seq_len + args.max_answer_seq_len)
        unsup = Cycle(make_loader(blocks, args.per_device_training_batch_size, collate_blocks, True, args.seed))
    if iterations(args, len(loader)) == 0:
        raise ValueError(f"no iteration: {len(train)} prompts, --per_device_generation_batch_size "
                         f"{args.per_device_generation_batch_size} x --generation_batches {args.generation_batches} "
                         f"x {world_size()} ranks")
    return loader, unsup, eval_loader(evalset, args, collate)


def save_models(models, tokenizer, output_dir: str) -> None:
    for name in ("actor", "critic", "actor_ema"):
        if getattr(models, name) is not None:
            save_hf(getattr(models, name), tokenizer, os.path.join(output_dir, name))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_checkpoint(args.actor_model_name_or_path, "actor")
    device = init_distributed()
    set_seed(args.seed)
    tokenizer = actor_tokenizer(args.actor_model_name_or_path)
    check_models(args, tokenizer)
    metric = load_metric(args.eval_metric)
    loader, unsup, evals = load_data(args, tokenizer)
    path = resolve_resume(args.resume_from, args.output_dir)
    models = build_rlhf_engine(args, tokenizer, steps_per_role(args, len(loader), unsup is not None), device)
    cfg, state, prompts = PPOConfig.from_args(args, tokenizer), new_state(models, args.seed), Cycle(loader)
    start = resume(models, path, prompts, unsup, state) if path else {"step": 0, "reward_ema": None}
    log = Log(args.output_dir, iterations(args, len(loader)), rank(),
              args.tensorboard_path if args.enable_tensorboard else None, "ppo", initial=start["step"])
    run = Run(prompts, unsup, iterations(args, len(loader)), log=log, args=args, **start,
              evaluate=lambda: evaluate(models, models.rollout, evals, cfg, state, args.seed, metric))
    run_iterations(models, models.rollout, run, cfg, state)
    save_models(models, tokenizer, args.output_dir)
    log.close()


if __name__ == "__main__":
    cli.run(main)
