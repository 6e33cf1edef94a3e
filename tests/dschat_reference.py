"""DeepSpeed-Chat's side of a checkpoint, rebuilt from reading its source (DeepSpeedExamples,
applications/DeepSpeed-Chat/dschat/utils/{utils.py, model/model_utils.py, model/reward_model.py}), as the
oracle of tests/test_rlhf_dschat.py: how its step 3 loads a critic (create_critic_model with
rlhf_training=True), how it scores a sequence (RewardModel.forward_value) and how its step 2 writes one
(save_hf_format). Nothing here imports rlhf: it must not share a line with the writer it checks.

Two deviations, both forced by transformers 5 and neither touching what is loaded or computed:
no_init_weights lives in transformers.initialization now (DeepSpeed-Chat imports it from
transformers.modeling_utils), and the ZeRO-3 branch of its loader (GatheredParameters around the same
_load_from_state_dict) is left out: these tests load on one process."""
import json
import math
import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.initialization import no_init_weights


def get_tokenizer(model_name_or_path: str):
    """utils.get_tokenizer for a model that is not LLaMA: the EOS doubles as the pad token, right padding."""
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, fast_tokenizer=True)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_hf_tokenizer(model_name_or_path: str):
    """utils.load_hf_tokenizer: a local directory's tokenizer comes from its config's _name_or_path when
    the config records one (transformers 5 does not write it: the directory itself)."""
    name = model_name_or_path
    config_path = os.path.join(model_name_or_path, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            name = json.load(f).get("_name_or_path", model_name_or_path)
    return get_tokenizer(name)


class RewardModel(nn.Module):
    """reward_model.RewardModel: the base transformer as rwtransformer, a bias-free v_head."""

    def __init__(self, base_model: nn.Module, tokenizer, num_padding_at_beginning: int = 0):
        super().__init__()
        self.config = base_model.config
        self.num_padding_at_beginning = num_padding_at_beginning
        if hasattr(self.config, "word_embed_proj_dim"):  # OPT's output width
            self.v_head = nn.Linear(self.config.word_embed_proj_dim, 1, bias=False)
        else:
            self.config.n_embd = self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.n_embd
            self.v_head = nn.Linear(self.config.n_embd, 1, bias=False)
        self.rwtransformer = base_model
        self.PAD_ID = tokenizer.pad_token_id

    def forward_value(self, input_ids, attention_mask=None, return_value_only=False, prompt_length=0):
        """Values at every position; the end score of a row is the value before its first pad token at or
        after prompt_length (the last position when it has none)."""
        kwargs = {} if self.config.model_type == "llama" else {"head_mask": None}
        hidden = self.rwtransformer(input_ids, past_key_values=None, attention_mask=attention_mask,
                                    inputs_embeds=None, use_cache=False, **kwargs)[0]
        values = self.v_head(hidden).squeeze(-1)
        if return_value_only:
            return values
        assert prompt_length > 1, "prompt_length must be greater than 1 to help select the end score"
        seq_len, end_scores = input_ids.shape[1], []
        for input_id, value in zip(input_ids, values):
            c_inds = (input_id[prompt_length:] == self.PAD_ID).nonzero()
            c_ind = c_inds[0].item() + prompt_length if len(c_inds) > 0 else seq_len
            end_scores.append(value[c_ind - 1])
        return {"values": values, "chosen_end_scores": torch.stack(end_scores)}


def create_hf_model(model_class, model_name_or_path: str, tokenizer, rlhf_training: bool = False):
    """model_utils.create_hf_model: for step 3 (rlhf_training) built from the config without weights; EOS as
    the pad id; embeddings resized to 8 * ceil(len(tokenizer) / 8) rows."""
    config = AutoConfig.from_pretrained(model_name_or_path)
    if rlhf_training:
        with no_init_weights():
            model = model_class.from_config(config)
    else:
        model = model_class.from_pretrained(model_name_or_path, config=config)
    model.config.end_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.config.eos_token_id
    model.resize_token_embeddings(int(8 * math.ceil(len(tokenizer) / 8.0)))
    return model


def load_state_dict_into_model(model: nn.Module, state_dict: dict, report: dict | None = None) -> list[str]:
    """utils.load_state_dict_into_model (ZeRO stages 0-2): each module's _load_from_state_dict under its
    prefix, strict. Keys missing or unexpected, and tensors of another shape (error_msgs), are skipped
    without a word, as there; `report` only records them for a test's failure message."""
    metadata = getattr(state_dict, "_metadata", None)
    state_dict, error_msgs = state_dict.copy(), []
    if metadata is not None:
        state_dict._metadata = metadata
    report = report if report is not None else {}

    def load(module: nn.Module, prefix: str = "") -> None:
        local_metadata = {} if metadata is None else metadata.get(prefix[:-1], {})
        if any(key.startswith(prefix) for key in state_dict):
            missing, unexpected = report.setdefault("missing", []), report.setdefault("unexpected", [])
            module._load_from_state_dict(state_dict, prefix, local_metadata, True, missing, unexpected, error_msgs)
        for name, child in module._modules.items():
            if child is not None:
                load(child, prefix + name + ".")

    load(model)
    report["error_msgs"] = error_msgs
    return error_msgs


def create_critic_model(model_name_or_path: str, tokenizer, num_padding_at_beginning: int = 0,
                        report: dict | None = None) -> RewardModel:
    """model_utils.create_critic_model(rlhf_training=True): how DeepSpeed-Chat's step 3 loads its critic and
    reward model, from the directory's config.json and pytorch_model.bin."""
    critic = RewardModel(create_hf_model(AutoModel, model_name_or_path, tokenizer, rlhf_training=True), tokenizer,
                         num_padding_at_beginning=num_padding_at_beginning)
    path = os.path.join(model_name_or_path, "pytorch_model.bin")
    assert os.path.exists(path), f"Cannot find model checkpoint at {path}"
    load_state_dict_into_model(critic, torch.load(path, map_location="cpu"), report)
    return critic


def save_hf_format(model: nn.Module, tokenizer, output_dir: str) -> None:
    """utils.save_hf_format: the state dict without LoRA weights as pytorch_model.bin, the config, and
    whatever tokenizer.save_vocabulary writes. Under transformers 5 a tokenizers-backed tokenizer has no
    vocab_file and save_vocabulary raises: DeepSpeed-Chat's step 2 stops there, its weights and config
    already written, which is the directory a user then has."""
    model = getattr(model, "module", model)
    os.makedirs(output_dir, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if "lora" not in k}
    torch.save(state, os.path.join(output_dir, "pytorch_model.bin"))
    model.config.to_json_file(os.path.join(output_dir, "config.json"))
    try:
        tokenizer.save_vocabulary(output_dir)
    except AttributeError:
        pass
