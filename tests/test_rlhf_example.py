"""The synthetic task: its rule, its records, its tokenizer and base model."""
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf import example
from rlhf.example import make_base_model, make_records, make_tokenizer, score

PROMPT = " Human: tell me about food Assistant:"


@pytest.mark.parametrize("answer, expected", [
    (" bread rice apple cheese soup", 1.0),                    # all on topic
    (" bread cat stuff milk", 2 / 4 - 0.1),                    # half on topic, one word short
    (" bread bread rice apple cheese", (5 - 1) / 5),          # one consecutive repeat
    (" dog cat horse fish cow", 0.0),                           # another topic's words
    (" " + " ".join(["egg", "cake"] * 7), 1.0 - 0.2),          # 14 words: two too many
    ("", -1.0),
])
def test_score_hand_written(answer, expected):
    assert score(PROMPT, answer) == pytest.approx(expected)


def test_score_reads_the_topic_from_the_prompt():
    assert score(" Human: name space things Assistant:", " star moon comet orbit rocket") == 1.0
    assert score(" Human: name tools things Assistant:", " star moon comet orbit rocket") == 0.0
    with pytest.raises(ValueError, match="names none of the topics"):
        score(" Human: hello Assistant:", " star")


def test_make_records_chosen_beats_rejected_and_is_seeded():
    records = make_records(300, seed=7)
    margins = [score(r["prompt"], r["chosen"]) - score(r["prompt"], r["rejected"]) for r in records]
    assert min(margins) >= example.MIN_MARGIN
    assert records == make_records(300, seed=7) and records != make_records(300, seed=8)
    # Imperfect writer: chosen answers are good on average, not all perfect (room for PPO).
    chosen = [score(r["prompt"], r["chosen"]) for r in records]
    assert 0.4 < sum(chosen) / len(chosen) < 0.9


def test_tokenizer_round_trip(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    record = make_records(1, seed=3)[0]
    text = record["prompt"] + record["chosen"]
    ids = loaded(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id and loaded.unk_token_id not in ids
    assert loaded.decode(ids, skip_special_tokens=True) == text.strip()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 2, "left")
    assert loaded("Human: zebra")["input_ids"][-1] == loaded.unk_token_id


def test_base_model_saves_and_reloads(tmp_path):
    tokenizer = make_tokenizer()
    model = make_base_model(tokenizer, "tiny").eval()
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 300_000
    assert model.config.vocab_size == len(tokenizer) and model.config.max_position_embeddings >= 128
    model.save_pretrained(tmp_path)
    ids = torch.tensor([tokenizer(PROMPT + " bread milk")["input_ids"]])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="size"):
        make_base_model(tokenizer, "huge")


def test_cli_all(tmp_path):
    cli = subprocess.run([sys.executable, "-m", "rlhf.example", "all", str(tmp_path), "--num_records", "50", "--size",
                          "tiny"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    import json
    train = json.loads((tmp_path / "data" / "train.json").read_text())
    eval_ = json.loads((tmp_path / "data" / "eval.json").read_text())
    assert (len(train), len(eval_)) == (45, 5)
    assert AutoTokenizer.from_pretrained(tmp_path / "base-model").eos_token == "</s>"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "base-model").config.model_type == "opt"
