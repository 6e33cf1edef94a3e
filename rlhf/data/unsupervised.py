"""Plain text for the PTX term of step 3 (--unsupervised_dataset_name): documents tokenized, joined
with EOS and cut into equal blocks, as DeepSpeed-Chat's get_unsupervised_data groups them.

Sources: a local .txt file (one document per blank-line-separated paragraph), a .json/.jsonl file of
records with a "text" field, a directory of such files, or a hub dataset name (needs internet) with
--unsupervised_dataset_config_name, whose "text" column is read."""
import json
import os

import torch
from torch.utils.data import Dataset

from rlhf.data.sources import DataError

TEXT_SUFFIXES = (".txt", ".json", ".jsonl")


class TextBlocks(Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i]}


def read_file(path: str) -> list[str]:
    with open(path) as f:
        if path.endswith(".txt"):
            return [p.strip() for p in f.read().split("\n\n") if p.strip()]
        records = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("text"), str)
                                                 for r in records):
        raise DataError(f"{path}: want a list of records with a string \"text\" field")
    return [r["text"] for r in records]


def read_texts(name: str, config_name: str | None) -> list[str]:
    if os.path.isdir(name):
        files = sorted(os.path.join(name, f) for f in os.listdir(name) if f.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"--unsupervised_dataset_name {name!r}: no {'/'.join(TEXT_SUFFIXES)} files in it")
        return [t for f in files for t in read_file(f)]
    if os.path.isfile(name):
        return read_file(name)
    from datasets import load_dataset  # hub datasets only: a slow import
    try:
        return list(load_dataset(name, config_name, split="train")["text"])
    except Exception as e:  # noqa: BLE001  (network, missing dataset, missing column: all one message)
        raise DataError(f"--unsupervised_dataset_name {name!r} (config {config_name!r}): cannot load it as a "
                        f"local file or directory or a hub dataset with a \"text\" column: {e}") from None


def text_blocks(name: str, config_name: str | None, tokenizer, block_size: int) -> TextBlocks:
    """Every document's tokens followed by EOS, concatenated and cut into [N, block_size] blocks;
    the remainder shorter than a block is dropped."""
    ids = [i for text in read_texts(name, config_name)
           for i in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    n = len(ids) // block_size
    if n == 0:
        raise DataError(f"--unsupervised_dataset_name {name!r}: {len(ids)} tokens, fewer than one block of "
                        f"{block_size} (--max_prompt_seq_len + --max_answer_seq_len)")
    return TextBlocks(torch.tensor(ids[: n * block_size]).view(n, block_size))


def collate_blocks(batch: list[dict]) -> dict:
    input_ids = torch.stack([b["input_ids"] for b in batch])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
