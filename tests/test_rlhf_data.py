"""rlhf.data: split arithmetic, sources, cache, bad input, collate functions."""
import json
from fractions import Fraction

import pytest
import torch

from rlhf.data import (DataError, build_datasets, collate_pairs, collate_prompts, collate_sft, parse_data_split,
                       split_parts)
from rlhf.example import make_records, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_json(path, records, jsonl=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text)
    return path


# --- split arithmetic ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 13, 101])
@pytest.mark.parametrize("data_split", ["2,4,4", "1,1,1", "0,0,1", "0.3, 0.3, 0.4", "6,0,4"])
def test_split_parts_disjoint_covering_proportional(n, data_split):
    fractions = parse_data_split(data_split)
    parts = split_parts(n, fractions, seed=5)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n))
    for part, fraction in zip(parts, fractions):
        assert abs(len(part) - n * fraction) <= 1
        assert fraction > 0 or not part
    assert parts == split_parts(n, fractions, seed=5)


def test_split_parts_is_seeded():
    fractions = parse_data_split("2,4,4")
    assert split_parts(50, fractions, 1) != split_parts(50, fractions, 2)
    assert parse_data_split("2,4,4") == [Fraction(1, 5), Fraction(2, 5), Fraction(2, 5)]


# --- collate --------------------------------------------------------------------------------------

def ids(*values):
    return torch.tensor(values, dtype=torch.long)


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_collate_sft_ragged(mask_prompt):
    batch = [{"input_ids": ids(5, 6, 7, 2), "prompt_len": torch.tensor(2)},
             {"input_ids": ids(8, 9), "prompt_len": torch.tensor(1)},
             {"input_ids": ids(3, 4, 5, 6, 2, 2), "prompt_len": torch.tensor(3)}]
    out = collate_sft(batch, pad_token_id=2, mask_prompt=mask_prompt)
    assert out["input_ids"].tolist() == [[5, 6, 7, 2, 2, 2], [8, 9, 2, 2, 2, 2], [3, 4, 5, 6, 2, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    x = -100
    expected = ([[x, x, 7, 2, x, x], [x, 9, x, x, x, x], [x, x, x, 6, 2, 2]] if mask_prompt else
                [[5, 6, 7, 2, x, x], [8, 9, x, x, x, x], [3, 4, 5, 6, 2, 2]])
    assert out["labels"].tolist() == expected


def test_collate_pairs_ragged():
    batch = [{"chosen_ids": ids(1, 2, 3), "rejected_ids": ids(1, 4)},
             {"chosen_ids": ids(5,), "rejected_ids": ids(6, 7, 8, 9)}]
    out = collate_pairs(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [1, 4, 0, 0], [6, 7, 8, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


def test_collate_prompts_left_padded():
    out = collate_prompts([{"prompt_ids": ids(4, 5)}, {"prompt_ids": ids(6, 7, 8)}, {"prompt_ids": ids(9,)}], 0)
    assert out["input_ids"].tolist() == [[0, 4, 5], [6, 7, 8], [0, 0, 9]]
    assert out["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]


# --- build_datasets -----------------------------------------------------------------------------

def test_build_datasets_stages_contract(tmp_path, tokenizer):
    records = make_records(40, seed=1)
    write_json(tmp_path / "d" / "train.json", records[:30])
    write_json(tmp_path / "d" / "eval.json", records[30:])
    args = dict(seed=3, max_seq_len=64, output_path=str(tmp_path / "cache"))
    (tr1, ev1), (tr2, ev2), (tr3, ev3) = (build_datasets([str(tmp_path / "d")], "2,4,4", s, tokenizer, **args)
                                          for s in (1, 2, 3))
    assert [len(d) for d in (tr1, ev1, tr2, ev2, tr3, ev3)] == [6, 2, 12, 4, 12, 4]
    eos = tokenizer.eos_token_id
    assert set(tr1[0]) == {"input_ids", "prompt_len"} and tr1[0]["input_ids"][-1] == eos
    assert set(tr2[0]) == {"chosen_ids", "rejected_ids"} and tr2[0]["rejected_ids"][-1] == eos
    assert set(tr3[0]) == {"prompt_ids"} and tr3[0]["prompt_ids"].dtype == torch.long
