"""Step 1: supervised fine-tuning of a causal LM on prompt + chosen + EOS (python -m rlhf.sft)."""
import argparse
import math
from functools import partial

import torch
from transformers import AutoModelForCausalLM

from rlhf import cli
from rlhf.args import add, check_args, training_parser
from rlhf.data import collate_sft
from rlhf.distributed import all_sum
from rlhf.supervised import load_run, to_device, token_nll, train_and_save


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("Step 1 of RLHF: supervised fine-tuning (DeepSpeed-Chat's step-1 flags).",
                             stage=1, learning_rate=1e-3)
    add(parser, "mask_prompt", "Leave prompt tokens out of the loss (default: on, --no-mask_prompt to train "
        "on them too, as DeepSpeed-Chat does). The actor only ever writes answers to given prompts, so the "
        "loss and the eval perplexity measure the answer; the prompts' own distribution is not its job.",
        action=argparse.BooleanOptionalAction, default=True)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def sft_loss(model, batch: dict) -> torch.Tensor:
    nll, count = token_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])
    return nll / count.clamp(min=1)


@torch.no_grad()
def perplexity(engine, loader, eval_iters: int) -> dict:
    """exp of the mean token NLL over (at most eval_iters batches per rank of) the eval part, all ranks."""
    engine.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if eval_iters and i >= eval_iters:
            break
        batch = to_device(batch, engine.device)
        nll, n = token_nll(engine.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])
        total, count = total + nll.item(), count + int(n)
    engine.train()
    total, count = all_sum(total, count)
    return {"loss": total / count, "perplexity": math.exp(min(total / count, 50.0))}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, config, tokenizer, train, evalset = load_run(args, stage=1)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config, dtype=torch.float32)
    collate = partial(collate_sft, pad_token_id=tokenizer.pad_token_id, mask_prompt=args.mask_prompt)
    train_and_save(args, model.to(device), tokenizer, (train, evalset), collate, sft_loss, perplexity, "sft")


if __name__ == "__main__":
    cli.run(main)
