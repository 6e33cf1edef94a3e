"""transformers checkpoints in and out of the RLHF steps: configs with clear errors, dropout
overrides, PEFT LoRA and gradient checkpointing as the flags ask, and save_hf, which writes a plain
checkpoint (gathered from any ZeRO stage, LoRA merged) that transformers alone loads."""
import os
import shutil
import tempfile
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from hybrid_engine.lora import base_name, find_adapters, is_adapter_param, merged
from rlhf.distributed import rank


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # what tokenizer.save_pretrained always writes
DROPOUT_ATTRS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attn_pdrop",
                 "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")


def configure_dropout(config: PretrainedConfig, dropout: float | None) -> PretrainedConfig:
    for attr in DROPOUT_ATTRS if dropout is not None else ():
        if hasattr(config, attr):
            setattr(config, attr, dropout)
    return config


def load_config(path: str, dropout: float | None = None, max_seq_len: int | None = None) -> PretrainedConfig:
    """The model's config, with clear errors for a missing model or a sequence longer than its positions."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model_name_or_path {path!r}: no model config there ({e})") from None
    if max_seq_len:
        check_positions(config, path, "model", "--max_seq_len", max_seq_len)
    return configure_dropout(config, dropout)


def check_positions(config: PretrainedConfig, path: str, role: str, flags: str, length: int) -> None:
    """A clear error before training for sequences longer than the model has positions for."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and length > positions:
        raise ValueError(f"{flags} = {length} exceeds the {role}'s max_position_embeddings {positions} ({path})")


def apply_lora(model: PreTrainedModel, lora_dim: int, module_name: str, only_optimize_lora: bool) -> PreTrainedModel:
    """PEFT LoRA on every linear layer whose name contains module_name; the model keeps its own class
    (the adapters are injected in place), so HybridEngine and save_hf see transformers names."""
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and module_name in n]
    if not targets:
        raise ValueError(f"--lora_module_name {module_name!r} matches no linear layer of the model")
    # alpha = r: scale 1, as DeepSpeed-Chat's LoRA layers
    model = get_peft_model(model, LoraConfig(r=lora_dim, lora_alpha=lora_dim, target_modules=targets)).get_base_model()
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name) or not only_optimize_lora)
    return model


def prepare_model(model: PreTrainedModel, args) -> PreTrainedModel:
    """LoRA and gradient checkpointing as the flags ask."""
    if args.lora_dim > 0:
        model = apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)
    if args.gradient_checkpointing:
        # non-reentrant: works when the inputs of a frozen (LoRA-only) model do not require grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def has_tokenizer(path: str) -> bool:
    """Whether a tokenizer was saved with the checkpoint. DeepSpeed-Chat's save_hf_format writes only what
    tokenizer.save_vocabulary writes: under transformers 5 nothing, or at most a lone vocabulary file."""
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)


def merged_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A full copy of the weights under transformers names, LoRA merged (W + scale * B @ A); the
    training weights are not touched. Every rank must call it under ZeRO-3."""
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        state = {base_name(k): v.detach().clone() for k, v in module.state_dict().items() if not is_adapter_param(k)}
        for adapter in find_adapters(module):
            state[adapter.weight] = merged(state[adapter.weight], adapter.delta())
    return state


def save_hf(engine_or_model, tokenizer, out_dir: str,
            extra_files: Callable[[PreTrainedModel, str], None] | None = None) -> None:
    """save_pretrained of the plain model (gathered, LoRA merged) and the tokenizer, written by rank 0
    to a temporary directory renamed into place, so a crash never leaves half a checkpoint.
    extra_files(plain_model, directory) writes more files into it before the rename."""
    module = getattr(engine_or_model, "module", engine_or_model)
    state = merged_state(module)
    if rank() == 0:
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        plain = type(module)._from_config(module.config, dtype=dtype)
        plain.load_state_dict(state)
        plain.tie_weights()
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(out_dir))
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if extra_files is not None:
            extra_files(plain, tmp)
        keep = [f for f in os.listdir(out_dir)] if os.path.isdir(out_dir) else []
        for name in keep:  # logs and other files already in out_dir stay
            if not os.path.exists(os.path.join(tmp, name)):
                shutil.move(os.path.join(out_dir, name), tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
