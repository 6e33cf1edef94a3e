"""Random-weight checkpoints that benchmarks load like real ones (an actor, a reward model and their
tokenizer, saved with save_pretrained), and random prompts for them."""
import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from bench.zero3 import DTYPES, MODELS
from hybrid_engine.memory import return_freed_memory


def make_tokenizer(config: PretrainedConfig):
    """A word-level tokenizer over the model's vocabulary with the config's special ids: prompts are
    random ids, so only the vocabulary size and the special ids matter. Text round-trips (ids ->
    "t12 t7" -> ids) for frameworks that pass prompts and completions as text (TRL)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {config.pad_token_id: "<pad>", config.eos_token_id: "</s>"}
    vocab = {special.get(i, f"t{i}"): i for i in range(config.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", padding_side="left")


def write_checkpoints(args: argparse.Namespace, root: str) -> dict[str, str]:
    """The actor (causal LM) and the reward model (sequence classification, 1 label) with random weights
    in --dtype, each with the same tokenizer; freed before the ranks start."""
    actor_config, reward_config = MODELS[args.model](), MODELS[args.reward_model]()
    if actor_config.vocab_size != reward_config.vocab_size:
        raise SystemExit(f"--reward-model {args.reward_model} has a vocabulary of {reward_config.vocab_size}, "
                         f"--model {args.model} {actor_config.vocab_size}: they must read the same token ids")
    tokenizer = make_tokenizer(actor_config)
    reward_config.num_labels, reward_config.pad_token_id = 1, actor_config.pad_token_id
    paths = {"actor": os.path.join(root, "actor"), "reward": os.path.join(root, "reward")}
    torch.manual_seed(args.seed)
    for role, build in (("actor", lambda: AutoModelForCausalLM.from_config(actor_config, dtype=DTYPES[args.dtype])),
                        ("reward", lambda: AutoModelForSequenceClassification.from_config(
                            reward_config, dtype=DTYPES[args.dtype]))):
        model = build()
        model.save_pretrained(paths[role])  # safetensors
        tokenizer.save_pretrained(paths[role])
        del model
        return_freed_memory()
    return paths


def random_tokens(shape: tuple[int, int], tokenizer, generator: torch.Generator) -> torch.Tensor:
    """Random token ids that are neither EOS nor padding."""
    special = torch.tensor(sorted({tokenizer.eos_token_id, tokenizer.pad_token_id}))
    ids = torch.randint(0, len(tokenizer) - len(special), shape, generator=generator)
    for s in special:  # shift past each special id in turn: a uniform draw over the other ids
        ids += ids >= s
    return ids
