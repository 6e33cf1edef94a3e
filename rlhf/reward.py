"""Step 2: reward model training on preference pairs (python -m rlhf.reward)."""
import argparse
from functools import partial

import torch

from rlhf import cli
from rlhf.args import add, add_no_effect, add_refused, check_args, training_parser
from rlhf.data import collate_pairs
from rlhf.distributed import all_sum
from rlhf.supervised import load_run, to_device, train_and_save
from rlhf.reward_model import (end_scores, last_token_loss, load_reward_model, pairwise_loss, save_dschat_reward,
                               token_values)


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser("Step 2 of RLHF: reward model (DeepSpeed-Chat's step-2 flags).",
                             stage=2, learning_rate=5e-5)
    add(parser, "reward_loss", "pairwise: DeepSpeed-Chat's loss, averaged from the first token where chosen "
        "and rejected differ to the end of the longer one; last_token: on the end scores only.",
        choices=["pairwise", "last_token"], default="pairwise")
    add_no_effect(parser, "num_padding_at_beginning", "the last real token is found from the attention mask, "
                  "whatever padding the model's tokenizer puts first.", type=int, default=1)
    add(parser, "dschat_checkpoint", "Also write pytorch_model.bin in DeepSpeed-Chat's reward-model layout "
        "(rwtransformer.*, v_head.weight, embeddings of 8 * ceil(len(tokenizer) / 8) rows), so that its step 3 "
        "(create_critic_model) loads this directory as transformers does (default: on; --no-dschat_checkpoint "
        "saves the disk of a second copy of the weights).", action=argparse.BooleanOptionalAction, default=True)
    dpo = ("DPO (DeepSpeed-Chat's step2_dpo_finetuning) is not implemented here; this step trains a reward model "
           "for PPO (python -m rlhf.ppo, which also runs critic-free with --algorithm grpo or rloo).")
    for name in ("beta", "label_smoothing"):  # the flags of DeepSpeed-Chat's step2_dpo_finetuning/main.py alone
        add_refused(parser, name, dpo, type=float)
    add_refused(parser, "offload_reference_model", dpo, action="store_true")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def pair_loss(kind: str):
    def loss(model, batch: dict) -> torch.Tensor:
        values = token_values(model, batch["input_ids"], batch["attention_mask"])
        if kind == "last_token":
            return last_token_loss(values, batch["attention_mask"])
        return pairwise_loss(values, batch["input_ids"], batch["attention_mask"])
    return loss


@torch.no_grad()
def reward_accuracy(engine, loader, eval_iters: int) -> dict:
    """Share of pairs whose chosen end score is above the rejected one's, and the mean end scores."""
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct, chosen score, rejected score, pairs
    for i, batch in enumerate(loader):
        if eval_iters and i >= eval_iters:
            break
        batch = to_device(batch, engine.device)
        values = token_values(engine.module, batch["input_ids"], batch["attention_mask"])
        chosen, rejected = end_scores(values, batch["attention_mask"]).cpu().double().chunk(2)
        sums += torch.stack([(chosen > rejected).sum(), chosen.sum(), rejected.sum(), torch.tensor(len(chosen))])
    engine.train()
    correct, chosen_sum, rejected_sum, pairs = all_sum(*sums.tolist())
    return {"accuracy": correct / pairs, "chosen_score": chosen_sum / pairs, "rejected_score": rejected_sum / pairs}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, config, tokenizer, train, evalset = load_run(args, stage=2)
    model = load_reward_model(args.model_name_or_path, config, tokenizer.pad_token_id)
    collate = partial(collate_pairs, pad_token_id=tokenizer.pad_token_id)
    dschat = partial(save_dschat_reward, tokenizer=tokenizer) if args.dschat_checkpoint else None
    train_and_save(args, model.to(device), tokenizer, (train, evalset), collate, pair_loss(args.reward_loss),
                   reward_accuracy, "reward", dschat)


if __name__ == "__main__":
    cli.run(main)
