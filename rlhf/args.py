"""Command-line flags of DeepSpeed-Chat's step-1/2 `main.py`, accepted under their own underscore
names and the dashed spelling, so that an existing shell script moves over unchanged."""
import argparse
import os
import sys

import torch
from transformers import SchedulerType

from hybrid_engine.capability import DTYPES, choose_dtype

NO_EFFECT = "Accepted for DeepSpeed-Chat scripts; no effect here: "
REFUSED = "Refused: "
NO_EFFECT_GIVEN = "no_effect_given"  # the namespace attribute: {flag: why} of the no-effect flags given
DEFAULT_DATA = ["Dahoas/rm-static"]  # DeepSpeed-Chat's default --data_path (its single-GPU scripts pass none)
DATA_HELP = ("Data sources: local dirs with train/eval .json(l), single .json(l) files, datasets.save_to_disk dirs "
             f"or hub names. Default {DEFAULT_DATA[0]} (DeepSpeed-Chat's; needs the Hugging Face hub: without it "
             "the step stops at once, saying so).")
AUTO_DTYPE = ("auto (default): bf16 where this machine multiplies bf16 natively (CPUs with AVX-512 BF16 or AMX, "
              "GPUs from sm_80), fp32 on other CPUs (e.g. AVX2 only, where bf16 runs emulated and about 6x "
              "slower), fp16 on older GPUs; the choice and its reason are printed at start. fp16 is refused on a "
              "CPU (hundreds of times slower there). Not DeepSpeed-Chat's fp16 default.")


def add(parser: argparse.ArgumentParser, name: str, help: str, **kwargs) -> None:
    """Register --name and, when it differs, --name-with-dashes for one destination."""
    flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*flags, dest=name, help=help, **kwargs)


class NoEffect(argparse.Action):
    """Stores like `store` (or `store_true` when nargs=0) and remembers that the flag was given, so that the
    step says once in its log that it has no effect here (note_no_effect)."""

    def __init__(self, option_strings: list[str], dest: str, why: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        given = dict(getattr(namespace, NO_EFFECT_GIVEN, {}))
        setattr(namespace, NO_EFFECT_GIVEN, {**given, self.option_strings[0]: self.why})


class Refused(NoEffect):
    """A DeepSpeed-Chat flag this project cannot honour: parsing stops with the reason."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.why}")


def _as_switch(kwargs: dict) -> dict:
    """action="store_true" as the nargs=0 form the NoEffect and Refused actions take."""
    if kwargs.pop("action", None) == "store_true":
        kwargs.update(nargs=0, const=True, default=kwargs.get("default", False))
    return kwargs


def add_no_effect(parser: argparse.ArgumentParser, name: str, why: str, **kwargs) -> None:
    add(parser, name, NO_EFFECT + why, action=NoEffect, why=why, **_as_switch(kwargs))


def add_refused(parser: argparse.ArgumentParser, name: str, why: str, **kwargs) -> None:
    add(parser, name, REFUSED + why, action=Refused, why=why, **_as_switch(kwargs))


def note_no_effect(args: argparse.Namespace) -> None:
    """One line per no-effect flag given, printed once (by rank 0), so the log says what was ignored."""
    if os.environ.get("RANK", "0") != "0":
        return
    for flag, why in getattr(args, NO_EFFECT_GIVEN, {}).items():
        print(f"{flag}: accepted for DeepSpeed-Chat scripts, no effect here: {why}", file=sys.stderr, flush=True)


def add_dschat_common(parser: argparse.ArgumentParser) -> None:
    """Flags every DeepSpeed-Chat step accepts: the four deepspeed.add_config_arguments adds (its scripts
    pass --deepspeed) and the end-of-text token ones."""
    for name in ("deepspeed", "deepscale"):
        add_no_effect(parser, name, "every step runs on DeepSpeed (DeepSpeed's own switch for user code; "
                      "--deepscale is its deprecated name).", action="store_true")
    for name in ("deepspeed_config", "deepscale_config"):
        add_refused(parser, name, "the DeepSpeed config is built from this command's flags (ZeRO stage, dtype, "
                    "batch sizes, offload), as DeepSpeed-Chat builds it; a config file would silently lose to them "
                    "(DeepSpeed-Chat's steps 1-2 stop at an assertion in deepspeed.initialize when given one).",
                    metavar="FILE")
    eos = ("every answer already ends with the tokenizer's own EOS token, a single token id, in every step "
           "(what adding <|endoftext|> as a special token gives DeepSpeed-Chat, whose OPT tokenizer would "
           "otherwise split it into pieces); the tokenizer is used and saved as it is.")
    add_no_effect(parser, "add_eot_token", eos, action="store_true")
    add_no_effect(parser, "eot_token", eos, default="<|endoftext|>")


def add_data(parser: argparse.ArgumentParser, stage: int) -> None:
    add(parser, "data_path", DATA_HELP, nargs="+", default=DEFAULT_DATA)
    add(parser, "data_split", "Proportions of each source for steps 1,2,3 (e.g. 2,4,4); this step takes part "
        f"{stage}.", default="2,4,4")
    add(parser, "sft_only_data_path", "Extra sources used by step 1 only.", nargs="*", default=[])
    add(parser, "data_output_path", "Directory of the tokenized-data cache (keyed by the sources' contents).",
        default="/tmp/data_files/")
    add(parser, "max_seq_len", "Maximum tokens per sequence; longer records are dropped and counted.",
        type=int, default=512)


def add_training(parser: argparse.ArgumentParser, learning_rate: float) -> None:
    add(parser, "model_name_or_path", "Local Hugging Face model directory (or hub name with internet).",
        required=True)
    add(parser, "per_device_train_batch_size", "Micro batch per rank for training.", type=int, default=16)
    add(parser, "per_device_eval_batch_size", "Micro batch per rank for evaluation.", type=int, default=16)
    add(parser, "learning_rate", "Initial learning rate (after warm-up).", type=float, default=learning_rate)
    add(parser, "weight_decay", "AdamW weight decay (never applied to biases and norm weights).",
        type=float, default=0.0)
    add(parser, "num_train_epochs", "Training epochs.", type=int, default=1)
    add(parser, "gradient_accumulation_steps", "Micro batches per optimizer step.", type=int, default=1)
    add(parser, "lr_scheduler_type", "Learning-rate schedule (transformers.get_scheduler).",
        default="cosine", choices=[s.value for s in SchedulerType])
    add(parser, "num_warmup_steps", "Linear warm-up optimizer steps.", type=int, default=0)
    add(parser, "seed", "Seed for the data split, shuffling and initialisation.", type=int, default=1234)
    add(parser, "output_dir", "Where the checkpoint, tokenizer and log.jsonl are written.", required=True)


def add_engine(parser: argparse.ArgumentParser) -> None:
    add(parser, "local_rank", "Set by the deepspeed launcher; torchrun sets LOCAL_RANK instead.",
        type=int, default=-1)
    add(parser, "zero_stage", "DeepSpeed ZeRO stage 0..3.", type=int, default=0, choices=[0, 1, 2, 3])
    add_dtype(parser, "Training dtype")
    add(parser, "offload", "ZeRO offload of optimizer state and parameters to host memory (CUDA only; "
        "on the CPU they already live in host memory, so it has no effect there).", action="store_true")
    add(parser, "gradient_checkpointing", "Recompute activations in the backward pass to save memory.",
        action="store_true")
    add(parser, "dropout", "Override the model config's dropout probabilities (default: keep them).",
        type=float, default=None)
    add_no_effect(parser, "compute_fp32_loss", "losses are always computed in fp32 from the logits.",
                  action="store_true")


def add_dtype(parser: argparse.ArgumentParser, what: str) -> None:
    add(parser, "dtype", f"{what}: {AUTO_DTYPE}", default="auto", choices=["auto", *DTYPES])


def resolve_dtype(args: argparse.Namespace, device: str | None = None) -> None:
    """--dtype auto becomes the dtype for `device` (default: the GPU if there is one, else the CPU);
    the choice (or the warning for a dtype the device only emulates) is printed once, by rank 0.
    fp16 on a CPU is refused."""
    try:
        choice = choose_dtype(args.dtype, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as e:  # its message starts with "dtype ...": name the flag
        raise ValueError(f"--{e}") from None
    args.dtype = choice.name
    if choice.message and os.environ.get("RANK", "0") == "0":
        print(choice.message, file=sys.stderr, flush=True)


def add_lora(parser: argparse.ArgumentParser) -> None:
    add(parser, "lora_dim", "LoRA rank (PEFT); 0 trains every weight.", type=int, default=0)
    add(parser, "lora_module_name", "LoRA goes on linear layers whose full module name contains this.",
        default="decoder.layers.")
    add(parser, "only_optimize_lora", "Freeze every non-LoRA weight.", action="store_true")
    add(parser, "lora_learning_rate", "Learning rate of the LoRA weights.", type=float, default=5e-4)


def add_logging(parser: argparse.ArgumentParser, stage: int) -> None:
    add(parser, "eval_interval", "Also evaluate every N optimizer steps (0: before training and after each "
        "epoch only).", type=int, default=0)
    add(parser, "eval_iters", "Evaluate on at most N eval batches per rank (0: all).", type=int, default=100)
    add(parser, "print_loss", "Print the loss of every step on every rank.", action="store_true")
    add(parser, "enable_tensorboard", "Write TensorBoard scalars.", action="store_true")
    add(parser, "tensorboard_path", "TensorBoard log directory.", default=f"step{stage}_tensorboard")


def training_parser(description: str, stage: int, learning_rate: float) -> argparse.ArgumentParser:
    """Flags shared by steps 1 and 2; the caller adds its step's own."""
    parser = argparse.ArgumentParser(description=description)
    add_training(parser, learning_rate)
    add_engine(parser)
    add_lora(parser)
    add_data(parser, stage)
    add_logging(parser, stage)
    add_dschat_common(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot work before any model is loaded; name the no-effect flags given."""
    note_no_effect(args)
    resolve_dtype(args)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "max_seq_len", "num_train_epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.only_optimize_lora and args.lora_dim <= 0:
        raise ValueError("--only_optimize_lora needs --lora_dim > 0")
