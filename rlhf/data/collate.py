"""Pad ragged records into batches: right padding for training, left padding for generation."""
from __future__ import annotations

import torch


def pad_rows(rows: list[torch.Tensor], pad_value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L], attention_mask [B, L]) with each row padded on the right (or the left) to the longest."""
    length = max(row.numel() for row in rows)
    ids = torch.full((len(rows), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - row.numel(), length) if left else slice(0, row.numel())
        ids[i, span] = row
        mask[i, span] = 1
    return ids, mask


def collate_sft(batch: list[dict], pad_token_id: int, mask_prompt: bool) -> dict:
    """Right-padded input_ids, attention_mask and labels (-100 on padding and, if mask_prompt, on the prompt)."""
    input_ids, attention_mask = pad_rows([b["input_ids"] for b in batch], pad_token_id, left=False)
    # The mask, not the token value, marks padding: pad_token_id may equal eos, which is trained.
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if mask_prompt:
        prompt_len = torch.stack([torch.as_tensor(b["prompt_len"]) for b in batch])
        labels = labels.masked_fill(torch.arange(labels.shape[1]) < prompt_len[:, None], -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(batch: list[dict], pad_token_id: int) -> dict:
    """input_ids [2B, L]: the B chosen rows then the B rejected rows, right-padded; attention_mask."""
    rows = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    input_ids, attention_mask = pad_rows(rows, pad_token_id, left=False)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def collate_prompts(batch: list[dict], pad_token_id: int) -> dict:
    """Left-padded prompt input_ids and attention_mask, so every prompt ends where generation starts."""
    input_ids, attention_mask = pad_rows([b["prompt_ids"] for b in batch], pad_token_id, left=True)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
