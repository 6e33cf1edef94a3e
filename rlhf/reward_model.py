"""The reward model: a base transformer plus a scalar head, stored as a transformers
*ForSequenceClassification model with one label, so that from_pretrained alone scores a text.

Training and the step-3 critic read the head at every position (token_values); the reward of a
sequence is the value at its last real token (end_scores), found from the attention mask."""
import math
import os
import pickle

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel


def load_reward_model(path: str, config: PretrainedConfig, pad_token_id: int) -> PreTrainedModel:
    """From an SFT or base causal-LM checkpoint (the score head starts random) or a saved reward model."""
    config.num_labels, config.pad_token_id = 1, pad_token_id  # HF pools at the last non-pad token
    return AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)


def token_values(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head at every position: [B, L], float32 (the critic's per-token values in step 3)."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def end_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for right or left padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


def end_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each sequence: its value at the last real token, [B]."""
    return values.gather(-1, end_index(attention_mask)[:, None]).squeeze(-1)


def reward_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """End scores of whole sequences (step 3's reward)."""
    return end_scores(token_values(model, input_ids, attention_mask), attention_mask)


def divergence_window(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] mask of the positions DeepSpeed-Chat's pairwise loss averages over: from the first token
    where chosen and rejected differ to the end of the longer of the two. Rows: B chosen then B rejected.
    An identical pair (no difference at all) uses its last real token only."""
    chosen_ids, rejected_ids = input_ids.chunk(2)
    chosen_mask, rejected_mask = attention_mask.bool().chunk(2)
    differ = (chosen_ids != rejected_ids) & (chosen_mask | rejected_mask) | (chosen_mask != rejected_mask)
    end = torch.maximum(chosen_mask.sum(-1), rejected_mask.sum(-1))
    start = torch.where(differ.any(-1), differ.int().argmax(-1), end - 1)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions >= start[:, None]) & (positions < end[:, None])


def pairwise_loss(values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """-logsigmoid(v_chosen - v_rejected) averaged per pair over its divergence window, then over pairs.
    values, input_ids, attention_mask: [2B, L] right-padded as rlhf.data.collate_pairs makes them."""
    window = divergence_window(input_ids, attention_mask)
    chosen, rejected = values.float().chunk(2)
    per_token = -F.logsigmoid(chosen - rejected) * window
    return (per_token.sum(-1) / window.sum(-1)).mean()


def last_token_loss(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """-logsigmoid(r_chosen - r_rejected) on the end scores only."""
    chosen, rejected = end_scores(values.float(), attention_mask).chunk(2)
    return -F.logsigmoid(chosen - rejected).mean()


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a planted pickle cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused, the file needs unpickling arbitrary Python objects "
                         f"(only plain tensors are loaded, weights_only=True): {str(e).splitlines()[0]}") from None


DSCHAT_WEIGHTS = "pytorch_model.bin"  # the file DeepSpeed-Chat's save_hf_format writes and create_critic_model reads


def dschat_rows(tokenizer) -> int:
    """The vocabulary rows of DeepSpeed-Chat's models: create_hf_model resizes the embeddings to
    8 * ceil(len(tokenizer) / 8) before its loader copies the weights in, which skips a tensor of any other
    shape without a word."""
    return 8 * math.ceil(len(tokenizer) / 8)


def resized_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The embedding with `rows` rows: rows no token id of the tokenizer reaches are dropped, or added as the
    mean row (as transformers' resize does); the tokenizer's own rows are unchanged."""
    if rows <= weight.shape[0]:
        return weight[:rows].clone()
    return torch.cat([weight, weight.float().mean(0, keepdim=True).to(weight.dtype).expand(rows - weight.shape[0], -1)])


def embedding_key(base: PreTrainedModel) -> str:
    """The input embedding's name in the base transformer's state dict (decoder.embed_tokens.weight for OPT)."""
    return next(f"{name}.weight" for name, module in base.named_modules() if module is base.get_input_embeddings())


def dschat_state(model: PreTrainedModel, rows: int) -> dict[str, torch.Tensor]:
    """A sequence-classification model's weights under DeepSpeed-Chat's RewardModel names: the base
    transformer as rwtransformer.*, the score head as v_head.weight, the input embedding with `rows` rows."""
    embedding = f"rwtransformer.{embedding_key(model.base_model)}"
    state = {f"rwtransformer.{k}": v for k, v in model.base_model.state_dict().items()}
    state[embedding] = resized_rows(state[embedding], rows)
    state["v_head.weight"] = model.score.weight.reshape(1, -1)
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def save_dschat_reward(model: PreTrainedModel, directory: str, tokenizer) -> None:
    """pytorch_model.bin in DeepSpeed-Chat's reward-model layout, beside our transformers checkpoint (whose
    config.json both read; transformers loads model.safetensors when both files are there)."""
    torch.save(dschat_state(model, dschat_rows(tokenizer)), os.path.join(directory, DSCHAT_WEIGHTS))


def load_dschat_reward(path: str, base_config_or_dir: PretrainedConfig | str, pad_token_id: int | None = None
                       ) -> PreTrainedModel:
    """A DeepSpeed-Chat step-2 checkpoint (pytorch_model.bin: rwtransformer.* = the base model,
    v_head.weight = the head, no bias) as our sequence-classification model."""
    state = read_weights(path)
    config = base_config_or_dir
    if isinstance(config, str):
        config = AutoConfig.from_pretrained(config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id if pad_token_id is not None else config.pad_token_id
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    missing = {"v_head.weight"} - set(state)
    if missing or not any(k.startswith("rwtransformer.") for k in state):
        raise ValueError(f"{path}: not a DeepSpeed-Chat reward checkpoint (needs rwtransformer.* and v_head.weight)")
    body = {k.removeprefix("rwtransformer."): v for k, v in state.items() if k.startswith("rwtransformer.")}
    rows = body[embedding_key(model.base_model)].shape[0]
    if rows != model.get_input_embeddings().weight.shape[0]:  # DeepSpeed-Chat's rows, or ours padded to them
        model.resize_token_embeddings(rows, mean_resizing=False)
    model.base_model.load_state_dict(body)
    model.score.load_state_dict({"weight": state["v_head.weight"].reshape(model.score.weight.shape)})
    return model
